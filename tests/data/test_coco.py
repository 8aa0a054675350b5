"""COCO route: DATASETS.COCO_REGISTER from the command line, and the TN5000 -> COCO converter."""
import json
import os

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.structures import BoxMode
from PIL import Image
from pycocotools.coco import COCO

from thyroid_det.data.datasets import (
    DatasetFormatError,
    load_coco,
    load_tn5000,
    records_to_coco,
    register_coco_datasets,
)
from thyroid_det.engine.defaults import ConfigError
from thyroid_det.utils.file_io import atomic_write_json

from ..conftest import make_cfg


def write_coco(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(images / "a.png")
    coco = {
        "images": [{"id": 7, "file_name": "a.png", "height": 30, "width": 40}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 2, "bbox": [1, 2, 10, 5], "area": 50,
             "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "benign"}, {"id": 2, "name": "malignant"}],
    }
    (tmp_path / "a.json").write_text(json.dumps(coco))
    return str(tmp_path / "a.json"), str(images)


def test_load_coco_checks_boxes_and_sizes(tmp_path, caplog):
    json_file, images = write_coco(tmp_path)
    coco = json.loads(open(json_file).read())
    coco["images"][0].update(width=20, height=15)  # the image is 40x30
    coco["annotations"].append(dict(coco["annotations"][0], id=2, bbox=[5, 5, -3, 4]))
    open(json_file, "w").write(json.dumps(coco))
    (record,) = load_coco(json_file, images)
    assert (record["width"], record["height"]) == (40, 30) and len(record["annotations"]) == 1
    assert "a.png is 40x30, not 20x15 as the JSON says" in caplog.text
    assert "dropped 1 boxes" in caplog.text
    coco["annotations"][0]["bbox"] = [30, 20, 30, 20]  # fits the JSON's size only if it were larger
    coco["images"][0].update(width=80, height=60)
    open(json_file, "w").write(json.dumps(coco))
    with pytest.raises(DatasetFormatError, match=r"a.json: .*a.png is 40x30, not 80x60.*does not"):
        load_coco(json_file, images)
    open(json_file, "w").write('{"images": [{"id": 1}]')
    with pytest.raises(DatasetFormatError, match="a.json: not a usable COCO instances file"):
        load_coco(json_file, images)


def test_load_coco_names_an_unreadable_image(tmp_path):
    json_file, images = write_coco(tmp_path)
    with open(os.path.join(images, "a.png"), "wb") as f:
        f.write(b"not an image")
    with pytest.raises(DatasetFormatError, match=r"a.json: image \S*/imgs/a.png: not a readable"):
        load_coco(json_file, images)


def cfg_from_command_line(opts):
    return make_cfg(opts=opts)


def test_coco_register_from_command_line_opts(tmp_path):
    json_file, image_root = write_coco(tmp_path)
    cfg = cfg_from_command_line(
        [
            "DATASETS.COCO_REGISTER", f"[['test_coco_mytrain', '{json_file}', '{image_root}']]",
            "DATASETS.TRAIN", "('test_coco_mytrain',)",
        ]
    )
    assert cfg.DATASETS.TRAIN == ("test_coco_mytrain",)
    assert register_coco_datasets(cfg) == ["test_coco_mytrain"]
    assert register_coco_datasets(cfg) == []  # already registered: skipped
    (record,) = DatasetCatalog.get("test_coco_mytrain")
    (ann,) = record["annotations"]
    assert ann["category_id"] == 1 and ann["bbox"] == [1, 2, 10, 5]
    assert MetadataCatalog.get("test_coco_mytrain").thing_classes == ["benign", "malignant"]
    # The registration survives a config dump/reload (what train_net writes to OUTPUT_DIR).
    dumped = tmp_path / "config.yaml"
    dumped.write_text(cfg.dump())
    again = make_cfg(str(dumped))
    assert again.DATASETS.COCO_REGISTER == cfg.DATASETS.COCO_REGISTER


def test_coco_register_errors(tmp_path):
    json_file, image_root = write_coco(tmp_path)
    cfg = cfg_from_command_line(
        ["DATASETS.COCO_REGISTER", f"[['test_coco_missing', 'nope.json', '{image_root}']]"]
    )
    with pytest.raises(FileNotFoundError, match=r"'test_coco_missing'.*'nope\.json' not found"):
        register_coco_datasets(cfg)
    # A malformed entry is a config error (one line in a tool), naming the entry.
    for entry in (f"[['test_coco_bad', '{json_file}']]", "['abc']"):
        cfg = cfg_from_command_line(["DATASETS.COCO_REGISTER", entry])
        with pytest.raises(ConfigError, match=r"COCO_REGISTER\[0\] is .*\[name, json_file, "):
            register_coco_datasets(cfg)


def test_records_to_coco_ids_and_boxes(tmp_path):
    records = [
        {"file_name": str(tmp_path / "x" / "1.png"), "image_id": "a", "height": 9, "width": 9,
         "annotations": [{"bbox": [1, 2, 4, 8], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 1}]},
        {"file_name": str(tmp_path / "x" / "2.png"), "image_id": "b", "height": 9, "width": 9,
         "annotations": []},
    ]
    coco = records_to_coco(records, ["benign", "malignant"], str(tmp_path))
    assert [im["id"] for im in coco["images"]] == [1, 2]  # string ids replaced
    assert coco["images"][0]["file_name"] == os.path.join("x", "1.png")
    assert coco["annotations"] == [
        {"id": 1, "image_id": 1, "category_id": 2, "bbox": [1.0, 2.0, 3.0, 6.0], "area": 18.0,
         "iscrowd": 0}
    ]
    assert coco["categories"] == [{"id": 1, "name": "benign"}, {"id": 2, "name": "malignant"}]


def test_atomic_write_json_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "a.json"
    atomic_write_json(str(path), {"v": 1}, indent=None)
    atomic_write_json(str(path), {"v": 2}, indent=None)
    assert json.loads(path.read_text()) == {"v": 2}
    assert os.listdir(path.parent) == ["a.json"]
    with pytest.raises(TypeError):
        atomic_write_json(str(path), {"v": object()}, indent=None)
    assert json.loads(path.read_text()) == {"v": 2} and os.listdir(path.parent) == ["a.json"]


def test_converter_round_trip(voc_tree, tmp_path, tool):
    dirname = voc_tree(
        {
            "000001": {"content": "a", "objects": [("1", 1, 1, 10, 10)]},
            "000002": {"content": "a", "objects": [("0", 20, 20, 30, 30)]},
            "000003": {"objects": [("0", 3, 4, 50, 40)]},
            "000004": {},
        },
        {"train": ["000001", "000003"], "val": ["000002", "000004"]},
    )
    converter = tool("convert_tn5000_to_coco")
    out = tmp_path / "coco"
    entries = converter.main(
        ["--root", os.path.dirname(dirname), "--splits", "train", "val", "--output-dir", str(out)]
    )
    assert [e[0] for e in entries] == ["tn5000_train_coco", "tn5000_val_coco"]
    for split in ("train", "val"):
        records = load_tn5000(dirname, split)
        json_file = str(out / f"tn5000_{split}.json")
        api = COCO(json_file)
        assert len(api.getImgIds()) == len(records)
        assert len(api.getAnnIds()) == sum(len(r["annotations"]) for r in records)
        back = load_coco_json(json_file, os.path.join(dirname, "JPEGImages"), f"test_rt_{split}")
        assert MetadataCatalog.get(f"test_rt_{split}").thing_classes == ["benign", "malignant"]
        for original, loaded in zip(records, back):
            assert loaded["file_name"] == original["file_name"]
            assert loaded["image_id"] == original["image_id"]
            xyxy = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in
                    loaded["annotations"]]
            assert sorted(
                (a["category_id"], tuple(box)) for a, box in zip(loaded["annotations"], xyxy)
            ) == sorted((a["category_id"], tuple(a["bbox"])) for a in original["annotations"])
    assert [img["source_ids"] for img in COCO(str(out / "tn5000_val.json")).dataset["images"]] == [
        ["000001", "000002"],
        ["000004"],
    ]


def test_converter_reencodes_smaller_images_with_scaled_boxes(voc_tree, tmp_path, tool):
    dirname = voc_tree(
        {"000001": {"size": (64, 48), "objects": [("1", 8, 4, 40, 36)]}, "000002": {}},
        {"train": ["000001", "000002"]},
    )
    converter = tool("convert_tn5000_to_coco")
    images = tmp_path / "small"
    args = ["--root", os.path.dirname(dirname), "--splits", "train", "--output-dir",
            str(tmp_path / "coco"), "--image-dir", str(images), "--max-side", "32"]
    (entry,) = converter.main(args + ["--format", "png"])
    assert entry[2] == str(images)
    back = load_coco_json(entry[1], entry[2], "test_reencoded")
    assert sorted(os.listdir(images)) == ["000001.png", "000002.png"]
    first = next(r for r in back if r["image_id"] == 1)
    pixels = cv2.imread(first["file_name"], cv2.IMREAD_UNCHANGED)
    assert pixels.shape == (24, 32) == (first["height"], first["width"])  # grayscale, halved
    box = BoxMode.convert(first["annotations"][0]["bbox"], first["annotations"][0]["bbox_mode"],
                          BoxMode.XYXY_ABS)
    # load_tn5000 turns VOC's 1-based inclusive corners into [x0 - 1, x1); then halved.
    original = load_tn5000(dirname, "train")[0]["annotations"][0]["bbox"]
    assert box == pytest.approx([v / 2 for v in original])
    with pytest.raises(SystemExit):  # --max-side without --image-dir
        converter.main(["--root", os.path.dirname(dirname), "--output-dir", str(tmp_path),
                        "--max-side", "9"])
