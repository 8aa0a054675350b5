"""Config set-up shared by every command-line tool."""
import difflib
import logging
import os
import re

import torch
import yaml
from detectron2.config import CfgNode, get_cfg
from detectron2.engine import default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..config import add_mccnn_config
from ..data.datasets import register_coco_datasets
from ..utils.cli import check_output_dir


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file (or the command
    line) and the key."""


def load_cfg(args):
    """get_cfg -> add_mccnn_config -> merge file -> merge opts, checked: a missing file, bad
    YAML, an unknown key (with the closest known key) or a wrong value raise ConfigError."""
    if not os.path.isfile(args.config_file):
        raise ConfigError(f"config file {args.config_file!r} not found")
    cfg = get_cfg()
    add_mccnn_config(cfg)
    known = _all_keys(cfg)
    try:
        cfg.merge_from_file(args.config_file)
    except (KeyError, ValueError, AssertionError, yaml.YAMLError) as e:
        raise _config_error(e, known, args.config_file) from None
    try:
        cfg.merge_from_list(list(args.opts))
    except (KeyError, ValueError, AssertionError) as e:
        raise _config_error(e, known, None) from None
    check_solver(cfg, args.config_file)
    if cfg.TEST.IMS_PER_BATCH < 1:
        raise ConfigError(
            f"{args.config_file} with the command line: TEST.IMS_PER_BATCH must be at least 1, "
            f"got {cfg.TEST.IMS_PER_BATCH}"
        )
    return cfg


def _all_keys(node, prefix=""):
    keys = []
    for name, value in node.items():
        if isinstance(value, CfgNode):
            keys += _all_keys(value, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _config_error(error, known, config_file):
    """ConfigError naming the file in the ``_BASE_`` chain (or the command line) that holds the
    bad key, and for an unknown key the closest known one."""
    text = str(error).strip().strip("'\"")
    first_line = text.splitlines()[0] if text else type(error).__name__
    match = re.search(r"Non-existent (?:config )?key: (\S+)", text)
    key = match.group(1) if match else None
    where = "the command line"
    if config_file is not None:
        where = (key and _file_setting(config_file, key)) or config_file
    if key is None:
        return ConfigError(f"{where}: {first_line}")
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if not close:  # a misspelt last part: compare within the key's own section
        section = key.rsplit(".", 1)[0] + "."
        names = [k for k in known if k.startswith(section)]
        close = difflib.get_close_matches(key, names, n=1, cutoff=0.0)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return ConfigError(f"{where}: unknown config key {key}{hint}")


def _file_setting(config_file, key):
    """The file of ``config_file``'s ``_BASE_`` chain whose YAML sets ``key``, or None."""
    path, seen = config_file, set()
    while path and os.path.isfile(path) and path not in seen:
        seen.add(path)
        with open(path, encoding="utf-8") as f:
            node = data = yaml.safe_load(f) or {}
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            return path
        base = data.get("_BASE_") if isinstance(data, dict) else None
        path = os.path.join(os.path.dirname(path), base) if isinstance(base, str) else None
    return None


def setup_cfg(args, freeze=True, training=None):
    """get_cfg -> add_mccnn_config -> merge file -> merge opts -> freeze -> default_setup.

    Falls back to the CPU, with a warning, when the config asks for CUDA and there is none. Off
    CUDA it turns ``SOLVER.AMP.ENABLED`` off: detectron2's AMPTrainer runs only on CUDA and
    would stop the run at its first step (warned for ``training`` runs, by default those without
    ``args.eval_only``). Also registers the COCO datasets listed in ``DATASETS.COCO_REGISTER`` so
    that a config or the command line alone can train and evaluate on them. Config errors: see
    :func:`load_cfg`.
    """
    cfg = load_cfg(args)
    asked_device = cfg.MODEL.DEVICE
    if asked_device.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    amp_off = cfg.SOLVER.AMP.ENABLED and not cfg.MODEL.DEVICE.startswith("cuda")
    if amp_off:
        cfg.SOLVER.AMP.ENABLED = False
    if freeze:
        cfg.freeze()
    default_setup(cfg, args)
    setup_logger(name="thyroid_det", output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank())
    if asked_device != cfg.MODEL.DEVICE:
        logging.getLogger("thyroid_det").warning(
            "MODEL.DEVICE is %r but no CUDA device is available: running on the CPU", asked_device
        )
    if training is None:
        training = not getattr(args, "eval_only", False)
    if amp_off and training:
        logging.getLogger("thyroid_det").warning(
            "SOLVER.AMP.ENABLED is True but MODEL.DEVICE is %r: training in fp32 "
            "(detectron2's AMPTrainer needs CUDA)",
            cfg.MODEL.DEVICE,
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
        raise ConfigError(f"{source}: SOLVER.STEPS {tuple(steps)} must be strictly increasing")
    if cfg.SOLVER.MAX_ITER in steps:
        raise ConfigError(
            f"{source}: SOLVER.STEPS {tuple(steps)} includes SOLVER.MAX_ITER "
            f"({cfg.SOLVER.MAX_ITER}); every step must come before the last iteration"
        )


def setup_cfg_for_weights(args, tool, inputs=()):
    """:func:`setup_cfg` for tools that run a trained model on ``--weights`` and write to
    ``--output``: both become MODEL.WEIGHTS and OUTPUT_DIR; a missing config or weights file stops
    the tool with a one-line message instead of a traceback, as does an ``--output`` that is a
    file, not writable, or a folder the tool reads from (``inputs``, see
    :func:`~thyroid_det.utils.cli.check_output_dir`)."""
    for path, what in ((args.config_file, "config file"), (args.weights, "weights")):
        if not os.path.isfile(path):
            raise SystemExit(f"{tool}: error: {what} {path!r} not found")
    try:
        check_output_dir(args.output, inputs)
    except OSError as e:
        raise SystemExit(f"{tool}: error: {e}") from None
    args.opts = list(args.opts) + ["MODEL.WEIGHTS", args.weights, "OUTPUT_DIR", args.output]
    return setup_cfg(args, training=False)
