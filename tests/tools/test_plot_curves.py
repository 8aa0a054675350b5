"""Learning curves: a short training logs evaluations (class-aware and class-agnostic AP50, AUC)
with images seen and training minutes into metrics.json, and plot_curves draws them."""

import argparse
import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_opts, _phantom_dir):
    """4 iterations of batch 2 on phantoms with an evaluation every 2 iterations, weight EMA on
    (its evaluations and final checkpoint are of the averaged weights)."""
    from thyroid_det.engine import Trainer, setup_cfg

    out = tmp_path_factory.mktemp("run")
    saved = os.environ.get("THYROID_SYNTHETIC")
    os.environ["THYROID_SYNTHETIC"] = str(_phantom_dir)
    opts = list(tiny_opts) + [
        "DATASETS.TRAIN", "('synthetic_tiny',)", "DATASETS.TEST", "('synthetic_tiny',)",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "4", "SOLVER.STEPS", "()",
        "SOLVER.WARMUP_ITERS", "0", "TEST.EVAL_PERIOD", "2", "OUTPUT_DIR", str(out),
        "SOLVER.EMA.ENABLED", "True", "SOLVER.EMA.DECAY", "0.9",
    ]
    args = argparse.Namespace(
        config_file=os.path.join(REPO, "configs", "mssd_vgg16_synthetic.yaml"),
        opts=opts, eval_only=False, resume=False,
    )
    try:
        trainer = Trainer(setup_cfg(args))
        trainer.resume_or_load(resume=False)
        trainer.train()
    finally:
        if saved is None:
            os.environ.pop("THYROID_SYNTHETIC")
        else:
            os.environ["THYROID_SYNTHETIC"] = saved
    return out


def test_evaluations_logged_with_progress(trained_run):
    rows = [json.loads(line) for line in open(trained_run / "metrics.json")]
    evals = [r for r in rows if "bbox/AP50" in r]
    assert [r["iteration"] for r in evals] == [1, 4]
    for r in evals:
        assert {"bbox_agnostic/AP50", "nodule/auc", "nodule/recall50"} <= set(r)
    final = evals[-1]
    assert final["progress/images_seen"] == 8
    assert 0 < final["progress/train_minutes"] < 10
    assert all(0 <= r["bbox_agnostic/AP50"] <= 100 for r in evals)


def test_plot_curves_draws_a_png(trained_run, tool, tmp_path):
    plot_curves = tool("plot_curves")
    rows = plot_curves.read_metrics(str(trained_run))
    x, y = plot_curves.series(rows, "bbox/AP50", "progress/images_seen")
    # the iteration-1 evaluation has no progress row of its own: interpolated (2 images/step)
    assert list(x) == pytest.approx([4.0, 8.0]) and len(y) == 2
    out = tmp_path / "curves.png"
    plot_curves.main([str(trained_run), str(trained_run / "metrics.json"),
                      "--labels", "a", "b", "--output", str(out)])
    assert out.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit, match="not found"):
        plot_curves.main([str(tmp_path / "missing")])
