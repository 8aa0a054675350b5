"""What tools/benchmark.py times: seeded synthetic images and boxes in detectron2's and
torchvision's input formats, a detector wrapper with its inference and training-step callables,
anchor, detection and FLOP counters. Weights and inputs are random: speed only."""

import logging

import torch
from detectron2.solver import build_optimizer
from detectron2.structures import Boxes, Instances
from fvcore.nn import FlopCountAnalysis
from torch import nn

__all__ = [
    "AnchorCounter",
    "DetectionCounter",
    "Detector",
    "count_gflops",
    "detectron2_inputs",
    "matmul_peak",
    "no_grad_call",
    "random_boxes",
    "random_detections",
    "synthetic_batch",
    "torchvision_inputs",
    "train_step_fn",
]

logger = logging.getLogger("thyroid_det.benchmark")


def random_boxes(num, size, generator):
    """``num`` XYXY boxes, each side 10-40% of the image's, inside an image of ``size`` (H, W)."""
    height, width = size
    side = torch.rand(num, 2, generator=generator) * 0.3 + 0.1
    centre = torch.rand(num, 2, generator=generator) * (1 - side) + side / 2
    scale = torch.tensor([width, height], dtype=torch.float32)
    return torch.cat([(centre - side / 2) * scale, (centre + side / 2) * scale], dim=1)


def synthetic_batch(num_images, size, seed):
    """Random uint8 images (N, H, W) and 1-3 random boxes with classes {0, 1} per image."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (num_images, *size), dtype=torch.uint8, generator=g)
    targets = []
    for _ in range(num_images):
        n = int(torch.randint(1, 4, (1,), generator=g))
        boxes = random_boxes(n, size, g)
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


def random_detections(num, size, seed, device):
    """``num`` plausible Ec detections (boxes 10-40% of the image, probabilities) on one image."""
    g = torch.Generator().manual_seed(seed + 1)
    boxes = random_boxes(num, size, g)
    probs = torch.rand(num, 2, generator=g).softmax(dim=1)
    scores, classes = probs.max(dim=1)
    result = Instances(tuple(size))
    result.pred_boxes = Boxes(boxes.to(device))
    result.scores = (scores * 0.9).to(device)
    result.pred_classes = classes.to(device)
    result.class_probs = probs.to(device)
    return result


def train_step_fn(bench, model, optimizer, forward):
    """A training iteration: ``forward()`` (autocast) to a loss dict, backward, optimiser step."""

    def step():
        model.train()
        with bench.autocast():
            losses = forward()
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


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


class DetectionCounter:
    """Forward pre-hook on the ROI heads: detections per image that reach the refiner."""

    def __init__(self, roi_heads):
        self.counts = []
        roi_heads.register_forward_pre_hook(self)

    def __call__(self, module, inputs):
        self.counts.extend(len(p) for p in inputs[2])


class _TensorForward(nn.Module):
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
    """2 x fvcore's multiply-add count of one inference forward on ``image``, comparable with a
    matrix-multiply peak (2 n^3 per product); ``detectron2_model`` None: ``model`` maps a tensor
    to a tensor, else True for detectron2-style and False for torchvision-style detectors."""
    was_training = model.training
    model.eval()
    module = model if detectron2_model is None else _TensorForward(model, detectron2_model)
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
    """One detector under test (a torchvision SSD when ``cfg`` is None, else ours): its inputs,
    inference and training-step callables."""

    def __init__(self, bench, model, batch_data, cfg=None, count_flops=True):
        """
        Args:
            model: a torchvision SSD (``cfg`` None) or one of ours, built from ``cfg``.
            batch_data: (images, targets) from :func:`synthetic_batch`, shared by every model.
        """
        self.bench, self.model, self.cfg, self.count_flops = bench, model, cfg, count_flops
        images, targets = batch_data
        if cfg is not None:
            self.inputs = detectron2_inputs(images, targets, bench.device, False)
            self.train_inputs = detectron2_inputs(images, targets, bench.device, True)
        else:
            self.inputs, self.targets = torchvision_inputs(images, targets, bench.device)
        self.info = {"parameters_m": sum(p.numel() for p in model.parameters()) / 1e6}
        if cfg is not None:
            generator = cfg.MODEL.ANCHOR_GENERATOR
            sizes = generator.RELATIVE_SIZES or generator.SIZES
            self.info["anchor_config"] = {"sizes": sizes, "aspect_ratios": generator.ASPECT_RATIOS}

    def describe(self):
        """Count anchors (one inference call, also a warm-up) and FLOPs."""
        self.model.eval()
        counter = AnchorCounter(self.model.anchor_generator)
        with torch.no_grad():
            self.model(self.inputs[:1])
        self.info["anchors"] = counter.count
        if self.count_flops:
            ours = self.cfg is not None
            image = self.inputs[0]["image"] if ours else self.inputs[0]
            self.info["gflops"] = count_gflops(self.model, image, ours)
        return self.info

    def inference(self, batch):
        return no_grad_call(self.bench, self.model.eval(), self.inputs[:batch])

    def train_step(self, batch):
        """Forward (autocast), backward and optimiser step on ``batch`` images."""
        if self.cfg is not None:
            optimizer = build_optimizer(self.cfg, self.model)
            inputs = self.train_inputs[:batch]
            forward = lambda: self.model(inputs)  # noqa: E731
        else:  # torchvision's reference recipe: SGD, momentum 0.9, weight decay 5e-4
            optimizer = torch.optim.SGD(
                self.model.parameters(), lr=1e-4, momentum=0.9, weight_decay=5e-4
            )
            images, targets = self.inputs[:batch], self.targets[:batch]
            forward = lambda: self.model(images, targets)  # noqa: E731
        return train_step_fn(self.bench, self.model, optimizer, forward)


def no_grad_call(bench, model, inputs):
    """Inference of ``model`` on ``inputs`` (eval mode, no grad, the run's autocast)."""

    def call():
        model.eval()
        with torch.no_grad(), bench.autocast():
            model(inputs)

    return call


def matmul_peak(bench, n, repeats):
    """fp32 ``n`` x ``n`` matrix-multiply GFLOP/s at the current thread count and device."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(bench.device)
    b = torch.randn(n, n, generator=g).to(bench.device)
    _, timings = bench.time_round_robin({"mm": lambda: torch.mm(a, b)}, repeats)
    median = timings["mm"]["median_s"]
    return {"n": n, "median_s": median, "gflops_per_s": 2 * n**3 / median / 1e9}
