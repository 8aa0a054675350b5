"""SOLVER.OPTIMIZER: detectron2's SGD by default, AdamW on request, both with detectron2's
parameter groups and gradient clipping; the trainer trains with the one the config names."""
import copy

import pytest
import torch
from torch import nn

from thyroid_det.engine.optimizer import build_optimizer, clip_each_parameter_norm

from ..conftest import make_cfg


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.GroupNorm(2, 4), nn.Linear(4, 2))


def optimizer_cfg(**solver):
    cfg = make_cfg()
    cfg.SOLVER.BASE_LR = 0.01
    cfg.SOLVER.WEIGHT_DECAY = 0.05
    cfg.SOLVER.WEIGHT_DECAY_NORM = 0.0
    for key, value in solver.items():
        cfg.SOLVER[key] = value
    return cfg


def test_sgd_is_the_default_and_detectron2s():
    cfg = make_cfg()
    assert cfg.SOLVER.OPTIMIZER == "SGD"
    optimizer = build_optimizer(optimizer_cfg(), small_model())
    assert isinstance(optimizer, torch.optim.SGD)
    assert all(group["momentum"] == cfg.SOLVER.MOMENTUM for group in optimizer.param_groups)


def test_adamw_takes_the_weight_decay_betas_and_norm_groups():
    optimizer = build_optimizer(
        optimizer_cfg(OPTIMIZER="AdamW", ADAMW_BETAS=(0.8, 0.99)), small_model()
    )
    assert isinstance(optimizer, torch.optim.AdamW)
    decays = sorted({group["weight_decay"] for group in optimizer.param_groups})
    assert decays == [0.0, 0.05]  # GroupNorm's parameters take WEIGHT_DECAY_NORM
    assert all(group["betas"] == (0.8, 0.99) for group in optimizer.param_groups)
    assert all(group["lr"] == 0.01 for group in optimizer.param_groups)


def test_from_scratch_recipes_train_with_adamw_and_the_papers_with_sgd():
    """mccnn.yaml and mccnn_cpu.yaml train with AdamW (at batch 32 SGD at the same lr learnt less
    than half as much); mccnn_imagenet.yaml keeps the paper's SGD and its small weight decay."""
    for name in ("mccnn.yaml", "mccnn_cpu.yaml"):
        optimizer = build_optimizer(make_cfg(name), small_model())
        assert isinstance(optimizer, torch.optim.AdamW), name
        assert sorted({group["weight_decay"] for group in optimizer.param_groups}) == [0.0, 0.05]
    paper = build_optimizer(make_cfg("mccnn_imagenet.yaml"), small_model())
    assert isinstance(paper, torch.optim.SGD)
    assert max(group["weight_decay"] for group in paper.param_groups) < 0.01


def test_adamw_takes_torchs_fused_kernel_and_makes_the_same_update():
    """The fused kernel, several times faster per step on the CPU, matches torch's per-tensor
    loop with the same parameter groups; under AMP the optimizer is torch's default one."""
    model = small_model()
    reference = copy.deepcopy(model)
    optimizer = build_optimizer(optimizer_cfg(OPTIMIZER="AdamW"), model)
    assert all(group["fused"] for group in optimizer.param_groups)
    index = {id(p): i for i, p in enumerate(model.parameters())}
    twins = list(reference.parameters())
    loop = torch.optim.AdamW(
        [
            {
                "params": [twins[index[id(p)]] for p in group["params"]],
                "weight_decay": group["weight_decay"],
            }
            for group in optimizer.param_groups
        ],
        lr=0.01,
        foreach=False,
    )
    x = torch.randn(8, 3)
    for _ in range(3):
        for net, opt in ((model, optimizer), (reference, loop)):
            opt.zero_grad()
            net(x).square().sum().backward()
            opt.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)
    assert not torch.equal(next(model.parameters()), next(small_model().parameters()))
    amp = optimizer_cfg(OPTIMIZER="AdamW")
    amp.SOLVER.AMP.ENABLED = True  # a GradScaler would leave a fused step's gradients scaled
    assert not any(group["fused"] for group in build_optimizer(amp, small_model()).param_groups)


def test_adamw_clips_gradients_as_configured():
    cfg = optimizer_cfg(OPTIMIZER="AdamW")
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "norm"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.5
    model = small_model()
    optimizer = build_optimizer(cfg, model)
    (model(torch.randn(8, 3)) * 1e4).sum().backward()
    assert max(p.grad.norm() for p in model.parameters()) > 1.0
    optimizer.step()
    assert max(p.grad.norm() for p in model.parameters()) <= 0.5 + 1e-6


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")])
def test_each_parameter_is_clipped_as_torch_clips_it_alone(norm_type):
    """The multi-tensor clip gives each gradient what clip_grad_norm_ on that parameter alone
    gives it (detectron2's per-parameter "norm" clipping); a parameter without a gradient is
    left alone."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(shape)) for shape in [(3, 4), (5,), (2, 2, 3), (7,)]]
    for scale, p in zip([10.0, 0.01, 3.0], params):
        p.grad = torch.randn_like(p) * scale
    small = params[1].grad.clone()
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    for p, q in zip(params, twins):
        if p.grad is not None:
            q.grad = p.grad.clone()
            torch.nn.utils.clip_grad_norm_(q, 1.5, norm_type)
    clip_each_parameter_norm(params, 1.5, norm_type)
    for p, q in zip(params[:3], twins):
        torch.testing.assert_close(p.grad, q.grad)
    assert params[3].grad is None
    assert torch.linalg.vector_norm(params[0].grad, norm_type) == pytest.approx(1.5, rel=1e-4)
    assert torch.equal(params[1].grad, small)  # under the limit: unchanged


def test_sgd_steps_as_detectron2s_clipped_sgd():
    """SGD with per-parameter norm clipping makes the same updates as detectron2's own
    build_optimizer, whose clipping loops over the parameters."""
    from detectron2.solver import build_optimizer as detectron2_build

    cfg = optimizer_cfg(MOMENTUM=0.9)
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "norm"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.5
    model, reference = small_model(), small_model()
    ours, theirs = build_optimizer(cfg, model), detectron2_build(cfg, reference)
    x = torch.randn(8, 3)
    for _ in range(3):
        for net, opt in ((model, ours), (reference, theirs)):
            opt.zero_grad()
            (net(x) * 100).square().sum().backward()
            opt.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)
    assert not torch.equal(next(model.parameters()), next(small_model().parameters()))


@pytest.mark.parametrize(
    "solver, message",
    [
        ({"OPTIMIZER": "Adam"}, "SOLVER.OPTIMIZER must be one of"),
        ({"OPTIMIZER": "AdamW", "ADAMW_BETAS": (0.9, 1.5)}, "SOLVER.ADAMW_BETAS must be"),
    ],
)
def test_bad_settings_name_the_key(solver, message):
    with pytest.raises(ValueError, match=message):
        build_optimizer(optimizer_cfg(**solver), small_model())


def test_the_trainer_trains_with_adamw(tmp_path, phantom_root, tiny_opts):
    from thyroid_det.engine import Trainer

    cfg = make_cfg("mssd_vgg16_synthetic.yaml")
    data = ["DATASETS.TRAIN", "('synthetic_tiny',)", "DATASETS.TEST", "()"]
    schedule = [
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "()",
        "SOLVER.WARMUP_ITERS", "0", "SOLVER.OPTIMIZER", "AdamW",
    ]
    cfg.merge_from_list(tiny_opts + data + schedule + ["OUTPUT_DIR", str(tmp_path)])
    trainer = Trainer(cfg)
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    after = trainer.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())
    assert trainer.optimizer.state  # AdamW's moments exist after the steps
