#!/usr/bin/env python
"""Speed of Ec, the refiner Ef and the MC-CNN cascade, measured against torchvision's SSD300-VGG16.

Examples:
    python tools/benchmark.py                               # full run (~10 min on 2 CPU cores)
    python tools/benchmark.py --quick --output bench.json   # rough figures, ~1-2 min
    python tools/benchmark.py --device cuda --amp --channels-last --size 512 --batch 16
    python tools/benchmark.py --only reference ec_matched --no-train --profile 15

Everything runs in one process at one input size (``--size``, both the reference's and ours:
INPUT.FIXED_SIZE is overridden) and one thread count (``--threads``). Weights are random: this
measures speed, not accuracy. Each figure is the median (and inter-quartile range) of
``--repeats`` timed calls after ``--warmup`` untimed ones. Models that are compared take turns,
call by call, and their ratio is the median of the per-turn ratios, so that a change of load
on a shared machine hits both alike; the load average is recorded with the results. On a machine
whose load exceeds its cores, ``--threads 1`` gives far steadier (and faster) figures: threads
of a parallel op wait for each other, and a descheduled one stalls the rest.

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
it is comparable with the matrix-multiply peak (2 n^3 per product).
"""

import argparse
import contextlib
import gc
import logging
import math
import os
import platform
import sys
import tempfile
import time

import cv2
import detectron2
import numpy as np
import torch
import torchvision
import tqdm
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import EventStorage
from detectron2.utils.logger import setup_logger
from fvcore.nn import FlopCountAnalysis
from torch import nn

import thyroid_det  # noqa: F401  (registers the plugin)
from thyroid_det import add_mccnn_config
from thyroid_det.data.datasets.phantoms import render_phantom
from thyroid_det.data.mapper import SSDDatasetMapper
from thyroid_det.utils.cli import cli_errors
from thyroid_det.utils.file_io import atomic_write_json

logger = logging.getLogger("thyroid_det.benchmark")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ("peak", "reference", "ec", "ec_matched", "refiner", "cascade", "mapper")
# torchvision's SSD300 ends with two unpadded 3x3 convolutions: smaller inputs fail there.
REFERENCE_MIN_SIZE = 264
# A typical TN5000 image: 718 wide, 500 high.
MAPPER_IMAGE_SIZE = (500, 718)
TARGETS = {
    "ec_inference_vs_reference": 1.05,
    "cascade_vs_ec_up_to_10": 1.25,
    "train_vs_reference": 1.10,
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See the module docstring (tools/benchmark.py) for what each row measures.",
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
    parser.add_argument("--amp", action="store_true", help="autocast to bfloat16")
    parser.add_argument("--channels-last", action="store_true", help="NHWC weights, activations")
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
    for flag in ("config_file", "matched_config_file", "cascade_config_file"):
        path = getattr(args, flag)
        if not os.path.isfile(path):
            parser.error(f"--{flag.replace('_', '-')}: no such file {path}")
    args.size = tuple(args.size)
    if quick:  # FLOPs do not change from run to run; the full run counts them
        args.no_flops = True
    # Training and larger-batch rows: at most 3 timed calls, each costs several batch-1 calls.
    args.train_repeats = max(1, min(args.repeats, 3))


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------


def paired_ratio(times, reference_times):
    """Median over rounds of time / reference time, both taken in the same round-robin round."""
    return float(np.median(np.asarray(times) / np.asarray(reference_times)))


class Bench:
    """Shared settings of one run (device, autocast, timing) and what it has measured."""

    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.rows = []
        self.models = {}
        self.profiles = {}
        self._groups = 0

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def autocast(self):
        if not self.args.amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def time_round_robin(self, fns, repeats):
        """Time the callables ``fns`` (name -> fn) in turn, ``repeats`` rounds after the warm-up.

        Taking turns means a change of load on a shared machine hits every callable alike, so
        ratios between them (:func:`paired_ratio`) stay meaningful when absolute times do not.

        Returns:
            group id, and per name: median, quartiles, IQR and the times of every round.
        """
        for fn in fns.values():
            for _ in range(self.args.warmup):
                fn()
        times = {name: [] for name in fns}
        for _ in tqdm.trange(repeats, desc=", ".join(map(str, fns)), leave=False, disable=None):
            for name, fn in fns.items():
                self.sync()
                start = time.perf_counter()
                fn()
                self.sync()
                times[name].append(time.perf_counter() - start)
        self._groups += 1
        timings = {}
        for name, ts in times.items():
            q1, median, q3 = (float(v) for v in np.percentile(ts, [25, 50, 75]))
            timings[name] = {
                "median_s": median, "q1_s": q1, "q3_s": q3, "iqr_s": q3 - q1, "times_s": ts
            }
        return self._groups, timings

    def add(self, model, kind, batch, timing, group, **extra):
        """Record a row; per-image time = median per call / batch."""
        row = {"model": model, "kind": kind, "batch": batch, "group": group, **timing}
        row["per_image_s"] = timing["median_s"] / batch
        row["images_per_s"] = batch / timing["median_s"]
        row.update(extra)
        self.rows.append(row)
        logger.info(
            f"{model:<10} {kind:<26} batch {batch:>2}: {1e3 * row['per_image_s']:9.1f} ms/image "
            f"(IQR {1e3 * timing['iqr_s']:.1f} ms per call)"
        )
        return row

    def profile(self, name, fn):
        """With ``--profile N``: profile one call of ``fn`` and keep its N costliest ops."""
        if not self.args.profile:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            fn()
            self.sync()
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events) or 1.0
        top = [
            {
                "op": e.key,
                "self_cpu_ms": e.self_cpu_time_total / 1e3,
                "self_cpu_share": e.self_cpu_time_total / total,
                "calls": e.count,
            }
            for e in events[: self.args.profile]
        ]
        self.profiles[name] = {"total_self_cpu_ms": total / 1e3, "top_ops": top}


# ------------------------------------------------------------------------------------------------
# Synthetic inputs
# ------------------------------------------------------------------------------------------------


def synthetic_batch(num_images, size, seed):
    """Random uint8 images (N, H, W) and 1-3 random boxes with classes {0, 1} per image."""
    height, width = size
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (num_images, height, width), dtype=torch.uint8, generator=g)
    targets = []
    for _ in range(num_images):
        n = int(torch.randint(1, 4, (1,), generator=g))
        side = torch.rand(n, 2, generator=g) * 0.3 + 0.1
        centre = torch.rand(n, 2, generator=g) * (1 - side) + side / 2
        scale = torch.tensor([width, height], dtype=torch.float32)
        boxes = torch.cat([(centre - side / 2) * scale, (centre + side / 2) * scale], dim=1)
        targets.append((boxes, torch.randint(0, 2, (n,), generator=g)))
    return images, targets


def detectron2_inputs(images, targets, device, with_instances):
    """The dicts our models take; "height"/"width" equal the input so no rescaling happens."""
    inputs = []
    for image, (boxes, classes) in zip(images, targets):
        height, width = image.shape
        item = {"image": image[None].to(device), "height": height, "width": width}
        if with_instances:
            instances = Instances((height, width))
            instances.gt_boxes = Boxes(boxes)
            instances.gt_classes = classes
            item["instances"] = instances
        inputs.append(item)
    return inputs


def torchvision_inputs(images, targets, device):
    """3-channel float images in [0, 1] and targets with labels shifted past background 0."""
    tensors = [image[None].expand(3, -1, -1).float().div(255).to(device) for image in images]
    dicts = [{"boxes": b.to(device), "labels": (c + 1).to(device)} for b, c in targets]
    return tensors, dicts


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------


def load_cfg(config_file, args, extra_opts=()):
    """A config of ours at the benchmark's input size and device, with ``--opts`` merged."""
    cfg = get_cfg()
    add_mccnn_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(args.opts) + list(extra_opts))
    cfg.INPUT.FIXED_SIZE = tuple(args.size)
    cfg.MODEL.DEVICE = args.device
    cfg.MODEL.WEIGHTS = ""
    cfg.freeze()
    return cfg


def prepare(model, args):
    """``--channels-last``: NHWC parameters; convolutions then keep activations NHWC."""
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def build_ours(cfg, args):
    torch.manual_seed(args.seed)
    return prepare(build_model(cfg), args)


def build_reference(size, num_classes=3):
    """torchvision's SSD300-VGG16 architecture, random weights, resizing to exactly ``size``."""
    model = torchvision.models.detection.ssd300_vgg16(
        weights=None, weights_backbone=None, num_classes=num_classes
    )
    model.transform.min_size = (min(size),)
    model.transform.max_size = max(size)
    model.transform.fixed_size = (size[1], size[0])  # torchvision's fixed_size is (width, height)
    return model


class AnchorCounter:
    """Forward hook on an anchor generator that records how many anchors one image gets."""

    def __init__(self, generator):
        self.count = None
        self.handle = generator.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        first = output[0]
        if isinstance(first, Boxes):  # detectron2: per level
            self.count = sum(len(b) for b in output)
        else:  # torchvision: per image
            self.count = int(first.shape[0])
        self.handle.remove()


class TensorForward(nn.Module):
    """A detector's inference on one image tensor with tensor outputs, so that fvcore can trace it
    (detectron2's own adapter, detectron2.utils.analysis, needs caffe2 in detectron2 0.6)."""

    def __init__(self, model, detectron2_model):
        super().__init__()
        self.model = model
        self.detectron2_model = detectron2_model

    def forward(self, image):
        if not self.detectron2_model:
            return tuple(self.model([image])[0].values())
        height, width = image.shape[-2:]
        instances = self.model([{"image": image, "height": height, "width": width}])[0]["instances"]
        fields = instances.get_fields().values()
        return tuple(v.tensor if isinstance(v, Boxes) else v for v in fields)


def count_gflops(model, image, detectron2_model=None):
    """2 x fvcore's multiply-add count of one inference forward on ``image`` (see the module
    docstring); ``detectron2_model`` None: ``model`` maps a tensor to a tensor."""
    was_training = model.training
    model.eval()
    module = model if detectron2_model is None else TensorForward(model, detectron2_model)
    try:
        with torch.no_grad():
            analysis = FlopCountAnalysis(module, (image,))
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            analysis.tracer_warnings("none")
            return 2 * analysis.total() / 1e9
    except Exception as e:  # a FLOP count is secondary: report it and go on
        logger.warning(f"FLOP count failed for {type(model).__name__}: {e}")
        return None
    finally:
        model.train(was_training)


class Detector:
    """One detector under test: its inputs, inference and training-step callables."""

    def __init__(self, bench, name, model, cfg=None):
        """
        Args:
            name: row name ("reference", "ec", ...).
            model: a torchvision SSD (``cfg`` None) or one of our models built from ``cfg``.
        """
        args = bench.args
        self.bench, self.name, self.model, self.cfg = bench, name, model, cfg
        self.is_ours = cfg is not None
        images, targets = synthetic_batch(max(args.batch, args.train_batch), args.size, args.seed)
        if self.is_ours:
            self.inputs = detectron2_inputs(images, targets, bench.device, False)
            self.train_inputs = detectron2_inputs(images, targets, bench.device, True)
        else:
            self.inputs, self.targets = torchvision_inputs(images, targets, bench.device)
        self.optimizer = None
        self.info = {"parameters_m": sum(p.numel() for p in model.parameters()) / 1e6}
        if self.is_ours:
            self.info["anchor_config"] = _anchor_config(cfg)

    def describe(self):
        """Count anchors (one inference call, also a warm-up) and FLOPs."""
        self.model.eval()
        counter = AnchorCounter(self.model.anchor_generator)
        with torch.no_grad():
            self.model(self.inputs[:1])
        self.info["anchors"] = counter.count
        if not self.bench.args.no_flops:
            image = self.inputs[0]["image"] if self.is_ours else self.inputs[0]
            self.info["gflops"] = count_gflops(self.model, image, self.is_ours)
        return self.info

    def inference(self, batch):
        inputs = self.inputs[:batch]

        def infer():
            self.model.eval()
            with torch.no_grad(), self.bench.autocast():
                self.model(inputs)

        return infer

    def train_step(self, batch):
        """Forward (autocast), backward and optimiser step on ``batch`` images."""
        if self.optimizer is None:
            if self.is_ours:
                self.optimizer = build_optimizer(self.cfg, self.model)
            else:  # torchvision's reference recipe: SGD, momentum 0.9, weight decay 5e-4
                self.optimizer = torch.optim.SGD(
                    self.model.parameters(), lr=1e-4, momentum=0.9, weight_decay=5e-4
                )
        if self.is_ours:
            inputs = self.train_inputs[:batch]
            forward = lambda: self.model(inputs)  # noqa: E731
        else:
            images, targets = self.inputs[:batch], self.targets[:batch]
            forward = lambda: self.model(images, targets)  # noqa: E731
        return train_step_fn(self.bench, self.model, self.optimizer, forward)


def train_step_fn(bench, model, optimizer, forward):
    def step():
        model.train()
        with bench.autocast():
            losses = forward()
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _anchor_config(cfg):
    generator = cfg.MODEL.ANCHOR_GENERATOR
    sizes = generator.RELATIVE_SIZES or generator.SIZES
    return {"sizes": sizes, "aspect_ratios": generator.ASPECT_RATIOS}


def run_detectors(bench, names):
    """reference / ec / ec_matched: anchors, FLOPs, inference at batch 1 and ``--batch``, a
    training iteration; the models take turns (see :meth:`Bench.time_round_robin`)."""
    args = bench.args
    detectors = {}
    for name in names:
        if name == "reference":
            if min(args.size) < REFERENCE_MIN_SIZE:
                raise ValueError(
                    f"--size {args.size[0]} {args.size[1]}: torchvision's SSD300-VGG16 needs at "
                    f"least {REFERENCE_MIN_SIZE} px (its last extra layers are unpadded 3x3 "
                    f"convolutions); use a larger --size or leave 'reference' out of --only"
                )
            torch.manual_seed(args.seed)
            model = prepare(build_reference(args.size).to(bench.device), args)
            detectors[name] = Detector(bench, name, model)
            detectors[name].info["config"] = "torchvision ssd300_vgg16(num_classes=3)"
        else:
            config_file = args.config_file if name == "ec" else args.matched_config_file
            cfg = load_cfg(config_file, args)
            detectors[name] = Detector(bench, name, build_ours(cfg, args), cfg)
            detectors[name].info["config"] = os.path.relpath(config_file, REPO)
    for name, detector in detectors.items():
        bench.models[name] = detector.describe()
        logger.info(f"{name}: {bench.models[name]}")

    # --quick: batch 1 only, and only the like-for-like pair trains.
    batches = [1] if args.quick else sorted({1, args.batch})
    for batch in batches:
        # Ec's heads hardly change the cost, so ec_matched is timed at batch 1 only.
        timed = {n: d for n, d in detectors.items() if batch == 1 or n != "ec_matched"}
        repeats = args.repeats if batch == 1 else args.train_repeats
        group, timings = bench.time_round_robin(
            {n: d.inference(batch) for n, d in timed.items()}, repeats
        )
        for name, timing in timings.items():
            bench.add(name, "inference", batch, timing, group)
    for name, detector in detectors.items():
        bench.profile(f"{name}/inference", detector.inference(1))

    if args.no_train:
        return
    trained = {n: d for n, d in detectors.items() if not args.quick or n != "ec"}
    steps = {n: d.train_step(args.train_batch) for n, d in trained.items()}
    with EventStorage(0):
        group, timings = bench.time_round_robin(steps, args.train_repeats)
        for name, timing in timings.items():
            bench.add(name, "train_step", args.train_batch, timing, group)
        for name, step in steps.items():
            bench.profile(f"{name}/train_step", step)


def random_detections(num, size, seed, device):
    """``num`` plausible Ec detections (boxes 10-40% of the image, probabilities) on one image."""
    height, width = size
    g = torch.Generator().manual_seed(seed + 1)
    side = torch.rand(num, 2, generator=g) * 0.3 + 0.1
    centre = torch.rand(num, 2, generator=g) * (1 - side) + side / 2
    scale = torch.tensor([width, height], dtype=torch.float32)
    boxes = torch.cat([(centre - side / 2) * scale, (centre + side / 2) * scale], dim=1)
    probs = torch.rand(num, 2, generator=g).softmax(dim=1)
    scores, classes = probs.max(dim=1)
    result = Instances((height, width))
    result.pred_boxes = Boxes(boxes.to(device))
    result.scores = (scores * 0.9).to(device)
    result.pred_classes = classes.to(device)
    result.class_probs = probs.to(device)
    return result


def run_refiner(bench):
    """The cascade's ROI heads alone (crop k detections, one batched refiner call, fuse)."""
    args = bench.args
    cfg = load_cfg(args.cascade_config_file, args)
    model = build_ours(cfg, args).eval()
    heads = model.roi_heads
    images, _ = synthetic_batch(1, args.size, args.seed)
    normalised = (images[:1].to(bench.device).float() - model.pixel_mean) / model.pixel_std
    image_list = ImageList(normalised[None], [tuple(args.size)])

    def refine_fn(detections):
        def refine():
            with torch.no_grad(), bench.autocast():
                heads(image_list, {}, [detections])

        return refine

    fns = {
        k: refine_fn(random_detections(k, args.size, args.seed, bench.device))
        for k in args.refiner_detections
    }
    group, timings = bench.time_round_robin(fns, args.repeats)
    for k, timing in timings.items():
        row = bench.add("refiner", f"inference, {k} detections", 1, timing, group)
        row.update({"detections": k, "per_crop_s": row["per_image_s"] / k})
    info = {
        "parameters_m": sum(p.numel() for p in heads.parameters()) / 1e6,
        "refiner": cfg.MODEL.REFINER.NAME,
        "crop_size": cfg.MODEL.REFINER.INPUT_SIZE,
    }
    if not args.no_flops:
        crops = torch.zeros(1, len(cfg.MODEL.PIXEL_MEAN), *(2 * [cfg.MODEL.REFINER.INPUT_SIZE]))
        info["gflops_per_crop"] = count_gflops(heads.refiner, crops.to(bench.device))
    info["config"] = os.path.relpath(args.cascade_config_file, REPO)
    bench.models["refiner"] = info


class DetectionCounter:
    """Forward pre-hook on the ROI heads: detections per image that reach the refiner."""

    def __init__(self, roi_heads):
        self.counts = []
        roi_heads.register_forward_pre_hook(self)

    def __call__(self, module, inputs):
        self.counts.extend(len(p) for p in inputs[2])


def run_cascade(bench):
    """MC-CNN inference with exactly k detections refined, taking turns with Ec (--config-file);
    then training iterations of its "refiner" and "joint" stages."""
    args = bench.args
    images, targets = synthetic_batch(args.train_batch, args.size, args.seed)
    inputs = detectron2_inputs(images[:1], targets[:1], bench.device, with_instances=False)
    ec = build_ours(load_cfg(args.config_file, args), args).eval()
    fns = {"ec": _no_grad_call(bench, ec, inputs)}
    counters, cascades = {}, {}
    for k in args.detections:
        # A threshold of 0 passes every anchor and NMS leaves far more than k boxes, so exactly
        # k reach the refiner; DetectionCounter checks it.
        overrides = ["MODEL.SSD.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", str(k)]
        cascades[k] = build_ours(load_cfg(args.cascade_config_file, args, overrides), args).eval()
        counters[k] = DetectionCounter(cascades[k].roi_heads)
        fns[k] = _no_grad_call(bench, cascades[k], inputs)
    group, timings = bench.time_round_robin(fns, args.repeats)
    bench.add("ec", "inference (cascade's Ec)", 1, timings.pop("ec"), group)
    for k, timing in timings.items():
        counts = counters[k].counts
        refined = float(np.mean(counts)) if counts else None
        if refined != k:
            logger.warning(f"cascade: asked for {k} detections, {refined} reached the refiner")
        row = bench.add("cascade", f"inference, {k} detections", 1, timing, group)
        row.update({"detections": k, "detections_refined": refined})
    info = {"config": os.path.relpath(args.cascade_config_file, REPO)}
    k = max([d for d in args.detections if d <= 10] or args.detections[:1])
    bench.profile(f"cascade/inference_{k}_detections", fns[k])
    if not args.no_flops:
        info[f"gflops_at_{k}_detections"] = count_gflops(cascades[k], inputs[0]["image"], True)
    bench.models["cascade"] = info
    del cascades, fns, ec
    gc.collect()
    if args.no_train:
        return

    cfg = load_cfg(args.cascade_config_file, args)
    train_inputs = detectron2_inputs(images, targets, bench.device, with_instances=True)
    steps, models = {}, []
    for stage in ("refiner",) if args.quick else ("refiner", "joint"):
        model = build_ours(cfg, args)
        model.set_stage(stage)
        optimizer = build_optimizer(cfg, model)
        steps[stage] = train_step_fn(bench, model, optimizer, _call(model, train_inputs))
        models.append(model)
    with EventStorage(0):
        group, timings = bench.time_round_robin(steps, args.train_repeats)
        for stage, timing in timings.items():
            bench.add("cascade", f"train_step ({stage})", len(train_inputs), timing, group)


def _call(model, inputs):
    return lambda: model(inputs)


def _no_grad_call(bench, model, inputs):
    def call():
        with torch.no_grad(), bench.autocast():
            model(inputs)

    return call


def run_mapper(bench):
    """SSDDatasetMapper (training, SSD augmentation) on 718x500 phantom JPEGs, in one thread as
    a data-loader worker runs it."""
    args = bench.args
    cfg = load_cfg(args.config_file, args)
    mapper = SSDDatasetMapper(cfg, is_train=True)
    with tempfile.TemporaryDirectory(prefix="thyroid_bench_") as tmp:
        dicts = []
        for i in range(args.mapper_images):
            seed = np.random.SeedSequence([args.seed, i])
            image, annotations = render_phantom(seed, *MAPPER_IMAGE_SIZE)
            file_name = os.path.join(tmp, f"{i:04d}.jpg")
            cv2.imwrite(file_name, image, [cv2.IMWRITE_JPEG_QUALITY, 95])
            dicts.append(
                {
                    "file_name": file_name,
                    "image_id": i,
                    "height": image.shape[0],
                    "width": image.shape[1],
                    "annotations": annotations,
                }
            )
        np.random.seed(args.seed)  # detectron2's augmentations draw from numpy's global RNG

        def map_all():
            for d in dicts:
                mapper(d)

        threads, cv2_threads = torch.get_num_threads(), cv2.getNumThreads()
        torch.set_num_threads(1)
        cv2.setNumThreads(1)
        try:
            group, timings = bench.time_round_robin({"mapper": map_all}, args.repeats)
        finally:
            torch.set_num_threads(threads)
            cv2.setNumThreads(cv2_threads)
    row = bench.add("mapper", "train mapping, 1 worker", len(dicts), timings["mapper"], group)
    row["source_size_hw"] = list(MAPPER_IMAGE_SIZE)


def run_peak(bench):
    """fp32 matrix-multiply GFLOP/s at the run's thread count and device."""
    n = 1024 if bench.args.quick else 2048
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(bench.device)
    b = torch.randn(n, n, generator=g).to(bench.device)
    _, timings = bench.time_round_robin({"mm": lambda: torch.mm(a, b)}, max(3, bench.args.repeats))
    median = timings["mm"]["median_s"]
    gflops = 2 * n**3 / median / 1e9
    bench.models["matmul_peak"] = {"n": n, "median_s": median, "gflops_per_s": gflops}
    logger.info(f"matmul peak: {bench.models['matmul_peak']['gflops_per_s']:.1f} GFLOP/s")


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def _find(rows, model, kind, batch=None):
    for row in rows:
        if row["model"] == model and row["kind"] == kind and batch in (None, row["batch"]):
            return row
    return None


def _ratio(row, ref):
    """Per-image time over the reference row's: paired when both were timed in turns."""
    if ref is None:
        return None
    if ref["group"] == row["group"] and row["batch"] == ref["batch"]:
        return paired_ratio(row["times_s"], ref["times_s"])
    return row["per_image_s"] / ref["per_image_s"]


def add_ratios(bench):
    """Every row of ours against the reference's matching row (inference rows of the refiner and
    the cascade against its batch-1 inference, training rows against its training step), and the
    cascade's inference against Ec's."""
    rows = bench.rows
    for row in rows:
        if row["model"] in ("reference", "mapper"):
            continue
        if row["kind"] in ("inference", "train_step"):
            ref = _find(rows, "reference", row["kind"], row["batch"])
        elif row["kind"].startswith("train_step"):
            ref = _find(rows, "reference", "train_step")
        else:
            ref = _find(rows, "reference", "inference", 1)
        row["vs_reference"] = _ratio(row, ref)
        if row["model"] == "cascade" and row["kind"].startswith("inference"):
            row["vs_ec"] = _ratio(row, _find(rows, "ec", "inference (cascade's Ec)"))

    peak = bench.models.get("matmul_peak", {}).get("gflops_per_s")
    for name in ("reference", "ec", "ec_matched"):
        info, row = bench.models.get(name, {}), _find(rows, name, "inference", 1)
        if info.get("gflops") and row:
            info["achieved_gflops_per_s"] = info["gflops"] / row["median_s"]
            if peak:
                info["share_of_matmul_peak"] = info["achieved_gflops_per_s"] / peak


def check_targets(bench):
    """The issue's targets, each with its measured value and whether it is met."""
    rows, checks = bench.rows, []

    def check(name, description, value, limit, **extra):
        met = None if value is None else bool(value <= limit)
        checks.append(
            {"target": name, "description": description, "value": value, "limit": limit,
             "met": met, **extra}
        )

    row = _find(rows, "ec_matched", "inference", 1)
    check(
        "ec_inference_vs_reference",
        "Ec inference, anchors matched, batch 1: time / torchvision SSD's",
        row and row.get("vs_reference"),
        TARGETS["ec_inference_vs_reference"],
    )
    cascade = [r["vs_ec"] for r in rows if r.get("vs_ec") is not None and r["detections"] <= 10]
    check(
        "cascade_vs_ec_up_to_10",
        "cascade inference, <= 10 detections: worst time / Ec's",
        max(cascade) if cascade else None,
        TARGETS["cascade_vs_ec_up_to_10"],
    )
    row = _find(rows, "ec_matched", "train_step")
    check(
        "train_vs_reference",
        "Ec training iteration, anchors matched: time / torchvision SSD's",
        row and row.get("vs_reference"),
        TARGETS["train_vs_reference"],
    )
    mapper = _find(rows, "mapper", "train mapping, 1 worker")
    train = _find(rows, "ec", "train_step") or _find(rows, "ec_matched", "train_step")
    value, workers = None, None
    if mapper and train:
        value = train["images_per_s"] / (2 * mapper["images_per_s"])
        workers = int(math.ceil(train["images_per_s"] / mapper["images_per_s"]))
    check(
        "mapper_feeds_training",
        "Ec training images/s / two mapper workers' images/s",
        value,
        1.0,
        workers_needed=workers,
    )
    return checks


def _fmt(value, spec):
    return "" if value is None else format(value, spec)


def format_table(bench, checks):
    lines = [
        f"{'model':<10} {'measurement':<26} {'batch':>5} {'ms/image':>10} {'IQR ms':>8} "
        f"{'img/s':>7} {'x ref':>6} {'x Ec':>6}"
    ]
    for row in bench.rows:
        lines.append(
            f"{row['model']:<10} {row['kind']:<26} {row['batch']:>5} "
            f"{1e3 * row['per_image_s']:>10.1f} {1e3 * row['iqr_s']:>8.1f} "
            f"{row['images_per_s']:>7.2f} {_fmt(row.get('vs_reference'), '.2f'):>6} "
            f"{_fmt(row.get('vs_ec'), '.2f'):>6}"
        )
    lines.append("(x ref, x Ec: time ratios; paired over rounds where the two were timed in turns)")
    lines.append("")
    for name, info in bench.models.items():
        shown = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in info.items()
            if not isinstance(v, (dict, list))
        )
        lines.append(f"{name}: {shown}")
    lines.append("")
    for c in checks:
        verdict = {True: "met", False: "NOT met", None: "not measured"}[c["met"]]
        value = _fmt(c["value"], ".3f") or "n/a"
        lines.append(f"target: {c['description']} = {value} (<= {c['limit']}): {verdict}")
    for name, prof in bench.profiles.items():
        lines.append(f"\nprofile {name} (self CPU time, total {prof['total_self_cpu_ms']:.0f} ms):")
        for op in prof["top_ops"]:
            lines.append(
                f"  {op['op']:<42} {op['self_cpu_ms']:>9.1f} ms {100 * op['self_cpu_share']:5.1f}% "
                f"x{op['calls']}"
            )
    return "\n".join(lines)


def environment(args):
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "detectron2": detectron2.__version__,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "processor": platform.processor(),
    }
    if args.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


@cli_errors("benchmark.py")
def main(argv=None):
    args = parse_args(argv)
    setup_logger(name="thyroid_det.benchmark")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args):
    bench = Bench(args)
    load_start = os.getloadavg()
    started = time.perf_counter()
    if "peak" in args.only:
        run_peak(bench)
    detectors = [n for n in ("reference", "ec", "ec_matched") if n in args.only]
    if detectors:
        run_detectors(bench, detectors)
        gc.collect()
    sections = (("refiner", run_refiner), ("cascade", run_cascade), ("mapper", run_mapper))
    for section, run in sections:
        if section in args.only:
            run(bench)
            gc.collect()
    add_ratios(bench)
    checks = check_targets(bench)
    load_end = os.getloadavg()
    results = {
        "settings": {
            "size_hw": list(args.size),
            "threads": args.threads,
            "device": args.device,
            "amp": args.amp,
            "channels_last": args.channels_last,
            "batch": args.batch,
            "train_batch": args.train_batch,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "train_repeats": args.train_repeats,
            "quick": args.quick,
            "no_train": args.no_train,
            "config_file": args.config_file,
            "matched_config_file": args.matched_config_file,
            "cascade_config_file": args.cascade_config_file,
            "opts": list(args.opts),
        },
        "environment": environment(args),
        "load_average_start": list(load_start),
        "load_average_end": list(load_end),
        "wall_s": time.perf_counter() - started,
        "models": bench.models,
        "rows": bench.rows,
        "targets": checks,
        "profiles": bench.profiles,
    }
    print(format_table(bench, checks))
    busy = max(load_start[0], load_end[0]) > (os.cpu_count() or 1) - 0.5
    print(
        f"\nload average (1 min) {load_start[0]:.2f} -> {load_end[0]:.2f} on {os.cpu_count()} "
        f"cores, {args.threads} threads, {results['wall_s']:.0f} s"
        + (": the machine was busy, absolute times are inflated and noisy" if busy else "")
    )
    if args.quick:
        print("--quick: one timed call per row; the verdicts above are indicative only")
    if args.output:
        atomic_write_json(args.output, results)
        print(f"results written to {args.output}")
    return results


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:
        sys.exit(f"benchmark.py: error: {e}")
