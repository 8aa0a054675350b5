"""The MC-CNN cascade's training schedule (the stage hook and the two-stage learning rate), and
the model that hooks work on, unwrapped from its parallel wrapper."""
import logging

from detectron2.engine import HookBase
from detectron2.solver import LRMultiplier, WarmupParamScheduler, build_lr_scheduler
from fvcore.common.param_scheduler import (
    CompositeParamScheduler,
    CosineParamScheduler,
    MultiStepParamScheduler,
)
from torch.nn.parallel import DataParallel, DistributedDataParallel

__all__ = ["CascadeStageHook", "build_cascade_lr_scheduler", "unwrap_model"]

logger = logging.getLogger(__name__)


def unwrap_model(model):
    """The model a hook or trainer works on: ``model`` without its (Distributed)DataParallel
    wrapper, whose ``module`` holds the stages, the weights and the state dict's own keys."""
    if isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    return model


class CascadeStageHook(HookBase):
    """Before every step, puts the MC-CNN cascade in the stage its schedule prescribes for the
    trainer's current iteration (``model.set_stage(model.stage_for_iteration(trainer.iter))``).

    Deriving the stage from the iteration, rather than switching once, makes ``--resume`` land
    in the right stage on either side of MODEL.MCCNN.DETECTOR_ITERS. Register it before hooks
    that read the model's state at the start of a step.
    """

    def __init__(self, ema=None):
        """
        Args:
            ema (ModelEMAHook or None): the run's weight average, restarted when Ec freezes.
        """
        self._ema = ema

    def before_step(self):
        model = unwrap_model(self.trainer.model)
        stage = model.stage_for_iteration(self.trainer.iter)
        if stage != model.stage:
            logger.info(f"Iteration {self.trainer.iter}: MC-CNN enters stage {stage!r}")
            model.set_stage(stage)
            if self._ema is not None and self.trainer.iter == model.detector_iters:
                self._ema.restart()  # not on a resume that lands inside the refiner stage


def _stage_multiplier(cfg, length, steps):
    """SOLVER's warm-up + multi-step (or cosine) multiplier over a stage of ``length`` iterations."""
    name = cfg.SOLVER.LR_SCHEDULER_NAME
    if name == "WarmupMultiStepLR":
        steps = sorted(s for s in steps if 0 < s < length)
        schedule = MultiStepParamScheduler(
            values=[cfg.SOLVER.GAMMA**k for k in range(len(steps) + 1)],
            milestones=steps,
            num_updates=length,
        )
    elif name == "WarmupCosineLR":
        schedule = CosineParamScheduler(1, 0)
    else:
        raise ValueError(
            f"SOLVER.LR_SCHEDULER_NAME {name!r} is not supported by the sequential MC-CNN "
            "schedule; use WarmupMultiStepLR or WarmupCosineLR"
        )
    return WarmupParamScheduler(
        schedule,
        cfg.SOLVER.WARMUP_FACTOR,
        min(cfg.SOLVER.WARMUP_ITERS / length, 1.0),
        cfg.SOLVER.WARMUP_METHOD,
    )


def build_cascade_lr_scheduler(cfg, optimizer):
    """The learning-rate schedule of a sequential MC-CNN run: SOLVER's schedule over Ec's
    ``DETECTOR_ITERS`` iterations, then the same schedule again (warm-up included, SOLVER.STEPS
    scaled to the stage's length) for the randomly initialised refiner.

    Without the restart the refiner would train at Ec's last, decayed learning rate (1e-4 in
    the paper's schedule). Other configs get detectron2's ``build_lr_scheduler``.
    """
    detector_iters, max_iter = cfg.MODEL.MCCNN.DETECTOR_ITERS, cfg.SOLVER.MAX_ITER
    if (
        cfg.MODEL.META_ARCHITECTURE != "MCCNN"
        or cfg.MODEL.MCCNN.SCHEDULE != "sequential"
        or not 0 < detector_iters < max_iter
    ):
        return build_lr_scheduler(cfg, optimizer)
    refiner_iters = max_iter - detector_iters
    refiner_steps = [round(s * refiner_iters / detector_iters) for s in cfg.SOLVER.STEPS]
    split = detector_iters / max_iter
    # Each stage runs over its own progress in [0, 1] ("rescaled").
    multiplier = CompositeParamScheduler(
        [
            _stage_multiplier(cfg, detector_iters, cfg.SOLVER.STEPS),
            _stage_multiplier(cfg, refiner_iters, refiner_steps),
        ],
        lengths=[split, 1.0 - split],
        interval_scaling=["rescaled", "rescaled"],
    )
    return LRMultiplier(optimizer, multiplier=multiplier, max_iter=max_iter)
