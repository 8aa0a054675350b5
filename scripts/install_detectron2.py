#!/usr/bin/env python
"""Install detectron2 into the current Python environment, or keep the one that is there.

detectron2 has no official release on PyPI; its official install builds from its source
repository. This script therefore:

1. keeps any detectron2 that is already installed and was not installed by this script
   (a build from source, a wheel of yours): it is used as is, nothing below touches it;
2. otherwise fetches the PyPI repackaging of detectron2 0.6, ``pb1-detectron2==0.6``
   (sdist, pinned by version and sha256 below) through pip's configured package index,
   applies the compatibility edits listed in ``PATCHES``, and installs it with pip;
3. ends with a check that imports detectron2's modeling, data, engine and evaluation.

With ``--source DIR`` (or ``DETECTRON2_SOURCE=DIR``), a local clone of detectron2 (0.6 or main)
is installed instead, by detectron2's official route, ``pip install -e DIR`` (without build
isolation, so that the build sees the environment's torch); it builds detectron2's C++ ops where
a compiler is there, and later runs keep it (step 1).

What the edits change, and why (each is applied to the unpacked sdist, never to this repo):

* ``setup.py``: no C++/CUDA extension is built. The sdist ships without
  ``detectron2/layers/csrc``, so the build cannot succeed; the ops it would provide
  (deformable conv, rotated boxes, ROIAlignRotated, the C++ COCO evaluator) are not used by
  thyroid_det. The ``black==21.4b2`` pin is dropped: black only pretty-prints
  ``LazyConfig.save`` output and that old release conflicts with current packages.
* ``from detectron2 import _C`` in layers/deform_conv.py, layers/roi_align_rotated.py,
  layers/rotated_boxes.py and evaluation/fast_eval_api.py is wrapped in ``try/except
  ImportError`` (as current detectron2 does), so ``import detectron2.modeling`` works without
  the compiled extension. ``COCOEvaluator`` must then run with ``use_fast_impl=False``;
  thyroid_det decides that from whether ``detectron2._C`` imports.
* ``detectron2/export/__init__.py`` imports its caffe2 API only when caffe2 is there (as current
  detectron2 does), so ``from detectron2.export import TracingAdapter`` works.
* NumPy >= 1.24 removed the aliases ``np.bool``, ``np.int``, ``np.float``, ``np.str`` and
  ``np.object``; they are replaced by the builtins they always meant (the one in
  data/build.py breaks the training loader).
* Pillow >= 10 removed ``Image.LINEAR``; it was an alias of ``Image.BILINEAR``, used instead.
* model_zoo/model_zoo.py used ``pkg_resources``, which recent setuptools no longer ships;
  the bundled config path is computed from the package folder instead.

None of these edits is needed by current detectron2 main, which ``--source`` installs unedited:
a clone has ``layers/csrc`` and main's setup.py pins no black; main guards ``_C`` itself
(deform_conv.py at its end; roi_align_rotated.py and rotated_boxes.py call ``torch.ops.detectron2``;
coco_evaluation.py falls back to pycocotools' COCOeval when fast_eval_api.py cannot import ``_C``)
and caffe2 (export/__init__.py); the NumPy aliases (PR #4975) and ``Image.LINEAR`` (commit ff53992,
July 2023) are gone. Most of the patterns would not even match main's files, which is why the edits
are tied to the sdist's sha256. Main still imports ``pkg_resources`` in model_zoo.py (issue #5494),
so with setuptools >= 82 ``detectron2.model_zoo`` (and ``detectron2.utils.testing``) cannot import
there; thyroid_det imports neither.

Usage: ``python scripts/install_detectron2.py [--force] [--source DIR]``
"""
import argparse
import hashlib
import importlib.util
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request

SDIST_NAME = "pb1-detectron2"
SDIST_VERSION = "0.6"
SDIST_FILE = f"{SDIST_NAME}-{SDIST_VERSION}.tar.gz"
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
CACHE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".cache")

_GUARDED_C_IMPORT = "try:\n    from detectron2 import _C\nexcept ImportError:  # built without C++ ops\n    _C = None\n"
# detectron2/export's caffe2 API is optional, as in current detectron2: TracingAdapter and
# TorchScript export need no caffe2 (which torch no longer ships).
_GUARDED_CAFFE2_API = "try:\n    from .api import *\nexcept ImportError:  # no caffe2\n    pass\n"

# (path inside the sdist, regex, replacement, count that must be replaced (None: at least one))
PATCHES = [
    ("setup.py", r"ext_modules=get_extensions\(\),", "ext_modules=[],", 1),
    ("setup.py", r'\s*"black==21\.4b2",', "", 1),
    ("detectron2/layers/deform_conv.py", r"^from detectron2 import _C\n", _GUARDED_C_IMPORT, 1),
    ("detectron2/layers/roi_align_rotated.py", r"^from detectron2 import _C\n", _GUARDED_C_IMPORT, 1),
    ("detectron2/layers/rotated_boxes.py", r"^from detectron2 import _C\n", _GUARDED_C_IMPORT, 1),
    ("detectron2/evaluation/fast_eval_api.py", r"^from detectron2 import _C\n", _GUARDED_C_IMPORT, 1),
    ("detectron2/export/__init__.py", r"^from \.api import \*\n", _GUARDED_CAFFE2_API, 1),
    ("detectron2/data/transforms/transform.py", r"Image\.LINEAR\b", "Image.BILINEAR", None),
    ("detectron2/model_zoo/model_zoo.py", r"^import pkg_resources\n", "", 1),
    (
        "detectron2/model_zoo/model_zoo.py",
        r"pkg_resources\.resource_filename\(\s*\"detectron2\.model_zoo\", ",
        "os.path.join(os.path.dirname(__file__), ",
        1,
    ),
]
NUMPY_ALIAS = (r"\bnp\.(bool|int|float|str|object)\b(?!_)", r"\1")


def log(msg):
    print(f"[install_detectron2] {msg}", flush=True)


def detectron2_present():
    return importlib.util.find_spec("detectron2") is not None


def patch_fingerprint():
    """Identifies this script's sdist pin and edits, so a changed recipe reinstalls."""
    return hashlib.sha256(repr((SDIST_SHA256, PATCHES, NUMPY_ALIAS)).encode()).hexdigest()[:16]


def marker_path():
    return os.path.join(sys.prefix, ".thyroid_det-detectron2")


def installed_by_us():
    try:
        with open(marker_path()) as f:
            return f.read().strip()
    except OSError:
        return None


def index_url():
    """The simple index pip is configured to use (PIP_INDEX_URL, pip config, or pip's default)."""
    url = os.environ.get("PIP_INDEX_URL")
    if not url:
        out = subprocess.run(
            [sys.executable, "-m", "pip", "config", "get", "global.index-url"],
            capture_output=True, text=True,
        )
        url = out.stdout.strip() if out.returncode == 0 else ""
    if not url:
        from pip._internal.models.index import PyPI

        url = PyPI.simple_url
    return url.rstrip("/")


def fetch_sdist():
    os.makedirs(CACHE_DIR, exist_ok=True)
    path = os.path.join(CACHE_DIR, SDIST_FILE)
    if os.path.exists(path) and sha256(path) == SDIST_SHA256:
        log(f"using cached {path}")
        return path
    page_url = f"{index_url()}/{SDIST_NAME}/"
    log(f"looking up {SDIST_FILE} in the package index")
    with urllib.request.urlopen(page_url, timeout=120) as r:
        page = r.read().decode()
    links = [h for h in re.findall(r'href="([^"]+)"', page) if SDIST_FILE in h]
    if not links:
        sys.exit(f"[install_detectron2] {SDIST_FILE} is not listed at {page_url}")
    url = urllib.parse.urljoin(page_url, links[0].split("#")[0])
    tmp = path + ".part"
    with urllib.request.urlopen(url, timeout=300) as r, open(tmp, "wb") as f:
        f.write(r.read())
    digest = sha256(tmp)
    if digest != SDIST_SHA256:
        os.remove(tmp)
        sys.exit(f"[install_detectron2] sha256 mismatch for {SDIST_FILE}: got {digest}, expected {SDIST_SHA256}")
    os.replace(tmp, path)
    return path


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def apply_patches(src):
    for rel, pattern, repl, expected in PATCHES:
        p = os.path.join(src, rel)
        with open(p) as f:
            text = f.read()
        text, n = re.subn(pattern, repl, text, flags=re.M)
        if n == 0 or (expected is not None and n != expected):
            sys.exit(f"[install_detectron2] patch of {rel} matched {n} times, expected {expected or '>=1'}")
        with open(p, "w") as f:
            f.write(text)
        log(f"patched {rel} ({n}x): {pattern!r}")
    total = 0
    for root, _, files in os.walk(os.path.join(src, "detectron2")):
        for name in files:
            if name.endswith(".py"):
                p = os.path.join(root, name)
                with open(p) as f:
                    text = f.read()
                text, n = re.subn(NUMPY_ALIAS[0], NUMPY_ALIAS[1], text)
                if n:
                    total += n
                    with open(p, "w") as f:
                        f.write(text)
    log(f"replaced {total} removed NumPy aliases (np.bool/int/float/str/object)")


def install():
    sdist = fetch_sdist()
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        src = os.path.join(tmp, f"{SDIST_NAME}-{SDIST_VERSION}")
        apply_patches(src)
        log("pip install (no C++ extension build)")
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--no-build-isolation", src], check=True
        )
    with open(marker_path(), "w") as f:
        f.write(patch_fingerprint() + "\n")


def source_checkout(path):
    """``path`` if it is a detectron2 source checkout (setup.py and detectron2/), else exit."""
    path = os.path.abspath(os.path.expanduser(path))
    if not (
        os.path.isfile(os.path.join(path, "setup.py"))
        and os.path.isfile(os.path.join(path, "detectron2", "__init__.py"))
    ):
        sys.exit(
            f"[install_detectron2] {path} is not a detectron2 source checkout (no setup.py and "
            "detectron2/__init__.py): git clone https://github.com/facebookresearch/detectron2"
        )
    return path


def install_from_source(path):
    """detectron2's official install of a clone: ``pip install -e``; the clone is then a
    detectron2 "not installed by this script", kept by later runs."""
    log(f"pip install -e {path} (detectron2 from a local source checkout)")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-build-isolation", "-e", path], check=True
    )
    if os.path.exists(marker_path()):
        os.remove(marker_path())


def check():
    code = (
        "import detectron2, detectron2.modeling, detectron2.data, detectron2.engine, "
        "detectron2.evaluation, detectron2.data.transforms, detectron2.export;"
        "print('detectron2', detectron2.__version__, 'from', detectron2.__file__)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    log("check passed: modeling, data, engine, evaluation and export import")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--force", action="store_true", help="reinstall the patched 0.6 even if detectron2 imports")
    ap.add_argument(
        "--source",
        default=os.environ.get("DETECTRON2_SOURCE") or None,
        metavar="DIR",
        help="install this local detectron2 clone with pip install -e (default: $DETECTRON2_SOURCE; "
        "unset: the patched 0.6 sdist)",
    )
    args = ap.parse_args(argv)
    ours = installed_by_us()
    if args.source:
        install_from_source(source_checkout(args.source))
    elif args.force or not detectron2_present():
        install()
    elif ours is None:
        log("detectron2 is already installed (not by this script): keeping it as is")
    elif ours != patch_fingerprint():
        log("the patched 0.6 installed here predates this script's recipe: reinstalling")
        install()
    else:
        log("patched detectron2 0.6 already installed by this script: nothing to do")
    check()


if __name__ == "__main__":
    main()
