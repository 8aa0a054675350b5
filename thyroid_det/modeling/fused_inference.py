"""Layers that run fused at inference (eval mode, no autograd, not traced or compiled;
:func:`unfused` turns it off), with weights derived once from their parameters: a convolution
with its batch norm folded in, channels-last on the CPU (:class:`FusedConv2d`, or
:func:`folded_conv_norm` for blocks that keep their own conv and norm modules), and fully
connected layers through oneDNN on the CPU (:func:`inference_linear`). Outputs equal the plain
layers' up to float rounding; training, autograd and exported graphs use the plain layers. The
refiners' inference is what they are for (see refiner_nets.py and README, Speed)."""
import contextlib
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from torch import nn

__all__ = [
    "FusedConv2d",
    "channels_last_on_cpu",
    "derived_tensors",
    "folded_conv_norm",
    "folds_into_conv",
    "inference_linear",
    "runs_fused",
    "unfused",
]


_fused = True


def runs_fused(module: nn.Module) -> bool:
    """Whether ``module`` runs fused: in eval mode, without autograd, not being traced or
    compiled (an exported graph keeps the plain layers; ``torch.compile`` fuses them itself) and
    not inside :func:`unfused`."""
    return _fused and not (
        module.training
        or torch.is_grad_enabled()
        or torch.jit.is_tracing()
        or torch.compiler.is_compiling()
    )


@contextlib.contextmanager
def unfused():
    """Within the block, the fused layers run as the plain layers (to compare the two)."""
    global _fused
    previous, _fused = _fused, False
    try:
        yield
    finally:
        _fused = previous


# module -> {name: (key, derived tensors)}; outside the modules, so copies and pickles of a model
# never carry them.
_DERIVED = weakref.WeakKeyDictionary()


def derived_tensors(module: nn.Module, name: str, sources, compute, *key):
    """``compute()``, kept for ``module`` under ``name`` until one of the ``sources`` tensors
    changes (an in-place update bumps its version; ``.to()``, ``.data =`` give it new storage) or
    ``key`` does. For inference-only weights derived from parameters and buffers."""
    key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in sources) + key
    cache = _DERIVED.setdefault(module, {})
    cached = cache.get(name)
    if cached is None or cached[0] != key:
        cached = cache[name] = (key, compute())
    return cached[1]


# Rows from which a fully connected layer runs through oneDNN on the CPU (inference_linear).
_ONEDNN_LINEAR_MIN_ROWS = 4


def inference_linear(linear: nn.Linear, x, weight=None, *key):
    """``F.linear(x, weight, linear.bias)`` at inference, ``weight`` being ``linear.weight`` or a
    weight derived from it alone, named by ``key``.

    On the CPU, in fp32 and from 4 rows on, the product runs through oneDNN with the weight
    converted to its format once. For fc6's 9216 x 4096 weight (224-px crops) on this project's
    2-core Xeon, torch's default product took 1.14-1.66x as long for 8-32 rows, as long for 4-6,
    and was the faster one for 1-2 (one thread).
    """
    weight = linear.weight if weight is None else weight
    onednn = (
        x.device.type == "cpu"
        and x.dim() == 2
        and x.shape[0] >= _ONEDNN_LINEAR_MIN_ROWS
        and x.dtype == weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and not torch.is_autocast_enabled("cpu")
    )
    if not onednn:
        return F.linear(x, weight, linear.bias)
    sources = [linear.weight] + ([] if linear.bias is None else [linear.bias])
    onednn_weight, onednn_bias = derived_tensors(linear, f"onednn{key}", sources, lambda: (
        weight.detach().to_mkldnn(),
        None if linear.bias is None else linear.bias.detach().to_mkldnn(),
    ), *key)
    # The op behind torch.utils.mkldnn.MkldnnLinear.
    x = torch._C._nn.mkldnn_linear(x.contiguous().to_mkldnn(), onednn_weight, onednn_bias)
    return x.to_dense()


def folds_into_conv(norm: Optional[nn.Module]) -> bool:
    """Whether a convolution followed by ``norm`` is one affine map at inference: no norm, or a
    batch norm with fixed statistics."""
    if norm is None or isinstance(norm, FrozenBatchNorm2d):
        return True
    return isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.running_var is not None


def conv_norm_sources(conv: nn.Conv2d, norm: Optional[nn.Module]):
    """The parameters and statistics :func:`fold_norm_into_conv` derives from."""
    sources = [conv.weight] + ([] if conv.bias is None else [conv.bias])
    if norm is not None:
        sources += [norm.running_mean, norm.running_var]
        sources += [t for t in (norm.weight, norm.bias) if t is not None]
    return sources


@torch.no_grad()
def fold_norm_into_conv(conv: nn.Conv2d, norm: Optional[nn.Module]):
    """(weight, bias) of ``conv`` followed by ``norm`` (see :func:`folds_into_conv`) as one
    convolution; the weight channels-last on the CPU."""
    weight, bias = conv.weight, conv.bias
    if norm is not None:
        scale = (norm.running_var + norm.eps).rsqrt()
        if norm.weight is not None:
            scale = scale * norm.weight
        shift = -norm.running_mean * scale
        if norm.bias is not None:
            shift = shift + norm.bias
        bias = shift if bias is None else shift + bias * scale
        weight = weight * scale.view(-1, 1, 1, 1)
    if bias is None:
        bias = weight.new_zeros(weight.shape[0])
    return channels_last_on_cpu(weight), bias


def folded_conv_norm(module: nn.Module, conv: nn.Conv2d, norm: Optional[nn.Module]):
    """:func:`fold_norm_into_conv`'s (weight, bias), kept for ``module`` until a source changes."""
    return derived_tensors(
        module, "_inference_weights", conv_norm_sources(conv, norm),
        lambda: fold_norm_into_conv(conv, norm),
    )


class FusedConv2d(Conv2d):
    """detectron2's ``Conv2d`` (conv, norm, activation) with a faster inference path.

    At inference (eval mode, no autograd), with a batch norm or no norm, it runs as one
    convolution: the batch norm is folded into the weight and bias. On the CPU that weight is
    also channels-last (NHWC), so oneDNN's convolution keeps its output NHWC, and so do the
    poolings and convolutions after it: on the refiner's small maps NCHW would cost a layout
    conversion around every convolution and the max pools run several times slower in it. The
    outputs are the same up to float rounding. The derived weights are kept until a parameter
    or statistic they come from changes. Parameters and state-dict keys are ``Conv2d``'s.
    """

    def forward(self, x):
        if not (runs_fused(self) and self.folds_norm()):
            return super().forward(x)
        weight, bias = self.inference_weights()
        x = F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        return x if self.activation is None else self.activation(x)

    def folds_norm(self) -> bool:
        """Whether conv and norm are one affine map at inference (batch norm or none)."""
        return folds_into_conv(self.norm)

    def weight_sources(self):
        """The parameters and statistics :meth:`inference_weights` derives from."""
        return conv_norm_sources(self, self.norm)

    def inference_weights(self):
        """(weight, bias) of the convolution followed by its batch norm at inference."""
        return folded_conv_norm(self, self, self.norm)


def channels_last_on_cpu(weight: torch.Tensor) -> torch.Tensor:
    """A CPU convolution weight with channels-last strides (others unchanged). Not
    ``.contiguous(memory_format=...)``: with one input channel (conv1) that keeps the NCHW
    strides, which count as both layouts, and oneDNN then answers in NCHW."""
    if weight.device.type != "cpu":
        return weight
    return torch.empty_like(weight, memory_format=torch.channels_last).copy_(weight)
