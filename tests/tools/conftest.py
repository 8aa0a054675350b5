"""Shared by the tools/ tests: import a tool as a module, tiny model settings, phantom data."""

import importlib.util
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Overrides that make any SSD/MC-CNN config CPU-test sized: 1/16 of VGG's width, 128 px input,
# a 64 px, 16-wide refiner, 10 detections per image.
TINY_MODEL = {
    "MODEL.DEVICE": "cpu",
    "MODEL.VGG.WIDTH_MULT": "0.0625",
    "INPUT.FIXED_SIZE": "(128, 128)",
    "MODEL.REFINER.WIDTH_MULT": "0.125",
    "MODEL.REFINER.FC_DIM": "16",
    "MODEL.REFINER.INPUT_SIZE": "64",
    "DATALOADER.NUM_WORKERS": "0",
    "TEST.NODULE_EVAL.BOOTSTRAP": "20",
    "TEST.DETECTIONS_PER_IMAGE": "10",
}


@pytest.fixture(scope="session")
def tiny_opts():
    """TINY_MODEL as command-line ``KEY VALUE`` overrides."""
    return [item for pair in TINY_MODEL.items() for item in pair]


@pytest.fixture(scope="session")
def tool():
    """``tool(name)`` imports ``tools/<name>.py`` as a module (tools/ is not a package)."""

    def load(name):
        path = os.path.join(REPO, "tools", f"{name}.py")
        spec = importlib.util.spec_from_file_location(f"thyroid_det_tool_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def _phantom_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic")


@pytest.fixture
def phantom_root(_phantom_dir, monkeypatch):
    """Phantom sets (synthetic_tiny, ...) are generated once per session, into a temp folder."""
    monkeypatch.setenv("THYROID_SYNTHETIC", str(_phantom_dir))
    return _phantom_dir


@pytest.fixture(scope="session")
def random_weights(tmp_path_factory):
    """``random_weights(config_file)``: a checkpoint of the config's tiny model, seeded random
    weights, built once per config and session."""
    cache = {}

    def make(config_file):
        if config_file not in cache:
            cache[config_file] = _save_random_weights(
                config_file, tmp_path_factory.mktemp("weights")
            )
        return cache[config_file]

    return make


def _save_random_weights(config_file, out_dir):
    import torch
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from thyroid_det import add_mccnn_config

    cfg = get_cfg()
    add_mccnn_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list([item for pair in TINY_MODEL.items() for item in pair])
    torch.manual_seed(0)
    model = build_model(cfg)
    DetectionCheckpointer(model, save_dir=str(out_dir)).save("random")
    return os.path.join(str(out_dir), "random.pth")
