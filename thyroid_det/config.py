"""Config keys that thyroid_det adds to detectron2's defaults."""
from detectron2.config import CfgNode as CN


def add_mccnn_config(cfg):
    """Add MC-CNN's keys to a detectron2 config (``get_cfg()``) in place."""
    _C = cfg

    # Images enter as detectron2's BGR, so DefaultPredictor and detectron2's tools run every
    # config; "L" (one gray channel) still loads older configs. Mean/std measured on 400 TN5000
    # training images read as grayscale, equal in the three channels.
    _C.INPUT.FORMAT = "BGR"
    _C.MODEL.PIXEL_MEAN = [58.6, 58.6, 58.6]
    _C.MODEL.PIXEL_STD = [50.2, 50.2, 50.2]
    # MultiScaleSSD and MCCNN convert BGR/RGB input to one ITU-R 601 luma channel themselves, so
    # their backbone and refiner take 1 channel and colour overlays count as their gray rendering;
    # detectron2's own meta-architectures keep len(PIXEL_MEAN) channels.
    _C.MODEL.LUMA_INPUT = True

    # ---------------------------------------------------------------------------------------
    # Data
    # ---------------------------------------------------------------------------------------
    # Extra COCO-format datasets to register before training: a list of
    # [name, json_file, image_root]; then name them in DATASETS.TRAIN / DATASETS.TEST.
    _C.DATASETS.COCO_REGISTER = []

    # SSD-style training augmentation (paper V-B), applied by thyroid_det's mapper.
    _C.INPUT.SSD_AUG = CN()
    # Turn the whole SSD augmentation pipeline on or off (off: resize + flip only).
    _C.INPUT.SSD_AUG.ENABLED = True
    # Random brightness/contrast jitter (grayscale photometric distortion).
    _C.INPUT.SSD_AUG.PHOTOMETRIC = True
    # Ranges of the brightness (intensity scale) and contrast (blend with the image mean) factors.
    _C.INPUT.SSD_AUG.BRIGHTNESS = (0.8, 1.2)
    _C.INPUT.SSD_AUG.CONTRAST = (0.5, 1.5)
    # Zoom-out: probability and the range of the canvas-to-image size ratio.
    _C.INPUT.SSD_AUG.EXPAND_PROB = 0.5
    _C.INPUT.SSD_AUG.EXPAND_RATIO = (1.0, 3.0)
    # Random crop that keeps at least one of these IoUs with some nodule (0.0: any crop).
    _C.INPUT.SSD_AUG.MIN_IOUS = (0.1, 0.3, 0.5, 0.7, 0.9)
    # Probability of keeping the whole image instead of a random crop.
    _C.INPUT.SSD_AUG.CROP_SKIP_PROB = 1.0 / 6
    # The network input size (height, width) both for training and testing: SSD is fixed-size.
    _C.INPUT.FIXED_SIZE = (512, 512)

    # ---------------------------------------------------------------------------------------
    # VGG-16 backbone (truncated for SSD) and its extra layers
    # ---------------------------------------------------------------------------------------
    _C.MODEL.VGG = CN()
    # Normalisation after each conv of VGG and the extra layers: "", "BN", "GN", "SyncBN".
    _C.MODEL.VGG.NORM = "GN"
    # Multiplier on every VGG/extra-layer channel count (1.0 = the published VGG-16).
    _C.MODEL.VGG.WIDTH_MULT = 1.0
    # Initial value of the learnt L2-normalisation scale on conv4_3.
    _C.MODEL.VGG.CONV4_3_SCALE = 20.0
    # Output channels of each extra level after fc7; each halves the resolution.
    _C.MODEL.VGG.EXTRA_CHANNELS = [512, 256, 256, 256]
    # Named outputs: a subset of "conv4_3", "fc7", "extra1".. "extraN".
    _C.MODEL.VGG.OUT_FEATURES = ["conv4_3", "fc7", "extra1", "extra2", "extra3", "extra4"]

    # ---------------------------------------------------------------------------------------
    # Nodule-prior anchors
    # ---------------------------------------------------------------------------------------
    # Per-level anchor sizes as fractions of sqrt(image area), e.g. [[0.05], [0.1], ...].
    # When non-empty they replace MODEL.ANCHOR_GENERATOR.SIZES (absolute pixels).
    _C.MODEL.ANCHOR_GENERATOR.RELATIVE_SIZES = []
    # Add SSD's extra square box of size sqrt(s_k * s_{k+1}) on each level.
    _C.MODEL.ANCHOR_GENERATOR.SSD_EXTRA_SCALE = True

    # ---------------------------------------------------------------------------------------
    # Multi-scale SSD detector (Ec)
    # ---------------------------------------------------------------------------------------
    _C.MODEL.SSD = CN()
    # Backbone outputs that get a prediction head, from fine to coarse.
    _C.MODEL.SSD.IN_FEATURES = ["conv4_3", "fc7", "extra1", "extra2", "extra3", "extra4"]
    # Foreground classes (benign, malignant).
    _C.MODEL.SSD.NUM_CLASSES = 2
    # Anchor-to-ground-truth matching: "iou" (IoU >= IOU_THRESHOLDS is foreground, and each
    # nodule keeps its best anchor) or "atss" (ATSS's adaptive threshold per nodule: among the
    # anchors at the ATSS_TOPK locations per level nearest its centre, those with IoU >= their
    # mean + std whose centres lie inside it).
    _C.MODEL.SSD.MATCHER = "iou"
    _C.MODEL.SSD.IOU_THRESHOLDS = [0.5]
    _C.MODEL.SSD.IOU_LABELS = [0, 1]
    _C.MODEL.SSD.ATSS_TOPK = 9
    # Box coding weights (dx, dy, dw, dh), as in SSD.
    _C.MODEL.SSD.BBOX_REG_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
    # Box loss over positive anchors: "smooth_l1" on the coded deltas (SSD) or "giou", "diou",
    # "ciou" on the decoded boxes (detectron2's dense box losses, as RetinaNet's
    # BBOX_REG_LOSS_TYPE).
    _C.MODEL.SSD.BBOX_REG_LOSS_TYPE = "smooth_l1"
    # Smooth-L1 beta of the box loss ("smooth_l1" only).
    _C.MODEL.SSD.SMOOTH_L1_BETA = 1.0
    # Weight of the box loss against the classification loss. An IoU-type loss per box lies in
    # [0, 2], a few times less than smooth-L1 on SSD's (10, 10, 5, 5) deltas: ATSS weights GIoU 2.
    _C.MODEL.SSD.BBOX_REG_LOSS_WEIGHT = 1.0
    # Classification loss: "softmax_mined" (SSD: softmax cross-entropy over positives and the
    # hardest negatives) or "sigmoid_focal" (RetinaNet: sigmoid focal loss over every anchor).
    _C.MODEL.SSD.CLS_LOSS_TYPE = "softmax_mined"
    # Weight of each foreground class's positive anchors in the classification loss, in
    # NUM_CLASSES order (benign, malignant); empty: all 1. Background and the mining are
    # unweighted. tn5000_train has 2420 malignant and 1014 benign nodules: mccnn.yaml's (2.4,
    # 1.0) gives both classes the same total weight (what it did: README, "Learning from scratch").
    _C.MODEL.SSD.CLASS_WEIGHTS = []
    # Hard negative mining: negatives kept per positive (SSD: 3; Base-SSD.yaml says why it uses 20).
    _C.MODEL.SSD.NEG_POS_RATIO = 3
    # Focal loss parameters and the foreground prior of the class biases ("sigmoid_focal" only).
    _C.MODEL.SSD.FOCAL_LOSS_ALPHA = 0.25
    _C.MODEL.SSD.FOCAL_LOSS_GAMMA = 2.0
    _C.MODEL.SSD.PRIOR_PROB = 0.01
    # Test-time flip: at inference Ec also sees the mirror image, and its predictions are
    # averaged with the image's anchor by anchor before NMS (probabilities and box deltas);
    # twice Ec's cost. Needs INPUT.FIXED_SIZE and anchors centred in their cells.
    _C.MODEL.SSD.TEST_FLIP = False
    # Inference: minimum foreground score, candidates kept before NMS, NMS IoU.
    _C.MODEL.SSD.SCORE_THRESH_TEST = 0.01
    _C.MODEL.SSD.TOPK_CANDIDATES_TEST = 400
    _C.MODEL.SSD.NMS_THRESH_TEST = 0.45
    # NMS per class, as SSD: a nodule may be reported once per class, so per-class AP ranks
    # every nodule under both classes. True: one box per nodule with its most likely class
    # (docs/experiments.md, "One box per nodule").
    _C.MODEL.SSD.CLASS_AGNOSTIC_NMS = False

    # ---------------------------------------------------------------------------------------
    # Refiner (Ef) network and its ROI heads
    # ---------------------------------------------------------------------------------------
    _C.MODEL.REFINER = CN()
    # Network from REFINER_REGISTRY: "AlexNetSPConv5" (paper's best), "AlexNetSPPool5",
    # "AlexNet", "GoogLeNet".
    _C.MODEL.REFINER.NAME = "AlexNetSPConv5"
    # Side of the square crop fed to the refiner, in pixels.
    _C.MODEL.REFINER.INPUT_SIZE = 224
    # Crop side at inference; 0 = INPUT_SIZE. The refiners end in a spatial pyramid or an
    # adaptive pool, so a smaller test crop runs the same weights at a lower cost (README, Speed).
    _C.MODEL.REFINER.TEST_INPUT_SIZE = 0
    # Spatial pyramid kernel sizes (pooling and convolution), one per level.
    _C.MODEL.REFINER.PYRAMID_LEVELS = [1, 3, 5]
    # Width of the refiner's fully connected layers.
    _C.MODEL.REFINER.FC_DIM = 4096
    # Multiplier on the AlexNet refiners' conv channels (1.0 = AlexNet); GoogLeNet ignores it.
    _C.MODEL.REFINER.WIDTH_MULT = 1.0
    # Dropout before each fully connected layer.
    _C.MODEL.REFINER.DROPOUT = 0.5
    # Normalisation in the refiner's conv layers: "", "BN", "GN".
    _C.MODEL.REFINER.NORM = "BN"
    # Context kept around each box, as a fraction of its longer side on each side; crops are
    # square so the nodule's aspect ratio (taller-than-wide) survives the resize.
    _C.MODEL.REFINER.CONTEXT_MARGIN = 0.2
    # How fine probabilities combine with coarse ones: "product" (eq. 7, renormalised),
    # "geometric_mean" or "fine_only".
    _C.MODEL.REFINER.FUSION = "product"
    # Crops per box averaged at test time (1 = the box itself; more add jittered crops).
    _C.MODEL.REFINER.TEST_CROPS = 1
    # Average each test crop with its mirror image as well; twice the refiner's cost.
    _C.MODEL.REFINER.TEST_FLIP = False
    # Training: jittered copies of each ground-truth box added to the crops, and the jitter
    # scale (fraction of box size) for those copies.
    _C.MODEL.REFINER.GT_JITTER_COPIES = 4
    _C.MODEL.REFINER.GT_JITTER = 0.1
    # Training: detections with IoU >= this against a ground truth are used as its crops.
    _C.MODEL.REFINER.DETECTION_IOU = 0.5
    # Training: at most this many crops per image.
    _C.MODEL.REFINER.BATCH_SIZE_PER_IMAGE = 16
    # Training: weight of each class's crops in the refiner's cross-entropy, in NUM_CLASSES order
    # (benign, malignant); empty: all 1. A weighted mean, so only the ratio matters (what it
    # did: docs/experiments.md, "Weighting the refiner's classes").
    _C.MODEL.REFINER.CLASS_WEIGHTS = []

    # ---------------------------------------------------------------------------------------
    # The MC-CNN cascade
    # ---------------------------------------------------------------------------------------
    _C.MODEL.MCCNN = CN()
    # "sequential" (algorithm 2: train Ec, then freeze it and train Ef) or "joint" (eq. 8).
    _C.MODEL.MCCNN.SCHEDULE = "sequential"
    # Sequential schedule: iterations spent on Ec before it is frozen and Ef trains.
    _C.MODEL.MCCNN.DETECTOR_ITERS = 1000
    # Joint schedule: weight of the refiner loss added to Ec's losses.
    _C.MODEL.MCCNN.REFINER_LOSS_WEIGHT = 1.0

    # ---------------------------------------------------------------------------------------
    # Training
    # ---------------------------------------------------------------------------------------
    # "SGD" (detectron2's, with SOLVER.MOMENTUM) or "AdamW"; both take detectron2's parameter
    # groups and SOLVER.CLIP_GRADIENTS. With AdamW, SOLVER.WEIGHT_DECAY is its decoupled weight
    # decay (AdamW recipes use about 0.05, not SGD's 1e-4 to 5e-4).
    _C.SOLVER.OPTIMIZER = "SGD"
    # AdamW's (beta1, beta2): decay of its running gradient mean and squared-gradient mean.
    _C.SOLVER.ADAMW_BETAS = (0.9, 0.999)
    # Exponential moving average of the weights; the average is what evaluation and
    # model_final.pth hold. A periodic checkpoint keeps the step's own weights as its model (to
    # resume) and the average beside them, which inference (evaluate.py, predict.py,
    # --eval-only) loads. DECAY: weight of the old average per step (window ~1 / (1 - DECAY)).
    _C.SOLVER.EMA = CN()
    _C.SOLVER.EMA.ENABLED = False
    _C.SOLVER.EMA.DECAY = 0.999
    # Fit the schedule to a time budget (engine/budget.py). Before training, time
    # CALIBRATION_ITERS steps (after a few unmeasured), predict the training minutes as MAX_ITER
    # times their mean step raised by MARGIN, and when they exceed MINUTES shrink
    # SOLVER.MAX_ITER, SOLVER.STEPS, MODEL.MCCNN.DETECTOR_ITERS, TEST.EVAL_PERIOD and
    # SOLVER.CHECKPOINT_PERIOD by one factor to fit. Never lengthens a schedule; the fit is saved
    # as OUTPUT_DIR/time_budget.json and reused by --resume. MINUTES (whole minutes; 0: off)
    # counts training steps only, as progress/train_minutes does, not the evaluations or the
    # timing itself.
    _C.SOLVER.TIME_BUDGET = CN()
    _C.SOLVER.TIME_BUDGET.MINUTES = 0
    # Steps timed; their mean is the step time (about a minute of a 2-core CPU at 30).
    _C.SOLVER.TIME_BUDGET.CALIBRATION_ITERS = 30
    # The timed mean is raised by this fraction before the fit: on this project's 2-core machines
    # the run's Ec steps averaged 0.4-9% above the 30 timed ones (0.895 s timed against 0.899 in
    # run 28, 0.811 against 0.879 in run 27; docs/experiments.md, "A time budget").
    _C.SOLVER.TIME_BUDGET.MARGIN = 0.1

    # Images per inference call when evaluating (train_net.py's evaluations, --eval-only and
    # tools/evaluate.py), per process. 1 is detectron2's and the papers' convention for seconds
    # per image. On a GPU a larger batch issues fewer, larger operations for the same detections
    # (to rounding: the SSD mapper gives every test image INPUT.FIXED_SIZE, so nothing is padded).
    # evaluate.py's seconds per image are then each call's time over its images; it records the
    # batch beside them.
    _C.TEST.IMS_PER_BATCH = 1

    # ---------------------------------------------------------------------------------------
    # Clinical evaluation
    # ---------------------------------------------------------------------------------------
    _C.TEST.NODULE_EVAL = CN()
    # IoU at which a detection finds a ground-truth nodule.
    _C.TEST.NODULE_EVAL.IOU = 0.5
    # Nodule size groups: upper edges of sqrt(box area) in original-image pixels
    # (small < first edge <= middle < second edge <= large). Default: terciles of TN5000's 3956 boxes.
    _C.TEST.NODULE_EVAL.SIZE_EDGES = [89.0, 139.0]
    # Bootstrap resamples for the ROC AUC 95% interval.
    _C.TEST.NODULE_EVAL.BOOTSTRAP = 1000
    # Per-record metadata fields to break metrics down by (e.g. "age_group").
    _C.TEST.NODULE_EVAL.GROUP_BY = []
    # Size groups in millimetres (equivalent diameter sqrt(width * height) of the box), used
    # instead of SIZE_EDGES when every evaluated image is physically calibrated (DICOM):
    # small < 10 mm <= middle < 20 mm <= large (1 and 2 cm, as nodules are reported clinically).
    _C.TEST.NODULE_EVAL.SIZE_EDGES_MM = [10.0, 20.0]
    # Equal-width probability bins of the expected calibration error and reliability diagram.
    _C.TEST.NODULE_EVAL.CALIBRATION_BINS = 10
    # A malignant-probability threshold fixed beforehand (e.g. on a validation run, see
    # tools/evaluate.py --threshold-from); >= 0 adds *_fixed metrics with bootstrap intervals.
    _C.TEST.NODULE_EVAL.FIXED_THRESHOLD = -1.0

    # Temperature applied to the malignant probability at inference (tools/fit_temperature.py
    # fits it on a validation set): 0 takes the checkpoint's "malignancy_temperature" entry when
    # it has one, else none; > 0 overrides it (1.0: none).
    _C.MODEL.MALIGNANCY_TEMPERATURE = 0.0
