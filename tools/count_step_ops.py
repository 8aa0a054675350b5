#!/usr/bin/env python
"""Count what one training step of a config asks of the host: the operations it issues and those
that make the host wait for a GPU, by phase (forward with the loss, backward, optimizer).

A GPU step bound by its host shows as a GPU that is mostly idle (README, "TN5000 on one GPU"):
Python issues operations one by one, and each value read back (``.item()``, ``nonzero``, a
boolean-mask index) stops the host until the GPU has caught up. The same code issues the same
operations on any device, so this counts them on the CPU, on real training batches of the
config, at any width (``MODEL.VGG.WIDTH_MULT``: the counts do not depend on it). It also times,
on the CPU, the part of the step outside the network: Ec's loss (anchor labelling, mining,
box targets) and the optimizer's step (clipping included).

With ``--inference`` it counts the evaluation's inference instead, per image: batches of
``TEST.IMS_PER_BATCH`` images of ``DATASETS.TEST[0]``, through the model that ``MODEL.WEIGHTS``
loads (random weights without it).

Example (mccnn.yaml's step, batch 32 at 320 px, on a narrow Ec so that it runs fast here):
    THYROID_DATASETS=../shared/data python tools/count_step_ops.py \\
        --config-file configs/mccnn.yaml MODEL.VGG.WIDTH_MULT 0.125
"""
import json
import logging
import statistics
import sys
import time

import torch
from detectron2.utils.events import EventStorage

import thyroid_det  # noqa: F401  (registers the plugin)
from thyroid_det.data.datasets import register_coco_datasets
from thyroid_det.engine import Trainer, load_cfg, load_inference_weights
from thyroid_det.engine.defaults import ConfigError
from thyroid_det.utils.cli import check_dataset, check_output_file, cli_errors, config_tool_parser
from thyroid_det.utils.file_io import atomic_write_text
from thyroid_det.utils.op_count import OpCounter


def _step(model, optimizer, data, counter=None):
    """One training step as detectron2's trainer takes it; counted by phase with ``counter``."""
    phase = (lambda name: setattr(counter, "phase", name)) if counter else (lambda name: None)
    phase("forward")
    loss = sum(model(data).values())
    optimizer.zero_grad()
    phase("backward")
    loss.backward()
    phase("optimizer")
    start = time.perf_counter()
    optimizer.step()
    return time.perf_counter() - start


def count_inference(cfg, batches):
    """Operations and waits per image of the evaluation's inference, over ``batches`` batches
    (after one uncounted: first-call work)."""
    name = cfg.DATASETS.TEST[0]
    check_dataset(name)
    torch.manual_seed(0)
    model = Trainer.build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        load_inference_weights(model, cfg.MODEL.WEIGHTS)
    model.eval()
    loader = iter(Trainer.build_test_loader(cfg, name))
    # Loaded before counting: the mapper's own operations are not the model's.
    first, *counted = [inputs for _, inputs in zip(range(batches + 1), loader)]
    with torch.no_grad():
        model(first)
        with OpCounter() as counter:
            for inputs in counted:
                model(inputs)
    images = sum(len(inputs) for inputs in counted)
    if not images:
        raise ConfigError(
            f"{name} has one batch of TEST.IMS_PER_BATCH ({cfg.TEST.IMS_PER_BATCH}) images or fewer: "
            "nothing left to count after the uncounted first"
        )
    return {
        "dataset": name,
        "images_per_batch": cfg.TEST.IMS_PER_BATCH,
        "images": images,
        "ops_per_image": round(counter.ops / images, 1),
        "waiting_ops_per_image": round(counter.waits / images, 2),
    }


@cli_errors("count_step_ops")
def main(argv=None):
    parser = config_tool_parser(__doc__, config_help="the config whose training step to count")
    parser.add_argument(
        "--batches",
        type=int,
        default=6,
        help="steps timed (after 2 untimed); with --inference, batches counted (after 1)",
    )
    parser.add_argument(
        "--inference",
        action="store_true",
        help="count the evaluation's inference per image instead, over --batches batches",
    )
    parser.add_argument("--output", help="also write the counts and times to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    args.opts = ["MODEL.DEVICE", "cpu", "SOLVER.AMP.ENABLED", "False", *args.opts]
    cfg = load_cfg(args)
    if args.output:
        check_output_file(args.output, [args.config_file])
    register_coco_datasets(cfg)
    if args.inference:
        return _report({"config": args.config_file, **count_inference(cfg, args.batches)}, args.output)
    for name in cfg.DATASETS.TRAIN:
        check_dataset(name, need_images=False)
    torch.manual_seed(0)
    model = Trainer.build_model(cfg)
    model.train()
    optimizer = Trainer.build_optimizer(cfg, model)
    loader = iter(Trainer.build_train_loader(cfg))
    loss_seconds = []
    ssd_losses = getattr(model, "ssd_losses", None)
    if ssd_losses is not None:

        def timed_losses(*a, **k):
            start = time.perf_counter()
            out = ssd_losses(*a, **k)
            loss_seconds.append(time.perf_counter() - start)
            return out

        model.ssd_losses = timed_losses
    with EventStorage():
        for _ in range(2):  # first-call work (anchors, allocations) out of the counts
            _step(model, optimizer, next(loader))
        data = next(loader)
        with OpCounter() as counter:
            _step(model, optimizer, data, counter)
        del loss_seconds[:]
        optimizer_seconds = [_step(model, optimizer, next(loader)) for _ in range(args.batches)]
    result = {
        "config": args.config_file,
        "images_per_step": cfg.SOLVER.IMS_PER_BATCH,
        "input_size": list(cfg.INPUT.FIXED_SIZE),
        "ops": {phase: ops for phase, (ops, _) in counter.by_phase.items()},
        "waiting_ops": {phase: waits for phase, (_, waits) in counter.by_phase.items()},
        "cpu_ms_loss": round(1e3 * statistics.median(loss_seconds), 1) if loss_seconds else None,
        "cpu_ms_optimizer_step": round(1e3 * statistics.median(optimizer_seconds), 1),
        "threads": torch.get_num_threads(),
    }
    return _report(result, args.output)


def _report(result, output):
    print(json.dumps(result, indent=1))
    if output:
        atomic_write_text(output, json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
