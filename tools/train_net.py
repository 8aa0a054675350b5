#!/usr/bin/env python
"""Train or evaluate thyroid_det models (MultiScaleSSD, MCCNN, or any detectron2 model).

Examples:
    python tools/train_net.py --config-file configs/mccnn_synthetic.yaml
    python tools/train_net.py --config-file configs/mccnn.yaml --num-gpus 8
    python tools/train_net.py --config-file configs/mccnn.yaml --eval-only MODEL.WEIGHTS model.pth
"""
import detectron2.utils.comm as comm
from detectron2.engine import default_argument_parser

import thyroid_det  # noqa: F401  (registers the plugin)
from thyroid_det.engine import Checkpointer, Trainer, launch, setup_cfg
from thyroid_det.engine.defaults import load_cfg
from thyroid_det.utils.cli import cli_errors


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
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


@cli_errors("train_net.py")
def run(argv=None):
    """Check the config before any process starts, then :func:`main` on every process (CPU
    processes, gloo, where there is no GPU)."""
    args = default_argument_parser().parse_args(argv)
    print("Command Line Args:", args)
    load_cfg(args)
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
