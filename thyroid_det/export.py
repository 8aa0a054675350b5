"""ONNX export of Ec and the cascade through detectron2's ``TracingAdapter``.

torch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``) converts every op of
these models but three, which :func:`register_onnx_symbolics` adds:

* ``aten::_upsample_bilinear2d_aa``, the antialiased resize to ``INPUT.FIXED_SIZE`` in
  :func:`~thyroid_det.modeling.model_input.resize_to`. ONNX's ``Resize`` with ``antialias=1``
  (opset 18) exists, but onnxruntime's downscale filter differs from torch's (up to 9 grey levels
  at 2x), so the resize is written as torch computes it: two matrix products with per-row
  normalised triangle-filter weights, built in the graph from the input's size (any H x W).
* ``aten::sort`` with ``stable=True`` (Ec's top-k candidates): exported as ``TopK``, which breaks
  ties by the lower index, as a stable sort does; torch's own symbolic rejects the overload.
* ``aten::adaptive_avg_pool2d`` whose output does not divide the input (the AlexNet refiners'
  6x6 pool after pool5 on small crops): two matrix products with the bins' averaging weights.

torchvision registers ``nms`` and ``roi_align`` itself; ``roi_align(aligned=True)`` needs
opset 16.
"""
import torch
from detectron2.export import TracingAdapter
from torch.onnx import symbolic_helper as sh

from .utils.file_io import atomic_path

__all__ = ["ONNX_OPSET", "register_onnx_symbolics", "export_onnx"]

ONNX_OPSET = 17
_MIN_OPSET = 16  # torchvision's RoiAlign symbolic with aligned=True (half_pixel)
_FLOAT = 1  # onnx.TensorProto.FLOAT
_INT64 = 7  # onnx.TensorProto.INT64


def _const(g, value, dtype=torch.float32):
    return g.op("Constant", value_t=torch.as_tensor(value, dtype=dtype))


def _input_size(g, input, axis, dtype):
    """Size of ``input`` along ``axis`` as a 0-d ``dtype`` tensor of the graph."""
    size = g.op("Gather", g.op("Shape", input), _const(g, axis, torch.int64), axis_i=0)
    return g.op("Cast", size, to_i=dtype) if dtype != _INT64 else size


def _resize_weights(g, input, axis, out_size):
    """(out_size, in_size) weights of torch's antialiased bilinear resize along ``axis``: a
    triangle filter widened by the scale when shrinking, centred on each output pixel, clipped to
    the input and normalised per row (``_compute_index_ranges_weights`` in ATen's UpSample)."""
    in_size = _input_size(g, input, axis, _FLOAT)
    scale = g.op("Div", in_size, _const(g, float(out_size)))
    inv_support = g.op("Div", _const(g, 1.0), g.op("Max", scale, _const(g, 1.0)))
    centers = g.op("Mul", scale, _const(g, (torch.arange(out_size) + 0.5).view(-1, 1)))
    taps = g.op("Add", g.op("Range", _const(g, 0.0), in_size, _const(g, 1.0)), _const(g, 0.5))
    distance = g.op("Mul", g.op("Sub", taps, centers), inv_support)
    weights = g.op("Relu", g.op("Sub", _const(g, 1.0), g.op("Abs", distance)))
    total = g.op("ReduceSum", weights, _const(g, [1], torch.int64), keepdims_i=1)
    return g.op("Div", weights, total)


def _pool_weights(g, input, axis, out_size):
    """(out_size, in_size) weights of adaptive average pooling along ``axis``: bin i averages
    inputs floor(i * in / out) .. ceil((i + 1) * in / out) - 1, in integer arithmetic as ATen."""
    in_size = _input_size(g, input, axis, _INT64)
    index = torch.arange(out_size, dtype=torch.int64).view(-1, 1)
    out = _const(g, out_size, torch.int64)
    start = g.op("Div", g.op("Mul", _const(g, index, torch.int64), in_size), out)  # floor
    end = g.op("Mul", _const(g, index + 1, torch.int64), in_size)
    end = g.op("Div", g.op("Add", end, _const(g, out_size - 1, torch.int64)), out)  # ceil
    taps = g.op("Range", _const(g, 0, torch.int64), in_size, _const(g, 1, torch.int64))
    inside = g.op("And", g.op("GreaterOrEqual", taps, start), g.op("Less", taps, end))
    count = g.op("Cast", g.op("Sub", end, start), to_i=_FLOAT)
    return g.op("Div", g.op("Cast", inside, to_i=_FLOAT), count)


def _separable(g, input, weights_h, weights_w):
    """``weights_h @ input @ weights_w.T`` over the last two axes of an (N, C, H, W) input."""
    rows = g.op("MatMul", weights_h, input)
    return g.op("MatMul", rows, g.op("Transpose", weights_w, perm_i=[1, 0]))


def _upsample_bilinear2d_aa(g, input, output_size, align_corners, *scale_factors):
    size = sh._maybe_get_const(output_size, "is")
    if sh._is_value(size) or sh._maybe_get_const(align_corners, "b"):
        return sh._unimplemented(
            "_upsample_bilinear2d_aa", "only a constant output size with align_corners=False", input
        )
    height, width = size
    return _separable(
        g, input, _resize_weights(g, input, 2, height), _resize_weights(g, input, 3, width)
    )


def _adaptive_avg_pool2d(g, input, output_size):
    size = sh._maybe_get_const(output_size, "is")
    if sh._is_value(size):
        return sh._unimplemented("adaptive_avg_pool2d", "only a constant output size", input)
    height, width = (size, size) if isinstance(size, int) else size
    return _separable(
        g, input, _pool_weights(g, input, 2, height), _pool_weights(g, input, 3, width)
    )


def _sort(g, input, *args):
    # aten::sort(self, dim, descending) or aten::sort.stable(self, *, stable, dim, descending)
    dim = sh._get_const(args[-2], "i", "dim")
    descending = sh._get_const(args[-1], "b", "descending")
    return sh._sort_helper(g, input, dim, descending=descending)


def register_onnx_symbolics():
    """Teach torch's TorchScript-based ONNX exporter the three ops above (opset >= 16).
    Idempotent."""
    for name, symbolic in (
        ("aten::_upsample_bilinear2d_aa", _upsample_bilinear2d_aa),
        ("aten::adaptive_avg_pool2d", _adaptive_avg_pool2d),
        ("aten::sort", _sort),
    ):
        torch.onnx.register_custom_op_symbolic(name, symbolic, _MIN_OPSET)


def export_onnx(model, image, path, *, opset=ONNX_OPSET):
    """
    Export ``model`` (Ec or the cascade, as built by ``build_model``) to an ONNX file that takes
    one (C, H, W) float image of any H x W, as ``model`` does, and returns the fields of its
    ``Instances`` (sorted by name), then the output image size.

    Args:
        model: a thyroid_det meta-architecture; put in eval mode.
        image (Tensor): an example (C, H, W) image to trace with.
        path (str): the .onnx file to write; written beside it and renamed, so a failed
            export leaves no truncated file and an earlier file at ``path`` intact.
        opset (int): ONNX opset, >= 16.

    Returns:
        TracingAdapter: its ``outputs_schema`` turns the ONNX outputs back into
        ``[{"instances": Instances}]``.
    """
    register_onnx_symbolics()
    model.eval()
    # The exporter restores the adapter's training flag afterwards, recursively: it must be eval.
    adapter = TracingAdapter(model, [{"image": image}]).eval()
    with torch.no_grad():
        adapter(*adapter.flattened_inputs)  # records outputs_schema, which names the outputs
        instances = adapter.outputs_schema.schemas[0].schemas[0]  # [{"instances": Instances}]
        with atomic_path(str(path)) as tmp:
            torch.onnx.export(
                adapter,
                adapter.flattened_inputs,
                tmp,
                dynamo=False,
                opset_version=opset,
                input_names=["image"],
                output_names=list(instances.keys) + ["image_size"],
                dynamic_axes={"image": {1: "height", 2: "width"}},
            )
    return adapter
