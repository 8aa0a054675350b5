"""Bad command lines and config files end every tool with one line naming the file and the
problem: unknown keys (with the closest known key), a missing config, a broken COCO JSON."""
import json
import os
import re
import subprocess
import sys

import pytest

from thyroid_det.engine.defaults import ConfigError, load_cfg

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(REPO, "configs")
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


def write_coco_set(folder, boxes, num_images=None):
    """A COCO file in ``folder``: image i (not written) holds ``boxes[i]``; ``num_images``
    (default one per box) may add images without boxes."""
    folder.mkdir()
    images = [
        {"id": i + 1, "file_name": f"{i}.png", "height": 64, "width": 64}
        for i in range(len(boxes) if num_images is None else num_images)
    ]
    annotations = [
        {"id": i + 1, "image_id": i + 1, "category_id": 1 + i % 2, "bbox": box, "iscrowd": 0}
        for i, box in enumerate(boxes)
    ]
    categories = [{"id": 1, "name": "benign"}, {"id": 2, "name": "malignant"}]
    path = folder / "all.json"
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return path


def test_check_dataset_names_the_set_and_the_problem(tmp_path):
    from detectron2.data import DatasetCatalog

    from thyroid_det.data.datasets import DatasetFormatError
    from thyroid_det.utils.cli import UnknownDatasetError, check_dataset

    with pytest.raises(UnknownDatasetError, match="dataset 'no_such_set' is not registered"):
        check_dataset("no_such_set")

    def broken():
        raise RuntimeError("first line\nsecond line")

    image = tmp_path / "a.png"
    image.write_bytes(b"")
    sets = {
        "test_cli_broken": broken,
        "test_cli_empty": lambda: [],
        "test_cli_missing": lambda: [{"file_name": str(image)}, {"file_name": str(tmp_path / "b")}],
    }
    for name, load in sets.items():
        if name not in DatasetCatalog.list():
            DatasetCatalog.register(name, load)
    with pytest.raises(RuntimeError, match="^first line"):  # a loader's bug keeps its traceback
        check_dataset("test_cli_broken")
    with pytest.raises(DatasetFormatError, match="'test_cli_empty' has no images"):
        check_dataset("test_cli_empty")
    with pytest.raises(DatasetFormatError, match=r"'test_cli_missing' references a missing image: "
                       r"\S*/b$"):  # fmt: skip
        check_dataset("test_cli_missing")
    assert len(check_dataset("test_cli_missing", need_images=False)) == 2


def test_check_output_file_refuses_an_input(tmp_path):
    from thyroid_det.utils.cli import check_output_file

    config = tmp_path / "a.yaml"
    config.write_text("")
    (tmp_path / "link.yaml").symlink_to(config)
    for output in (config, tmp_path / "link.yaml", f"{tmp_path}/./a.yaml"):
        message = re.escape(f"--out {output} is the input {config}")
        with pytest.raises(FileExistsError, match=message):
            check_output_file(str(output), [str(config)], "--out")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        check_output_file(str(tmp_path), [str(config)])
    check_output_file(str(tmp_path / "b.yaml"), [str(config), None])


def test_dataset_tools_name_the_set_and_the_problem(tmp_path, tool):
    """kfold_split.py, fit_priors.py: an unregistered data set, a set without boxes: one line,
    with the tool's prefix."""
    kfold_split, fit_priors = tool("kfold_split"), tool("fit_priors")
    with pytest.raises(SystemExit, match="^kfold_split.py: error: dataset 'no_such_set' is not"):
        kfold_split.main(["--dataset", "no_such_set", "--output-dir", str(tmp_path / "folds")])
    with pytest.raises(SystemExit, match="^fit_priors.py: error: dataset 'no_such_set' is not"):
        fit_priors.main(["--config-file", BASE, "--dataset", "no_such_set"])
    empty = write_coco_set(tmp_path / "empty", [], num_images=3)
    register = f"[['test_cli_no_boxes', '{empty}', '{empty.parent}']]"
    with pytest.raises(SystemExit, match="^fit_priors.py: error: dataset 'test_cli_no_boxes' has"):
        fit_priors.main(["--config-file", BASE, "--dataset", "test_cli_no_boxes",
                         "DATASETS.COCO_REGISTER", register])  # fmt: skip


def test_kfold_split_reads_coco_as_training_does(tmp_path, tool):
    """thyroid_det's checked COCO loader: a broken file in one line, a box without width
    dropped."""
    kfold_split = tool("kfold_split")
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(SystemExit, match=r"^kfold_split.py: error: \S*broken.json: not a usable"):
        kfold_split.main(["--coco-json", str(broken), "--image-root", str(tmp_path),
                          "--output-dir", str(tmp_path / "folds")])  # fmt: skip
    coco = write_coco_set(tmp_path / "set", [[5, 5, 20, 20]] * 5 + [[5, 5, 0, 20]])
    out = tmp_path / "folds"
    kfold_split.main(["--coco-json", str(coco), "--image-root", str(coco.parent), "--k", "2",
                      "--output-dir", str(out)])  # fmt: skip
    folds = [json.loads((out / f"fold{i}_val.json").read_text()) for i in range(2)]
    assert sum(len(f["images"]) for f in folds) == 6
    assert sum(len(f["annotations"]) for f in folds) == 5
    assert all(a["bbox"][2] > 0 for f in folds for a in f["annotations"])
    with pytest.raises(SystemExit, match="^kfold_split.py: error: 9 folds of 6 images: k-fold"):
        kfold_split.main(["--coco-json", str(coco), "--image-root", str(coco.parent), "--k", "9",
                          "--output-dir", str(tmp_path / "folds9")])  # fmt: skip


def test_fit_priors_never_writes_over_an_input(tmp_path, tool):
    fit_priors = tool("fit_priors")
    coco = write_coco_set(tmp_path / "set", [[5, 5, 20, 20]] * 6)
    child = tmp_path / "child.yaml"
    child.write_text(f'_BASE_: "{BASE}"\nINPUT:\n  FIXED_SIZE: (128, 128)\n')
    text = child.read_text()
    register = f"[['test_cli_priors', '{coco}', '{coco.parent}']]"
    for output in (child, coco):
        argv = ["--config-file", str(child), "--dataset", "test_cli_priors", "--no-refine",
                "--output", str(output), "DATASETS.COCO_REGISTER", register]  # fmt: skip
        message = "^fit_priors.py: error: " + re.escape(f"--output {output} is the input")
        with pytest.raises(SystemExit, match=message):
            fit_priors.main(argv)
    assert child.read_text() == text and len(json.loads(coco.read_text())["images"]) == 6


def test_train_net_checks_data_and_weights_before_processes_start(
    tmp_path, tool, tiny_opts, phantom_root, monkeypatch
):
    """With several processes, a missing data set or ``--eval-only`` checkpoint stops
    train_net.py on one line before any process starts, as it does with one process."""
    train_net = tool("train_net")
    monkeypatch.setattr(train_net, "launch", lambda *a, **k: pytest.fail("processes started"))
    monkeypatch.setenv("THYROID_DATASETS", str(tmp_path / "absent"))
    opts = tiny_opts + ["DATASETS.TEST", "('synthetic_tiny',)", "OUTPUT_DIR", str(tmp_path / "o")]
    argv = ["--config-file", BASE, "--num-gpus", "2"]
    with pytest.raises(SystemExit, match=r"^train_net.py: error: TN5000 not found at '\S*absent/"):
        train_net.run(argv + opts + ["DATASETS.TRAIN", "('tn5000_train',)"])
    with pytest.raises(SystemExit, match=r"^train_net.py: error: checkpoint \S*none.pth not found"):
        train_net.run(argv + ["--eval-only"] + opts + ["MODEL.WEIGHTS", str(tmp_path / "none.pth")])


def test_train_net_on_two_processes_ends_a_user_error_on_one_line(
    tmp_path, tiny_opts, phantom_root
):
    """An error that only the processes meet (here: ``--eval-only`` weights that lack the
    model's) ends train_net.py as in one process: one line, exit status 1, no traceback."""
    import torch

    empty = tmp_path / "empty.pth"
    torch.save({}, empty)
    argv = [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file", BASE,
            "--num-gpus", "2", "--dist-url", "auto", "--eval-only"] + tiny_opts + [
            "MODEL.WEIGHTS", str(empty), "DATASETS.TEST", "('synthetic_tiny',)",
            "OUTPUT_DIR", str(tmp_path / "out")]  # fmt: skip
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert re.match(r"train_net.py: error: \S*empty.pth lacks \d+ of the model's", last), last
    assert "Traceback" not in result.stderr


def test_train_net_eval_only_refuses_to_evaluate_random_weights(tmp_path, tool, tiny_opts):
    """detectron2 loads nothing for an empty MODEL.WEIGHTS and would score a random model."""
    train_net = tool("train_net")
    argv = ["--config-file", BASE, "--eval-only"] + tiny_opts + [
        "MODEL.WEIGHTS", "", "OUTPUT_DIR", str(tmp_path / "o")]  # fmt: skip
    with pytest.raises(SystemExit, match="^train_net.py: error: --eval-only needs weights"):
        train_net.run(argv)


def test_train_net_names_a_dist_url_port_in_use(tmp_path, tool, tiny_opts, phantom_root):
    """detectron2's default ``--dist-url`` is one port per user: a second run on the machine
    ends on one line that says so, before any process starts."""
    import socket

    train_net = tool("train_net")
    with socket.socket() as other_run:
        other_run.bind(("127.0.0.1", 0))
        other_run.listen()
        url = f"tcp://127.0.0.1:{other_run.getsockname()[1]}"
        argv = ["--config-file", BASE, "--num-gpus", "2", "--dist-url", url] + tiny_opts + [
                "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path / "o")]  # fmt: skip
        with pytest.raises(SystemExit, match=r"^train_net.py: error: port already in use .*"
                           r"--dist-url auto picks a free port\): " + re.escape(url) + "$"):
            train_net.run(argv)
