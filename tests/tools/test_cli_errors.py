"""Bad command lines and config files end every tool with one line naming the file and the
problem: unknown keys (with the closest known key), a missing config, a broken COCO JSON."""
import os

import pytest

from thyroid_det.engine.defaults import ConfigError, load_cfg

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "configs")
BASE = os.path.abspath(os.path.join(CONFIGS, "mssd_vgg16_synthetic.yaml"))


class Args:
    def __init__(self, config_file, *opts):
        self.config_file, self.opts = str(config_file), list(opts)


def test_unknown_keys_name_the_file_and_the_closest_key(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text(f'_BASE_: "{BASE}"\nMODEL:\n  SSD:\n    NEG_POS_RATIOS: 3\n')
    with pytest.raises(ConfigError, match=r"child.yaml: unknown config key MODEL.SSD."
                       r"NEG_POS_RATIOS \(did you mean MODEL.SSD.NEG_POS_RATIO\?\)"):  # fmt: skip
        load_cfg(Args(child))
    # A bad key in a base file is named where it is.
    grandchild = tmp_path / "grandchild.yaml"
    grandchild.write_text('_BASE_: "child.yaml"\nSOLVER:\n  MAX_ITER: 5\n')
    with pytest.raises(ConfigError, match=r"/child.yaml: unknown config key MODEL.SSD.NEG_POS"):
        load_cfg(Args(grandchild))
    with pytest.raises(ConfigError, match=r"the command line: unknown config key SOLVER.MAX_ITERS "
                       r"\(did you mean SOLVER.MAX_ITER\?\)"):  # fmt: skip
        load_cfg(Args(BASE, "SOLVER.MAX_ITERS", "5"))
    with pytest.raises(ConfigError, match="the command line: .*SOLVER.MAX_ITER"):
        load_cfg(Args(BASE, "SOLVER.MAX_ITER", "many"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("MODEL: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: "):
        load_cfg(Args(broken))


def test_train_net_errors_are_one_line(tmp_path, tool, tiny_opts, phantom_root):
    train_net = tool("train_net")
    with pytest.raises(SystemExit, match="^train_net.py: error: config file '.*nothing.yaml' not"):
        train_net.run(["--config-file", str(tmp_path / "nothing.yaml")])
    with pytest.raises(SystemExit, match="^train_net.py: error: the command line: unknown config"):
        train_net.run(["--config-file", BASE, "MODEL.SSD.NEG_POS_RATIOS", "3"])
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [')
    (tmp_path / "images").mkdir()
    register = f"[['bad_set', '{bad}', '{tmp_path / 'images'}']]"
    argv = ["--config-file", BASE] + tiny_opts + [
        "DATASETS.COCO_REGISTER", register, "DATASETS.TRAIN", "('bad_set',)",
        "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path / "out")]  # fmt: skip
    with pytest.raises(SystemExit, match=r"^train_net.py: error: .*bad.json: not a usable COCO"):
        train_net.run(argv)
    a_file = tmp_path / "taken"
    a_file.write_text("")
    argv = ["--config-file", BASE, "OUTPUT_DIR", str(a_file)]
    with pytest.raises(SystemExit, match="^train_net.py: error: .*taken") as info:
        train_net.run(argv)
    assert "\n" not in str(info.value)
