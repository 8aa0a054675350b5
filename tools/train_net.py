#!/usr/bin/env python
"""Train or evaluate thyroid_det models (MultiScaleSSD, MCCNN, or any detectron2 model).

Examples:
    python tools/train_net.py --config-file configs/mccnn_synthetic.yaml
    python tools/train_net.py --config-file configs/mccnn.yaml --num-gpus 8
    python tools/train_net.py --config-file configs/mccnn.yaml --eval-only MODEL.WEIGHTS model.pth
"""
import logging
import os

import detectron2.utils.comm as comm
from detectron2.engine import default_argument_parser

import thyroid_det  # noqa: F401  (registers the plugin)
from thyroid_det.data.datasets import register_coco_datasets
from thyroid_det.engine import CheckpointError, Checkpointer, Trainer, launch, setup_cfg
from thyroid_det.engine.budget import fit_schedule_to_budget
from thyroid_det.engine.defaults import load_cfg
from thyroid_det.utils.cli import check_dataset, cli_errors


def main(args):
    cfg = setup_cfg(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        Checkpointer(
            model, cfg.OUTPUT_DIR, require_all_weights=True, weight_average=True
        ).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            from detectron2.evaluation import verify_results

            verify_results(cfg, res)
        return res
    cfg = fit_schedule_to_budget(cfg, Trainer, resume=args.resume)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def check_eval_weights(cfg, args):
    """
    ``--eval-only`` needs weights: detectron2 would score a random model for an empty
    ``MODEL.WEIGHTS``, and a missing file is better named before any process starts.

    Raises:
        CheckpointError: ``MODEL.WEIGHTS`` empty or not a file (unless ``--resume`` finds the
            run's last checkpoint).
    """
    weights = cfg.MODEL.WEIGHTS
    if not args.eval_only or (
        args.resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))
    ):
        return
    if not weights:
        raise CheckpointError("--eval-only needs weights: MODEL.WEIGHTS is empty")
    if "://" not in weights and not os.path.isfile(weights):
        raise CheckpointError(f"checkpoint {weights} not found")


def check_datasets(cfg, args):
    """
    Load the run's data sets before several processes start: a missing or broken data set then
    stops the run at once, and each process does not repeat the load only to fail. The loaders'
    warnings are left to the run's main process.

    Raises:
        what :func:`~thyroid_det.utils.cli.check_dataset` raises.
    """
    register_coco_datasets(cfg)
    names = [*([] if args.eval_only else cfg.DATASETS.TRAIN), *cfg.DATASETS.TEST]
    logging.disable(logging.WARNING)
    try:
        for name in dict.fromkeys(names):
            check_dataset(name, need_images=False)  # the mapper names a missing image itself
    finally:
        logging.disable(logging.NOTSET)


@cli_errors("train_net.py")
def run(argv=None):
    """Check the config and the ``--eval-only`` weights (and, for several processes, the data
    sets) before any process starts, then :func:`main` on every process (CPU processes, gloo, where there is no
    GPU); a user error in a process ends the tool on one line as it does in one process."""
    args = default_argument_parser().parse_args(argv)
    print("Command Line Args:", args)
    cfg = load_cfg(args)
    check_eval_weights(cfg, args)
    if args.num_gpus * args.num_machines > 1:
        check_datasets(cfg, args)
    return launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    run()
