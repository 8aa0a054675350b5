"""Checkpoints: inference refuses weights that leave the model uninitialised or a file that is
not a checkpoint, and takes a periodic checkpoint's weight average; saves are atomic; resume
falls back past an unreadable checkpoint."""
import os
import pickle

import pytest
import torch
from torch import nn

from thyroid_det.engine import CheckpointError, Checkpointer, load_inference_weights

from ..conftest import make_cfg


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def test_inference_refuses_a_checkpoint_without_the_weights(tmp_path):
    empty = tmp_path / "empty.pth"
    torch.save({}, empty)
    unrelated = tmp_path / "unrelated.pth"
    torch.save({"model": {"something.else": torch.zeros(2)}}, unrelated)
    partial = tmp_path / "partial.pth"
    torch.save({"model": {"0.weight": torch.zeros(4, 3), "0.bias": torch.zeros(4)}}, partial)
    for path, lacks in ((empty, "4 of"), (unrelated, "4 of"), (partial, r"2 of .*2\.weight")):
        with pytest.raises(CheckpointError, match=f"{path.name} lacks {lacks}"):
            load_inference_weights(small_model(), str(path))
    complete = tmp_path / "complete.pth"
    Checkpointer(small_model(), str(tmp_path)).save("complete")
    fresh = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    loaded = load_inference_weights(fresh, str(complete))
    assert torch.equal(loaded[0].weight, small_model()[0].weight)


class NotATensor:
    pass


def test_a_file_that_is_not_a_checkpoint_gets_one_line(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    pickled = tmp_path / "object.pth"
    with open(pickled, "wb") as f:
        pickle.dump({"model": NotATensor()}, f)
    truncated = tmp_path / "cut.pth"
    torch.save({"model": small_model().state_dict()}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    for path in (text, pickled, truncated, tmp_path / "absent.pth"):
        with pytest.raises(CheckpointError) as info:
            load_inference_weights(small_model(), str(path))
        message = str(info.value)
        assert path.name in message and "\n" not in message, message
        assert "weights_only" not in message, message


def test_saves_are_atomic(tmp_path, monkeypatch):
    checkpointer = Checkpointer(small_model(), str(tmp_path))
    checkpointer.save("model_final")
    before = (tmp_path / "model_final.pth").read_bytes()

    def killed(obj, f, *args, **kwargs):  # a kill -9 halfway through writing
        with open(f, "wb") as out:
            out.write(before[: len(before) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save("model_final")
    assert (tmp_path / "model_final.pth").read_bytes() == before
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_final.pth"]


def test_resume_falls_back_past_an_unreadable_checkpoint(tmp_path, caplog):
    model = small_model()
    checkpointer = Checkpointer(model, str(tmp_path))
    checkpointer.save("model_0000004", iteration=4)
    os.utime(tmp_path / "model_0000004.pth", (1, 1))  # older than what follows
    checkpointer.save("model_final", iteration=9)
    (tmp_path / "model_final.pth").write_bytes(b"truncated")  # as a kill left it before
    restored = Checkpointer(small_model(), str(tmp_path)).resume_or_load("", resume=True)
    assert restored["iteration"] == 4
    assert "model_final.pth is not a readable checkpoint" in caplog.text
    (tmp_path / "model_0000004.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no readable checkpoint in"):
        Checkpointer(small_model(), str(tmp_path)).resume_or_load("", resume=True)


def test_the_trainer_saves_through_it(tmp_path, phantom_root, tiny_opts):
    from detectron2.engine import hooks

    from thyroid_det.engine import Trainer

    cfg = make_cfg("mssd_vgg16_synthetic.yaml")
    data = ["DATASETS.TRAIN", "('synthetic_tiny',)", "DATASETS.TEST", "()"]
    cfg.merge_from_list(tiny_opts + data + ["OUTPUT_DIR", str(tmp_path)])
    trainer = Trainer(cfg)
    assert type(trainer.checkpointer) is Checkpointer
    periodic = [h for h in trainer._hooks if isinstance(h, hooks.PeriodicCheckpointer)]
    assert periodic and periodic[0].checkpointer is trainer.checkpointer


def test_inference_takes_the_weight_average_of_a_periodic_checkpoint(tmp_path, phantom_root, tiny_opts):
    """With SOLVER.EMA a periodic checkpoint's model is the step's own weights and its trainer
    state the average, which the evaluation at that iteration scored: inference loads the
    average, a training load (MODEL.WEIGHTS, resume) the step's own weights."""
    from thyroid_det.engine import Trainer

    cfg = make_cfg("mssd_vgg16_synthetic.yaml")
    data = ["DATASETS.TRAIN", "('synthetic_tiny',)", "DATASETS.TEST", "()"]
    schedule = [
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "4", "SOLVER.STEPS", "()",
        "SOLVER.WARMUP_ITERS", "0", "SOLVER.CHECKPOINT_PERIOD", "2",
        "SOLVER.EMA.ENABLED", "True", "SOLVER.EMA.DECAY", "0.9",
    ]
    cfg.merge_from_list(tiny_opts + data + schedule + ["OUTPUT_DIR", str(tmp_path)])
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()

    path = str(tmp_path / "model_0000001.pth")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    own, average = saved["model"], saved["trainer"]["hooks"]["ModelEMAHook"]["averages"]
    floats = [k for k, v in own.items() if v.is_floating_point()]
    assert any(not torch.equal(own[k], average[k]) for k in floats)

    inference = load_inference_weights(Trainer.build_model(cfg), path).state_dict()
    assert all(torch.equal(inference[k], average[k]) for k in floats)
    training = Trainer.build_model(cfg)
    Checkpointer(training).load(path, checkpointables=[])
    assert all(torch.equal(training.state_dict()[k], own[k]) for k in floats)
    # the final checkpoint holds the average as its model: the same either way
    final = load_inference_weights(Trainer.build_model(cfg), str(tmp_path / "model_final.pth"))
    last = torch.load(str(tmp_path / "model_final.pth"), map_location="cpu", weights_only=True)
    assert all(torch.equal(final.state_dict()[k], last["model"][k]) for k in floats)
