"""TN5000 loader on tiny VOC trees the tests write: boxes, copies, split rule, errors, cache."""
import hashlib
import json
import logging
import os
import time

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

import thyroid_det  # noqa: F401  (registers tn5000_*)
from thyroid_det.data.datasets import DatasetFormatError, load_tn5000, register_tn5000



def boxes_of(record):
    return sorted((a["category_id"], tuple(a["bbox"])) for a in record["annotations"])


def file_hashes(record):
    folder = os.path.dirname(record["file_name"])
    return {
        hashlib.sha1(open(os.path.join(folder, f"{i}.jpg"), "rb").read()).hexdigest()
        for i in record["source_ids"]
    }


def test_boxes_labels_and_fields(voc_tree):
    dirname = voc_tree(
        {
            "000001": {"objects": [("0", 1, 1, 10, 20)]},
            "000002": {"size": (80, 40), "objects": [("1", 5, 6, 80, 40), ("benign", 2, 2, 3, 3)]},
            "000003": {},
        },
        {"train": ["000002", "000001", "000003"]},
    )
    records = load_tn5000(dirname, "train")
    assert [r["image_id"] for r in records] == [1, 2, 3]
    r1, r2, r3 = records
    assert r1["file_name"] == os.path.join(dirname, "JPEGImages", "000001.jpg")
    assert (r1["height"], r1["width"], r2["height"], r2["width"]) == (48, 64, 40, 80)
    # VOC 1-based inclusive -> 0-based half-open: xmin=1..xmax=10 covers [0, 10).
    assert boxes_of(r1) == [(0, (0.0, 0.0, 10.0, 20.0))]
    assert boxes_of(r2) == [(0, (1.0, 1.0, 3.0, 3.0)), (1, (4.0, 5.0, 80.0, 40.0))]
    assert all(a["bbox_mode"] == BoxMode.XYXY_ABS for a in r2["annotations"])
    assert r3["annotations"] == [] and r3["source_ids"] == ["000003"]


def test_identical_files_merge_into_one_record(voc_tree, caplog):
    dirname = voc_tree(
        {
            "000010": {"content": "a", "objects": [("1", 1, 1, 10, 10)]},
            "000011": {"content": "a", "objects": [("1", 20, 20, 30, 30)]},
            "000012": {"content": "a", "objects": [("1", 1, 1, 10, 10)]},
            "000013": {"content": "b", "objects": [("0", 1, 1, 10, 10)]},
        },
        {"train": ["000010", "000011", "000012", "000013"]},
    )
    with caplog.at_level(logging.INFO):
        records = load_tn5000(dirname, "train")
    assert len(records) == 2
    merged = records[0]
    assert merged["image_id"] == 10 and merged["source_ids"] == ["000010", "000011", "000012"]
    assert boxes_of(merged) == [(1, (0.0, 0.0, 10.0, 10.0)), (1, (19.0, 19.0, 30.0, 30.0))]
    assert "3 image files are byte-identical copies in 1 groups" in caplog.text
    assert "dropped 1 boxes repeated" in caplog.text


def test_copy_group_straddling_splits_stays_in_the_held_out_split(voc_tree):
    dirname = voc_tree(
        {
            "000001": {"content": "a", "objects": [("1", 1, 1, 10, 10)]},
            "000002": {"content": "a", "objects": [("1", 20, 20, 30, 30)]},
            "000003": {"content": "b", "objects": [("0", 1, 1, 10, 10)]},
            "000004": {"content": "c", "objects": [("0", 1, 1, 10, 10)]},
            "000005": {"content": "c", "objects": [("0", 5, 5, 9, 9)]},
            "000006": {"content": "d", "objects": [("1", 1, 1, 10, 10)]},
        },
        {
            "train": ["000001", "000003", "000005"],
            "val": ["000002", "000004"],
            "trainval": ["000001", "000002", "000003", "000004", "000005"],
            "test": ["000006"],
        },
    )
    train, val = load_tn5000(dirname, "train"), load_tn5000(dirname, "val")
    trainval, test = load_tn5000(dirname, "trainval"), load_tn5000(dirname, "test")
    assert [r["source_ids"] for r in train] == [["000003"]]
    assert [r["source_ids"] for r in val] == [["000001", "000002"], ["000004", "000005"]]
    assert len(val[0]["annotations"]) == 2  # the train-listed copy's box came along
    assert [r["image_id"] for r in trainval] == [1, 3, 4]
    assert [r["image_id"] for r in test] == [6]
    assert not set.union(*map(file_hashes, train)) & set.union(*map(file_hashes, val))


def test_small_overshoot_is_clipped_and_size_mismatch_uses_the_image(voc_tree, caplog):
    dirname = voc_tree(
        {
            "000001": {"objects": [("1", 0, 1, 66, 48)]},  # x0 = -1, x1 = 66 > 64
            "000002": {"xml_size": (818, 628), "objects": [("0", 2, 2, 30, 30)]},
        },
        {"val": ["000001", "000002"]},
    )
    with caplog.at_level(logging.INFO):
        r1, r2 = load_tn5000(dirname, "val")
    assert boxes_of(r1) == [(1, (0.0, 0.0, 64.0, 48.0))]
    assert (r2["width"], r2["height"]) == (64, 48)
    assert "clipped 1 boxes" in caplog.text
    assert "000002.xml: <size> says 818x628 but the image is 64x48" in caplog.text


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"xml": "<annotation><object>"}, "000001.xml: cannot parse XML"),
        ({"no_image": True}, "JPEGImages/000001.jpg: image file not found"),
        ({"objects": [("2", 1, 1, 9, 9)]}, "000001.xml: object 1: unknown label '2'"),
        ({"objects": [("0", 10, 1, 9, 9)]}, "000001.xml: object 1: degenerate box (xmin=10"),
        ({"objects": [("1", 1, 1, 70, 9)]}, "000001.xml: object 1: box (xmin=1, ymin=1, xmax=70"),
        ({"objects": [("1", 1, 1, "ten", 9)]}, "object 1: <bndbox/xmax> is not a number: 'ten'"),
        (
            {"xml_size": (100, 100), "objects": [("1", 1, 1, 90, 9)]},
            "000001.xml: <size> says 100x100 but the image is 64x48, and box (xmin=1",
        ),
    ],
    ids=["broken-xml", "no-image", "label", "degenerate", "outside", "not-a-number", "size"],
)
def test_bad_annotations_raise_naming_the_file(voc_tree, spec, message):
    dirname = voc_tree({"000001": spec, "000002": {}}, {"train": ["000001", "000002"]})
    with pytest.raises(DatasetFormatError) as e:
        load_tn5000(dirname, "train")
    assert message in str(e.value)
    assert "1 problem(s)" in str(e.value)


def test_all_problems_are_reported_at_once(voc_tree):
    dirname = voc_tree(
        {
            "000001": {"objects": [("7", 1, 1, 9, 9)]},
            "000002": {"content": "x", "objects": [("0", 1, 1, 9, 9)]},
            "000003": {"content": "x", "objects": [("1", 1, 1, 9, 9)]},
        },
        {"train": ["000001", "000002", "000003", "000004"]},
    )
    with pytest.raises(DatasetFormatError) as e:
        load_tn5000(dirname, "train")
    text = str(e.value)
    assert "3 problem(s)" in text
    assert "000001.xml: object 1: unknown label '7'" in text
    assert "000004.jpg: image file not found" in text
    assert "is malignant but benign in 000002.xml, an identical copy" in text


def test_missing_folder_and_split_file(voc_tree, tmp_path):
    with pytest.raises(FileNotFoundError, match="THYROID_DATASETS"):
        load_tn5000(str(tmp_path / "nowhere"), "train")
    dirname = voc_tree({"000001": {}}, {"train": ["000001"]})
    with pytest.raises(FileNotFoundError, match=r"test\.txt: split file not found"):
        load_tn5000(dirname, "test")
    with pytest.raises(ValueError, match="Unknown TN5000 split"):
        load_tn5000(dirname, "testing")


def test_hash_cache_is_used_refreshed_and_optional(voc_tree, tmp_path):
    dirname = voc_tree(
        {"000001": {"content": "a"}, "000002": {"content": "b"}}, {"train": ["000001", "000002"]}
    )
    assert len(load_tn5000(dirname, "train")) == 2
    (cache_file,) = (tmp_path / "cache").iterdir()
    cache = json.loads(cache_file.read_text())
    cache["000002.jpg"]["sha1"] = cache["000001.jpg"]["sha1"]
    cache_file.write_text(json.dumps(cache))
    assert len(load_tn5000(dirname, "train")) == 1  # believed the (forged) cache

    image = os.path.join(dirname, "JPEGImages", "000002.jpg")
    later = time.time() + 10
    os.utime(image, (later, later))
    assert len(load_tn5000(dirname, "train")) == 2  # mtime changed: hashed again

    unwritable = os.path.join(dirname, "Annotations", "000001.xml", "cache")
    assert len(load_tn5000(dirname, "train", cache_dir=unwritable)) == 2


def test_registered_names_are_lazy_and_follow_the_environment(voc_tree, tmp_path, monkeypatch):
    names = {"tn5000_train", "tn5000_val", "tn5000_trainval", "tn5000_test"}
    assert names <= set(DatasetCatalog.list())
    assert MetadataCatalog.get("tn5000_val").thing_classes == ["benign", "malignant"]
    assert MetadataCatalog.get("tn5000_val").evaluator_type == "coco"
    register_tn5000("test_tn5000_lazy", "train", dirname=str(tmp_path / "absent"))  # reads nothing

    voc_tree({"000001": {"objects": [("1", 1, 1, 9, 9)]}, "000002": {}}, {"val": ["000001"]})
    monkeypatch.setenv("THYROID_DATASETS", str(tmp_path / "voc"))
    assert [r["image_id"] for r in DatasetCatalog.get("tn5000_val")] == [1]
    # tn5000_test is registered whatever the root held at import; its list is needed on loading.
    with pytest.raises(FileNotFoundError, match=r"TN5000/ImageSets/Main/test.txt: split file not"):
        DatasetCatalog.get("tn5000_test")
    voc_tree({}, {"test": ["000002"]})
    assert [r["image_id"] for r in DatasetCatalog.get("tn5000_test")] == [2]


@pytest.mark.tn5000
def test_real_tn5000_val_and_train_merge(tn5000_datasets):
    """Counts measured on the TN5000 release in ../shared/data (3459 train + 497 val files)."""
    val = DatasetCatalog.get("tn5000_val")
    train = DatasetCatalog.get("tn5000_train")
    assert (len(val), sum(len(r["source_ids"]) for r in val)) == (496, 522)
    assert (len(train), sum(len(r["source_ids"]) for r in train)) == (3386, 3434)
    train_ids = {i for r in train for i in r["source_ids"]}
    assert not train_ids & {i for r in val for i in r["source_ids"]}
    groups = [r for r in train + val if len(r["source_ids"]) > 1]
    assert (len(groups), sum(len(r["source_ids"]) for r in groups)) == (69, 143)
    assert all(len(r["annotations"]) == len(r["source_ids"]) for r in groups)
    (odd,) = [r for r in val + train if "002589" in r["source_ids"]]
    assert (odd["width"], odd["height"]) == (718, 500)
