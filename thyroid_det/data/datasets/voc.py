"""Pascal VOC XML annotations: one file's boxes, checked against its image, in detectron2's frame.

VOC counts pixels from 1 and includes both ends, so ``xmin=1, xmax=10`` covers the first ten
pixels; that is ``[0, 10)`` in detectron2's absolute XYXY, i.e. ``x0 = xmin - 1``, ``x1 = xmax``
(as detectron2's own VOC loader does).
"""
import logging
import os
import xml.etree.ElementTree as ET

__all__ = ["BOX_TOLERANCE", "read_voc_boxes"]

logger = logging.getLogger(__name__)

# Boxes may overshoot the image by this many pixels (annotation tools round outwards); they are
# clipped. Anything further out is an annotation error.
BOX_TOLERANCE = 2.0


def read_voc_boxes(dirname, rel, width, height, labels, problems, stats):
    """
    The boxes of one VOC XML file, checked against its image and in detectron2's frame.

    Args:
        dirname (str): the data set's folder; ``rel`` is relative to it.
        rel (str): the XML file, e.g. "Annotations/000001.xml"; names it in problems.
        width, height (int): the image's real size; a ``<size>`` that differs is only logged
            when every box fits the image.
        labels (dict): ``<name>`` text -> contiguous category id.
        problems (list): gets a ``(rel, message)`` per problem found.
        stats (defaultdict(int)): counts "clipped_boxes" and "images_without_boxes".

    Returns:
        list[(int, tuple)] or None: ``(category_id, (x0, y0, x1, y1))`` with VOC's 1-based
        inclusive pixels moved to 0-based XYXY_ABS, boxes overshooting by at most
        ``BOX_TOLERANCE`` px clipped; None if the file has a problem.
    """
    path = os.path.join(dirname, rel)
    n_problems = len(problems)
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        problems.append((rel, "annotation file not found"))
        return None
    except (ET.ParseError, OSError) as e:
        problems.append((rel, f"cannot parse XML ({e})"))
        return None

    xml_size = None
    if root.find("size") is not None:
        try:
            xml_size = (_number(root, "size/width"), _number(root, "size/height"))
        except ValueError as e:
            problems.append((rel, str(e)))
            return None

    boxes = []
    for i, obj in enumerate(root.findall("object")):
        where = f"object {i + 1}"
        name = (obj.findtext("name") or "").strip()
        if name not in labels:
            known = ", ".join(sorted(labels))
            problems.append((rel, f"{where}: unknown label {name!r} (known: {known})"))
            continue
        try:
            xmin, ymin, xmax, ymax = (
                _number(obj, f"bndbox/{k}") for k in ("xmin", "ymin", "xmax", "ymax")
            )
        except ValueError as e:
            problems.append((rel, f"{where}: {e}"))
            continue
        box = (xmin - 1.0, ymin - 1.0, xmax, ymax)
        if box[2] <= box[0] or box[3] <= box[1]:
            problems.append((rel, f"{where}: degenerate box {_voc(xmin, ymin, xmax, ymax)}"))
            continue
        boxes.append((labels[name], box, where, (xmin, ymin, xmax, ymax)))

    if xml_size is not None and xml_size != (width, height):
        outside = [b for b in boxes if not _inside(b[1], width, height)]
        if outside:
            problems.append(
                (
                    rel,
                    f"<size> says {xml_size[0]:g}x{xml_size[1]:g} but the image is "
                    f"{width}x{height}, and box {_voc(*outside[0][3])} does not fit the image",
                )
            )
            return None
        logger.warning(
            f"{rel}: <size> says {xml_size[0]:g}x{xml_size[1]:g} but the image is "
            f"{width}x{height}; all boxes fit the image, using its size."
        )

    out = []
    for category_id, box, where, voc in boxes:
        if not _inside(box, width, height):
            problems.append(
                (rel, f"{where}: box {_voc(*voc)} lies outside the {width}x{height} image")
            )
            continue
        clipped = (
            min(max(box[0], 0.0), width),
            min(max(box[1], 0.0), height),
            min(max(box[2], 0.0), width),
            min(max(box[3], 0.0), height),
        )
        if clipped != box:
            stats["clipped_boxes"] += 1
            if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
                problems.append((rel, f"{where}: box {_voc(*voc)} has no area inside the image"))
                continue
        out.append((category_id, clipped))
    if len(problems) > n_problems:
        return None
    if not out:
        stats["images_without_boxes"] += 1
    return out


def _number(node, path):
    text = node.findtext(path)
    if text is None:
        raise ValueError(f"missing <{path}>")
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"<{path}> is not a number: {text.strip()!r}") from None


def _inside(box, width, height):
    tol = BOX_TOLERANCE
    return box[0] >= -tol and box[1] >= -tol and box[2] <= width + tol and box[3] <= height + tol


def _voc(xmin, ymin, xmax, ymax):
    return f"(xmin={xmin:g}, ymin={ymin:g}, xmax={xmax:g}, ymax={ymax:g})"
