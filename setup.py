"""thyroid_det: MC-CNN thyroid nodule detection and recognition as a detectron2 plugin."""
from setuptools import find_packages, setup

setup(
    name="thyroid_det",
    version="0.1.0",
    description="MC-CNN (multi-scale SSD + spatial pyramid refiner) for thyroid nodules, on detectron2",
    packages=find_packages(include=["thyroid_det", "thyroid_det.*"]),
    python_requires=">=3.9",
    # torch, torchvision and detectron2 are installed by `make install` (detectron2 is not on PyPI).
    install_requires=[
        "numpy",
        "opencv-python-headless",
        "pycocotools",
        "fvcore",
        "scikit-learn",
        # (scikit-learn's own dependency) rank statistics for the bootstrap AUC, the
        # temperature fit's optimiser.
        "scipy",
        "matplotlib",
        "tqdm",
        # DICOM input: pydicom, and pylibjpeg's decoders for JPEG lossless/LS and JPEG 2000
        # pixel data (pydicom decodes RLE itself and baseline JPEG with Pillow).
        "pydicom>=3.0",
        "pylibjpeg>=2.0",
        "pylibjpeg-libjpeg>=2.1",
        "pylibjpeg-openjpeg>=2.0",
    ],
    extras_require={
        # onnx + onnxruntime: the ONNX export test (tests/modeling/test_export.py); tested with
        # onnx 1.23.2 and onnxruntime 1.32.0 (CPU wheels, about 110 MB installed).
        "dev": ["pytest", "onnx>=1.23", "onnxruntime>=1.32"],
    },
)
