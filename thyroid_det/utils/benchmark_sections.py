"""The sections of tools/benchmark.py, one function a section (what each row measures is in
the tool's docstring): ``run_peak``, ``run_detectors`` (reference / ec / ec_matched),
``run_refiner``, ``run_cascade`` and ``run_mapper``. Each takes a :class:`~.benchmark.Benchmark`
and the tool's parsed arguments (sizes, counts, configs, and ``batch_data``, the one random batch
all sections share) and adds its rows and model descriptions to the benchmark."""

import gc
import logging
import os
import tempfile
from types import SimpleNamespace

import cv2
import numpy as np
import torch
import torchvision
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer
from detectron2.structures import ImageList
from detectron2.utils.events import EventStorage

from ..data.datasets.phantoms import render_phantom
from ..data.mapper import SSDDatasetMapper
from ..engine import load_cfg
from ..modeling.meta_arch.mccnn import detections_to_proposals
from ..modeling.model_input import model_input_channels
from .benchmark_models import (
    DetectionCounter,
    Detector,
    count_gflops,
    detectron2_inputs,
    matmul_peak,
    no_grad_call,
    random_detections,
    train_step_fn,
)

__all__ = [
    "benchmark_cfg",
    "build_reference",
    "run_cascade",
    "run_detectors",
    "run_mapper",
    "run_peak",
    "run_refiner",
]

logger = logging.getLogger("thyroid_det.benchmark")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# torchvision's SSD300-VGG16 ends in unpadded 3x3 convolutions: smaller inputs vanish.
REFERENCE_MIN_SIZE = 264
MAPPER_IMAGE_SIZE = (500, 718)  # TN5000's typical frame, (H, W)


def benchmark_cfg(config_file, args, extra_opts=()):
    """A config of ours (engine's checked loading, without default_setup's output folder and
    logging) at the benchmark's input size and device, random weights, ``--opts`` merged."""
    opts = list(args.opts) + list(extra_opts) + ["MODEL.DEVICE", args.device, "MODEL.WEIGHTS", ""]
    cfg = load_cfg(SimpleNamespace(config_file=config_file, opts=opts))
    cfg.INPUT.FIXED_SIZE = tuple(args.size)
    cfg.freeze()
    return cfg


def build_ours(cfg, args):
    torch.manual_seed(args.seed)
    return prepare(build_model(cfg), args)


def prepare(model, args):
    """``--channels-last``: NHWC parameters; convolutions then keep activations NHWC."""
    return model.to(memory_format=torch.channels_last) if args.channels_last else model


def compile_refiner(model, args):
    """``--compile-refiner MODE``: the cascade's refiner network under ``torch.compile`` with
    static shapes: one graph per crop count it meets (the warm-up calls compile them)."""
    if args.compile_refiner:
        heads = model.roi_heads
        heads.refiner = torch.compile(heads.refiner, mode=args.compile_refiner, dynamic=False)
    return model


def build_reference(size, num_classes=3):
    """torchvision's SSD300-VGG16 architecture, random weights, resizing to exactly ``size``."""
    model = torchvision.models.detection.ssd300_vgg16(
        weights=None, weights_backbone=None, num_classes=num_classes
    )
    model.transform.min_size = (min(size),)
    model.transform.max_size = max(size)
    model.transform.fixed_size = (size[1], size[0])  # torchvision's fixed_size is (width, height)
    return model


def run_detectors(bench, args, names):
    """reference / ec / ec_matched: anchors, FLOPs, inference at batch 1 and ``--batch``, a
    training iteration; the models take turns (see :meth:`Benchmark.time_round_robin`)."""
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
            detectors[name] = Detector(bench, model, args.batch_data, None, not args.no_flops)
            detectors[name].info["config"] = "torchvision ssd300_vgg16(num_classes=3)"
        else:
            config_file = args.config_file if name == "ec" else args.matched_config_file
            cfg = benchmark_cfg(config_file, args)
            model = build_ours(cfg, args)
            detectors[name] = Detector(bench, model, args.batch_data, cfg, not args.no_flops)
            detectors[name].info["config"] = os.path.relpath(config_file, REPO)
    for name, detector in detectors.items():
        bench.models[name] = detector.describe()
        logger.info(f"{name}: {bench.models[name]}")

    # --quick: batch 1 only, and only the like-for-like pair trains.
    for batch in [1] if args.quick else sorted({1, args.batch}):
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


def run_refiner(bench, args):
    """The cascade's ROI heads alone (crop k detections, one batched refiner call, fuse)."""
    cfg = benchmark_cfg(args.cascade_config_file, args)
    model = compile_refiner(build_ours(cfg, args).eval(), args)
    heads = model.roi_heads
    images = args.batch_data[0][:1].to(bench.device)
    image_list = ImageList(((images.float() - model.pixel_mean) / model.pixel_std)[None],
                           [tuple(args.size)])

    def refine_fn(k):
        detections = random_detections(k, args.size, args.seed, bench.device)
        (proposals,) = detections_to_proposals([detections])  # as MCCNN feeds its ROI heads

        def refine():
            with torch.no_grad(), bench.autocast():
                heads(image_list, {}, [proposals])

        return refine

    fns = {k: refine_fn(k) for k in args.refiner_detections}
    group, timings = bench.time_round_robin(fns, args.repeats)
    for k, timing in timings.items():
        row = bench.add("refiner", f"inference, {k} detections", 1, timing, group)
        row.update({"detections": k, "per_crop_s": row["per_image_s"] / k})
    crop_size = heads.test_input_size  # the crops inference runs on
    info = {
        "parameters_m": sum(p.numel() for p in heads.parameters()) / 1e6,
        "refiner": cfg.MODEL.REFINER.NAME,
        "crop_size": crop_size,
    }
    if not args.no_flops:
        channels = model_input_channels(cfg)  # 1: the ROI heads hand the refiner luma crops
        crops = torch.zeros(1, channels, crop_size, crop_size)
        info["gflops_per_crop"] = count_gflops(heads.refiner, crops.to(bench.device))
    info["config"] = os.path.relpath(args.cascade_config_file, REPO)
    bench.models["refiner"] = info


def run_cascade(bench, args):
    """MC-CNN inference with exactly k detections refined, taking turns with its own Ec (the
    cascade's config as a MultiScaleSSD, keeping 10 detections or the largest k below);
    then training iterations of its "refiner" and "joint" stages."""
    images, targets = args.batch_data
    inputs = detectron2_inputs(images[:1], targets[:1], bench.device, with_instances=False)

    def overrides(k):
        # A threshold of 0 passes every anchor and NMS leaves far more than k boxes, so exactly
        # k reach the refiner; DetectionCounter checks it.
        return ["MODEL.SSD.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", str(k)]

    k_ec = max([d for d in args.detections if d <= 10] or args.detections[:1])
    ec_cfg = benchmark_cfg(
        args.cascade_config_file,
        args,
        overrides(k_ec) + ["MODEL.META_ARCHITECTURE", "MultiScaleSSD"],
    )
    ec = build_ours(ec_cfg, args).eval()
    fns = {"ec": no_grad_call(bench, ec, inputs)}
    counters, cascades = {}, {}
    for k in args.detections:
        cfg = benchmark_cfg(args.cascade_config_file, args, overrides(k))
        cascades[k] = compile_refiner(build_ours(cfg, args).eval(), args)
        counters[k] = DetectionCounter(cascades[k].roi_heads)
        fns[k] = no_grad_call(bench, cascades[k], inputs)
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
    bench.profile(f"cascade/inference_{k_ec}_detections", fns[k_ec])
    if not args.no_flops:
        info[f"gflops_at_{k_ec}_detections"] = count_gflops(cascades[k_ec], inputs[0]["image"], True)
    bench.models["cascade"] = info
    del cascades, fns, ec
    gc.collect()
    if args.no_train:
        return

    cfg = benchmark_cfg(args.cascade_config_file, args)
    train_inputs = detectron2_inputs(
        images[: args.train_batch], targets[: args.train_batch], bench.device, True
    )
    steps = {}
    for stage in ("refiner",) if args.quick else ("refiner", "joint"):
        model = build_ours(cfg, args)
        model.set_stage(stage)
        forward = (lambda m: lambda: m(train_inputs))(model)
        steps[stage] = train_step_fn(bench, model, build_optimizer(cfg, model), forward)
    with EventStorage(0):
        group, timings = bench.time_round_robin(steps, args.train_repeats)
        for stage, timing in timings.items():
            bench.add("cascade", f"train_step ({stage})", len(train_inputs), timing, group)


def run_mapper(bench, args):
    """SSDDatasetMapper (training, SSD augmentation) on 718x500 phantom JPEGs, in one thread as
    a data-loader worker runs it."""
    mapper = SSDDatasetMapper(benchmark_cfg(args.config_file, args), is_train=True)
    with tempfile.TemporaryDirectory(prefix="thyroid_bench_") as tmp:
        dicts = []
        for i in range(args.mapper_images):
            image, annotations = render_phantom(np.random.SeedSequence([args.seed, i]),
                                                *MAPPER_IMAGE_SIZE)
            file_name = os.path.join(tmp, f"{i:04d}.jpg")
            cv2.imwrite(file_name, image, [cv2.IMWRITE_JPEG_QUALITY, 95])
            height, width = image.shape[:2]
            dicts.append({"file_name": file_name, "image_id": i, "height": height,
                          "width": width, "annotations": annotations})
        np.random.seed(args.seed)  # detectron2's augmentations draw from numpy's global RNG
        threads, cv2_threads = torch.get_num_threads(), cv2.getNumThreads()
        torch.set_num_threads(1)
        cv2.setNumThreads(1)
        try:
            group, timings = bench.time_round_robin(
                {"mapper": lambda: [mapper(d) for d in dicts]}, args.repeats
            )
        finally:
            torch.set_num_threads(threads)
            cv2.setNumThreads(cv2_threads)
    row = bench.add("mapper", "train mapping, 1 worker", len(dicts), timings["mapper"], group)
    row["source_size_hw"] = list(MAPPER_IMAGE_SIZE)


def run_peak(bench, args):
    """fp32 matrix-multiply GFLOP/s at the run's thread count and device."""
    n, repeats = (1024 if args.quick else 2048), max(3, args.repeats)
    bench.models["matmul_peak"] = matmul_peak(bench, n, repeats)
    logger.info(f"matmul peak: {bench.models['matmul_peak']['gflops_per_s']:.1f} GFLOP/s")
