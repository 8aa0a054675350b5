"""Config set-up shared by every command-line tool."""
import logging
import os

import torch
from detectron2.config import get_cfg
from detectron2.engine import default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..config import add_mccnn_config
from ..data.datasets import register_coco_datasets


def setup_cfg(args, freeze=True):
    """get_cfg -> add_mccnn_config -> merge file -> merge opts -> freeze -> default_setup.

    Falls back to the CPU, with a warning, when the config asks for CUDA and there is none.
    Also registers the COCO datasets listed in ``DATASETS.COCO_REGISTER`` so that a config or the
    command line alone can train and evaluate on them.
    """
    cfg = get_cfg()
    add_mccnn_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    check_solver(cfg, args.config_file)
    asked_device = cfg.MODEL.DEVICE
    if asked_device.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    if freeze:
        cfg.freeze()
    default_setup(cfg, args)
    setup_logger(name="thyroid_det", output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank())
    if asked_device != cfg.MODEL.DEVICE:
        logging.getLogger("thyroid_det").warning(
            "MODEL.DEVICE is %r but no CUDA device is available: running on the CPU", asked_device
        )
    register_coco_datasets(cfg)
    return cfg


def check_solver(cfg, source):
    """Reject learning-rate steps that fvcore's scheduler would only refuse deep inside training.

    Steps beyond MAX_ITER stay allowed: detectron2 drops them with a warning, which is what a
    shortened command-line run (``SOLVER.MAX_ITER 100``) relies on.
    """
    if cfg.SOLVER.LR_SCHEDULER_NAME != "WarmupMultiStepLR":
        return
    steps = list(cfg.SOLVER.STEPS)
    if steps != sorted(set(steps)):
        raise ValueError(f"{source}: SOLVER.STEPS {tuple(steps)} must be strictly increasing")
    if cfg.SOLVER.MAX_ITER in steps:
        raise ValueError(
            f"{source}: SOLVER.STEPS {tuple(steps)} includes SOLVER.MAX_ITER "
            f"({cfg.SOLVER.MAX_ITER}); every step must come before the last iteration"
        )


def setup_cfg_for_weights(args, tool):
    """:func:`setup_cfg` for tools that run a trained model on ``--weights`` and write to
    ``--output``: both become MODEL.WEIGHTS and OUTPUT_DIR; a missing config or weights file stops
    the tool with a one-line message instead of a traceback."""
    for path, what in ((args.config_file, "config file"), (args.weights, "weights")):
        if not os.path.isfile(path):
            raise SystemExit(f"{tool}: error: {what} {path!r} not found")
    args.opts = list(args.opts) + ["MODEL.WEIGHTS", args.weights, "OUTPUT_DIR", args.output]
    return setup_cfg(args)
