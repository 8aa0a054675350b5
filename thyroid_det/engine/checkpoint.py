"""detectron2's checkpointer, made safe to kill and strict where a model is used for inference.

* Every checkpoint and ``last_checkpoint`` is written to a temporary file and renamed, so a run
  killed while saving leaves the previous files intact, never a truncated ``model_final.pth``.
* A file that is not a checkpoint raises :class:`CheckpointError` with a one-line reason (torch's
  own message advises ``weights_only=False``, unsafe for a file of unknown origin: never taken).
* ``resume_or_load(resume=True)`` reports a checkpoint it cannot read and resumes from the
  newest earlier one that it can.
* ``MODEL.WEIGHTS`` may be torchvision's ImageNet VGG-16 state dict (``vgg16().state_dict()``
  saved with ``torch.save``): it is converted on load into the model's VGG-16 backbone
  (:mod:`thyroid_det.modeling.backbone.vgg_imagenet`), and a log line says what stayed random.
* :func:`load_inference_weights` refuses a checkpoint that leaves model weights uninitialised:
  a model with random weights would still draw confident boxes.
* For inference (``weight_average=True``) a periodic checkpoint of a run with ``SOLVER.EMA``
  gives the weight average saved with it, not the step's own weights: the average is what the
  run's evaluation at that iteration scored (``model_final.pth`` holds it as its model anyway).
"""
import glob
import logging
import os
import zipfile

import torch
from detectron2.checkpoint import DetectionCheckpointer

from ..modeling.backbone.vgg_imagenet import imagenet_vgg16_model_weights, is_imagenet_vgg16
from ..utils.file_io import atomic_path, atomic_write_text
from .ema import ModelEMAHook

__all__ = ["CheckpointError", "Checkpointer", "load_inference_weights", "read_checkpoint"]

logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, or lacks weights the model needs."""


class _MissingWeights(CheckpointError):
    pass


class Checkpointer(DetectionCheckpointer):
    """:class:`DetectionCheckpointer` with atomic saves, one-line load errors and a resume that
    falls back past unreadable checkpoints."""

    def __init__(
        self, model, save_dir="", *, require_all_weights=False, weight_average=False, **kwargs
    ):
        """
        Args:
            require_all_weights (bool): raise instead of warning when the loaded checkpoint
                leaves model weights uninitialised (for inference).
            weight_average (bool): load the weight average (``SOLVER.EMA``) that a training
                checkpoint carries in place of its model's own weights (for inference; never
                for a resume, which needs both).
            model, save_dir, kwargs: as for :class:`DetectionCheckpointer`.
        """
        super().__init__(model, save_dir, **kwargs)
        self.require_all_weights = require_all_weights
        self.weight_average = weight_average

    def save(self, name, **kwargs):
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        with atomic_path(save_file) as tmp:
            torch.save(data, tmp)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename):
        atomic_write_text(os.path.join(self.save_dir, "last_checkpoint"), last_filename_basename)

    def load(self, path, checkpointables=None):
        if path and "://" not in path and not os.path.isfile(path):
            raise CheckpointError(f"checkpoint {path} not found")
        try:
            return super().load(path, checkpointables)
        except _MissingWeights as e:
            raise CheckpointError(
                f"{path} lacks {e}: not a trained checkpoint of this config's model"
            ) from None
        finally:
            # detectron2 after 0.6 keeps the URL being loaded in _parsed_url_during_load, clears
            # it only when a load succeeds and asserts it is clear when the next load starts:
            # without this, the load after a failed one (resume's fallback) would assert.
            if getattr(self, "_parsed_url_during_load", None) is not None:
                self._parsed_url_during_load = None

    def _load_file(self, filename):
        try:
            loaded = super()._load_file(filename)
        except Exception as e:  # torch.load and pickle raise many types for a bad file
            reason = _reason(e)
            raise CheckpointError(f"{filename} is not a readable checkpoint ({reason})") from None
        if is_imagenet_vgg16(loaded.get("model")):
            try:
                weights, summary = imagenet_vgg16_model_weights(self.model, loaded["model"])
            except ValueError as e:
                raise CheckpointError(f"{filename}: {e}") from None
            logger.info(summary)
            loaded = {"model": weights, "__author__": "torchvision (ImageNet VGG-16, converted)"}
        average = _weight_average(loaded) if self.weight_average else None
        if average is not None:
            logger.info(
                f"{filename}: loading the weight average (SOLVER.EMA) saved with it, the model "
                "that the run's evaluation at that iteration scored"
            )
            loaded = dict(loaded, model=average)
        return loaded

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)
        missing = incompatible.missing_keys
        if self.require_all_weights and missing:
            shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
            total = len(self.model.state_dict())
            raise _MissingWeights(f"{len(missing)} of the model's {total} weights ({shown})")
        return incompatible

    def resume_or_load(self, path, *, resume=True):
        """As detectron2's, but an unreadable last checkpoint is reported and the newest earlier
        ``model_*.pth`` that loads is used instead; none readable is an error."""
        if not (resume and self.has_checkpoint()):
            return self.load(path, checkpointables=[])
        candidates = _newest_first(self.get_checkpoint_file(), self.save_dir)
        failures = []
        for candidate in candidates:
            try:
                checkpoint = self.load(candidate)
            except CheckpointError as e:
                logger.warning(f"Cannot resume from it: {e}")
                failures.append(str(e))
                continue
            if failures:
                logger.warning(f"Resumed from the earlier checkpoint {candidate}")
            return checkpoint
        raise CheckpointError(
            f"no readable checkpoint in {self.save_dir} to resume from "
            f"({'; '.join(failures) or 'none found'}); delete them or run without --resume"
        )


def _newest_first(tagged, save_dir):
    """The tagged checkpoint, then detectron2's other ``model_*.pth`` files, newest first."""
    others = sorted(
        glob.glob(os.path.join(save_dir, "model_*.pth")), key=os.path.getmtime, reverse=True
    )
    first = [tagged] if tagged and os.path.isfile(tagged) else []
    return first + [p for p in others if not first or not os.path.samefile(p, tagged)]


def _weight_average(checkpoint):
    """The EMA average a training checkpoint holds in its trainer state, or None."""
    hooks = (checkpoint.get("trainer") or {}).get("hooks") or {}
    return (hooks.get(ModelEMAHook.__qualname__) or {}).get("averages")


def _reason(error):
    """The first line of a load error, without torch's advice to unpickle unsafely."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if "weights_only" in text or "Weights only load failed" in text:
        return "it holds Python objects other than tensors, which are not loaded for safety"
    if "central directory" in text:
        return "truncated or corrupt zip archive"
    return f"{type(error).__name__}: {text[:200]}"


def read_checkpoint(path):
    """The checkpoint at ``path`` as saved, a dict (memory-mapped where torch can, for tools that
    hold it while they evaluate); CheckpointError with a one-line reason when the file is not one."""
    try:  # torch maps only its zip format: another file gets torch.load's own complaint
        mmap = zipfile.is_zipfile(path)
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch.load and pickle raise many types for a bad file
        raise CheckpointError(f"{path} is not a readable checkpoint ({_reason(e)})") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} is not a checkpoint (a {type(checkpoint).__name__})")
    return checkpoint


def load_inference_weights(model, path):
    """
    Load ``path`` into ``model`` for inference and refuse a checkpoint that does not set every
    weight of the model (an empty or unrelated file, a backbone-only initialisation). A
    periodic checkpoint of a run with ``SOLVER.EMA`` gives its weight average.

    Raises:
        CheckpointError: naming the file and, briefly, the weights it lacks.
    """
    if not path:
        raise CheckpointError("no weights given (MODEL.WEIGHTS is empty)")
    Checkpointer(model, require_all_weights=True, weight_average=True).load(
        path, checkpointables=[]
    )
    return model
