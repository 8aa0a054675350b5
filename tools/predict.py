#!/usr/bin/env python
"""Detect and classify thyroid nodules in images; draw them and write JSON.

Examples:
    python tools/predict.py --config-file configs/mccnn.yaml --weights model_final.pth \\
        --input scan.png --output out/
    python tools/predict.py ... --input folder/ more.jpg list.txt --json-mode single

Inputs: image files, folders (their images and DICOM files, not recursive) and list files
(``.txt``: one path per line, relative to the list's folder; blank lines and ``#`` comments
ignored). Images may be grayscale or colour (an alpha channel is dropped), 8- or 16-bit PNG,
JPEG, BMP or TIFF. 16-bit images become 8-bit by ``--scale-16bit``: "full" (default) maps
0..65535 linearly onto 0..255 (value / 257: exact for 8-bit data stored as 16-bit), "minmax"
stretches each image's own min..max onto 0..255 (for 10/12-bit exports). Images are read by
thyroid_det.data.image_io, as training and evaluation read them. A file that cannot be used
(missing, corrupt, a truncated JPEG, a side under 32 px) is reported by name and skipped; the
rest proceed, and the exit status is 2 if any was skipped. ``--output`` may not be a folder the
inputs are in (outputs would replace files there); a new sub-folder is fine.

The model sees what tools/evaluate.py feeds it: the file as the test mapper reads it (a colour
file in colour for colour configs, whose SSD models take its ITU-R 601 luma; a DICOM frame in
gray), resized by thyroid_det.engine.Predictor with the test mapper's own augmentation, to
INPUT.FIXED_SIZE without keeping the aspect ratio, for every config. detectron2's
DefaultPredictor differs: it resizes by the shorter edge (the peers then keep the aspect ratio)
and applies no malignancy temperature. Drawings are gray. ``<name>`` below is the file's stem
(``<stem>_f<frame>`` for a cine frame), numbered ``_1``, ``_2``, ... where an earlier output
took it, so no output replaces another. Outputs, in original-image pixels:

* ``OUTPUT/<name>.png``: the image with each detection at or above ``--min-score``, labelled
  with its class and that class's probability (red: malignant, green: benign); images with a
  side over 2048 px are drawn on a copy shrunk to 2048 px (drawing at full size took 7.6 GB for
  an 8000x8000 image). With NMS per class (Ec's default) a nodule close to both classes is
  drawn once per class; ``MODEL.SSD.CLASS_AGNOSTIC_NMS True`` draws one box per nodule.
* ``--json-mode per-image`` (default): ``OUTPUT/<name>.json`` per image;
  ``single``: ``OUTPUT/predictions.json`` with all images and the skipped files.
  Each detection: ``bbox`` [x0, y0, x1, y1], ``class``, ``category_id``, ``score`` (the model's
  detection score), ``malignant_prob``, ``size`` and ``class_probs`` / ``coarse_probs`` /
  ``fine_probs`` ([benign, malignant]) where the model gives them.
* ``OUTPUT/report.html``: one self-contained page (thumbnails embedded, no server needed) with
  a row per image: the drawing, the highest malignant probability, the detections and their
  sizes; click a column header to sort.

DICOM files (``.dcm``/``.dicom`` or the DICM marker; Ultrasound and Secondary Capture, any
transfer syntax pydicom's plugins decode) are read by thyroid_det.data.dicom; every frame of a
multi-frame cine is predicted on its own, as ``<stem>_f<frame>``. A detection's ``size`` is
``width_mm``, ``height_mm`` and ``diameter_mm`` (equivalent diameter sqrt(width * height)) from
the file's SequenceOfUltrasoundRegions (the region containing the box) or PixelSpacing, or
``{"calibration": "none", "reason": ...}`` for uncalibrated files and other images.
"""

import logging
import os
import sys

import cv2
import tqdm
from detectron2.data import MetadataCatalog
from detectron2.data.detection_utils import convert_image_to_rgb
from detectron2.utils.visualizer import Visualizer

import thyroid_det  # noqa: F401  (registers the plugin)
from thyroid_det.data.dicom import (
    DICOM_EXTENSIONS,
    DicomError,
    box_size_mm,
    is_dicom,
    model_image,
    read_frames,
)
from thyroid_det.data.image_io import UnreadableImage
from thyroid_det.engine import Predictor, setup_cfg_for_weights
from thyroid_det.evaluation.nodule_evaluator import malignant_probability
from thyroid_det.utils.cli import cli_errors, config_tool_parser
from thyroid_det.utils.file_io import atomic_path, atomic_write_json
from thyroid_det.utils.html_report import thumbnail_data_uri, write_html_report

logger = logging.getLogger("thyroid_det.predict")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff") + DICOM_EXTENSIONS
DEFAULT_CLASSES = ["benign", "malignant"]
CLASS_COLOURS = {"benign": (0.1, 0.8, 0.2), "malignant": (0.95, 0.1, 0.1)}
MAX_DRAW_SIDE = 2048


def collect_inputs(paths):
    """Expand files, folders and list files into image paths, in order, without duplicates."""
    found = []
    for path in paths:
        if os.path.isdir(path):
            files = sorted(os.path.join(path, f) for f in os.listdir(path))
            found += [
                f for f in files if f.lower().endswith(IMAGE_EXTENSIONS) or is_dicom(f)
            ]  # a PACS export's DICOM files often have no extension
        elif path.lower().endswith(".txt") and os.path.isfile(path):
            base = os.path.dirname(os.path.abspath(path))
            with open(path, encoding="utf-8") as f:
                lines = [line.strip() for line in f]
            found += [
                os.path.join(base, line) for line in lines if line and not line.startswith("#")
            ]
        else:
            found.append(path)
    seen = set()
    return [p for p in found if not (p in seen or seen.add(p))]


def output_stem(path):
    """The file's name without its extension; a DICOM file named by its UID keeps its dots,
    which are no extension (1.2.840.113619.2.5 and 1.2.840.113619.2.6 stay apart)."""
    name = os.path.basename(path)
    stem, ext = os.path.splitext(name)
    if ext.lower() not in IMAGE_EXTENSIONS and is_dicom(path):
        return name
    return stem


class OutputNames:
    """Distinct output stems, in the order the outputs are made: the wanted name (a file's stem,
    ``<stem>_f<frame>`` for a cine frame) if no earlier output holds it, else the first of
    ``<name>_1``, ``<name>_2``, ... that none holds. Every name given is remembered, numbered
    and frame names included, so x/a.png, y/a.png, a_1.png give a, a_1, a_1_1, and an input
    scan_f000.png after a cine scan.dcm gives scan_f000_1. Names are compared without case, as
    macOS and Windows file systems compare them."""

    def __init__(self):
        self.used = set()

    def __call__(self, wanted):
        name, count = wanted, 0
        while name.lower() in self.used:
            count += 1
            name = f"{wanted}_{count}"
        self.used.add(name.lower())
        return name


def instances_to_json(instances, classes):
    probs = malignant_probability(instances).tolist()
    detections = []
    for i in range(len(instances)):
        category = int(instances.pred_classes[i])
        det = {
            "bbox": [round(float(v), 2) for v in instances.pred_boxes.tensor[i].tolist()],
            "bbox_mode": "XYXY_ABS",
            "class": classes[category] if category < len(classes) else str(category),
            "category_id": category,
            "score": float(instances.scores[i]),
            "malignant_prob": float(probs[i]),
        }
        for field in ("class_probs", "coarse_probs", "fine_probs"):
            if instances.has(field):
                det[field] = [float(v) for v in instances.get(field)[i].tolist()]
        detections.append(det)
    return detections


def draw(gray, instances, classes, min_score):
    """The RGB image with the kept detections, labelled "<class> <probability of that class>";
    shrunk to a long side of MAX_DRAW_SIDE if larger."""
    keep = instances[instances.scores >= min_score]
    scale = min(1.0, MAX_DRAW_SIDE / max(gray.shape))
    if scale < 1.0:
        size = (max(1, round(gray.shape[1] * scale)), max(1, round(gray.shape[0] * scale)))
        gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
    rgb = convert_image_to_rgb(gray[:, :, None], "L")
    visualizer = Visualizer(rgb, metadata=None, scale=1.0)
    labels, colours = [], []
    probs = malignant_probability(keep)
    for i in range(len(keep)):
        category = int(keep.pred_classes[i])
        name = classes[category] if category < len(classes) else str(category)
        p = float(probs[i]) if name == "malignant" else 1.0 - float(probs[i])
        if name not in CLASS_COLOURS:  # not a benign/malignant model: its score is the probability
            p = float(keep.scores[i])
        labels.append(f"{name} {p:.2f}")
        colours.append(CLASS_COLOURS.get(name, (0.2, 0.4, 1.0)))
    vis = visualizer.overlay_instances(
        boxes=keep.pred_boxes.tensor.numpy() * scale, labels=labels, assigned_colors=colours
    )
    return vis.get_image()


def build_parser():
    parser = config_tool_parser(__doc__)
    parser.add_argument("--weights", required=True, metavar="FILE")
    parser.add_argument("--input", required=True, nargs="+", help="images, folders or .txt lists")
    parser.add_argument("--output", required=True, metavar="DIR")
    parser.add_argument("--json-mode", choices=("per-image", "single"), default="per-image")
    parser.add_argument(
        "--min-score", type=float, default=0.3, help="draw and write detections >= this"
    )
    parser.add_argument("--scale-16bit", choices=("full", "minmax"), default="full")
    return parser


@cli_errors("predict.py")
def main(argv=None):
    args = build_parser().parse_args(argv)
    paths = collect_inputs(args.input)
    if not paths:
        raise SystemExit("predict.py: error: no images found in --input")
    cfg = setup_cfg_for_weights(args, "predict.py", inputs=list(args.input) + paths)
    classes = DEFAULT_CLASSES
    if len(cfg.DATASETS.TEST):
        classes = MetadataCatalog.get(cfg.DATASETS.TEST[0]).get("thing_classes", DEFAULT_CLASSES)
    predictor = Predictor(cfg)
    output_name = OutputNames()
    results, skipped = [], []
    report = []
    for path in tqdm.tqdm(paths, desc="predict", unit="image"):
        try:
            frames = read_frames(path, args.scale_16bit)
        except (UnreadableImage, DicomError) as e:
            logger.warning(f"skipped {path}: {e}")
            skipped.append({"file_name": path, "error": str(e)})
            continue
        stem = output_stem(path)
        for frame in frames:
            name = output_name(stem if frame.index is None else f"{stem}_f{frame.index:03d}")
            gray = frame.image
            image = model_image(path, frame, cfg.INPUT.FORMAT, args.scale_16bit)
            instances = predictor(image)["instances"].to("cpu")
            kept = instances[instances.scores >= args.min_score]
            record = {
                "file_name": path,
                "height": int(gray.shape[0]),
                "width": int(gray.shape[1]),
                "detections": instances_to_json(kept, classes),
            }
            if frame.index is not None:
                record["frame"] = frame.index
            if is_dicom(path):
                record["calibration"] = frame.calibration.source if frame.calibration else "none"
            for det in record["detections"]:
                det["size"] = box_size_mm(frame.calibration, det["bbox"])
            results.append(record)
            drawing = draw(gray, instances, classes, args.min_score)
            ok, png = cv2.imencode(".png", drawing[:, :, ::-1])
            if not ok:
                raise OSError(f"cannot encode the drawing of {path} as PNG")
            with atomic_path(os.path.join(args.output, f"{name}.png")) as tmp, open(tmp, "wb") as f:
                f.write(png.tobytes())
            if args.json_mode == "per-image":
                atomic_write_json(os.path.join(args.output, f"{name}.json"), record)
            report.append(
                dict(record, name=name, thumbnail=thumbnail_data_uri(drawing), frame=frame.index,
                     calibration=record.get("calibration"))
            )
    write_html_report(
        os.path.join(args.output, "report.html"),
        report,
        subtitle=f"{args.weights}; detections with score >= {args.min_score:g}; "
        f"{len(skipped)} file(s) skipped",
    )
    if args.json_mode == "single":
        atomic_write_json(
            os.path.join(args.output, "predictions.json"), {"images": results, "skipped": skipped}
        )
    print(f"{len(results)} images written to {args.output}; {len(skipped)} skipped")
    for item in skipped:
        print(f"  skipped {item['file_name']}: {item['error']}", file=sys.stderr)
    return {"images": results, "skipped": skipped}


if __name__ == "__main__":
    sys.exit(2 if main()["skipped"] else 0)
