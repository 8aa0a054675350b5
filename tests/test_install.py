"""The environment `make install` builds, and what `import thyroid_det` registers."""
import glob
import os
import subprocess
import sys
import tarfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_detectron2_parts_import():
    import detectron2.data  # noqa: F401
    import detectron2.engine  # noqa: F401
    import detectron2.evaluation  # noqa: F401
    import detectron2.modeling  # noqa: F401


def test_plugin_registers_its_components():
    from detectron2.data import DatasetCatalog
    from detectron2.modeling import (
        ANCHOR_GENERATOR_REGISTRY,
        BACKBONE_REGISTRY,
        META_ARCH_REGISTRY,
        ROI_HEADS_REGISTRY,
    )

    import thyroid_det  # noqa: F401
    from thyroid_det.modeling.refiner_nets import REFINER_REGISTRY

    assert "MultiScaleSSD" in META_ARCH_REGISTRY
    assert "MCCNN" in META_ARCH_REGISTRY
    assert "build_vgg16_ssd_backbone" in BACKBONE_REGISTRY
    assert "NodulePriorAnchorGenerator" in ANCHOR_GENERATOR_REGISTRY
    assert {"RefinerROIHeads", "SpatialPyramidROIHeads"} <= set(dict(ROI_HEADS_REGISTRY))
    for name in ("AlexNetSPConv5", "AlexNetSPPool5", "AlexNet", "GoogLeNet"):
        assert name in REFINER_REGISTRY
    registered = DatasetCatalog.list()
    for name in ("tn5000_train", "tn5000_val", "tn5000_trainval", "synthetic_train", "synthetic_val"):
        assert name in registered


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml"))))
def test_every_config_loads(path):
    from detectron2.config import get_cfg

    from thyroid_det import add_mccnn_config

    cfg = get_cfg()
    add_mccnn_config(cfg)
    cfg.merge_from_file(path)
    assert cfg.MODEL.META_ARCHITECTURE


def _install_script():
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    try:
        import install_detectron2
    finally:
        sys.path.pop(0)
    return install_detectron2


def test_detectron2_patches_apply_to_the_pinned_sdist(tmp_path):
    script = _install_script()
    sdist = os.path.join(script.CACHE_DIR, script.SDIST_FILE)
    if not os.path.exists(sdist):
        pytest.skip("pinned sdist not cached: detectron2 was already installed, not by the script")
    assert script.sha256(sdist) == script.SDIST_SHA256
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_path, filter="data")
    src = tmp_path / f"{script.SDIST_NAME}-{script.SDIST_VERSION}"
    script.apply_patches(str(src))
    text = (src / "detectron2/data/build.py").read_text()
    assert "np.int)" not in text and "dtype=int" in text
    assert "_C = None" in (src / "detectron2/layers/deform_conv.py").read_text()
    assert "ext_modules=[]" in (src / "setup.py").read_text()
    assert "except ImportError" in (src / "detectron2/export/__init__.py").read_text()


def test_patch_mismatch_is_reported(tmp_path):
    script = _install_script()
    (tmp_path / "setup.py").write_text("nothing to patch here\n")
    with pytest.raises(SystemExit, match="setup.py matched 0 times"):
        script.apply_patches(str(tmp_path))


@pytest.fixture
def recorded_pip(monkeypatch, tmp_path):
    """The install script with pip and the import check recorded instead of run, and its
    marker file in tmp_path."""
    script = _install_script()
    commands = []
    monkeypatch.setattr(script.subprocess, "run", lambda cmd, **kw: commands.append(cmd))
    monkeypatch.setattr(script, "marker_path", lambda: str(tmp_path / "marker"))
    monkeypatch.delenv("DETECTRON2_SOURCE", raising=False)
    return script, commands


def fake_checkout(root):
    (root / "detectron2").mkdir(parents=True)
    (root / "detectron2" / "__init__.py").write_text("")
    (root / "setup.py").write_text("")
    return root


def test_install_from_a_source_checkout_by_option_or_env(recorded_pip, tmp_path, monkeypatch):
    script, commands = recorded_pip
    clone = fake_checkout(tmp_path / "detectron2")
    (tmp_path / "marker").write_text("old fingerprint\n")
    script.main(["--source", str(clone)])
    pip, check = commands
    assert pip[1:] == ["-m", "pip", "install", "--no-build-isolation", "-e", str(clone)]
    assert "import detectron2" in check[-1]
    assert not (tmp_path / "marker").exists()  # a source build is kept as is by later runs

    commands.clear()
    monkeypatch.setenv("DETECTRON2_SOURCE", str(clone))
    script.main([])
    assert commands[0][-2:] == ["-e", str(clone)]


def test_source_option_rejects_a_folder_that_is_not_detectron2(recorded_pip, tmp_path):
    script, commands = recorded_pip
    with pytest.raises(SystemExit, match="not a detectron2 source checkout"):
        script.main(["--source", str(tmp_path)])
    assert commands == []


def test_without_a_source_the_patched_sdist_is_the_default(recorded_pip, monkeypatch):
    script, commands = recorded_pip
    installs = []
    monkeypatch.setattr(script, "detectron2_present", lambda: False)
    monkeypatch.setattr(script, "install", lambda: installs.append("sdist"))
    script.main([])
    assert installs == ["sdist"] and len(commands) == 1  # the import check only


def test_install_check_passes():
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "install_detectron2.py")],
        capture_output=True, text=True, check=True,
    )
    assert "check passed" in out.stdout
