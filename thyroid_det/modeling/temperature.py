"""Temperature scaling of the malignant probability at inference.

The temperature (fitted on a validation set by tools/fit_temperature.py) travels with the model
as the checkpoint entry ``"malignancy_temperature"``, or is set by ``MODEL.MALIGNANCY_TEMPERATURE``.
It is applied as a forward hook on the built model, so every meta-architecture, detectron2's
included, gets it without code of its own: in eval mode each output's ``class_probs`` become
``[1 - p', p']`` with ``p' = sigmoid(logit(p) / T)`` and ``p`` the malignant probability. Boxes,
scores, classes (0.5 stays 0.5) and the cascade's ``coarse_probs`` / ``fine_probs`` are unchanged.
"""

import logging
import os

import torch

from ..evaluation.calibration import apply_temperature
from ..evaluation.nodule_evaluator import MALIGNANT, malignant_probability

__all__ = ["TEMPERATURE_KEY", "attach_malignancy_temperature", "resolve_malignancy_temperature"]

logger = logging.getLogger(__name__)
TEMPERATURE_KEY = "malignancy_temperature"


def scale_instances(instances, temperature):
    """Instances with temperature-scaled ``class_probs`` (two classes: benign, malignant)."""
    if len(instances) == 0:
        return instances
    p = malignant_probability(instances, MALIGNANT)
    scaled = torch.as_tensor(apply_temperature(p.cpu().numpy(), temperature), dtype=torch.float32)
    scaled = scaled.to(p.device)
    instances.class_probs = torch.stack([1.0 - scaled, scaled], dim=1)
    return instances


def attach_malignancy_temperature(model, temperature):
    """Scale the malignant probability of ``model``'s eval-mode outputs by ``temperature``
    (1.0: a no-op, nothing attached). Returns the hook handle (``.remove()`` detaches it)."""
    if temperature is None or float(temperature) == 1.0:
        return None
    temperature = float(temperature)
    if not temperature > 0:
        raise ValueError(f"malignancy temperature must be > 0, got {temperature}")

    def hook(module, inputs, outputs):
        if module.training or not isinstance(outputs, list):
            return outputs
        for out in outputs:
            if isinstance(out, dict) and "instances" in out:
                out["instances"] = scale_instances(out["instances"], temperature)
        return outputs

    return model.register_forward_hook(hook)


def read_checkpoint_temperature(path):
    """The checkpoint's ``"malignancy_temperature"`` entry, or None (none, or not a .pth)."""
    from ..engine.checkpoint import read_checkpoint  # engine imports modeling

    if not path or not path.endswith(".pth") or not os.path.isfile(path):
        return None
    value = read_checkpoint(path).get(TEMPERATURE_KEY)
    return float(value) if value is not None else None


def resolve_malignancy_temperature(cfg, weights=None):
    """The temperature to apply: ``MODEL.MALIGNANCY_TEMPERATURE`` when > 0, else the entry of
    the checkpoint ``weights`` (default ``MODEL.WEIGHTS``), else 1.0 (none)."""
    if cfg.MODEL.MALIGNANCY_TEMPERATURE > 0:
        return float(cfg.MODEL.MALIGNANCY_TEMPERATURE)
    stored = read_checkpoint_temperature(weights if weights is not None else cfg.MODEL.WEIGHTS)
    if stored is not None:
        logger.info(f"malignant probability: temperature {stored:.4g} from the checkpoint")
        return stored
    return 1.0
