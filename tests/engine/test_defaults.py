"""setup_cfg: solver settings that would fail deep inside training fail at set-up instead."""
import argparse
import logging
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


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("eval_only", [False, True])
def test_amp_is_turned_off_off_cuda(tmp_path, eval_only):
    """mccnn.yaml asks for AMP; on the CPU detectron2's AMPTrainer would assert at its first
    step, so the run trains in fp32 and says so."""
    records = _Records()
    logger = logging.getLogger("thyroid_det")
    logger.addHandler(records)
    try:
        args = _args(tmp_path, "SOLVER.AMP.ENABLED", "True", "MODEL.DEVICE", "cpu")
        args.eval_only = eval_only
        cfg = setup_cfg(args)
    finally:
        logger.removeHandler(records)
    assert not cfg.SOLVER.AMP.ENABLED
    warned = [m for m in records.messages if "SOLVER.AMP.ENABLED" in m]
    assert len(warned) == (0 if eval_only else 1)
    assert eval_only or "fp32" in warned[0]
