"""detectron2's export routes on Ec and on the cascade: TracingAdapter then torch.jit.trace (save
and load), or then torch.onnx.export (run in onnxruntime); the exported model gives the eager
model's outputs, also on images of another size and with fewer detections than the traced one.
The three ONNX symbolics that thyroid_det.export adds give torch's results on inputs of any size."""
import pytest
import torch
from detectron2.export import TracingAdapter
from detectron2.modeling import build_model
from torch import nn
from torch.nn import functional as F

from thyroid_det.export import ONNX_OPSET, export_onnx, register_onnx_symbolics

from ..conftest import make_cfg

CONFIGS = ["configs/mssd_vgg16.yaml", "configs/mccnn.yaml"]


def fields(instances):
    return {k: getattr(v, "tensor", v) for k, v in instances.get_fields().items()}


def model_and_images(config):
    """A tiny random-weight model and two images that keep different numbers of detections: the
    one to trace (BGR, not FIXED_SIZE) and FIXED_SIZE itself."""
    cfg = make_cfg(config, tiny=True)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    generator = torch.Generator().manual_seed(0)
    traced_image = torch.rand(3, 90, 150, generator=generator) * 255
    other = torch.rand(3, 128, 128, generator=generator) * 255
    with torch.no_grad():
        other_scores = model([{"image": other}])[0]["instances"].scores
    # A score threshold within `other`'s scores, so that the two images keep different numbers
    # of detections: the exported graph must not fix the count it saw.
    model.test_score_thresh = float(other_scores[3] + other_scores[4]) / 2
    return model, (traced_image, other)


def assert_matches_eager(model, images, run_exported, **tolerance):
    """``run_exported(image)`` (the Instances' fields) equals the eager model's on each image,
    and the images keep different numbers of detections."""
    counts = []
    for image in images:
        with torch.no_grad():
            eager = fields(model([{"image": image}])[0]["instances"])
        exported = run_exported(image)
        assert eager.keys() == exported.keys()
        for key, value in eager.items():
            torch.testing.assert_close(exported[key], value, msg=key, **tolerance)
        counts.append(len(eager["scores"]))
    assert counts[0] != counts[1] and min(counts) > 0, counts


@pytest.mark.parametrize("config", CONFIGS)
def test_traced_model_reloads_with_eager_outputs(config, tmp_path):
    model, images = model_and_images(config)
    adapter = TracingAdapter(model, [{"image": images[0]}])
    with torch.no_grad():
        traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)
    path = str(tmp_path / "model.ts")
    torch.jit.save(traced, path)
    reloaded = torch.jit.load(path)

    def run(image):
        with torch.no_grad():
            return fields(adapter.outputs_schema(reloaded(image))[0]["instances"])

    assert_matches_eager(model, images, run)


def importorskip(name):
    """The module, or a skip that names it (missing, or installed but failing to import)."""
    reason = f"{name} not importable: pip install -e '.[dev]'"
    return pytest.importorskip(name, reason=reason, exc_type=ImportError)


@pytest.mark.parametrize("config", CONFIGS)
def test_onnx_model_runs_in_onnxruntime_with_eager_outputs(config, tmp_path):
    onnx = importorskip("onnx")
    ort = importorskip("onnxruntime")

    model, images = model_and_images(config)
    path = str(tmp_path / "model.onnx")
    adapter = export_onnx(model, images[0], path)
    onnx.checker.check_model(onnx.load(path), full_check=True)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    assert names[-1] == "image_size" and "pred_boxes" in names and "scores" in names

    def run(image):
        outputs = session.run(None, {"image": image.numpy()})
        outputs = adapter.outputs_schema([torch.from_numpy(o) for o in outputs])
        return fields(outputs[0]["instances"])

    # float32 in both; measured: boxes within 3.1e-5 px, probabilities within 2e-6, classes equal.
    assert_matches_eager(model, images, run, rtol=1e-5, atol=1e-4)


def test_failed_onnx_export_leaves_the_previous_file(tmp_path, monkeypatch):
    """The .onnx is written beside its path and renamed: an export that fails part-way leaves
    neither a truncated file nor a temporary one."""
    model, images = model_and_images(CONFIGS[0])
    path = tmp_path / "model.onnx"
    path.write_bytes(b"the previous export")

    def fails_part_way(model, args, f, **kwargs):
        with open(f, "wb") as out:
            out.write(b"half a graph")
        raise RuntimeError("exporter failed")

    monkeypatch.setattr(torch.onnx, "export", fails_part_way)
    with pytest.raises(RuntimeError, match="exporter failed"):
        export_onnx(model, images[0], str(path))
    assert path.read_bytes() == b"the previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


class SymbolicOps(nn.Module):
    """The three ops thyroid_det.export adds symbolics for."""

    def forward(self, x):
        resized = F.interpolate(x, (32, 48), mode="bilinear", align_corners=False, antialias=True)
        values, order = torch.floor(x / 64).flatten().sort(descending=True, stable=True)  # ties
        return resized, F.adaptive_avg_pool2d(x, (5, 3)), values, order


def test_onnx_symbolics_match_torch_on_any_input_size(tmp_path):
    ort = importorskip("onnxruntime")
    register_onnx_symbolics()
    path = str(tmp_path / "ops.onnx")
    generator = torch.Generator().manual_seed(0)
    example = torch.rand(1, 2, 20, 30, generator=generator) * 255
    torch.onnx.export(
        SymbolicOps(), (example,), path, dynamo=False, opset_version=ONNX_OPSET,
        input_names=["x"], dynamic_axes={"x": {2: "height", 3: "width"}},
    )  # fmt: skip
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    # Shrinking, enlarging and mixed resizes; pools whose bins overlap or repeat inputs.
    for height, width in [(20, 30), (100, 150), (16, 96), (13, 7), (1, 1)]:
        x = torch.rand(1, 2, height, width, generator=generator) * 255
        outputs = session.run(None, {"x": x.numpy()})
        expected = SymbolicOps()(x)
        for name, got, want in zip(("resize", "pool", "sorted", "order"), outputs, expected):
            torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-5, atol=1e-3, msg=name)
