"""ModelEMAHook: the average follows the warmed-up decay, integer buffers are copied, evaluation
sees the average and gets the model's own weights back, and the last step leaves the average in
the model (what model_final.pth then holds)."""
import types

import pytest
import torch
from torch import nn

from thyroid_det.engine.ema import ModelEMAHook


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 1, bias=False)
        self.register_buffer("count", torch.zeros((), dtype=torch.long))


def test_average_follows_the_decay_and_lands_in_the_model_at_the_end():
    model = Toy()
    nn.init.zeros_(model.linear.weight)
    trainer = types.SimpleNamespace(model=nn.parallel.DataParallel(model), iter=0, max_iter=3)
    hook = ModelEMAHook(decay=0.5)
    hook.trainer = trainer
    hook.before_train()

    expected = torch.zeros(1, 2)
    for step, value in enumerate([1.0, 2.0, 4.0]):
        trainer.iter = step
        model.linear.weight.data.fill_(value)
        model.count += 1
        d = min(0.5, (2 + step) / (11 + step))
        expected = d * expected + (1 - d) * value
        own = model.linear.weight.detach().clone()
        hook.after_step()
        if step < 2:
            assert torch.allclose(hook.state_dict()["averages"]["linear.weight"], expected)
            with hook.applied(trainer.model):
                assert torch.allclose(model.linear.weight, expected)
            assert torch.equal(model.linear.weight, own)
    # after the last step the model itself holds the average; the step counter is copied
    assert torch.allclose(model.linear.weight, expected)
    assert int(model.count) == 3

    restored = ModelEMAHook(decay=0.5)
    restored.load_state_dict(hook.state_dict())
    assert restored.state_dict()["updates"] == 3


def test_decay_must_be_a_fraction():
    with pytest.raises(ValueError, match="SOLVER.EMA.DECAY"):
        ModelEMAHook(decay=1.0)
