"""k-fold splits: partition, stratification, determinism, copies together, CLI, registration."""
import json
import os

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from thyroid_det.data.datasets import (
    kfold_assign,
    kfold_splits,
    load_tn5000,
    records_to_coco,
    register_kfold_datasets,
)


def make_records(n=53, malignant_every=3):
    """Records where every third image holds a malignant box, some none at all."""
    records = []
    for i in range(n):
        anns = [{"bbox": [0, 0, 5, 5], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0}]
        if i % malignant_every == 0:
            anns.append({"bbox": [5, 5, 9, 9], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 1})
        records.append(
            {"file_name": f"/d/{i}.png", "image_id": i + 1, "height": 9, "width": 9,
             "annotations": anns if i % 7 else []}
        )
    return records


def malignant(record):
    return any(a["category_id"] == 1 for a in record["annotations"])


def test_folds_partition_and_are_stratified():
    records = make_records()
    splits = kfold_splits(records, k=5, seed=0)
    assert len(splits) == 5
    val_ids = [[r["image_id"] for r in val] for _, val in splits]
    assert sorted(i for ids in val_ids for i in ids) == [r["image_id"] for r in records]
    for (train, val), ids in zip(splits, val_ids):
        assert not {r["image_id"] for r in train} & set(ids)
        assert len(train) + len(val) == len(records)
    sizes = [len(v) for v in val_ids]
    positives = [sum(map(malignant, val)) for _, val in splits]
    assert max(sizes) - min(sizes) <= 1
    assert max(positives) - min(positives) <= 1 and sum(positives) == sum(map(malignant, records))


def test_folds_are_deterministic_order_free_and_seeded():
    records = make_records()
    folds = kfold_assign(records, 5, seed=1)
    assert folds == kfold_assign(records, 5, seed=1)
    by_id = dict(zip((r["image_id"] for r in records), folds))
    reversed_folds = kfold_assign(records[::-1], 5, seed=1)
    assert [by_id[r["image_id"]] for r in records[::-1]] == reversed_folds
    assert folds != kfold_assign(records, 5, seed=2)
    with pytest.raises(ValueError, match="2 <= k"):
        kfold_assign(records[:3], 5)


def test_copies_of_an_image_stay_in_one_fold(voc_tree):
    images = {
        f"{i:06d}": {"content": f"c{i // 3}", "objects": [(str(i % 2), 1, 1, 9 + i, 9)]}
        for i in range(1, 31)
    }
    dirname = voc_tree(images, {"trainval": sorted(images)})
    records = load_tn5000(dirname, "trainval")
    assert len(records) == 11
    seen = {}
    for fold, (_, val) in enumerate(kfold_splits(records, k=3, seed=0)):
        for record in val:
            for voc_id in record["source_ids"]:
                assert voc_id not in seen
                seen[voc_id] = fold
    assert sorted(seen) == sorted(images)


def test_kfold_tool_writes_coco_folds(tmp_path, tool):
    records = make_records(n=12)
    os.makedirs(tmp_path / "d")
    coco = records_to_coco(
        [{**r, "file_name": str(tmp_path / "d" / f"{r['image_id']}.png")} for r in records],
        ["benign", "malignant"],
        str(tmp_path / "d"),
    )
    (tmp_path / "all.json").write_text(json.dumps(coco))
    out = tmp_path / "folds"
    summary = tool("kfold_split").main(
        ["--coco-json", str(tmp_path / "all.json"), "--image-root", str(tmp_path / "d"),
         "--k", "3", "--output-dir", str(out)]
    )
    assert sorted(os.listdir(out)) == sorted(
        ["folds.json"] + [f"fold{i}_{p}.json" for i in range(3) for p in ("train", "val")]
    )
    all_val = []
    for i, fold in enumerate(summary["folds"]):
        val = json.loads((out / f"fold{i}_val.json").read_text())
        train = json.loads((out / f"fold{i}_train.json").read_text())
        assert [im["id"] for im in val["images"]] == fold["val"]
        assert not {im["id"] for im in val["images"]} & {im["id"] for im in train["images"]}
        assert val["categories"] == coco["categories"]
        all_val += fold["val"]
    assert sorted(all_val) == [im["id"] for im in coco["images"]]


def test_registered_fold_datasets():
    records = make_records(n=10)
    DatasetCatalog.register("test_kfold_base", lambda: records)
    MetadataCatalog.get("test_kfold_base").set(thing_classes=["benign", "malignant"])
    names = register_kfold_datasets("test_kfold_base", k=2, seed=0)
    assert names == [("test_kfold_base_fold0_train", "test_kfold_base_fold0_val"),
                     ("test_kfold_base_fold1_train", "test_kfold_base_fold1_val")]
    train0, val0 = (DatasetCatalog.get(n) for n in names[0])
    assert len(train0) + len(val0) == 10
    assert DatasetCatalog.get(names[1][1]) == train0
    assert MetadataCatalog.get(names[0][0]).thing_classes == ["benign", "malignant"]
