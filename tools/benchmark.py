#!/usr/bin/env python
"""Speed of Ec, the refiner Ef and the MC-CNN cascade, measured against torchvision's SSD300-VGG16.

Examples:
    python tools/benchmark.py                               # full run (~10 min on 2 CPU cores)
    python tools/benchmark.py --quick --output bench.json   # rough figures, ~1-2 min
    python tools/benchmark.py --device cuda --amp --channels-last --size 512 --batch 16
    python tools/benchmark.py --only reference ec_matched --no-train --profile 15
    python tools/benchmark.py --only cascade --threads 1 --clock cpu [--unfused]  # loaded machine

Everything runs in one process at one input size (``--size``, both the reference's and ours:
INPUT.FIXED_SIZE is overridden) and one thread count (``--threads``). Weights are random: this
measures speed, not accuracy. Each figure is the median (and inter-quartile range) of
``--repeats`` timed calls after ``--warmup`` untimed ones. Models that are compared take turns,
call by call, and their ratio is the median of the per-turn ratios, so that a change of load
on a shared machine hits both alike; the load average is recorded with the results. On a machine
whose load exceeds its cores, ``--threads 1`` gives far steadier (and faster) figures: threads
of a parallel op wait for each other, and a descheduled one stalls the rest; add ``--clock cpu``
(the process's CPU time instead of elapsed time) where the load is several times the cores, as
the time spent waiting for a core then dwarfs the work.

Rows:

* ``reference``: ``torchvision.models.detection.ssd300_vgg16(weights=None, weights_backbone=None,
  num_classes=3)``, its transform fixed to ``--size`` so it resizes as ours does: inference at
  batch 1 and ``--batch``, a training iteration (forward, backward, SGD step) at ``--train-batch``.
* ``ec``: Ec from ``--config-file`` (configs/mssd_vgg16.yaml), the same measurements.
* ``ec_matched``: Ec with ``--matched-config-file`` (configs/ssd512_vgg16.yaml: SSD's own default
  boxes), whose anchor count is within 0.5% of the reference's at 300 and 512 px: the
  like-for-like row (timed at batch 1 and in training only: its heads hardly change the cost).
* ``refiner``: the cascade's ROI heads (crop, Ef, fuse; one batched refiner call) on 1, 5 and 20
  detections of one image; per image and per crop.
* ``cascade``: the whole MC-CNN inference (``--cascade-config-file``) with exactly k detections
  reaching the refiner (MODEL.SSD.SCORE_THRESH_TEST 0 and TEST.DETECTIONS_PER_IMAGE k), and its
  training iteration in stages "refiner" (Ec frozen) and "joint".
* ``mapper``: SSDDatasetMapper with SSD augmentation on generated 718x500 phantom JPEGs, one
  thread: images/s of one data-loader worker.
* ``matmul_peak``: torch.mm of large fp32 matrices at the same thread count; each model's FLOPs
  (fvcore, on the inference forward) over its median time is compared with it.

FLOPs are fvcore's counts, which count a multiply-add as one; "GFLOP" here is 2 x that, so that
it is comparable with the matrix-multiply peak (2 n^3 per product). The timing harness is
:mod:`thyroid_det.utils.benchmark`, the sections :mod:`thyroid_det.utils.benchmark_sections`;
the targets these figures are read against are in the README (Speed).
"""

import argparse
import contextlib
import gc
import os
import sys
import time

import torch
from detectron2.utils.collect_env import collect_env_info
from detectron2.utils.logger import setup_logger

import thyroid_det  # noqa: F401  (registers the plugin)
from thyroid_det.modeling.fused_inference import unfused
from thyroid_det.utils.benchmark import Benchmark, add_ratios, format_table, headline_figures
from thyroid_det.utils.benchmark_models import synthetic_batch
from thyroid_det.utils.benchmark_sections import (
    run_cascade,
    run_detectors,
    run_mapper,
    run_peak,
    run_refiner,
)
from thyroid_det.utils.cli import cli_errors
from thyroid_det.utils.file_io import atomic_write_json

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ("peak", "reference", "ec", "ec_matched", "refiner", "cascade", "mapper")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],  # examples and what each row measures
    )
    parser.add_argument("--config-file", default=os.path.join(REPO, "configs/mssd_vgg16.yaml"))
    parser.add_argument(
        "--matched-config-file",
        default=os.path.join(REPO, "configs/ssd512_vgg16.yaml"),
        help="Ec config whose anchor count matches the reference's (the ec_matched row)",
    )
    parser.add_argument("--cascade-config-file", default=os.path.join(REPO, "configs/mccnn.yaml"))
    parser.add_argument(
        "--size", type=int, nargs="+", default=None, metavar="N",
        help="input size: N (square) or H W; default 300 (torchvision's SSD300)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: cores)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall",
        help="what a timing is: elapsed time, or the process's CPU time (CPU only; with "
        "--threads 1 it leaves out the waits for a core on a machine loaded past its cores)",
    )
    parser.add_argument("--amp", action="store_true", help="autocast to bfloat16")
    parser.add_argument("--channels-last", action="store_true", help="NHWC weights, activations")
    parser.add_argument(
        "--unfused", action="store_true",
        help="the refiner's plain layers at inference instead of its fused ones "
        "(modeling/fused_inference.py): what the fusion gains",
    )
    parser.add_argument(
        "--compile-refiner", choices=("default", "reduce-overhead", "max-autotune"), default=None,
        help="torch.compile the refiner network in the refiner and cascade rows, in this mode "
        "(reduce-overhead: CUDA graphs on a GPU); the warm-up calls compile",
    )
    parser.add_argument("--batch", type=int, default=None, help="inference batch > 1 (default 4)")
    parser.add_argument("--train-batch", type=int, default=None, help="training batch (default 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (default 5)")
    parser.add_argument(
        "--detections", type=int, nargs="+", default=None,
        help="detections reaching the refiner in the cascade rows (default 1 5 10 20)",
    )
    parser.add_argument(
        "--refiner-detections", type=int, nargs="+", default=None,
        help="detections per image in the refiner rows (default 1 5 20)",
    )
    parser.add_argument("--mapper-images", type=int, default=None, help="phantoms (default 16)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=None, help="run these rows")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP counts")
    parser.add_argument("--no-train", action="store_true", help="skip the training iterations")
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N",
        help="also profile one call of each model's inference and training step; keep N top ops",
    )
    parser.add_argument(
        "--quick", action="store_true",
        help="one timed call per row, batch 1, fewer detection counts, no FLOPs: rough figures",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="JSON file for the results")
    parser.add_argument(
        "--opts", nargs=argparse.REMAINDER, default=[],
        help="config overrides (KEY VALUE ...) applied to all three configs",
    )
    args = parser.parse_args(argv)
    _fill_defaults(args, parser)
    return args


def _fill_defaults(args, parser):
    quick = args.quick
    defaults = {
        "size": [300],
        "threads": os.cpu_count() or 1,
        "batch": 2 if quick else 4,
        "train_batch": 1 if quick else 2,
        "warmup": 1,
        "repeats": 1 if quick else 5,
        "detections": [10] if quick else [1, 5, 10, 20],
        "refiner_detections": [1, 20] if quick else [1, 5, 20],
        "mapper_images": 8 if quick else 16,
        "only": list(SECTIONS),
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if len(args.size) == 1:
        args.size = args.size * 2
    if len(args.size) != 2 or min(args.size) < 32:
        parser.error(f"--size takes N or H W (at least 32 px), got {args.size}")
    if min(args.batch, args.train_batch, args.threads, args.repeats) < 1 or args.warmup < 0:
        parser.error("--batch, --train-batch, --threads and --repeats must be >= 1, --warmup >= 0")
    if min(args.detections + args.refiner_detections + [args.mapper_images]) < 1:
        parser.error("--detections, --refiner-detections and --mapper-images must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch finds no CUDA device")
    if args.device == "cuda" and args.clock == "cpu":
        parser.error("--clock cpu times the host's work only: use --clock wall with --device cuda")
    for flag in ("config_file", "matched_config_file", "cascade_config_file"):
        path = getattr(args, flag)
        if not os.path.isfile(path):
            parser.error(f"--{flag.replace('_', '-')}: no such file {path}")
    args.size = tuple(args.size)
    if quick or args.compile_refiner:  # FLOPs do not change from run to run or when compiled
        args.no_flops = True
    # Training and larger-batch rows: at most 3 timed calls, each costs several batch-1 calls.
    args.train_repeats = max(1, min(args.repeats, 3))


@cli_errors("benchmark.py")
def main(argv=None):
    args = parse_args(argv)
    setup_logger(name="thyroid_det.benchmark")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with unfused() if args.unfused else contextlib.nullcontext():
            return _run(args)
    finally:
        torch.set_num_threads(threads)


SETTINGS = ("threads", "device", "clock", "amp", "channels_last", "unfused", "compile_refiner",
            "batch", "train_batch", "warmup", "repeats", "train_repeats", "quick", "no_train",
            "config_file", "matched_config_file", "cascade_config_file")


def _run(args):
    bench = Benchmark(args.device, args.amp, args.warmup, args.profile, args.clock)
    # One random batch for every section (built once; sections take what they need).
    args.batch_data = synthetic_batch(max(args.batch, args.train_batch), args.size, args.seed)
    load_start, started = os.getloadavg(), time.perf_counter()
    if "peak" in args.only:
        run_peak(bench, args)
    detectors = [n for n in ("reference", "ec", "ec_matched") if n in args.only]
    if detectors:
        run_detectors(bench, args, detectors)
        gc.collect()
    sections = (("refiner", run_refiner), ("cascade", run_cascade), ("mapper", run_mapper))
    for section, run in sections:
        if section in args.only:
            run(bench, args)
            gc.collect()
    add_ratios(bench)
    load_end = os.getloadavg()
    settings = {"size_hw": list(args.size), **{k: getattr(args, k) for k in SETTINGS}}
    environment = {"cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
                   "collect_env": collect_env_info()}
    if args.device == "cuda":
        environment["gpu"] = torch.cuda.get_device_name()
    results = {
        "settings": {**settings, "opts": list(args.opts)},
        "environment": environment,
        "load_average_start": list(load_start),
        "load_average_end": list(load_end),
        "wall_s": time.perf_counter() - started,
        "models": bench.models,
        "rows": bench.rows,
        "figures": headline_figures(bench),
        "profiles": bench.profiles,
    }
    print(format_table(bench))
    for f in results["figures"]:
        print(f"{f['description']}: {'n/a' if f['value'] is None else format(f['value'], '.3f')}")
    busy = max(load_start[0], load_end[0]) > (os.cpu_count() or 1) - 0.5
    print(
        f"\nload average (1 min) {load_start[0]:.2f} -> {load_end[0]:.2f} on {os.cpu_count()} "
        f"cores, {args.threads} threads, {results['wall_s']:.0f} s"
        + (": the machine was busy, absolute times are inflated and noisy" if busy else "")
        + ("\n--quick: one timed call per row, indicative only" if args.quick else "")
    )
    if args.output:
        atomic_write_json(args.output, results)
        print(f"results written to {args.output}")
    return results


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:
        sys.exit(f"benchmark.py: error: {e}")
