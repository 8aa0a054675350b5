"""The device-run scripts write their JSON files through a temporary file renamed into place: a
write that fails part-way (a full disk, a killed process) leaves the previous file, or none,
never a truncated one that the next step would fail to parse."""
import builtins
import errno
import json
import os
import sys

import pytest

from .test_plan_device_run import _calibration

@pytest.fixture
def disk_fills(monkeypatch):
    """``disk_fills()``: from then on a file opened for writing takes 8 characters, then its
    write fails as on a full disk."""
    real_open = builtins.open

    def open_on_a_full_disk(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if "w" in mode:
            def write(data, _write=f.write):
                _write(data[:8])
                f.flush()
                raise OSError(errno.ENOSPC, "No space left on device")

            f.write = write
        return f

    return lambda: monkeypatch.setattr(builtins, "open", open_on_a_full_disk)


def assert_only(folder, names):
    assert sorted(os.listdir(folder)) == sorted(names)  # no temporary file left either


def test_plan_keeps_the_previous_plan(tmp_path, monkeypatch, disk_fills, tool):
    plan = tool("plan_device_run", "scripts")
    run_dir, log = _calibration(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "plan.json").write_text('{"SOLVER.MAX_ITER": 400}')
    argv = [run_dir, log, "--smoke-detector-iters", "60", "--seconds", "400"]
    monkeypatch.setattr(sys, "argv", ["plan"] + argv + ["--output", str(out / "plan.json")])
    disk_fills()
    with pytest.raises(OSError, match="No space left"):
        plan.main()
    assert json.loads((out / "plan.json").read_text()) == {"SOLVER.MAX_ITER": 400}
    assert_only(out, ["plan.json"])


def test_summary_keeps_the_previous_summary(tmp_path, disk_fills, tool):
    summarize = tool("summarize_run", "scripts")
    rows = [{"iteration": 99, "bbox/AP50": 50.0, "progress/train_minutes": 1.0}]
    (tmp_path / "metrics.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text('{"last_iteration": 49}')
    disk_fills()
    with pytest.raises(OSError, match="No space left"):
        summarize.main([str(tmp_path), "--max-iter", "100", "--output", str(out / "summary.json")])
    assert json.loads((out / "summary.json").read_text()) == {"last_iteration": 49}
    assert_only(out, ["summary.json"])


def test_payload_stamps_are_whole_or_absent(tmp_path, monkeypatch, disk_fills, tool):
    """settings.json (which a re-run parses to keep converted data) and MANIFEST.json."""
    prepare = tool("prepare_device_run", "scripts")
    monkeypatch.setattr(prepare, "run", lambda cmd, **kwargs: None)  # the converter
    monkeypatch.setattr(prepare, "build_wheels", lambda wheel_dir: {})
    monkeypatch.setattr(prepare, "working_tree_bytes", lambda: 0)
    (tmp_path / "MANIFEST.json").write_text('{"commit": "previous"}')
    disk_fills()
    with pytest.raises(OSError, match="No space left"):
        prepare.convert_data(str(tmp_path / "data"), str(tmp_path), force=True)
    assert_only(tmp_path / "data", [])
    with pytest.raises(OSError, match="No space left"):
        prepare.main(["--skip-data", "--output", str(tmp_path)])
    assert json.loads((tmp_path / "MANIFEST.json").read_text()) == {"commit": "previous"}
    assert_only(tmp_path, ["MANIFEST.json", "data"])
