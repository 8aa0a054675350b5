"""Config set-up shared by every command-line tool."""
from detectron2.config import get_cfg
from detectron2.engine import default_setup

from ..config import add_mccnn_config
from ..data.datasets import register_coco_datasets


def setup_cfg(args, freeze=True):
    """get_cfg -> add_mccnn_config -> merge file -> merge opts -> freeze -> default_setup.

    Also registers the COCO datasets listed in ``DATASETS.COCO_REGISTER`` so that a config or the
    command line alone can train and evaluate on them.
    """
    cfg = get_cfg()
    add_mccnn_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if freeze:
        cfg.freeze()
    default_setup(cfg, args)
    register_coco_datasets(cfg)
    return cfg
