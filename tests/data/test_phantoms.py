"""Synthetic phantoms: determinism, valid boxes, class-dependent look, caching, registration."""
import json
import os

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.structures import BoxMode

import thyroid_det  # noqa: F401  (registers synthetic_*)
from thyroid_det.data.datasets import generate_phantoms, render_phantom
from thyroid_det.data.datasets.phantoms import SYNTHETIC_SETS, ensure_phantoms


def read_set(folder):
    files = sorted(os.listdir(os.path.join(folder, "images")))
    pngs = [open(os.path.join(folder, "images", f), "rb").read() for f in files]
    return pngs, json.loads(open(os.path.join(folder, "annotations.json")).read())


def test_render_is_deterministic_and_seed_dependent():
    a, anns_a = render_phantom(np.random.SeedSequence([3, 1]), 96, 128)
    b, anns_b = render_phantom(np.random.SeedSequence([3, 1]), 96, 128)
    c, _ = render_phantom(np.random.SeedSequence([4, 1]), 96, 128)
    assert a.shape == (96, 128) and a.dtype == np.uint8
    assert np.array_equal(a, b) and anns_a == anns_b
    assert not np.array_equal(a, c)
    with pytest.raises(ValueError, match="at least 64x64"):
        render_phantom(0, 32, 32)


def test_annotations_are_valid_and_classes_look_different():
    counts, aspects, inside = [], {0: [], 1: []}, {0: [], 1: []}
    for i in range(40):
        image, anns = render_phantom(np.random.SeedSequence([9, i]), 96, 96)
        counts.append(len(anns))
        for ann in anns:
            x0, y0, x1, y1 = ann["bbox"]
            assert ann["bbox_mode"] == BoxMode.XYXY_ABS
            assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 96
            aspects[ann["category_id"]].append((x1 - x0) / (y1 - y0))
            inside[ann["category_id"]].append(image[int(y0) : int(y1), int(x0) : int(x1)].std())
    assert set(counts) <= {0, 1, 2, 3} and 0 in counts and max(counts) >= 2
    assert len(aspects[0]) >= 5 and len(aspects[1]) >= 5
    # Benign nodules are wider than tall, malignant ones taller than wide (box incl. margin).
    assert np.median(aspects[0]) > 1.0 > np.median(aspects[1])


def test_generated_sets_are_byte_identical_per_seed(tmp_path):
    one = generate_phantoms(str(tmp_path / "one"), 3, seed=5, image_size=(64, 80))
    two = generate_phantoms(str(tmp_path / "two"), 3, seed=5, image_size=(64, 80))
    other = generate_phantoms(str(tmp_path / "other"), 3, seed=6, image_size=(64, 80))
    pngs_one, coco_one = read_set(os.path.dirname(one))
    pngs_two, coco_two = read_set(os.path.dirname(two))
    pngs_other, coco_other = read_set(os.path.dirname(other))
    assert pngs_one == pngs_two and coco_one == coco_two
    assert pngs_one != pngs_other
    assert coco_one["categories"] == [{"id": 1, "name": "benign"}, {"id": 2, "name": "malignant"}]
    assert [im["file_name"] for im in coco_one["images"]] == [f"00000{i}.png" for i in range(3)]
    assert sorted(os.listdir(tmp_path)) == ["one", "other", "two"]  # no temporary folders left
    with pytest.raises(FileExistsError):
        generate_phantoms(str(tmp_path / "one"), 3, seed=5, image_size=(64, 80))


def test_ensure_reuses_a_matching_set_and_regenerates_otherwise(tmp_path):
    folder = str(tmp_path / "set")
    json_file = ensure_phantoms(folder, 2, seed=1, image_size=(64, 64))
    stamp = os.stat(json_file).st_mtime_ns
    assert ensure_phantoms(folder, 2, seed=1, image_size=(64, 64)) == json_file
    assert os.stat(json_file).st_mtime_ns == stamp
    ensure_phantoms(folder, 3, seed=1, image_size=(64, 64))
    assert len(os.listdir(os.path.join(folder, "images"))) == 3


def test_registered_tiny_set_is_generated_on_first_use(tmp_path, monkeypatch):
    monkeypatch.setenv("THYROID_SYNTHETIC", str(tmp_path))
    assert {"synthetic_train", "synthetic_val"} <= set(DatasetCatalog.list())
    records = DatasetCatalog.get("synthetic_tiny")
    spec = SYNTHETIC_SETS["synthetic_tiny"]
    assert len(records) == spec["num_images"]
    assert os.path.isdir(tmp_path / "synthetic_tiny" / "images")
    assert MetadataCatalog.get("synthetic_tiny").thing_classes == ["benign", "malignant"]
    record = records[0]
    assert (record["height"], record["width"]) == spec["image_size"]
    assert read_image(record["file_name"], format="L").shape == (*spec["image_size"], 1)
    assert all(a["bbox_mode"] == BoxMode.XYXY_ABS for r in records for a in r["annotations"])
    assert sum(len(r["annotations"]) for r in records) > 0


def test_make_phantoms_tool(tmp_path, tool, capsys):
    make_phantoms = tool("make_phantoms")
    json_file = make_phantoms.main(
        ["--output", str(tmp_path / "p"), "--num-images", "2", "--size", "64", "64"]
    )
    assert len(json.loads(open(json_file).read())["images"]) == 2
    assert "DATASETS.COCO_REGISTER" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        make_phantoms.main(["--output", str(tmp_path / "p"), "--num-images", "2"])
