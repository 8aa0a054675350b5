"""Seconds per image of the model call alone (not data loading or metric bookkeeping)."""

import time

import torch
from torch import nn


class ModelTimer(nn.Module):
    """Wraps a model and times each forward call, waiting for the GPU before reading the clock.

    The first ``warmup`` calls are not counted (allocator and cuDNN warm-up), as in detectron2's
    ``inference_on_dataset``, unless there were no others. Pass the wrapper where the model
    would go.
    """

    def __init__(self, model, warmup=1):
        super().__init__()
        self.model = model
        self.warmup = warmup
        self.reset()

    def reset(self):
        self.calls = 0
        self.seconds, self.images = 0.0, 0
        self.all_seconds, self.all_images = 0.0, 0

    def _sync(self):
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    def forward(self, batched_inputs):
        self._sync()
        start = time.perf_counter()
        outputs = self.model(batched_inputs)
        self._sync()
        elapsed = time.perf_counter() - start
        self.calls += 1
        self.all_seconds += elapsed
        self.all_images += len(batched_inputs)
        if self.calls > self.warmup:
            self.seconds += elapsed
            self.images += len(batched_inputs)
        return outputs

    @property
    def seconds_per_image(self):
        if self.images:
            return self.seconds / self.images
        return self.all_seconds / self.all_images if self.all_images else float("nan")
