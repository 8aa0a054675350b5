"""The training optimizer: detectron2's SGD, or AdamW, picked by ``SOLVER.OPTIMIZER``.

Both take detectron2's parameter groups (``SOLVER.WEIGHT_DECAY_NORM``, ``BIAS_LR_FACTOR``,
``WEIGHT_DECAY_BIAS``) and its gradient clipping (``SOLVER.CLIP_GRADIENTS``), so the schedule,
the cascade's learning-rate restart and the checkpoints work the same with either.
"""
import functools
from collections import defaultdict

import torch
from detectron2.solver.build import (
    _generate_optimizer_class_with_gradient_clipping,
    get_default_optimizer_params,
    maybe_add_gradient_clipping,
)

__all__ = ["OPTIMIZERS", "build_optimizer", "clip_each_parameter_norm"]

OPTIMIZERS = ("SGD", "AdamW")


def build_optimizer(cfg, model):
    """SGD exactly as detectron2 builds it, or AdamW with ``SOLVER.WEIGHT_DECAY`` as its
    decoupled weight decay and ``SOLVER.ADAMW_BETAS``."""
    name = cfg.SOLVER.OPTIMIZER
    if name not in OPTIMIZERS:
        raise ValueError(f"SOLVER.OPTIMIZER must be one of {OPTIMIZERS}, got {name!r}")
    params = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
    )
    if name == "SGD":  # detectron2's build_optimizer, with the clipping below
        return _with_gradient_clipping(cfg, torch.optim.SGD)(
            params,
            lr=cfg.SOLVER.BASE_LR,
            momentum=cfg.SOLVER.MOMENTUM,
            nesterov=cfg.SOLVER.NESTEROV,
            weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        )
    betas = tuple(cfg.SOLVER.ADAMW_BETAS)
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"SOLVER.ADAMW_BETAS must be two numbers in [0, 1), got {list(betas)}")
    # torch's fused kernel makes the same update as its per-tensor loop in a third of the time
    # on the CPU (mccnn_cpu.yaml: ~20 ms per step against 56, ~3 minutes a run; docs/experiments.md,
    # "AdamW becomes the default"). Not with AMP: a GradScaler leaves a fused optimizer's
    # gradients scaled, which SOLVER.CLIP_GRADIENTS would then clip; on CUDA torch's default
    # multi-tensor kernel is fast already.
    fused = not cfg.SOLVER.AMP.ENABLED and all(
        p.device.type in ("cpu", "cuda") for group in params for p in group["params"]
    )
    return _with_gradient_clipping(cfg, torch.optim.AdamW)(
        params,
        lr=cfg.SOLVER.BASE_LR,
        betas=betas,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        fused=fused,
    )


def _with_gradient_clipping(cfg, optimizer_type):
    """detectron2's ``maybe_add_gradient_clipping``, except that per-parameter "norm" clipping
    runs as :func:`clip_each_parameter_norm`."""
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if not (clip.ENABLED and clip.CLIP_TYPE == "norm"):
        return maybe_add_gradient_clipping(cfg, optimizer_type)
    clipper = functools.partial(
        clip_each_parameter_norm, max_norm=clip.CLIP_VALUE, norm_type=clip.NORM_TYPE
    )
    return _generate_optimizer_class_with_gradient_clipping(optimizer_type, global_clipper=clipper)


@torch.no_grad()
def clip_each_parameter_norm(params, max_norm: float, norm_type: float = 2.0) -> None:
    """``torch.nn.utils.clip_grad_norm_(p, max_norm, norm_type)`` for each parameter ``p`` on its
    own (``SOLVER.CLIP_GRADIENTS.CLIP_TYPE "norm"``), as a few multi-tensor operations.

    detectron2 calls torch's function once per parameter: about eight operations each, over a
    thousand a step for Ec, all issued from Python. That was 11 ms a step on the CPU before any
    arithmetic, and on a GPU the optimizer's host work is not hidden behind computation,
    because the trainer reads the losses back just before the step."""
    groups = defaultdict(list)
    for p in params:
        if p.grad is not None:
            groups[(p.grad.device, p.grad.dtype)].append(p.grad)
    for grads in groups.values():
        norms = torch.stack(torch._foreach_norm(grads, norm_type))
        scale = (max_norm / (norms + 1e-6)).clamp_(max=1.0)
        torch._foreach_mul_(grads, list(scale.unbind(0)))
