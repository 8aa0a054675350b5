from .checkpoint import CheckpointError, Checkpointer, load_inference_weights
from .defaults import load_cfg, setup_cfg, setup_cfg_for_weights
from .hooks import CascadeStageHook
from .launch import launch
from .predictor import Predictor
from .trainer import Trainer

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "load_inference_weights",
    "load_cfg",
    "setup_cfg",
    "setup_cfg_for_weights",
    "CascadeStageHook",
    "launch",
    "Predictor",
    "Trainer",
]
