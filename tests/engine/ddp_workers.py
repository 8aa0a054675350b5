"""What each process runs in tests/engine/test_distributed.py. A module of its own, put on
sys.path by the test: spawned processes import their function by name, and pytest's importlib
mode leaves test modules unimportable that way."""
import json
import os

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "mccnn_synthetic.yaml")
# The training set, and no evaluation during training.
DATA = ["DATASETS.TRAIN", "('synthetic_tiny',)", "DATASETS.TEST", "()"]


def _cfg(opts):
    from detectron2.config import get_cfg

    import thyroid_det  # noqa: F401
    from thyroid_det import add_mccnn_config

    cfg = get_cfg()
    add_mccnn_config(cfg)
    cfg.merge_from_file(CONFIG)
    cfg.merge_from_list(DATA + list(opts))
    return cfg


def train(opts, report):
    """On every process: a few iterations; the main process reports what DDP looked like."""
    from detectron2.utils import comm
    from torch.nn.parallel import DistributedDataParallel

    from thyroid_det.engine import Trainer

    torch.manual_seed(0)
    trainer = Trainer(_cfg(opts))
    trainer.resume_or_load(resume=False)
    trainer.train()
    ddp = trainer.model
    checksum = float(sum(p.detach().double().sum() for p in ddp.module.parameters()))
    checksums = comm.all_gather(checksum)
    if comm.is_main_process():
        with open(report, "w") as f:
            json.dump(
                {
                    "ddp": isinstance(ddp, DistributedDataParallel),
                    "find_unused_parameters": ddp.find_unused_parameters,
                    "stage": ddp.module.stage,
                    "iter": trainer.iter,
                    "checksums": checksums,
                },
                f,
            )


def evaluate(opts, weights, output_dir, report):
    """inference_on_dataset with the project's evaluators; the main process writes metrics."""
    from detectron2.evaluation import inference_on_dataset
    from detectron2.modeling import build_model
    from detectron2.utils import comm

    from thyroid_det.engine import Trainer, load_inference_weights
    from thyroid_det.evaluation import build_evaluators, flat_metrics

    cfg = _cfg(opts)
    model = load_inference_weights(build_model(cfg), weights).eval()
    distributed = comm.get_world_size() > 1
    evaluator = build_evaluators(cfg, "synthetic_tiny", output_dir, distributed=distributed)
    loader = Trainer.build_test_loader(cfg, "synthetic_tiny")
    results = inference_on_dataset(model, loader, evaluator)
    if comm.is_main_process():
        with open(report, "w") as f:
            json.dump({"world_size": comm.get_world_size(), "metrics": flat_metrics(results)}, f)


def fail_on_main(error):
    """The main process raises ``error``; the other waits for it in a barrier, as a process
    waits in a collective when another stops."""
    from detectron2.utils import comm

    if comm.is_main_process():
        raise error
    comm.synchronize()
