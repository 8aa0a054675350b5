#!/usr/bin/env python
"""Build ``device_payload/``: what a borrowed GPU machine needs to run ``configs/mccnn.yaml``.

Run here (no GPU needed), then hand the folder to the device tool as ``carry``; the script that
runs there is ``scripts/device_run_mccnn.sh`` (README, "TN5000 on one GPU")::

    .venv/bin/python scripts/prepare_device_run.py        # or: make device-payload

What it writes (the folder is git-ignored):

* ``wheels/``: what the GPU machine's Python 3.12 image lacks (its package list:
  the device library's KINDS.md), for ``pip install --no-deps --target``:
  detectron2 0.6, built here as a pure-Python wheel from the same patched sdist that
  ``scripts/install_detectron2.py`` installs (no C++ ops: thyroid_det uses none, and building
  them there would cost device minutes), and the packages detectron2 and thyroid_det import
  that the image does not have (``DEVICE_MISSING``), at the versions tested here;
* ``data/``: TN5000 as COCO JSON + grayscale WebP (``tools/convert_tn5000_to_coco.py``):
  ``tn5000_train`` shrunk to a long side of 480 px, ``tn5000_val`` at full size, as the README's
  GPU sessions sent it (full-size val keeps the evaluator's pixel size groups comparable with
  the CPU results; the network sees 320 px either way);
* ``MANIFEST.json``: versions, settings, sizes.

It ends by adding up what one device call sends (the working tree git would list, plus this
folder) against the tool's 64 MiB limit, and exits non-zero if it is over. Re-running keeps
converted data whose settings match (``--force`` redoes it) and rebuilds the wheels.
"""
import argparse
import importlib.metadata
import importlib.util
import json
import os
import runpy
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUTPUT = os.path.join(REPO, "device_payload")
LIMIT_MIB = 64
# Packages that detectron2 0.6 and thyroid_det import during training, evaluation and
# plot_curves (read from sys.modules after such a run here) and that the GPU image lacks,
# at the versions this project's environment runs. Everything else they import (torch,
# torchvision, numpy, opencv, matplotlib, scipy, scikit-learn, tabulate, cloudpickle, tqdm,
# pyyaml, portalocker, tensorboard, pillow, pyparsing) is in the image.
DEVICE_MISSING = {
    "fvcore": "0.1.5.post20221221",
    "iopath": "0.1.9",
    "yacs": "0.1.8",
    "termcolor": "3.3.0",
    "omegaconf": "2.3.1",
    "antlr4-python3-runtime": "4.9.3",
    "pydot": "4.0.1",
    "pycocotools": "2.0.11",
}
# pip download tags for the GPU machine (x86-64, CPython 3.12, glibc manylinux).
TARGET = ["--python-version", "3.12", "--implementation", "cp"] + [
    arg
    for plat in (
        "manylinux_2_28_x86_64",
        "manylinux_2_27_x86_64",
        "manylinux_2_17_x86_64",
        "manylinux2014_x86_64",
        "manylinux1_x86_64",
    )
    for arg in ("--platform", plat)
]
# (split, long side or 0 for full size, WebP quality): the README's GPU sessions' data.
DATA_SPLITS = (("train", 480, 75), ("val", 0, 80))


def log(msg):
    print(f"[prepare_device_run] {msg}", flush=True)


def run(cmd, **kwargs):
    log("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True, **kwargs)


def mib(nbytes):
    return nbytes / 2**20


def tree_bytes(path):
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


# thyroid_det's atomic JSON writer, run from its file (it needs only the standard library):
# importing thyroid_det would import detectron2 and torch, seconds of a device run's time box.
atomic_write_json = runpy.run_path(os.path.join(REPO, "thyroid_det", "utils", "file_io.py"))[
    "atomic_write_json"
]


def load_install_detectron2():
    """scripts/install_detectron2.py as a module: its pinned sdist and its edits."""
    path = os.path.join(REPO, "scripts", "install_detectron2.py")
    spec = importlib.util.spec_from_file_location("install_detectron2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_detectron2_wheel(wheel_dir):
    """The patched pb1-detectron2 0.6 as a pure-Python wheel (no C++ extension)."""
    d2 = load_install_detectron2()
    sdist = d2.fetch_sdist()
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        src = os.path.join(tmp, f"{d2.SDIST_NAME}-{d2.SDIST_VERSION}")
        d2.apply_patches(src)
        run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
             "-w", wheel_dir, src],
            cwd=tmp,
        )


def fetch_wheel(name, version, wheel_dir):
    """A cp312/x86-64 or pure-Python wheel of ``name==version`` from the package index; where
    the index has only an sdist (fvcore, antlr4), a wheel built here, which must be pure."""
    spec = f"{name}=={version}"
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           *TARGET, "-d", wheel_dir, spec]
    if subprocess.run(cmd, capture_output=True, text=True).returncode == 0:
        log(f"downloaded {spec}")
        return
    log(f"no cp312 wheel of {spec} in the index: building it from its sdist")
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-binary", name,
         "-w", wheel_dir, spec])


def check_wheels(wheel_dir):
    """One wheel per project, each pure Python or CPython 3.12 x86-64; returns {project: file}."""
    found = {}
    for name in sorted(os.listdir(wheel_dir)):
        if not name.endswith(".whl"):
            continue
        project, _version, *_, pyver, abi, plat = name[:-4].split("-")
        pure = abi == "none" and plat == "any"
        if not pure and not ("cp312" in pyver and plat.endswith("x86_64")):
            sys.exit(
                f"[prepare_device_run] {name} runs neither anywhere nor on CPython 3.12 x86-64"
            )
        key = project.lower().replace("_", "-")
        if key in found:
            sys.exit(f"[prepare_device_run] two wheels of {key}: {found[key]}, {name}")
        found[key] = name
        with zipfile.ZipFile(os.path.join(wheel_dir, name)) as z:
            if pure and any(n.endswith((".so", ".pyd")) for n in z.namelist()):
                sys.exit(f"[prepare_device_run] {name} is tagged pure but holds compiled code")
    return found


def build_wheels(wheel_dir):
    shutil.rmtree(wheel_dir, ignore_errors=True)
    os.makedirs(wheel_dir)
    build_detectron2_wheel(wheel_dir)
    for name, version in DEVICE_MISSING.items():
        try:
            here = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            here = None
        if here != version:
            log(f"note: this environment has {name} {here}, the payload carries {version}")
        fetch_wheel(name, version, wheel_dir)
    return check_wheels(wheel_dir)


def convert_data(data_dir, root, force):
    """TN5000 train/val as COCO JSON + WebP under ``data_dir`` (kept when its settings match)."""
    stamp_path = os.path.join(data_dir, "settings.json")
    settings = {"splits": [list(s) for s in DATA_SPLITS], "format": "webp"}
    if not force and os.path.exists(stamp_path):
        with open(stamp_path) as f:
            if json.load(f) == settings:
                log(f"keeping {data_dir} (same settings; --force converts again)")
                return settings
    shutil.rmtree(data_dir, ignore_errors=True)
    os.makedirs(data_dir)
    for split, max_side, quality in DATA_SPLITS:
        cmd = [sys.executable, os.path.join(REPO, "tools", "convert_tn5000_to_coco.py"),
               "--root", root, "--splits", split, "--output-dir", data_dir,
               "--image-dir", os.path.join(data_dir, split), "--format", "webp",
               "--quality", str(quality)]
        if max_side:
            cmd += ["--max-side", str(max_side)]
        run(cmd, cwd=REPO)
    atomic_write_json(stamp_path, settings, indent=None)
    return settings


def working_tree_bytes():
    """What a device call sends besides ``carry``: tracked and untracked-not-ignored files."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout
    paths = [os.path.join(REPO, p) for p in out.decode().split("\0") if p]
    return sum(os.path.getsize(p) for p in paths if os.path.isfile(p))


def git_commit():
    out = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    )
    return out.stdout.strip()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--output", default=DEFAULT_OUTPUT, help="payload folder (default: device_payload/)"
    )
    parser.add_argument(
        "--root",
        default=os.getenv("THYROID_DATASETS", "datasets"),
        help="folder holding TN5000/ (default: $THYROID_DATASETS or ./datasets)",
    )
    parser.add_argument(
        "--force", action="store_true", help="convert the data again even if its settings match"
    )
    parser.add_argument("--skip-data", action="store_true", help="wheels only (to check them)")
    args = parser.parse_args(argv)
    if not args.skip_data and not os.path.isdir(os.path.join(args.root, "TN5000", "Annotations")):
        sys.exit(
            f"[prepare_device_run] no TN5000 under {args.root!r}: set THYROID_DATASETS or --root"
        )

    start = time.time()
    output = os.path.abspath(args.output)
    os.makedirs(output, exist_ok=True)
    wheels = build_wheels(os.path.join(output, "wheels"))
    settings = None
    if not args.skip_data:
        settings = convert_data(os.path.join(output, "data"), args.root, args.force)

    wheel_bytes = tree_bytes(os.path.join(output, "wheels"))
    data_bytes = tree_bytes(os.path.join(output, "data"))
    tree = working_tree_bytes()
    total = tree + tree_bytes(output)
    manifest = {
        "commit": git_commit(),
        "made": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "wheels": sorted(wheels.values()),
        "data": settings,
        "mib": {"wheels": round(mib(wheel_bytes), 2), "data": round(mib(data_bytes), 2),
                "working_tree": round(mib(tree), 2), "device_call_total": round(mib(total), 2)},
    }
    atomic_write_json(os.path.join(output, "MANIFEST.json"), manifest)
    for name in manifest["wheels"]:
        log(f"wheel {name}")
    log(
        f"a device call sends {mib(total):.1f} MiB of its {LIMIT_MIB} MiB: working tree "
        f"{mib(tree):.1f}, wheels {mib(wheel_bytes):.1f}, data {mib(data_bytes):.1f} "
        f"({time.time() - start:.0f} s)"
    )
    if mib(total) > LIMIT_MIB:
        sys.exit(f"[prepare_device_run] over the device tool's {LIMIT_MIB} MiB limit")
    rel = os.path.relpath(output, REPO)
    log(
        'device tool: run(command="bash scripts/device_run_mccnn.sh", '
        f'carry=["{rel}"], timeout_s=600)'
    )


if __name__ == "__main__":
    main()
