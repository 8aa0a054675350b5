"""Fixtures for data tests: tiny TN5000-style VOC trees."""
import os

import numpy as np
import pytest
from PIL import Image

VOC_XML = """<annotation>
  <filename>{image_id}.jpg</filename>
  <size><width>{width}</width><height>{height}</height><depth>3</depth></size>
{objects}</annotation>
"""
VOC_OBJECT = """  <object>
    <name>{}</name><difficult>0</difficult>
    <bndbox><xmin>{}</xmin><ymin>{}</ymin><xmax>{}</xmax><ymax>{}</ymax></bndbox>
  </object>
"""


def write_voc_tree(root, images, splits):
    """
    Write ``root/TN5000`` and return its path.

    Args:
        images: {voc_id: spec}; spec keys: ``content`` (images with equal content are written
            as byte-identical files; default: the id), ``size`` ((w, h), default (64, 48)),
            ``objects`` ([(name, xmin, ymin, xmax, ymax)]), ``xml_size`` (written instead of the
            real size), ``xml`` (raw XML text instead), ``no_image`` (skip the JPEG).
        splits: {split: [voc_id, ...]}.
    """
    dirname = os.path.join(str(root), "TN5000")
    for sub in ("JPEGImages", "Annotations", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(dirname, sub), exist_ok=True)
    for image_id, spec in images.items():
        width, height = spec.get("size", (64, 48))
        if not spec.get("no_image"):
            seed = sum(map(ord, str(spec.get("content", image_id))))
            pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), np.uint8)
            Image.fromarray(pixels).save(os.path.join(dirname, "JPEGImages", f"{image_id}.jpg"))
        xml = spec.get("xml")
        if xml is None:
            xml_w, xml_h = spec.get("xml_size", (width, height))
            objects = "".join(VOC_OBJECT.format(*o) for o in spec.get("objects", []))
            xml = VOC_XML.format(image_id=image_id, width=xml_w, height=xml_h, objects=objects)
        with open(os.path.join(dirname, "Annotations", f"{image_id}.xml"), "w") as f:
            f.write(xml)
    for split, ids in splits.items():
        with open(os.path.join(dirname, "ImageSets", "Main", f"{split}.txt"), "w") as f:
            f.write("".join(f"{i}\n" for i in ids))
    return dirname


@pytest.fixture
def voc_tree(tmp_path, monkeypatch):
    """``write_voc_tree`` bound to a fresh folder; the image-hash cache goes there too."""
    monkeypatch.setenv("THYROID_CACHE", str(tmp_path / "cache"))
    return lambda images, splits: write_voc_tree(tmp_path / "voc", images, splits)
