"""setup_cfg: solver settings that would fail deep inside training fail at set-up instead."""
import argparse
import os

import pytest

from thyroid_det.engine import setup_cfg

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "mssd_vgg16_synthetic.yaml")


def _args(tmp_path, *opts):
    return argparse.Namespace(
        config_file=CONFIG, opts=["OUTPUT_DIR", str(tmp_path), *opts], eval_only=False, resume=False
    )


@pytest.mark.parametrize(
    "steps, message",
    [("(50, 100)", "includes SOLVER.MAX_ITER"), ("(60, 40)", "strictly increasing")],
)
def test_bad_steps_name_the_config(tmp_path, steps, message):
    with pytest.raises(ValueError, match=message) as err:
        setup_cfg(_args(tmp_path, "SOLVER.MAX_ITER", "100", "SOLVER.STEPS", steps))
    assert "mssd_vgg16_synthetic.yaml" in str(err.value)


def test_steps_past_the_end_are_allowed(tmp_path):
    cfg = setup_cfg(_args(tmp_path, "SOLVER.MAX_ITER", "100", "SOLVER.STEPS", "(50, 150)"))
    assert cfg.SOLVER.MAX_ITER == 100
