from .defaults import setup_cfg
from .hooks import CascadeStageHook
from .predictor import Predictor
from .trainer import Trainer

__all__ = ["setup_cfg", "CascadeStageHook", "Predictor", "Trainer"]
