"""ROI heads that crop each detection from the input image, classify the crop with the refiner
Ef and fuse its probabilities with the detector's coarse ones (paper III-IV, eq. 7)."""
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.structures import Boxes, ImageList, Instances, pairwise_iou
from torch import nn
from torchvision.ops import roi_align

from ..class_weights import check_class_weights
from ..model_input import luma_enabled, to_luma
from ..refiner_nets import build_refiner

__all__ = [
    "RefinerROIHeads",
    "SpatialPyramidROIHeads",
    "FUSION_MODES",
    "fuse_probabilities",
    "square_context_boxes",
    "jitter_boxes",
    "crop_and_resize",
]

FUSION_MODES = ("product", "geometric_mean", "fine_only")


def fuse_probabilities(
    coarse: torch.Tensor, fine: torch.Tensor, mode: str = "product"
) -> torch.Tensor:
    """Combine coarse (Ec) and fine (Ef) class distributions, both (N, C), into one (N, C).

    "product" is eq. 7's p_j * p_c renormalised (a naive-Bayes combination of two classifiers
    with a uniform prior), "geometric_mean" its square root renormalised (the same ranking of
    classes, softer probabilities), "fine_only" ignores the coarse distribution.
    """
    if mode == "fine_only":
        return fine
    if mode not in FUSION_MODES:
        raise ValueError(f"Unknown MODEL.REFINER.FUSION {mode!r}; expected one of {FUSION_MODES}")
    eps = torch.finfo(fine.dtype).tiny
    log_joint = coarse.clamp(min=eps).log() + fine.clamp(min=eps).log()
    if mode == "geometric_mean":
        log_joint = 0.5 * log_joint
    return F.softmax(log_joint, dim=1)


def square_context_boxes(boxes: torch.Tensor, context_margin: float) -> torch.Tensor:
    """Square XYXY boxes centred on ``boxes`` (N, 4), with side (1 + 2 * margin) * longer side.

    Square crops keep the nodule's aspect ratio through the resize to the refiner's square
    input: taller-than-wide shape is one of the strongest sonographic signs of malignancy,
    and stretching every box to a square would erase it.
    """
    centers = (boxes[:, :2] + boxes[:, 2:]) / 2
    sides = (boxes[:, 2:] - boxes[:, :2]).max(dim=1, keepdim=True).values
    half = (sides * (1 + 2 * context_margin)).clamp(min=1.0) / 2
    return torch.cat([centers - half, centers + half], dim=1)


def jitter_boxes(
    boxes: torch.Tensor, copies: int, scale: float, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """``copies`` jittered versions of each box of ``boxes`` (N, 4) -> (N * copies, 4), box-major.

    The centre moves and each side is rescaled by up to ``scale`` times the box's size, uniformly.
    """
    if copies <= 0 or boxes.numel() == 0:
        return boxes.new_zeros((0, 4))
    sizes = (boxes[:, 2:] - boxes[:, :2])[:, None, :]
    centers = ((boxes[:, :2] + boxes[:, 2:]) / 2)[:, None, :]
    noise = torch.rand((boxes.shape[0], copies, 4), generator=generator, device=boxes.device)
    noise = (noise * 2 - 1) * scale
    new_centers = centers + noise[..., :2] * sizes
    new_sizes = sizes * (1 + noise[..., 2:])
    jittered = torch.cat([new_centers - new_sizes / 2, new_centers + new_sizes / 2], dim=2)
    return jittered.reshape(-1, 4).to(boxes.dtype)


def crop_and_resize(
    images: torch.Tensor,
    boxes: Union[List[torch.Tensor], torch.Tensor],
    output_size: int,
    context_margin: float,
) -> torch.Tensor:
    """Square context crops of every box, resized to ``output_size``: one batched ``roi_align``.

    Args:
        images: (B, C, H, W) image tensor the boxes' coordinates refer to.
        boxes: B tensors (Ki, 4) of XYXY boxes, one per image, or a (K, 5) tensor of rois
            (image index, then the XYXY box).
        output_size: side of the square crops.
        context_margin: see :func:`square_context_boxes`.

    Returns:
        (sum Ki, C, output_size, output_size) crops, image-major. Parts outside the tensor are 0
        (the mean pixel, after normalisation). Bins average several bilinear samples when a crop
        shrinks, so downscaling does not alias.
    """
    if isinstance(boxes, torch.Tensor):  # (K, 5) rois: image index, then the box
        square = square_context_boxes(boxes[:, 1:].to(images.dtype), context_margin)
        rois = torch.cat([boxes[:, :1].to(images.dtype), square], dim=1)
    else:
        rois = [square_context_boxes(b.to(images.dtype), context_margin) for b in boxes]
    size = (output_size, output_size)
    return roi_align(images, rois, output_size=size, spatial_scale=1.0, aligned=True)


@ROI_HEADS_REGISTRY.register()
class RefinerROIHeads(nn.Module):
    """The cascade's second stage: crop, refine (Ef, any network of REFINER_REGISTRY), fuse.

    Inputs are detectron2-style proposals, as :class:`StandardROIHeads` takes them, so one path
    serves Ec (see :func:`thyroid_det.modeling.meta_arch.mccnn.detections_to_proposals`),
    detectron2's RPN or any other proposal source: ``proposal_boxes`` and ``objectness_logits``
    (the logit of P(nodule)) in the coordinates of ``images.tensor``; optionally
    ``class_probs`` (N, num_classes), the proposer's P(class | nodule), and ``pred_classes``.
    Crops are taken from the normalised input image, not from feature maps: Ef is a separate
    network (paper Fig. 2).

    Training: the crops of an image are its ground-truth boxes, ``gt_jitter_copies`` jittered
    copies of each, and the proposals that match a ground truth with IoU >= ``detection_iou``
    (labelled with that ground truth's class), at most ``batch_size_per_image`` of them,
    ground-truth boxes first. Ef has no background class, so unmatched proposals are not used.
    Loss: cross-entropy, "loss_refiner", each crop weighted by its class's ``class_weights``
    (PyTorch's weighted mean: the weights set the classes' balance, not the loss's scale).

    Inference: the ``proposals_per_image`` proposals of highest objectness are kept, with their
    boxes unchanged; the output adds ``coarse_probs`` (the proposals' class_probs; uniform when
    they carry none), ``fine_probs`` (Ef's softmax, averaged over ``test_crops`` crops) and
    ``class_probs`` (their fusion, see :func:`fuse_probabilities`; the fine distribution when
    the proposals carry no class_probs, whatever ``fusion`` says), all (N, num_classes).
    ``pred_classes`` is the argmax of the fused distribution (with ``keep_input_classes``, for
    per-class NMS where a box may come once per class, each proposal keeps its ``pred_classes``
    instead) and ``scores = sigmoid(objectness_logits) * fused[pred_class]``: the probability
    of "a nodule of this class", which ranks a class's detections for COCO AP by both how sure
    the proposer is that there is a nodule and how sure the cascade is of its type. Outputs are
    sorted by score.
    """

    @configurable
    def __init__(
        self,
        *,
        refiner: nn.Module,
        num_classes: int,
        input_size: int,
        context_margin: float,
        test_input_size: Optional[int] = None,
        fusion: str = "product",
        test_crops: int = 1,
        test_flip: bool = False,
        gt_jitter_copies: int = 4,
        gt_jitter: float = 0.1,
        detection_iou: float = 0.5,
        batch_size_per_image: int = 16,
        proposals_per_image: int = 100,
        keep_input_classes: bool = False,
        luma_format: Optional[str] = None,
        class_weights: Sequence[float] = (),
    ):
        """
        Args:
            refiner: network mapping (N, C, S, S) crops to (N, num_classes) logits (see
                refiner_nets).
            num_classes: classes of the refiner and of the proposals' class_probs.
            input_size: crop side S.
            test_input_size: crop side at inference (None: ``input_size``).
            context_margin: context around each box, as a fraction of its longer side per side.
            fusion: one of FUSION_MODES.
            test_crops: crops per box averaged at inference (the box, then jittered copies).
            test_flip: also average each test crop's mirror image (twice the refiner's cost).
            gt_jitter_copies: jittered copies of each ground-truth box in training.
            gt_jitter: jitter scale (fraction of the box's size), for training and test crops.
            detection_iou: IoU with a ground truth above which an input box is a training crop.
            batch_size_per_image: maximum training crops per image.
            proposals_per_image: proposals refined per image at inference (highest objectness
                first).
            keep_input_classes: rescore each proposal for its own ``pred_classes`` instead of
                taking the fused argmax (for a proposer with per-class NMS, such as Ec with
                MODEL.SSD.CLASS_AGNOSTIC_NMS False).
            luma_format: "BGR" or "RGB": 3-channel crops (from a meta-architecture that kept
                colour, e.g. GeneralizedRCNN) become one luma channel for a 1-channel refiner.
            class_weights: one weight per class for the training loss; empty: unweighted.
        """
        super().__init__()
        if fusion not in FUSION_MODES:
            raise ValueError(
                f"Unknown MODEL.REFINER.FUSION {fusion!r}; expected one of {FUSION_MODES}"
            )
        if test_crops < 1:
            raise ValueError(f"MODEL.REFINER.TEST_CROPS must be >= 1, got {test_crops}")
        self.refiner = refiner
        self.num_classes = num_classes
        self.input_size = input_size
        self.test_input_size = test_input_size or input_size
        self.context_margin = context_margin
        self.fusion = fusion
        self.test_crops = test_crops
        self.test_flip = test_flip
        self.gt_jitter_copies = gt_jitter_copies
        self.gt_jitter = gt_jitter
        self.batch_size_per_image = batch_size_per_image
        self.proposals_per_image = proposals_per_image
        self.keep_input_classes = keep_input_classes
        self.luma_format = luma_format
        self.class_weights = check_class_weights(
            class_weights, num_classes, "MODEL.REFINER.CLASS_WEIGHTS"
        )
        self.detection_iou = detection_iou

    @classmethod
    def from_config(
        cls, cfg, input_shape=None, *, num_classes: Optional[int] = None,
        keep_input_classes: bool = False,
    ):
        """``num_classes`` defaults to MODEL.ROI_HEADS.NUM_CLASSES; a meta-architecture whose
        proposer has its own class count (MCCNN: MODEL.SSD.NUM_CLASSES) passes it in, and
        ``keep_input_classes`` when its proposals come from per-class NMS."""
        if num_classes is None:
            num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
        return {
            "refiner": build_refiner(cfg, num_classes),
            "num_classes": num_classes,
            "input_size": cfg.MODEL.REFINER.INPUT_SIZE,
            "test_input_size": cfg.MODEL.REFINER.TEST_INPUT_SIZE or None,
            "context_margin": cfg.MODEL.REFINER.CONTEXT_MARGIN,
            "fusion": cfg.MODEL.REFINER.FUSION,
            "test_crops": cfg.MODEL.REFINER.TEST_CROPS,
            "test_flip": cfg.MODEL.REFINER.TEST_FLIP,
            "gt_jitter_copies": cfg.MODEL.REFINER.GT_JITTER_COPIES,
            "gt_jitter": cfg.MODEL.REFINER.GT_JITTER,
            "detection_iou": cfg.MODEL.REFINER.DETECTION_IOU,
            "batch_size_per_image": cfg.MODEL.REFINER.BATCH_SIZE_PER_IMAGE,
            "proposals_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "keep_input_classes": keep_input_classes,
            "luma_format": cfg.INPUT.FORMAT if luma_enabled(cfg) else None,
            "class_weights": cfg.MODEL.REFINER.CLASS_WEIGHTS,
        }

    def forward(
        self,
        images: ImageList,
        features: Dict[str, torch.Tensor],
        proposals: List[Instances],
        targets: Optional[List[Instances]] = None,
    ):
        """
        Args:
            images: the normalised network input; crops come from ``images.tensor``.
            features: unused (Ef sees pixels); kept for detectron2's ROIHeads signature.
            proposals: per image, proposals (see the class docstring).
            targets: per image, ``gt_boxes`` and ``gt_classes``; training only.

        Returns:
            (list[Instances], dict): in training the inputs and {"loss_refiner"}; at inference
            the refined detections and {}.
        """
        del features
        if self.training:
            assert targets is not None, "RefinerROIHeads needs targets in training"
            return proposals, self.losses(images, proposals, targets)
        return self.inference(images, proposals), {}

    @torch.no_grad()
    def sample_crops(self, images: ImageList, proposals: List[Instances], targets: List[Instances]):
        """Training crops of the whole batch at once: per image, its ground truths, their jittered
        copies (clipped to the image) and the inputs matched to one of its ground truths (IoU >=
        ``detection_iou``), at most ``batch_size_per_image``: ground truths first, each subset
        drawn at random. An image without ground truth gives no crop (Ef has no background).

        Returns:
            rois: (K, 5) crops as roi_align takes them: image index, then the XYXY box.
            labels: (K,) the class of each crop's ground truth.
        """
        device = images.tensor.device
        counts = [len(t) for t in targets]
        gt_boxes = cat([t.gt_boxes.tensor for t in targets]).to(device)
        if gt_boxes.numel() == 0:
            return gt_boxes.new_zeros((0, 5)), torch.zeros((0,), dtype=torch.long, device=device)
        gt_classes = cat([t.gt_classes for t in targets]).to(device)
        prop_counts = [len(p) for p in proposals]
        # image of every ground truth and every input, built on the host and sent at once
        owners = [i for ns in (counts, prop_counts) for i, n in enumerate(ns) for _ in range(n)]
        gt_image, prop_image = (
            torch.tensor(owners, dtype=torch.long)
            .to(device, non_blocking=True)
            .split([sum(counts), sum(prop_counts)])
        )
        limits = torch.tensor(
            [[w, h, w, h] for h, w in images.image_sizes], dtype=gt_boxes.dtype
        ).to(device, non_blocking=True)

        copies = self.gt_jitter_copies
        jittered = jitter_boxes(gt_boxes, copies, self.gt_jitter)
        jit_image = gt_image.repeat_interleave(copies)
        jittered = torch.minimum(jittered.clamp(min=0), limits[jit_image])  # Boxes.clip

        prop_boxes = cat([p.proposal_boxes.tensor for p in proposals]).to(device, gt_boxes.dtype)
        iou = pairwise_iou(Boxes(gt_boxes), Boxes(prop_boxes))
        iou = torch.where(gt_image[:, None] == prop_image[None, :], iou, -1.0)
        if len(prop_boxes):
            best, best_gt = iou.max(dim=0)  # the Matcher's rule: the best nodule of its image
        else:
            best, best_gt = iou.new_zeros((0,)), prop_image
        matched = best >= self.detection_iou

        boxes = cat([gt_boxes, jittered, prop_boxes])
        labels = cat([gt_classes, gt_classes.repeat_interleave(copies), gt_classes[best_gt]])
        image = cat([gt_image, jit_image, prop_image])
        valid = cat([torch.ones_like(gt_image, dtype=torch.bool)] * (1 + copies) + [matched])
        is_gt = torch.arange(len(boxes), device=device) < len(gt_boxes)
        # Per image: random keys, ground truths above the rest, the first batch_size_per_image.
        priority = torch.rand(len(boxes), device=device, dtype=torch.float64) + 2.0 * is_gt
        key = image * 8.0 + torch.where(valid, 3.0 - priority, 4.0)  # float64: image-major
        order = key.argsort()
        per_image = torch.bincount(image, minlength=len(counts))
        rank = torch.arange(len(order), device=device) - (per_image.cumsum(0) - per_image)[
            image[order]
        ]
        chosen = order[(rank < self.batch_size_per_image) & valid[order]]
        rois = cat([image[chosen, None].to(boxes.dtype), boxes[chosen]], dim=1)
        return rois, labels[chosen]

    def label_crops(self, images: ImageList, proposals: List[Instances], targets: List[Instances]):
        """:meth:`sample_crops` as per-image lists of crop boxes and of labels."""
        rois, labels = self.sample_crops(images, proposals, targets)
        image = rois[:, 0].long()
        per_image = [image == i for i in range(len(targets))]
        return [rois[m, 1:] for m in per_image], [labels[m] for m in per_image]

    def losses(self, images: ImageList, proposals: List[Instances], targets: List[Instances]):
        rois, labels = self.sample_crops(images, proposals, targets)
        if labels.numel() == 0:
            # Nothing to learn from in this batch: a zero that still reaches every parameter.
            return {"loss_refiner": sum(p.sum() for p in self.refiner.parameters()) * 0.0}
        crops = self.crops(images.tensor.detach(), rois)
        logits = self.refiner(crops)
        weight = None
        if self.class_weights:
            weight = torch.tensor(self.class_weights, dtype=logits.dtype, device=logits.device)
        return {"loss_refiner": F.cross_entropy(logits, labels.long(), weight=weight)}

    def crops(self, images: torch.Tensor, boxes) -> torch.Tensor:
        """:func:`crop_and_resize` at the refiner's size (``test_input_size`` at inference), in
        its channels (see ``luma_format``)."""
        size = self.input_size if self.training else self.test_input_size
        crops = crop_and_resize(images, boxes, size, self.context_margin)
        if self.luma_format and crops.shape[1] == 3:
            crops = to_luma(crops, self.luma_format)
        return crops

    def fine_probabilities(self, images: ImageList, boxes: List[torch.Tensor]) -> torch.Tensor:
        """Ef's class probabilities (sum Ki, num_classes) for every box, averaged over ``test_crops``
        crops (the box, then copies jittered with a fixed seed: reproducible outputs) and, with
        ``test_flip``, their mirror images."""
        num_boxes = sum(len(b) for b in boxes)
        if num_boxes == 0:
            return images.tensor.new_zeros((0, self.num_classes))
        if self.test_crops > 1:
            generator = torch.Generator(device=images.tensor.device).manual_seed(0)
            boxes = [self._with_test_jitter(b, generator) for b in boxes]
        crops = self.crops(images.tensor, boxes)
        if self.test_flip:  # each crop followed by its mirror image: still box-major
            crops = torch.stack([crops, crops.flip(-1)], dim=1).flatten(0, 1)
        probs = F.softmax(self.refiner(crops).float(), dim=1)
        per_box = self.test_crops * (2 if self.test_flip else 1)
        return probs.view(-1, per_box, probs.shape[1]).mean(dim=1)

    def _with_test_jitter(self, boxes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Each box followed by its ``test_crops - 1`` jittered copies, (K * test_crops, 4)."""
        copies = self.test_crops - 1
        jittered = jitter_boxes(boxes, copies, self.gt_jitter, generator).view(-1, copies, 4)
        return torch.cat([boxes[:, None], jittered], dim=1).view(-1, 4)

    def inference(self, images: ImageList, proposals: List[Instances]) -> List[Instances]:
        inputs = [self._select_inputs(p) for p in proposals]
        fine = self.fine_probabilities(images, [p.proposal_boxes.tensor for p in inputs])
        # One image needs no split, which keeps a traced model's detection count dynamic.
        fine = fine.split([len(p) for p in inputs]) if len(inputs) > 1 else [fine]
        return [self._fuse(p, f) for p, f in zip(inputs, fine)]

    def _select_inputs(self, instances: Instances) -> Instances:
        if len(instances) <= self.proposals_per_image:
            return instances
        order = instances.objectness_logits.argsort(descending=True)
        return instances[order[: self.proposals_per_image]]

    def _fuse(self, inputs: Instances, fine: torch.Tensor) -> Instances:
        result = Instances(inputs.image_size)
        nodule_prob = inputs.objectness_logits.to(fine.dtype).sigmoid()
        if inputs.has("class_probs"):
            coarse = inputs.class_probs.to(fine.dtype)
            fused = fuse_probabilities(coarse, fine, self.fusion)
        else:
            coarse = torch.full_like(fine, 1.0 / fine.shape[1])
            fused = fine
        if self.keep_input_classes and inputs.has("pred_classes"):
            pred_classes = inputs.pred_classes.long()
        else:
            pred_classes = fused.argmax(dim=1)
        scores = nodule_prob * fused.gather(1, pred_classes[:, None])[:, 0]
        order = scores.argsort(descending=True)
        result.pred_boxes = inputs.proposal_boxes[order]
        result.scores = scores[order]
        result.pred_classes = pred_classes[order]
        result.coarse_probs = coarse[order]
        result.fine_probs = fine[order]
        result.class_probs = fused[order]
        return result


@ROI_HEADS_REGISTRY.register()
class SpatialPyramidROIHeads(RefinerROIHeads):
    """The former name of :class:`RefinerROIHeads`, registered so that configs and checkpoints
    that name it keep loading."""
