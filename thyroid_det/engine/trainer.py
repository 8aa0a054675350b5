"""detectron2's DefaultTrainer with thyroid_det's mapper, evaluators and cascade schedule."""
import contextlib
import functools
import os

import torch.utils.data as torchdata
from detectron2.data import (
    DatasetFromList,
    MapDataset,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.data.build import trivial_batch_collator
from detectron2.data.samplers import InferenceSampler
from detectron2.engine import DefaultTrainer, hooks
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel

from ..data.mapper import SSDDatasetMapper
from ..evaluation import build_evaluators
from .checkpoint import Checkpointer
from .ema import ModelEMAHook
from .hooks import CascadeStageHook, build_cascade_lr_scheduler, unwrap_model
from .optimizer import build_optimizer
from .progress import TrainingProgressHook


class Trainer(DefaultTrainer):
    """Overrides only the loaders (SSD augmentation, fixed input size), the evaluators (COCO AP
    plus per-nodule clinical metrics), the optimizer (SGD or AdamW), the hooks (training
    progress, optional weight EMA, and for the cascade its stage) and the cascade's learning-rate
    restart at the stage change."""

    def __init__(self, cfg):
        super().__init__(cfg)
        ddp = self.model
        if cfg.MODEL.META_ARCHITECTURE == "MCCNN" and isinstance(ddp, DistributedDataParallel):
            # Each stage of the cascade leaves one network without gradients.
            self.model = DistributedDataParallel(
                ddp.module,
                device_ids=ddp.device_ids,
                broadcast_buffers=False,
                find_unused_parameters=True,
            )

    @property
    def last_eval_results(self):
        """The results of the latest evaluation during training (None before any)."""
        # detectron2 0.6 keeps them only in this private attribute (train() returns them only
        # with TEST.EXPECTED_RESULTS set).
        return getattr(self, "_last_eval_results", None)

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=SSDDatasetMapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """detectron2's test loader with ``TEST.IMS_PER_BATCH`` images per batch."""
        mapper = SSDDatasetMapper(cfg, is_train=False)
        batch_size = cfg.TEST.IMS_PER_BATCH
        if batch_size == 1:
            return build_detection_test_loader(cfg, dataset_name, mapper=mapper)
        # detectron2 0.6's test loader has a batch of 1 (main's takes a batch_size): the same
        # DataLoader from detectron2's parts, with a larger batch.
        dataset = MapDataset(
            DatasetFromList(get_detection_dataset_dicts([dataset_name], filter_empty=False), copy=False),
            mapper,
        )
        return torchdata.DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=InferenceSampler(len(dataset)),
            num_workers=cfg.DATALOADER.NUM_WORKERS,
            collate_fn=trivial_batch_collator,
        )

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return build_evaluators(cfg, dataset_name, output_folder, distributed=comm.get_world_size() > 1)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_cascade_lr_scheduler(cfg, optimizer)

    def test_during_training(self, ema=None):
        """The periodic evaluation: of the weight average when there is one, and of Ec alone
        while the sequential cascade has not started training its refiner."""
        model = unwrap_model(self.model)
        refine = getattr(model, "refine", None)
        with ema.applied(self.model) if ema is not None else contextlib.nullcontext():
            if refine is not None:
                model.refine = model.stage != "detector"
            try:
                results = self.test(self.cfg, self.model)
            finally:
                if refine is not None:
                    model.refine = refine
        # detectron2 0.6's train() verifies and returns this private attribute; no hook.
        self._last_eval_results = results
        return results

    def build_hooks(self):
        # Before the hooks take it: atomic saves, and a resume that survives a corrupt checkpoint.
        self.checkpointer = Checkpointer(
            self.checkpointer.model, self.checkpointer.save_dir, **self.checkpointer.checkpointables
        )
        ret = super().build_hooks()
        ema = ModelEMAHook(self.cfg.SOLVER.EMA.DECAY) if self.cfg.SOLVER.EMA.ENABLED else None
        test = functools.partial(self.test_during_training, ema)
        ret = [hooks.EvalHook(self.cfg.TEST.EVAL_PERIOD, test) if isinstance(h, hooks.EvalHook) else h
               for h in ret]
        if ema is not None:
            ret.insert(0, ema)  # before the checkpointer, which then saves the average
        if self.cfg.MODEL.META_ARCHITECTURE == "MCCNN":
            ret.insert(0, CascadeStageHook(ema))
        ret.insert(0, TrainingProgressHook(self.cfg.SOLVER.IMS_PER_BATCH))
        return ret
