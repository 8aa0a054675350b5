"""Anchors shaped by the nodule prior: per-level sizes and aspect ratios fitted to the data."""

import collections.abc
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import ANCHOR_GENERATOR_REGISTRY
from detectron2.structures import Boxes
from torch import nn

__all__ = ["NodulePriorAnchorGenerator", "per_level_params"]

_CACHE_LIMIT = 16


def per_level_params(params, num_levels: int, name: str, allow_extra: bool = False):
    """Expand an anchor parameter to one list per level (detectron2's broadcast rule).

    ``list[float]`` is used on every level; ``list[list[float]]`` of length 1 is repeated; otherwise
    it must have one entry per level (or one more, when ``allow_extra``: the last entry then only
    bounds the extra square box of the coarsest level).
    """
    if not isinstance(params, collections.abc.Sequence) or len(params) == 0:
        raise ValueError(f"Anchor {name} must be a non-empty list, got {params!r}")
    if not isinstance(params[0], collections.abc.Sequence):
        return [[float(p) for p in params]] * num_levels
    if len(params) == 1:
        return [[float(p) for p in params[0]]] * num_levels
    allowed = (num_levels, num_levels + 1) if allow_extra else (num_levels,)
    if len(params) not in allowed:
        expected = " or ".join(str(n) for n in allowed)
        raise ValueError(
            f"Anchor {name} has {len(params)} levels but the detector has {num_levels} feature "
            f"levels (expected {expected} lists, or one list for all): {params!r}"
        )
    if any(len(p) == 0 for p in params):
        raise ValueError(f"Anchor {name} has an empty level: {params!r}")
    return [[float(x) for x in p] for p in params]


@ANCHOR_GENERATOR_REGISTRY.register()
class NodulePriorAnchorGenerator(nn.Module):
    """SSD-style default boxes whose sizes and aspect ratios come from the nodule prior.

    On level ``k`` every cell gets one box per (size, aspect ratio) pair and, with
    ``ssd_extra_scale``, SSD's extra square box of side ``sqrt(s_k * s_{k+1})`` where ``s_k`` is the
    largest size of level k and ``s_{k+1}`` the smallest of the next level (for the coarsest level:
    an extra trailing entry of ``sizes``, or else the geometric continuation ``s_k^2 / s_{k-1}``).

    Conventions:

    * aspect ratio = height / width (detectron2's convention); ``tools/fit_priors.py`` writes
      ratios in this convention. The box keeps the area ``size**2``.
    * sizes are either absolute (pixels of the network input) or, with ``relative=True``,
      fractions of ``sqrt(H * W)`` of the network input, so one config serves every input size.
    * cell centres are spread evenly over the image, SSD-style: on a ``Hk x Wk`` grid the centre of
      cell (i, j) is ``((j + offset) * W / Wk, (i + offset) * H / Hk)``. When the image fills the
      grid exactly (``H = stride * Hk``) this is detectron2's ``(j + offset) * stride``.

    ``forward(features, image_size)`` takes the network-input size ``(H, W)``. Called as
    ``forward(features)`` (as detectron2's RetinaNet and RPN do), the image size is taken to be
    the finest level's ``stride * grid size``. Anchors are cached per (grid sizes, image size);
    callers get copies, so in-place edits (e.g. ``Boxes.clip``) do not reach the cache.
    """

    box_dim: int = 4

    @configurable
    def __init__(
        self,
        *,
        sizes: Sequence,
        aspect_ratios: Sequence,
        strides: Sequence[int],
        relative: bool = False,
        ssd_extra_scale: bool = True,
        offset: float = 0.5,
    ):
        """
        Args:
            sizes: per-level anchor sizes (sqrt of anchor area); list[list[float]] with one list
                per level (optionally one more level, see class doc), or list[float] for all
                levels. Pixels, or fractions of sqrt(image area) when ``relative``.
            aspect_ratios: per-level aspect ratios (height / width), same broadcast rule.
            strides: stride of each feature level.
            relative: whether ``sizes`` are fractions of sqrt(image area).
            ssd_extra_scale: add SSD's extra square box sqrt(s_k * s_{k+1}) on every level.
            offset: position of the first cell centre, in cells, from the top-left corner; in
                [0, 1). 0.5 puts centres in the middle of cells, as SSD does.
        """
        super().__init__()
        if not 0.0 <= offset < 1.0:
            raise ValueError(f"Anchor offset must be in [0, 1), got {offset}")
        self.strides = [int(s) for s in strides]
        self.num_features = len(self.strides)
        self.sizes = per_level_params(sizes, self.num_features, "sizes", allow_extra=True)
        self.aspect_ratios = per_level_params(aspect_ratios, self.num_features, "aspect_ratios")
        if any(s <= 0 for level in self.sizes for s in level):
            raise ValueError(f"Anchor sizes must be positive, got {sizes!r}")
        if any(a <= 0 for level in self.aspect_ratios for a in level):
            raise ValueError(f"Anchor aspect ratios must be positive, got {aspect_ratios!r}")
        self.relative = relative
        self.ssd_extra_scale = ssd_extra_scale
        self.offset = offset
        self._cache: Dict[tuple, List[torch.Tensor]] = {}

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        relative_sizes = cfg.MODEL.ANCHOR_GENERATOR.RELATIVE_SIZES
        return {
            "sizes": relative_sizes if len(relative_sizes) else cfg.MODEL.ANCHOR_GENERATOR.SIZES,
            "relative": len(relative_sizes) > 0,
            "aspect_ratios": cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS,
            "strides": [x.stride for x in input_shape],
            "ssd_extra_scale": cfg.MODEL.ANCHOR_GENERATOR.SSD_EXTRA_SCALE,
            "offset": cfg.MODEL.ANCHOR_GENERATOR.OFFSET,
        }

    @property
    def num_cell_anchors(self) -> List[int]:
        """Anchors per cell on each level."""
        extra = 1 if self.ssd_extra_scale else 0
        return [
            len(s) * len(a) + extra
            for s, a in zip(self.sizes[: self.num_features], self.aspect_ratios)
        ]

    num_anchors = num_cell_anchors

    def _extra_square_sizes(self) -> List[float]:
        """Side of SSD's extra square box on each level, in the units of ``sizes``."""
        upper = [level[0] for level in self.sizes[1:]]
        if len(self.sizes) == self.num_features:
            last = self.sizes[-1][-1]
            prev = self.sizes[-2][-1] if self.num_features > 1 else last
            upper.append(last * last / prev)
        return [math.sqrt(level[-1] * up) for level, up in zip(self.sizes, upper)]

    def cell_anchors(self, image_size: Tuple[int, int]) -> List[torch.Tensor]:
        """Per-level (A_k, 4) XYXY boxes centred at (0, 0) for a network input of ``image_size``."""
        unit = math.sqrt(image_size[0] * image_size[1]) if self.relative else 1.0
        extra = self._extra_square_sizes() if self.ssd_extra_scale else [None] * self.num_features
        cells = []
        for sizes, ratios, extra_size in zip(self.sizes, self.aspect_ratios, extra):
            size = torch.tensor(sizes, dtype=torch.float64).repeat_interleave(len(ratios)) * unit
            ratio = torch.tensor(ratios, dtype=torch.float64).repeat(len(sizes))
            w = size / ratio.sqrt()
            h = size * ratio.sqrt()
            if extra_size is not None:
                w = torch.cat([w, w.new_tensor([extra_size * unit])])
                h = torch.cat([h, h.new_tensor([extra_size * unit])])
            cells.append(torch.stack([-w / 2, -h / 2, w / 2, h / 2], dim=1).float())
        return cells

    def _grid_anchors(self, grid_sizes, image_size, device) -> List[torch.Tensor]:
        height, width = image_size
        anchors = []
        for (grid_h, grid_w), cell in zip(grid_sizes, self.cell_anchors(image_size)):
            cell = cell.to(device)
            step_y, step_x = height / grid_h, width / grid_w
            ys = (torch.arange(grid_h, dtype=torch.float32, device=device) + self.offset) * step_y
            xs = (torch.arange(grid_w, dtype=torch.float32, device=device) + self.offset) * step_x
            cy, cx = torch.meshgrid(ys, xs, indexing="ij")
            centres = torch.stack([cx, cy, cx, cy], dim=-1).reshape(-1, 1, 4)
            anchors.append((centres + cell.view(1, -1, 4)).reshape(-1, 4))
        return anchors

    def forward(
        self, features: List[torch.Tensor], image_size: Optional[Tuple[int, int]] = None
    ) -> List[Boxes]:
        """
        Args:
            features: per-level feature maps (N, C, Hk, Wk), fine to coarse.
            image_size: (H, W) of the network input (the padded batch tensor); if None,
                the finest level's stride times its grid size.

        Returns:
            list[Boxes]: per level, ``Hk * Wk * A_k`` anchors ordered by row, column, cell anchor
            (the order of ``permute``-d dense predictions).
        """
        if len(features) != self.num_features:
            raise ValueError(
                f"Anchor generator built for {self.num_features} levels got {len(features)}"
            )
        grid_sizes = tuple((int(f.shape[-2]), int(f.shape[-1])) for f in features)
        if image_size is None:
            image_size = (grid_sizes[0][0] * self.strides[0], grid_sizes[0][1] * self.strides[0])
        image_size = (int(image_size[0]), int(image_size[1]))
        device = features[0].device
        key = (grid_sizes, image_size, str(device))
        anchors = self._cache.get(key)
        if anchors is None:
            anchors = self._grid_anchors(grid_sizes, image_size, device)
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[key] = anchors
        return [Boxes(a.clone()) for a in anchors]
