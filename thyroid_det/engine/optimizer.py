"""The training optimizer: detectron2's SGD, or AdamW, picked by ``SOLVER.OPTIMIZER``.

Both take detectron2's parameter groups (``SOLVER.WEIGHT_DECAY_NORM``, ``BIAS_LR_FACTOR``,
``WEIGHT_DECAY_BIAS``) and its gradient clipping (``SOLVER.CLIP_GRADIENTS``), so the schedule,
the cascade's learning-rate restart and the checkpoints work the same with either.
"""
import torch
from detectron2.solver import build_optimizer as build_sgd
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping

__all__ = ["OPTIMIZERS", "build_optimizer"]

OPTIMIZERS = ("SGD", "AdamW")


def build_optimizer(cfg, model):
    """SGD exactly as detectron2 builds it, or AdamW with ``SOLVER.WEIGHT_DECAY`` as its
    decoupled weight decay and ``SOLVER.ADAMW_BETAS``."""
    name = cfg.SOLVER.OPTIMIZER
    if name not in OPTIMIZERS:
        raise ValueError(f"SOLVER.OPTIMIZER must be one of {OPTIMIZERS}, got {name!r}")
    if name == "SGD":
        return build_sgd(cfg, model)
    betas = tuple(cfg.SOLVER.ADAMW_BETAS)
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"SOLVER.ADAMW_BETAS must be two numbers in [0, 1), got {list(betas)}")
    params = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
    )
    # torch's fused kernel makes the same update as its per-tensor loop in a third of the time
    # on the CPU (mccnn_cpu.yaml: ~20 ms per step against 56, ~3 minutes a run; docs/experiments.md,
    # "AdamW becomes the default"). Not with AMP: a GradScaler leaves a fused optimizer's
    # gradients scaled, which SOLVER.CLIP_GRADIENTS would then clip; on CUDA torch's default
    # multi-tensor kernel is fast already.
    fused = not cfg.SOLVER.AMP.ENABLED and all(
        p.device.type in ("cpu", "cuda") for group in params for p in group["params"]
    )
    return maybe_add_gradient_clipping(cfg, torch.optim.AdamW)(
        params,
        lr=cfg.SOLVER.BASE_LR,
        betas=betas,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        fused=fused,
    )
