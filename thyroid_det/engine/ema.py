"""An exponential moving average of the model's weights, evaluated and saved in their place.

From random initialisation with small batches the weights of one step are noisy; their running
average is a better model at every point of a short schedule (the "model EMA" of YOLO-style
detectors and d2go), at the cost of one extra copy of the weights and one fused update per step.
"""
import contextlib

import torch
from detectron2.engine import HookBase

from .hooks import unwrap_model

__all__ = ["ModelEMAHook"]


class ModelEMAHook(HookBase):
    """Keeps ``ema = d * ema + (1 - d) * weights`` after every step, with the decay warmed up as
    ``d = min(decay, (1 + step) / (10 + step))`` so that early averages are not dominated by the
    random initialisation. Integer buffers are copied.

    The averaged weights replace the model's own at the end of training (so ``model_final.pth``
    and the final evaluation are the EMA model) and inside :meth:`applied`, which the trainer
    wraps around its periodic evaluations. Register it before the checkpointer.
    """

    def __init__(self, decay):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"SOLVER.EMA.DECAY must be in (0, 1), got {decay}")
        self.decay = decay
        self._averages = None
        self._updates = 0

    def _tensors(self):
        return unwrap_model(self.trainer.model).state_dict()

    def before_train(self):
        if self._averages is None:  # not restored by load_state_dict on --resume
            self._averages = {k: v.detach().clone() for k, v in self._tensors().items()}

    @torch.no_grad()
    def after_step(self):
        self._updates += 1
        d = min(self.decay, (1 + self._updates) / (10 + self._updates))
        floats, averages, others = [], [], []
        for name, value in self._tensors().items():
            if value.dtype.is_floating_point:
                floats.append(value.detach())
                averages.append(self._averages[name])
            else:
                others.append((self._averages[name], value))
        torch._foreach_lerp_(averages, floats, 1.0 - d)
        for average, value in others:
            average.copy_(value)
        if self.trainer.iter + 1 == self.trainer.max_iter:
            # from here on (final checkpoint, final evaluation) the model is the average
            unwrap_model(self.trainer.model).load_state_dict(self._averages)

    @torch.no_grad()
    def restart(self):
        """Put the average into the model and start averaging afresh from it.

        The sequential cascade calls this when Ec freezes: the refiner then trains on the
        averaged Ec, and its own average is not pulled towards its random initialisation.
        """
        if self._averages is None:
            return
        unwrap_model(self.trainer.model).load_state_dict(self._averages)
        self._averages = {k: v.detach().clone() for k, v in self._tensors().items()}
        self._updates = 0

    @contextlib.contextmanager
    def applied(self, model):
        """Within the block ``model`` holds the averaged weights; its own come back after."""
        model = unwrap_model(model)
        if self._averages is None:
            yield
            return
        own = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self._averages)
        try:
            yield
        finally:
            model.load_state_dict(own)

    def state_dict(self):
        return {"averages": self._averages, "updates": self._updates}

    def load_state_dict(self, state):
        self._averages = state["averages"]
        self._updates = int(state["updates"])
