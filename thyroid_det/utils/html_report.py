"""One self-contained HTML page of predictions: a table of images with embedded thumbnails (the
drawn detections), malignant probabilities and sizes, sortable by clicking a column header. No
external file, script or server: it opens from disk in any browser."""

import base64
import html
import math

import cv2

from .file_io import atomic_write_text

__all__ = ["thumbnail_data_uri", "write_html_report"]

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; width: 100%; }
th, td { border-bottom: 1px solid #ddd; padding: 6px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; cursor: pointer; user-select: none; white-space: nowrap; }
th.sorted-desc::after { content: " \\25BC"; } th.sorted-asc::after { content: " \\25B2"; }
td.num { font-variant-numeric: tabular-nums; white-space: nowrap; }
.malignant { color: #c00; font-weight: 600; } .benign { color: #080; }
.none { color: #888; } img { max-width: 320px; display: block; }
ul { margin: 0; padding-left: 1.1em; } .meta { color: #555; font-size: 0.9em; }
"""

SCRIPT = """
function sortBy(th) {
  const table = th.closest("table"), body = table.tBodies[0], col = th.cellIndex;
  const desc = !th.classList.contains("sorted-desc");
  for (const other of th.parentNode.children) other.classList.remove("sorted-desc", "sorted-asc");
  th.classList.add(desc ? "sorted-desc" : "sorted-asc");
  const key = r => { const v = r.cells[col].dataset.sort; const n = parseFloat(v);
                     return isNaN(n) ? (v || "") : n; };
  const rows = Array.from(body.rows).sort((a, b) => {
    const x = key(a), y = key(b);
    if (typeof x !== typeof y) return typeof x === "number" ? -1 : 1;  // blanks last
    return (x < y ? -1 : x > y ? 1 : 0) * (desc ? -1 : 1);
  });
  rows.forEach(r => body.appendChild(r));
}
"""


def thumbnail_data_uri(rgb, max_side=320):
    """An RGB image as a ``data:`` URI of a JPEG at most ``max_side`` pixels on its longer side."""
    scale = min(1.0, max_side / float(max(rgb.shape[:2])))
    if scale < 1.0:
        size = (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale)))
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    ok, jpeg = cv2.imencode(".jpg", rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:
        raise OSError("cannot encode a thumbnail as JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(jpeg.tobytes()).decode("ascii")


def _size_text(det):
    size = det.get("size")
    if not size:
        return ""
    if size.get("calibration") == "none":
        return '<span class="none">uncalibrated</span>'
    return (
        f"{size['width_mm']:.1f} &times; {size['height_mm']:.1f} mm "
        f"(&empty; {size['diameter_mm']:.1f} mm)"
    )


def _detection_item(det):
    cls = html.escape(str(det["class"]))
    box = ", ".join(f"{v:.0f}" for v in det["bbox"])
    size = _size_text(det)
    return (
        f'<li><span class="{cls}">{cls}</span> p(malignant) {det["malignant_prob"]:.3f}, '
        f"score {det['score']:.2f}, box [{box}]{', ' + size if size else ''}</li>"
    )


def _row(entry):
    dets = entry["detections"]
    top = max((d["malignant_prob"] for d in dets), default=float("nan"))
    top_text = "&ndash;" if math.isnan(top) else f"{top:.3f}"
    sizes = [d["size"]["diameter_mm"] for d in dets if d.get("size", {}).get("diameter_mm")]
    largest = max(sizes, default=None)
    name = html.escape(entry["name"])
    where = html.escape(entry["file_name"])
    frame = "" if entry.get("frame") is None else f" frame {entry['frame']}"
    calibration = html.escape(entry.get("calibration") or "none")
    ranked = sorted(dets, key=lambda d: -d["malignant_prob"])
    items = "".join(_detection_item(d) for d in ranked) or '<span class="none">no detection</span>'
    return (
        "<tr>"
        f'<td><img src="{entry["thumbnail"]}" alt="{name}"></td>'
        f'<td data-sort="{name}">{name}{html.escape(frame)}<div class="meta">{where}<br>'
        f"{entry['width']}&times;{entry['height']} px, calibration: {calibration}</div></td>"
        f'<td class="num" data-sort="{"" if math.isnan(top) else f"{top:.6f}"}">{top_text}</td>'
        f'<td class="num" data-sort="{len(dets)}">{len(dets)}</td>'
        f'<td class="num" data-sort="{"" if largest is None else largest}">'
        f"{'&ndash;' if largest is None else f'{largest:.1f}'}</td>"
        f"<td><ul>{items}</ul></td>"
        "</tr>"
    )


def write_html_report(path, entries, title="thyroid_det predictions", subtitle=""):
    """Write the report.

    Args:
        path (str): the .html file.
        entries (list[dict]): per image (or DICOM frame): ``name``, ``file_name``, ``frame``
            (or None), ``width``, ``height``, ``calibration`` (its source, or None),
            ``thumbnail`` (a data URI, :func:`thumbnail_data_uri`) and ``detections`` (as
            tools/predict.py's JSON: ``class``, ``malignant_prob``, ``score``, ``bbox``, and
            ``size`` from :func:`thyroid_det.data.dicom.box_size_mm`).
        title, subtitle (str): page heading and the line under it.

    Rows start sorted by the highest malignant probability, most suspicious first.
    """
    key = [max((d["malignant_prob"] for d in e["detections"]), default=-1.0) for e in entries]
    order = sorted(range(len(entries)), key=lambda i: -key[i])
    rows = "\n".join(_row(entries[i]) for i in order)
    headers = [
        ("", False), ("image", True), ("max p(malignant)", True), ("detections", True),
        ("largest &empty; mm", True), ("findings", False),
    ]
    head = "".join(
        f'<th onclick="sortBy(this)"{" class=sorted-desc" if i == 2 else ""}>{h}</th>'
        if sortable else f"<th>{h}</th>"
        for i, (h, sortable) in enumerate(headers)
    )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{STYLE}</style><script>{SCRIPT}</script></head>
<body><h1>{html.escape(title)}</h1><p class="meta">{html.escape(subtitle)}</p>
<table><thead><tr>{head}</tr></thead>
<tbody>
{rows}
</tbody></table></body></html>
"""
    atomic_write_text(path, page)
