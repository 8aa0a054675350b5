from .defaults import setup_cfg, setup_cfg_for_weights
from .hooks import CascadeStageHook
from .predictor import Predictor
from .trainer import Trainer

__all__ = ["setup_cfg", "setup_cfg_for_weights", "CascadeStageHook", "Predictor", "Trainer"]
