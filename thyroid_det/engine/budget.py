"""Fit a training schedule to a time budget (``SOLVER.TIME_BUDGET``).

A recipe such as ``mccnn_cpu.yaml`` promises an hour of 2 CPU cores, but 2-core machines differ by
nearly two-fold in speed (0.47 to 0.90 s per Ec iteration on this project's machines). With
``SOLVER.TIME_BUDGET.MINUTES`` set, training first times a few steps on the real model, data and
processes, then shrinks every iteration count of the schedule by one factor so that the predicted
training time fits the budget. It never lengthens a schedule: on a fast enough machine the run is
the config's own.
"""
import gc
import json
import logging
import os
import statistics
import time

from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

__all__ = ["fit_schedule", "fit_schedule_to_budget", "measure_seconds_per_iter"]

logger = logging.getLogger(__name__)

# Where a run keeps its fitted schedule, so that --resume continues the same one.
FIT_FILE = "time_budget.json"


def fit_schedule(cfg, scale):
    """Multiply the schedule's iteration counts by ``scale`` (at most 1) in place: SOLVER.MAX_ITER,
    SOLVER.STEPS, MODEL.MCCNN.DETECTOR_ITERS (whose stage change stays on an evaluation when it
    was on one), TEST.EVAL_PERIOD and SOLVER.CHECKPOINT_PERIOD. Warm-up keeps its length: it is
    there for stability, not for the schedule. ``cfg`` must be unfrozen."""
    if not 0 < scale <= 1:
        raise ValueError(f"a schedule's scale must be in (0, 1], got {scale}")

    def shrink(n):
        return max(1, round(n * scale)) if n > 0 else n

    s = cfg.SOLVER
    max_iter, period = s.MAX_ITER, cfg.TEST.EVAL_PERIOD
    s.MAX_ITER = shrink(max_iter)
    s.STEPS = tuple(shrink(step) for step in s.STEPS)
    cfg.TEST.EVAL_PERIOD = shrink(period)
    s.CHECKPOINT_PERIOD = cfg.TEST.EVAL_PERIOD if s.CHECKPOINT_PERIOD == period else shrink(s.CHECKPOINT_PERIOD)
    detector_iters = cfg.MODEL.MCCNN.DETECTOR_ITERS
    if cfg.MODEL.META_ARCHITECTURE == "MCCNN" and 0 < detector_iters < max_iter:
        if period > 0 and detector_iters % period == 0:
            new = detector_iters // period * cfg.TEST.EVAL_PERIOD
        else:
            new = shrink(detector_iters)
        # The refiner's stage keeps its share of the schedule.
        s.MAX_ITER = new + shrink(max_iter - detector_iters)
        cfg.MODEL.MCCNN.DETECTOR_ITERS = new
    return cfg


class _StepTimer(HookBase):
    def __init__(self):
        self.seconds = []

    def before_step(self):
        self._start = time.perf_counter()

    def after_step(self):
        self.seconds.append(time.perf_counter() - self._start)


def measure_seconds_per_iter(trainer_class, cfg, iters):
    """Mean seconds per training step over ``iters`` steps of ``trainer_class(cfg)`` after a
    few unmeasured ones (the data loader's start), on every process; the slowest process's.
    The mean, not the median: the run's minutes add up its slow steps (a late batch, a
    collection) too, and on the CPU the median ran 5% under the mean.
    Only the hooks a step needs run (stage, learning rate, weight average): nothing is
    evaluated or written, and the model is thrown away."""
    from detectron2.engine import hooks

    from .ema import ModelEMAHook
    from .hooks import CascadeStageHook

    warmup = max(3, iters // 5)

    class _Calibration(trainer_class):
        def build_hooks(self):
            # First, as TrainingProgressHook is in training: it times what the run's minutes count.
            self.timer = _StepTimer()
            ret = [self.timer, hooks.LRScheduler()]  # warm-up's low rate: no divergence
            if cfg.MODEL.META_ARCHITECTURE == "MCCNN":
                ret.insert(1, CascadeStageHook())
            if cfg.SOLVER.EMA.ENABLED:
                ret.append(ModelEMAHook(cfg.SOLVER.EMA.DECAY))
            return ret

    calib = cfg.clone()
    calib.defrost()
    calib.SOLVER.MAX_ITER = warmup + iters
    calib.freeze()
    trainer = _Calibration(calib)
    trainer.train()
    mean = statistics.fmean(trainer.timer.seconds[warmup:])
    del trainer
    gc.collect()  # its data loader's workers, before the run starts its own
    return max(comm.all_gather(mean))


def fit_schedule_to_budget(cfg, trainer_class, resume=False):
    """Shrink ``cfg``'s schedule (see :func:`fit_schedule`) so that training is predicted to take
    at most SOLVER.TIME_BUDGET.MINUTES, after timing SOLVER.TIME_BUDGET.CALIBRATION_ITERS steps
    (their mean raised by SOLVER.TIME_BUDGET.MARGIN: the first steps run faster than the rest).

    The prediction prices every step at the calibrated Ec step (the refiner's are cheaper), so it
    errs long. The fit is saved in OUTPUT_DIR; ``resume`` reuses it instead of timing again, so
    that a resumed run keeps its schedule. Returns ``cfg`` (a new, frozen config when changed).
    """
    budget = cfg.SOLVER.TIME_BUDGET.MINUTES
    if budget <= 0:
        return cfg
    path = os.path.join(cfg.OUTPUT_DIR, FIT_FILE)
    fit = None
    if resume and PathManager.isfile(path):
        with PathManager.open(path) as f:
            fit = json.load(f)
        logger.info(f"Resuming with the schedule fitted before: {fit}")
    if fit is None:
        iters = cfg.SOLVER.TIME_BUDGET.CALIBRATION_ITERS
        logger.info(f"Timing {iters} training steps to fit the schedule to {budget:g} minutes ...")
        start = time.perf_counter()
        timed = measure_seconds_per_iter(trainer_class, cfg, iters)
        seconds = timed * (1 + cfg.SOLVER.TIME_BUDGET.MARGIN)
        predicted = cfg.SOLVER.MAX_ITER * seconds / 60
        fit = {
            "budget_minutes": budget,
            "timed_seconds_per_iter": round(timed, 4),
            "seconds_per_iter": round(seconds, 4),
            "predicted_minutes": round(predicted, 2),
            "scale": min(1.0, budget / predicted),
            "calibration_minutes": round((time.perf_counter() - start) / 60, 2),
        }
        if comm.is_main_process():
            _write_json(path, fit)
    if fit["scale"] >= 1.0:
        logger.info(
            f"{fit['seconds_per_iter']:.3f} s per step: the schedule ({cfg.SOLVER.MAX_ITER} "
            f"iterations, about {fit['predicted_minutes']:.0f} minutes) fits {budget:g} minutes as it is"
        )
        return cfg
    cfg = cfg.clone()
    cfg.defrost()
    fit_schedule(cfg, fit["scale"])
    cfg.freeze()
    logger.info(
        f"{fit['seconds_per_iter']:.3f} s per step: the schedule would take about "
        f"{fit['predicted_minutes']:.0f} minutes; shrunk by {fit['scale']:.3f} to "
        f"SOLVER.MAX_ITER {cfg.SOLVER.MAX_ITER}, MODEL.MCCNN.DETECTOR_ITERS "
        f"{cfg.MODEL.MCCNN.DETECTOR_ITERS}, TEST.EVAL_PERIOD {cfg.TEST.EVAL_PERIOD} "
        f"to fit {budget:g} minutes"
    )
    if comm.is_main_process():
        config_path = os.path.join(cfg.OUTPUT_DIR, "config.yaml")
        tmp = config_path + ".tmp"
        with PathManager.open(tmp, "w") as f:
            f.write(cfg.dump())
        os.replace(tmp, config_path)
    comm.synchronize()
    return cfg


def _write_json(path, data):
    tmp = path + ".tmp"
    with PathManager.open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)
