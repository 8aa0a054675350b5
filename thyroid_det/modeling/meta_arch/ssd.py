"""Ec: the multi-scale SSD detector with nodule-prior anchors (paper section II)."""

import inspect
import logging
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, cat
from detectron2.modeling import (
    META_ARCH_REGISTRY,
    Backbone,
    build_anchor_generator,
    build_backbone,
)
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.structures import Boxes, ImageList, Instances
from torch import Tensor, nn

from ..atss_matcher import ATSSMatcher
from ..class_weights import check_class_weights
from ..model_input import luma_enabled, luma_statistic, model_input_channels, resize_to, to_luma
from .flip_test import average_probabilities, check_mirror_symmetric, mirror_dense_predictions
from .ssd_head import SSDHead
from .ssd_inference import ssd_inference_batch, ssd_inference_single_image
from .ssd_loss import (
    BOX_REG_LOSS_TYPES,
    build_anchor_matcher,
    label_anchors,
    multibox_loss,
)

__all__ = ["MultiScaleSSD", "SSDHead"]

logger = logging.getLogger(__name__)


@META_ARCH_REGISTRY.register()
class MultiScaleSSD(DenseDetector):
    """Ec of MC-CNN: SSD on multi-scale feature levels with nodule-prior anchors.

    A softmax over ``num_classes + 1`` classes (background last, detectron2's convention for
    softmax heads) is predicted for every anchor together with box deltas. Training matches
    anchors to nodules (from an IoU threshold, each nodule keeping its best anchor, or by ATSS),
    and uses smooth-L1 (or an IoU-type loss) on positives plus cross-entropy on positives and the
    hardest negatives (``neg_pos_ratio`` per positive: SSD used 3, Base-SSD.yaml 20), both
    normalised by the number of positives in the batch. Inference keeps confident anchors,
    decodes them and applies NMS.

    A detectron2 ``DenseDetector``: its ``forward`` runs preprocess -> backbone -> head, then
    :meth:`forward_training` (``ssd_losses``) or :meth:`forward_inference` (``ssd_inference``),
    then ``detector_postprocess``; the MC-CNN cascade overrides the two hooks.

    Input: images of any size in ``input_format``; with ``luma_input`` a BGR/RGB image becomes one
    luma channel, and with ``fixed_size`` it is resized to that size, both inside the model, so
    that detectron2's ``DefaultPredictor`` and the project's paths give it the same tensor.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        head: nn.Module,
        head_in_features: Sequence[str],
        anchor_generator: nn.Module,
        box2box_transform: Box2BoxTransform,
        anchor_matcher: Union[Matcher, ATSSMatcher],
        num_classes: int,
        cls_loss_type: str = "softmax_mined",
        neg_pos_ratio: float = 3.0,
        focal_loss_alpha: float = 0.25,
        focal_loss_gamma: float = 2.0,
        box_reg_loss_type: str = "smooth_l1",
        smooth_l1_beta: float = 1.0,
        box_reg_loss_weight: float = 1.0,
        class_weights: Sequence[float] = (),
        test_score_thresh: float = 0.01,
        test_topk_candidates: int = 400,
        test_nms_thresh: float = 0.45,
        class_agnostic_nms: bool = True,
        max_detections_per_image: int = 100,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        input_format: str = "L",
        luma_input: bool = False,
        fixed_size: Optional[Tuple[int, int]] = None,
        test_flip: bool = False,
    ):
        """
        Args:
            backbone: a detectron2 backbone whose outputs include ``head_in_features``.
            head: maps the list of ``head_in_features`` maps to per-level
                (N, A*(C+1), H, W) logits and (N, A*4, H, W) deltas, e.g. :class:`SSDHead`.
            head_in_features: backbone outputs that get predictions, fine to coarse.
            anchor_generator: per-level anchors; a generator whose ``forward`` takes an
                ``image_size`` (NodulePriorAnchorGenerator) is given the network-input size, others
                only the features (decided here, once).
            box2box_transform: box coding; SSD uses weights (10, 10, 5, 5).
            anchor_matcher: labels anchors 1 (foreground), 0 (background) or -1 (ignored): a
                detectron2 ``Matcher`` or an :class:`ATSSMatcher`.
            num_classes: foreground classes (2: benign, malignant).
            cls_loss_type: "softmax_mined": SSD's softmax cross-entropy over positives and hard
                negatives; "sigmoid_focal": RetinaNet's sigmoid focal loss over every anchor
                that is not ignored (the head then has no background logit).
            neg_pos_ratio: hard negatives kept per positive anchor, per image ("softmax_mined").
            focal_loss_alpha, focal_loss_gamma: the focal loss's parameters ("sigmoid_focal").
            box_reg_loss_type: "smooth_l1" on the coded deltas, or "giou", "diou", "ciou" on
                the decoded boxes (detectron2's ``_dense_box_regression_loss``).
            smooth_l1_beta: transition point of the smooth-L1 box loss.
            box_reg_loss_weight: weight of the box loss against the classification loss.
            class_weights: per foreground class, the weight of its positive anchors in the
                classification loss (empty: all 1; background always 1).
            test_score_thresh: minimum foreground probability of a kept detection.
            test_topk_candidates: candidates (over all levels) kept before NMS.
            test_nms_thresh: IoU above which NMS suppresses a box.
            class_agnostic_nms: keep only each anchor's best foreground class and run one NMS
                over all classes, so a nodule is never reported as both classes; otherwise every
                (anchor, class) pair above threshold is a candidate and NMS runs per class.
            max_detections_per_image: cap on detections returned per image.
            pixel_mean, pixel_std: per-channel input normalisation (with ``luma_input``, their
                luma-weighted values normalise the luma channel).
            input_format: image format of the inputs: "BGR", "RGB" or "L" (grayscale).
            luma_input: convert 3-channel BGR/RGB inputs to one ITU-R 601 luma channel before
                normalisation (the backbone then takes 1 channel); 1-channel inputs pass as they are.
            fixed_size: (H, W) every input is resized to before normalisation (bilinear,
                antialiased); None keeps the input's size.
            test_flip: at inference, also run the backbone and head on the mirror image and
                average the two predictions anchor by anchor (:mod:`.flip_test`): twice the
                network's cost. Needs anchors symmetric under the mirror, and unpadded batches.
        """
        if len(pixel_mean) != len(pixel_std):
            raise ValueError(f"PIXEL_MEAN {pixel_mean} and PIXEL_STD {pixel_std} differ in length")
        luma_input = bool(luma_input) and input_format in ("BGR", "RGB")
        if luma_input:
            pixel_mean = [luma_statistic(pixel_mean, input_format)]
            pixel_std = [luma_statistic(pixel_std, input_format)]
        super().__init__(
            backbone, head, list(head_in_features), pixel_mean=pixel_mean, pixel_std=pixel_std
        )
        self.luma_input = luma_input
        self.anchor_generator = anchor_generator
        self.anchors_take_image_size = (
            "image_size" in inspect.signature(anchor_generator.forward).parameters
        )
        self.box2box_transform = box2box_transform
        self.anchor_matcher = anchor_matcher
        self.num_classes = num_classes
        if cls_loss_type not in ("softmax_mined", "sigmoid_focal"):
            raise ValueError(
                f"MODEL.SSD.CLS_LOSS_TYPE {cls_loss_type!r}: expected 'softmax_mined' or "
                "'sigmoid_focal'"
            )
        self.cls_loss_type = cls_loss_type
        self.neg_pos_ratio = neg_pos_ratio
        self.focal_loss_alpha = focal_loss_alpha
        self.focal_loss_gamma = focal_loss_gamma
        if box_reg_loss_type not in BOX_REG_LOSS_TYPES:
            raise ValueError(
                f"MODEL.SSD.BBOX_REG_LOSS_TYPE {box_reg_loss_type!r}: expected one of "
                f"{BOX_REG_LOSS_TYPES}"
            )
        self.box_reg_loss_type = box_reg_loss_type
        self.smooth_l1_beta = smooth_l1_beta
        self.box_reg_loss_weight = box_reg_loss_weight
        self.class_weights = check_class_weights(class_weights, num_classes)
        self.test_score_thresh = test_score_thresh
        self.test_topk_candidates = test_topk_candidates
        self.test_nms_thresh = test_nms_thresh
        self.class_agnostic_nms = class_agnostic_nms
        self.max_detections_per_image = max_detections_per_image
        self.input_format = input_format
        self.fixed_size = tuple(fixed_size) if fixed_size else None
        self.num_logits = num_classes + (cls_loss_type == "softmax_mined")
        self.test_flip = test_flip

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg, ShapeSpec(channels=model_input_channels(cfg)))
        backbone_shape = backbone.output_shape()
        in_features = list(cfg.MODEL.SSD.IN_FEATURES)
        missing = [f for f in in_features if f not in backbone_shape]
        if missing:
            raise ValueError(
                f"MODEL.SSD.IN_FEATURES {missing} are not outputs of the backbone "
                f"{cfg.MODEL.BACKBONE.NAME}; it has {sorted(backbone_shape)}"
            )
        feature_shapes = [backbone_shape[f] for f in in_features]
        anchor_generator = build_anchor_generator(cfg, feature_shapes)
        return {
            "backbone": backbone,
            "head": SSDHead(cfg, feature_shapes, anchor_generator.num_cell_anchors),
            "head_in_features": in_features,
            "anchor_generator": anchor_generator,
            "box2box_transform": Box2BoxTransform(weights=cfg.MODEL.SSD.BBOX_REG_WEIGHTS),
            "anchor_matcher": build_anchor_matcher(cfg, anchor_generator.num_cell_anchors),
            "num_classes": cfg.MODEL.SSD.NUM_CLASSES,
            "cls_loss_type": cfg.MODEL.SSD.CLS_LOSS_TYPE,
            "neg_pos_ratio": cfg.MODEL.SSD.NEG_POS_RATIO,
            "focal_loss_alpha": cfg.MODEL.SSD.FOCAL_LOSS_ALPHA,
            "focal_loss_gamma": cfg.MODEL.SSD.FOCAL_LOSS_GAMMA,
            "box_reg_loss_type": cfg.MODEL.SSD.BBOX_REG_LOSS_TYPE,
            "smooth_l1_beta": cfg.MODEL.SSD.SMOOTH_L1_BETA,
            "box_reg_loss_weight": cfg.MODEL.SSD.BBOX_REG_LOSS_WEIGHT,
            "class_weights": cfg.MODEL.SSD.CLASS_WEIGHTS,
            "test_score_thresh": cfg.MODEL.SSD.SCORE_THRESH_TEST,
            "test_topk_candidates": cfg.MODEL.SSD.TOPK_CANDIDATES_TEST,
            "test_nms_thresh": cfg.MODEL.SSD.NMS_THRESH_TEST,
            "class_agnostic_nms": cfg.MODEL.SSD.CLASS_AGNOSTIC_NMS,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "input_format": cfg.INPUT.FORMAT,
            "luma_input": luma_enabled(cfg),
            "fixed_size": tuple(cfg.INPUT.FIXED_SIZE),
            "test_flip": cfg.MODEL.SSD.TEST_FLIP,
        }

    def forward(self, batched_inputs: List[Dict]):
        """DenseDetector's forward, on inputs put in the frame of the model's resize.

        Args:
            batched_inputs: mapper outputs, each with "image" (C, H, W); in training also
                "instances" (gt_boxes, gt_classes in the image's frame); optionally "height" and
                "width", the size to report detections in (default: the image's size).

        Returns:
            training: dict with "loss_cls" and "loss_box_reg".
            inference: per image {"instances": Instances} with pred_boxes, scores, pred_classes
            and class_probs, in the "height" x "width" frame.
        """
        if self.training and "instances" not in batched_inputs[0]:
            raise ValueError(
                f"{type(self).__name__}: training inputs need ground-truth 'instances'"
            )
        return super().forward([self._in_network_frame(x) for x in batched_inputs])

    def _in_network_frame(self, inputs: Dict) -> Dict:
        """An input whose output size defaults to its image's size and whose ground truth is
        scaled to the network-input frame when :meth:`preprocess_image` resizes the image."""
        in_height, in_width = inputs["image"].shape[-2:]
        inputs = {"height": in_height, "width": in_width, **inputs}
        if self.training and self.fixed_size and (in_height, in_width) != self.fixed_size:
            height, width = self.fixed_size
            gt = inputs["instances"]
            gt = Instances((height, width), **gt.get_fields())
            gt.gt_boxes = Boxes(gt.gt_boxes.tensor.clone())
            gt.gt_boxes.scale(width / in_width, height / in_height)
            inputs["instances"] = gt
        return inputs

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        """To luma (``luma_input``), resize to ``fixed_size``, normalise with PIXEL_MEAN/STD and
        batch; reject wrongly shaped or non-finite images.

        Images of one shape (a training batch from the mapper) go to the device as one tensor and
        are processed together: image by image, a GPU step spent more time issuing these small
        operations, and waiting on their copies, than the batch took to compute."""
        channels = self.pixel_mean.shape[0]
        accepted = (channels, 3) if self.luma_input else (channels,)
        for x in batched_inputs:
            image = x["image"]
            if image.dim() != 3 or image.shape[0] not in accepted:
                raise ValueError(
                    f"{x.get('file_name', '<input image>')}: image tensor has shape "
                    f"{tuple(image.shape)}, expected ({' or '.join(map(str, accepted))}, H, W) "
                    f"(INPUT.FORMAT={self.input_format!r})"
                )
        shapes = {tuple(x["image"].shape) for x in batched_inputs}
        divisor = self.backbone.size_divisibility
        if len(shapes) == 1 and divisor <= 1 and not torch.jit.is_tracing():
            batch = self._normalize(torch.stack([x["image"] for x in batched_inputs]))
            images = ImageList(batch, [tuple(batch.shape[-2:])] * len(batch))
        else:
            images = ImageList.from_tensors(
                [self._normalize(x["image"][None])[0] for x in batched_inputs], divisor
            )
        if any(x["image"].is_floating_point() for x in batched_inputs):
            # Integer pixels are finite; a float image may hold NaN or Inf.
            finite = torch.isfinite(images.tensor).flatten(1).all(dim=1)
            if not bool(finite.all()):
                bad = [x.get("file_name", f"image {i}") for i, x in enumerate(batched_inputs)]
                bad = [name for name, ok in zip(bad, finite.tolist()) if not ok]
                raise FloatingPointError(f"Input images contain NaN or Inf: {bad}")
        return images

    def _normalize(self, images: Tensor) -> Tensor:
        """(N, C, H, W) images of any dtype -> on the device, float, luma, ``fixed_size``,
        normalised."""
        images = images.to(self.device, torch.float32)
        if self.luma_input and images.shape[1] == 3:
            images = to_luma(images, self.input_format)
        images = resize_to(images, self.fixed_size)
        return (images - self.pixel_mean) / self.pixel_std

    def anchors(self, features: List[Tensor], images: ImageList) -> List[Boxes]:
        """Per-level anchors in the network-input frame."""
        if self.anchors_take_image_size:
            return self.anchor_generator(features, tuple(images.tensor.shape[-2:]))
        return self.anchor_generator(features)

    def dense_outputs(
        self, images: ImageList, features: List[Tensor], predictions
    ) -> Tuple[List[Boxes], List[Tensor], List[Tensor]]:
        """The head's (logits, deltas) per level as anchors, (N, Hi*Wi*Ai, C+1) logits and
        (N, Hi*Wi*Ai, 4) deltas (detectron2's transposition)."""
        pred_logits, pred_deltas = self._transpose_dense_predictions(
            predictions, [self.num_logits, 4]
        )
        return self.anchors(features, images), pred_logits, pred_deltas

    def forward_training(self, images, features, predictions, gt_instances):
        return self.ssd_losses(*self.dense_outputs(images, features, predictions), gt_instances)

    def forward_inference(self, images: ImageList, features: List[Tensor], predictions):
        anchors, pred_logits, pred_deltas = self.dense_outputs(images, features, predictions)
        if self.test_flip:
            pred_logits, pred_deltas = self.flip_averaged(
                images, features, anchors, pred_logits, pred_deltas
            )
        return self.ssd_inference(anchors, pred_logits, pred_deltas, images.image_sizes)

    def flip_averaged(
        self,
        images: ImageList,
        features: List[Tensor],
        anchors: List[Boxes],
        pred_logits: List[Tensor],
        pred_deltas: List[Tensor],
    ) -> Tuple[List[Tensor], List[Tensor]]:
        """The dense predictions averaged with those on the mirror image (``test_flip``):
        probabilities averaged, box deltas averaged with the mirror's dx negated."""
        height, width = images.tensor.shape[-2:]
        if any(tuple(size) != (height, width) for size in images.image_sizes):
            raise ValueError(
                "MODEL.SSD.TEST_FLIP needs a batch of images of one size (INPUT.FIXED_SIZE): "
                "the mirror of a padded batch is not the mirror of its images"
            )
        shapes = [tuple(f.shape[-2:]) for f in features]
        check_mirror_symmetric(shapes, anchors, width)
        mirror_features = self.backbone(images.tensor.flip(-1))
        mirror_logits, mirror_deltas = self._transpose_dense_predictions(
            self.head([mirror_features[f] for f in self.head_in_features]), [self.num_logits, 4]
        )
        mirror_logits = mirror_dense_predictions(shapes, mirror_logits)
        mirror_deltas = mirror_dense_predictions(shapes, mirror_deltas, negate_dx=True)
        sigmoid = self.cls_loss_type == "sigmoid_focal"
        logits = [average_probabilities(a, b, sigmoid) for a, b in zip(pred_logits, mirror_logits)]
        deltas = [(a + b) / 2 for a, b in zip(pred_deltas, mirror_deltas)]
        return logits, deltas

    def forward_head(
        self, images: ImageList
    ) -> Tuple[Dict[str, Tensor], List[Tensor], List[Tensor], List[Boxes]]:
        """Backbone and head on a batch, outside ``forward`` (for tools and tests).

        Returns:
            features: all backbone outputs by name.
            pred_logits: per level (N, Hi*Wi*Ai, C+1).
            pred_deltas: per level (N, Hi*Wi*Ai, 4).
            anchors: per level Boxes (Hi*Wi*Ai, 4) in the network-input frame.
        """
        features = self.backbone(images.tensor)
        level_features = [features[f] for f in self.head_in_features]
        anchors, pred_logits, pred_deltas = self.dense_outputs(
            images, level_features, self.head(level_features)
        )
        return features, pred_logits, pred_deltas, anchors

    def label_anchors(
        self, anchors: List[Boxes], gt_instances: List[Instances]
    ) -> Tuple[Tensor, Tensor]:
        """Match anchors to ground truth (:func:`label_anchors`).

        Returns:
            gt_labels: (N, R) in {-1 (ignore), 0..C-1 (class), C (background)}.
            matched_gt_boxes: (N, R, 4); meaningful only where the label is a class.
        """
        return label_anchors(anchors, gt_instances, self.anchor_matcher, self.num_classes)

    def ssd_losses(
        self,
        anchors: List[Boxes],
        pred_logits: List[Tensor],
        pred_deltas: List[Tensor],
        gt_instances: List[Instances],
    ) -> Dict[str, Tensor]:
        """SSD's multibox loss (:func:`multibox_loss`).

        Args:
            anchors: per-level anchors from :meth:`forward_head`.
            pred_logits, pred_deltas: per-level (N, Ri, C+1) and (N, Ri, 4).
            gt_instances: per image, gt_boxes and gt_classes in the network-input frame.

        Returns:
            "loss_cls": cross-entropy over positives and hard negatives, and "loss_box_reg":
            the box loss over positives, both divided by the batch's positives (at least 1).
            An image without nodules has no positives, hence no negatives, and adds nothing.
            Non-finite losses are left to detectron2's trainer, which raises on them.
        """
        gt_labels, gt_boxes = self.label_anchors(anchors, gt_instances)
        return multibox_loss(
            Boxes.cat(anchors).tensor,
            cat(pred_logits, dim=1),
            cat(pred_deltas, dim=1),
            gt_labels,
            gt_boxes,
            num_classes=self.num_classes,
            box2box_transform=self.box2box_transform,
            cls_loss_type=self.cls_loss_type,
            neg_pos_ratio=self.neg_pos_ratio,
            focal_loss_alpha=self.focal_loss_alpha,
            focal_loss_gamma=self.focal_loss_gamma,
            box_reg_loss_type=self.box_reg_loss_type,
            smooth_l1_beta=self.smooth_l1_beta,
            box_reg_loss_weight=self.box_reg_loss_weight,
            class_weights=self.class_weights,
        )

    @torch.no_grad()
    def ssd_inference(
        self,
        anchors: List[Boxes],
        pred_logits: List[Tensor],
        pred_deltas: List[Tensor],
        image_sizes: List[Tuple[int, int]],
    ) -> List[Instances]:
        """Decode, threshold, keep the top candidates and apply NMS, per image
        (:func:`ssd_inference_batch`; :func:`ssd_inference_single_image` under tracing).

        Returns:
            per image, Instances in the network-input frame with pred_boxes, scores (foreground
            probability of pred_classes), pred_classes and class_probs ((R, C) foreground
            probabilities renormalised to sum to 1: p(class | nodule)).
        """
        anchors = Boxes.cat(anchors).tensor
        fg_probs = self.foreground_probs(cat(pred_logits, dim=1))
        deltas = cat(pred_deltas, dim=1)
        options = dict(
            box2box_transform=self.box2box_transform,
            score_thresh=self.test_score_thresh,
            topk_candidates=self.test_topk_candidates,
            nms_thresh=self.test_nms_thresh,
            class_agnostic_nms=self.class_agnostic_nms,
            max_detections_per_image=self.max_detections_per_image,
        )
        if not torch.jit.is_tracing():
            # the same results, the candidates of all images handled at once, and fewer
            # values read back even for one image; a traced model keeps the single-image path,
            # which it was exported with
            sizes = [tuple(size) for size in image_sizes]
            return ssd_inference_batch(anchors, fg_probs, deltas, sizes, **options)
        return [
            ssd_inference_single_image(
                anchors, fg_probs[i], deltas[i], tuple(image_size), **options
            )
            for i, image_size in enumerate(image_sizes)
        ]

    def foreground_probs(self, logits: Tensor) -> Tensor:
        """(..., K) logits -> (..., num_classes) foreground class probabilities: the softmax's
        class columns, or one sigmoid per class under the focal loss."""
        if self.cls_loss_type == "sigmoid_focal":
            return logits.sigmoid()
        return logits.softmax(dim=-1)[..., : self.num_classes]
