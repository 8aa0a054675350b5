"""How much training a model has had, beside every evaluation: images seen and minutes."""
import time

from detectron2.engine import HookBase

__all__ = ["TrainingProgressHook"]


class TrainingProgressHook(HookBase):
    """Records, every step, how much training the model has had: ``progress/images_seen`` and
    ``progress/train_minutes`` (time inside training steps, data loading included, evaluation and
    checkpointing excluded).

    Both land in ``metrics.json`` beside each evaluation's metrics, so that learning curves of
    runs with different batch sizes or speeds compare by images seen or by minutes
    (``tools/plot_curves.py``). Register it first, so that its step time excludes the other hooks'
    ``after_step`` work.
    """

    def __init__(self, ims_per_batch):
        self._ims_per_batch = ims_per_batch
        self._train_seconds = 0.0
        self._step_start = None

    def before_step(self):
        self._step_start = time.perf_counter()

    def after_step(self):
        self._train_seconds += time.perf_counter() - self._step_start
        self._put(self.trainer.iter + 1)

    def after_train(self):
        # The final evaluation runs in EvalHook.after_train, logged one iteration later.
        self._put(self.trainer.iter)

    def _put(self, steps_done):
        self.trainer.storage.put_scalars(
            **{
                "progress/images_seen": steps_done * self._ims_per_batch,
                "progress/train_minutes": self._train_seconds / 60,
            },
            smoothing_hint=False,
        )

    def state_dict(self):
        # Resumed runs continue the clock instead of restarting it.
        return {"train_seconds": self._train_seconds}

    def load_state_dict(self, state):
        self._train_seconds = float(state.get("train_seconds", 0.0))
