"""MC-CNN: the multi-scale SSD detector Ec cascaded with the spatial pyramid refiner Ef
(paper Fig. 2, section IV, algorithm 2)."""
import logging
from typing import List

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.structures import Instances
from torch import nn

from .ssd import MultiScaleSSD

__all__ = ["MCCNN", "detections_to_proposals"]

logger = logging.getLogger(__name__)


def detections_to_proposals(detections: List[Instances]) -> List[Instances]:
    """Ec's detections as detectron2-style proposals for the ROI heads: ``proposal_boxes``,
    ``objectness_logits`` (the logit of P(nodule)), ``class_probs`` (P(class | nodule)) and
    ``pred_classes``.

    Ec scores a detection P(nodule) * P(class | nodule) (:meth:`MultiScaleSSD.ssd_inference`),
    so P(nodule) is its score over the class probability of its class (at most 1: under the
    sigmoid focal loss the per-class probabilities need not sum to 1).
    """
    proposals = []
    for det in detections:
        class_conf = det.class_probs.gather(1, det.pred_classes.long()[:, None])[:, 0]
        nodule_prob = (det.scores / class_conf.clamp(min=1e-12)).clamp(max=1.0)
        proposals.append(
            Instances(
                det.image_size,
                proposal_boxes=det.pred_boxes,
                objectness_logits=torch.logit(nodule_prob),
                class_probs=det.class_probs,
                pred_classes=det.pred_classes,
            )
        )
    return proposals


@META_ARCH_REGISTRY.register()
class MCCNN(MultiScaleSSD):
    """Ec (:class:`MultiScaleSSD`) followed by ROI heads that crop its detections from the input
    image and refine their class (:class:`RefinerROIHeads`), fed through
    :func:`detections_to_proposals`.

    Training schedules:

    * "sequential" (algorithm 2): stage "detector" trains Ec alone (Ef is not run: it would
      cost a refiner pass per step for a loss that is thrown away); stage "refiner" freezes Ec
      (``requires_grad`` off, Ec in eval mode so its norm layers use running statistics, no
      graph kept through it) and trains Ef on crops of Ec's detections and jittered ground truth.
    * "joint" (eq. 8): every step sums Ec's losses and ``refiner_loss_weight`` times Ef's. The
      detections that are cropped are computed without gradient, and crops are pixels, so Ef's
      loss does not reach Ec.

    The stage is set from outside with :meth:`set_stage`, by
    :class:`thyroid_det.engine.hooks.CascadeStageHook` from the trainer's iteration
    (:meth:`stage_for_iteration`), so a resumed run lands in the right stage. A freshly built
    model is in stage "detector" (sequential) or "joint", with every parameter trainable, so
    an optimizer built from it covers both networks. Inference always runs the whole cascade;
    a :class:`MultiScaleSSD` config gives Ec alone. Under DistributedDataParallel the sequential
    schedule needs ``find_unused_parameters=True``: each stage leaves one network without
    gradients.
    """

    SCHEDULES = ("sequential", "joint")
    STAGES = ("detector", "refiner", "joint")

    @configurable
    def __init__(
        self,
        *,
        roi_heads: nn.Module,
        schedule: str = "sequential",
        detector_iters: int = 0,
        refiner_loss_weight: float = 1.0,
        **kwargs,
    ):
        """
        Args:
            roi_heads: the second stage; called as ``roi_heads(images, features, proposals,
                targets)`` and returning (instances, losses), e.g. RefinerROIHeads.
            schedule: "sequential" or "joint".
            detector_iters: sequential schedule: iterations of stage "detector" before "refiner".
            refiner_loss_weight: joint schedule: weight of the refiner's losses.
            kwargs: arguments of :class:`MultiScaleSSD`.
        """
        super().__init__(**kwargs)
        if schedule not in self.SCHEDULES:
            raise ValueError(
                f"Unknown MODEL.MCCNN.SCHEDULE {schedule!r}; expected one of {self.SCHEDULES}"
            )
        self.roi_heads = roi_heads
        self.schedule = schedule
        self.detector_iters = detector_iters
        self.refiner_loss_weight = refiner_loss_weight
        self.stage = "joint" if schedule == "joint" else "detector"
        self._frozen_params: List[nn.Parameter] = []
        # Inference runs the refiner; the trainer turns it off to evaluate Ec alone while the
        # sequential schedule has not trained the refiner yet.
        self.refine = True

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        # Ec proposes: the heads take its class count and, with per-class NMS, its classes.
        roi_heads = ROI_HEADS_REGISTRY.get(cfg.MODEL.ROI_HEADS.NAME)(
            cfg,
            ret["backbone"].output_shape(),
            num_classes=cfg.MODEL.SSD.NUM_CLASSES,
            keep_input_classes=not cfg.MODEL.SSD.CLASS_AGNOSTIC_NMS,
        )
        ret.update(
            {
                "roi_heads": roi_heads,
                "schedule": cfg.MODEL.MCCNN.SCHEDULE,
                "detector_iters": cfg.MODEL.MCCNN.DETECTOR_ITERS,
                "refiner_loss_weight": cfg.MODEL.MCCNN.REFINER_LOSS_WEIGHT,
            }
        )
        return ret

    def detector_modules(self) -> List[nn.Module]:
        """Ec's modules: everything but the ROI heads."""
        return [m for name, m in self.named_children() if name != "roi_heads"]

    def stage_for_iteration(self, iteration: int) -> str:
        """The stage the schedule prescribes at a (0-based) training iteration."""
        if self.schedule == "joint":
            return "joint"
        return "detector" if iteration < self.detector_iters else "refiner"

    def set_stage(self, stage: str):
        """Switch to "detector", "refiner" (Ec frozen) or "joint"."""
        if stage not in self.STAGES:
            raise ValueError(f"Unknown MC-CNN stage {stage!r}; expected one of {self.STAGES}")
        if stage == self.stage:
            return
        if stage == "refiner":
            self._frozen_params = [
                p for m in self.detector_modules() for p in m.parameters() if p.requires_grad
            ]
            for p in self._frozen_params:
                p.requires_grad_(False)
                p.grad = None
        else:
            for p in self._frozen_params:
                p.requires_grad_(True)
            self._frozen_params = []
        logger.info(f"MC-CNN: stage {self.stage!r} -> {stage!r}")
        self.stage = stage
        self.train(self.training)

    def train(self, mode: bool = True):
        """As nn.Module.train, but a frozen Ec stays in eval mode (its norm statistics fixed)."""
        super().train(mode)
        if self.stage == "refiner":
            for m in self.detector_modules():
                m.train(False)
        return self

    def forward_training(self, images, features, predictions, gt_instances):
        """The losses of the current stage: "loss_cls" and "loss_box_reg" (Ec), "loss_refiner"
        (Ef). In stage "refiner" Ec's parameters are frozen, so no graph is kept through it."""
        anchors, pred_logits, pred_deltas = self.dense_outputs(images, features, predictions)
        losses = {}
        if self.stage != "refiner":
            losses.update(self.ssd_losses(anchors, pred_logits, pred_deltas, gt_instances))
        if self.stage != "detector":
            detections = self.ssd_inference(anchors, pred_logits, pred_deltas, images.image_sizes)
            proposals = detections_to_proposals(detections)
            _, refiner_losses = self.roi_heads(images, features, proposals, gt_instances)
            weight = self.refiner_loss_weight if self.stage == "joint" else 1.0
            losses.update({k: v * weight for k, v in refiner_losses.items()})
        return losses

    def forward_inference(self, images, features, predictions):
        """The whole cascade: Ec's detections refined and rescored by the ROI heads (Ec's own
        detections when ``refine`` is off). Outputs add class_probs (fused), coarse_probs and
        fine_probs to Ec's fields."""
        detections = super().forward_inference(images, features, predictions)
        if not self.refine:
            return detections
        results, _ = self.roi_heads(images, features, detections_to_proposals(detections))
        return results
