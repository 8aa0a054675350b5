"""NodulePriorAnchorGenerator (counts, shapes, placement, caching) and tools/fit_priors.py."""

import math
import os
import re

import numpy as np
import pytest
import torch
import yaml
from detectron2.data import DatasetCatalog
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_anchor_generator
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.structures import BoxMode

from thyroid_det.modeling.anchor_generator import NodulePriorAnchorGenerator

from ..conftest import make_cfg

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def features(*grids):
    return [torch.zeros(1, 1, h, w) for h, w in grids]


def wh(boxes):
    t = boxes.tensor
    return t[:, 2] - t[:, 0], t[:, 3] - t[:, 1]


def test_count_is_sum_of_cells_times_cell_anchors():
    gen = NodulePriorAnchorGenerator(
        sizes=[[0.1], [0.2, 0.25], [0.4]],
        aspect_ratios=[[1.0, 2.0, 0.5], [1.0], [1.0, 3.0]],
        strides=[8, 16, 32],
        relative=True,
    )
    assert gen.num_cell_anchors == [4, 3, 3]
    assert gen.box_dim == 4
    grids = [(8, 12), (4, 6), (2, 3)]
    anchors = gen(features(*grids), (64, 96))
    assert [len(a) for a in anchors] == [
        h * w * k for (h, w), k in zip(grids, gen.num_cell_anchors)
    ]


def test_cell_shapes_follow_size_ratio_and_ssd_extra_box():
    gen = NodulePriorAnchorGenerator(
        sizes=[[20.0], [40.0], [80.0]], aspect_ratios=[[1.0, 2.0, 0.5]], strides=[8, 16, 32]
    )
    cells = gen.cell_anchors((64, 64))
    w = cells[0][:, 2] - cells[0][:, 0]
    h = cells[0][:, 3] - cells[0][:, 1]
    # ratio = h / w, area = size^2; then the extra square sqrt(s_k * s_k+1).
    assert torch.allclose(h / w, torch.tensor([1.0, 2.0, 0.5, 1.0]))
    assert torch.allclose((w * h).sqrt(), torch.tensor([20.0, 20.0, 20.0, math.sqrt(20 * 40)]))
    # The coarsest level continues geometrically (80 * 80 / 40) unless a trailing size is given.
    last = cells[2][-1]
    assert math.isclose(float(last[2] - last[0]), math.sqrt(80 * 160), rel_tol=1e-5)
    gen = NodulePriorAnchorGenerator(
        sizes=[[20.0], [40.0], [80.0], [100.0]], aspect_ratios=[[1.0]], strides=[8, 16, 32]
    )
    last = gen.cell_anchors((64, 64))[2][-1]
    assert math.isclose(float(last[2] - last[0]), math.sqrt(80 * 100), rel_tol=1e-5)


def test_relative_sizes_scale_with_the_input_absolute_do_not():
    relative = NodulePriorAnchorGenerator(
        sizes=[[0.25]], aspect_ratios=[[1.0]], strides=[8], ssd_extra_scale=False, relative=True
    )
    absolute = NodulePriorAnchorGenerator(
        sizes=[[16.0]], aspect_ratios=[[1.0]], strides=[8], ssd_extra_scale=False
    )
    for side in (64, 128):
        (a,) = relative(features((side // 8, side // 8)), (side, side))
        assert torch.allclose(wh(a)[0], torch.full((len(a),), side / 4))
        (b,) = absolute(features((side // 8, side // 8)), (side, side))
        assert torch.allclose(wh(b)[0], torch.full((len(b),), 16.0))
    # Non-square input: sqrt(H * W) is the unit.
    (a,) = relative(features((6, 12)), (48, 96))
    assert torch.allclose(wh(a)[0], torch.full((len(a),), 0.25 * math.sqrt(48 * 96)))


def test_non_square_input_centres_span_the_image():
    gen = NodulePriorAnchorGenerator(
        sizes=[[10.0], [20.0]], aspect_ratios=[[1.0]], strides=[8, 16], ssd_extra_scale=False
    )
    height, width = 100, 150  # ceil-mode grids: (13, 19) and (7, 10)
    a8, a16 = gen(features((13, 19), (7, 10)), (height, width))
    for anchors, (gh, gw) in ((a8, (13, 19)), (a16, (7, 10))):
        t = anchors.tensor
        cx, cy = (t[:, 0] + t[:, 2]) / 2, (t[:, 1] + t[:, 3]) / 2
        xs, ys = torch.unique(cx), torch.unique(cy)
        assert len(xs) == gw and len(ys) == gh
        assert torch.allclose(xs, (torch.arange(gw) + 0.5) * width / gw, atol=1e-4)
        assert torch.allclose(ys, (torch.arange(gh) + 0.5) * height / gh, atol=1e-4)
    # Row-major over cells: the second anchor is one step to the right of the first.
    assert float(a8.tensor[1, 0] - a8.tensor[0, 0]) == pytest.approx(width / 19, abs=1e-4)


def test_matches_detectron2_default_generator_without_extras():
    sizes, ratios, strides = [[32.0], [64.0]], [[0.5, 1.0, 2.0]], [8, 16]
    ours = NodulePriorAnchorGenerator(
        sizes=sizes, aspect_ratios=ratios, strides=strides, ssd_extra_scale=False, offset=0.5
    )
    theirs = DefaultAnchorGenerator(sizes=sizes, aspect_ratios=ratios, strides=strides, offset=0.5)
    feats = features((6, 10), (3, 5))
    for a, b in zip(ours(feats), theirs(feats)):
        assert torch.allclose(a.tensor, b.tensor, atol=1e-4)
    # Called like RetinaNet does, the image size is the finest level's stride times its grid.
    for a, b in zip(ours(feats), ours(feats, (48, 80))):
        assert torch.equal(a.tensor, b.tensor)


def test_cache_returns_copies():
    gen = NodulePriorAnchorGenerator(
        sizes=[[0.3]], aspect_ratios=[[1.0]], strides=[8], relative=True
    )
    (first,) = gen(features((4, 4)), (32, 32))
    expected = first.tensor.clone()
    first.tensor.add_(100.0)
    (again,) = gen(features((4, 4)), (32, 32))
    assert torch.equal(again.tensor, expected)
    (other,) = gen(features((4, 4)), (40, 40))
    assert not torch.equal(other.tensor, expected)


def test_built_from_config_and_bad_config_errors():
    cfg = make_cfg("ssd512_vgg16.yaml")
    shapes = [ShapeSpec(stride=8 * 2**i) for i in range(7)]
    gen = build_anchor_generator(cfg, shapes)
    assert isinstance(gen, NodulePriorAnchorGenerator) and gen.relative
    assert gen.num_cell_anchors == [4, 6, 6, 6, 6, 4, 4]
    grids = [(64 >> i, 64 >> i) for i in range(7)]
    assert sum(len(a) for a in gen(features(*grids), (512, 512))) == 24564  # SSD512's count
    with pytest.raises(ValueError, match="has 8 levels but the detector has 5 feature levels"):
        build_anchor_generator(cfg, shapes[:5])
    cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [[1.0, -2.0]]
    with pytest.raises(ValueError, match="positive"):
        build_anchor_generator(cfg, shapes)


def test_fit_priors_helpers(tool):
    fp = tool("fit_priors")
    sizes, ratios = fp.ssd_default_boxes(7)
    assert [s[0] for s in sizes] == pytest.approx([0.07, 0.15, 0.30, 0.45, 0.60, 0.75, 0.90, 1.05])
    assert [len(r) for r in ratios] == [3, 5, 5, 5, 5, 3, 3]
    sizes6, _ = fp.ssd_default_boxes(6)  # SSD300's scales
    assert [s[0] for s in sizes6] == pytest.approx([0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05])

    # A 100x50 (w x h) box in a 200x100 image becomes 64x64 at a 128x128 input.
    boxes = fp.to_input_frame(
        np.array([[0.0, 0.0, 100.0, 50.0]]), np.array([[100.0, 200.0]]), (128, 128)
    )
    assert np.allclose(boxes, [[0, 0, 64, 64]])

    rng = np.random.RandomState(0)
    w = rng.uniform(10, 30, 200)
    h = w * rng.choice([0.5, 1.0, 2.0], 200)
    gt = np.stack([np.full(200, 5.0), np.full(200, 5.0), 5 + w, 5 + h], 1)
    assert fp.fit_ratios(gt, 3, (0.0, 1.0)) == [0.5, 1.0, 2.0]
    geo = fp.geometric_sizes(gt, (64, 64), 3, (0.0, 1.0))
    assert len(geo) == 4 and geo[1] / geo[0] == pytest.approx(geo[2] / geo[1])


def test_fit_priors_writes_a_mergeable_fragment_that_covers_better(tmp_path, capsys, tool):
    fp = tool("fit_priors")
    rng = np.random.RandomState(1)
    records = []
    for i in range(12):
        w, h = rng.uniform(14, 30), rng.uniform(20, 40)  # taller than wide, mid-sized
        x, y = rng.uniform(0, 90), rng.uniform(0, 80)
        records.append(
            {
                "file_name": f"img{i}.png",
                "image_id": i,
                "height": 128,
                "width": 128,
                "annotations": [
                    {
                        "bbox": [x, y, x + w, y + h],
                        "bbox_mode": BoxMode.XYXY_ABS,
                        "category_id": i % 2,
                    }
                ],
            }
        )
    name = "test_anchors_fit_priors_boxes"
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: records)
    out = tmp_path / "priors.yaml"
    fp.main(
        [
            "--config-file",
            os.path.join(REPO, "configs", "mssd_vgg16_synthetic.yaml"),
            "--dataset",
            name,
            "--output",
            str(out),
            "INPUT.FIXED_SIZE",
            "(128,128)",
            "MODEL.VGG.EXTRA_CHANNELS",
            "[16,16,16]",
            "MODEL.VGG.OUT_FEATURES",
            "['conv4_3','fc7','extra1','extra2','extra3']",
            "MODEL.SSD.IN_FEATURES",
            "['conv4_3','fc7','extra1','extra2','extra3']",
            "MODEL.ANCHOR_GENERATOR.RELATIVE_SIZES",
            "[[0.1],[0.2],[0.4],[0.6],[0.8],[1.0]]",
        ]
    )
    printed = capsys.readouterr().out
    # IoU 0.5 with each box's best anchor kept: every box has at least one positive.
    positives = re.search(r"positive anchors per box.*\(IoU >= 0.5\): mean ([\d.]+), median (\d+)"
                          r".*; 0 of 12 boxes get none", printed)
    assert positives and float(positives.group(1)) >= 1, printed
    rows = {
        line[:42].strip(): line.split()[-3:]
        for line in printed.splitlines()
        if line.startswith("  ") and len(line.split()) >= 4
    }
    fitted = [float(x) for x in rows["fitted priors (refined sizes)"][1:]]
    ssd = [float(x) for x in rows["SSD default boxes"][1:]]
    assert fitted[1] >= ssd[1] - 1e-6  # mean best IoU
    fragment = yaml.safe_load(out.read_text())
    assert len(fragment["MODEL"]["ANCHOR_GENERATOR"]["RELATIVE_SIZES"]) == 6
    assert all(r > 1.0 for r in fragment["MODEL"]["ANCHOR_GENERATOR"]["ASPECT_RATIOS"][0][1:])
    cfg = make_cfg(str(out))
    assert len(cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS) == 5
