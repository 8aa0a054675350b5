"""MCCNN: both schedules train, freezing really freezes, inference fields, the stage hook."""

import pytest
import torch
from detectron2.engine import SimpleTrainer
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from torch.nn import DataParallel

from thyroid_det.engine.hooks import CascadeStageHook
from thyroid_det.modeling.meta_arch.mccnn import MCCNN
from thyroid_det.modeling.meta_arch.ssd import MultiScaleSSD

from ..conftest import make_cfg


def tiny_cfg(schedule="sequential", detector_iters=2):
    """configs/mccnn_synthetic.yaml shrunk to a 64-px, 4-level, 8-channel Ec and a tiny Ef."""
    cfg = make_cfg("mccnn_synthetic.yaml")
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.VGG.WIDTH_MULT = 1 / 16
    cfg.MODEL.VGG.EXTRA_CHANNELS = [16, 16]
    levels = ["conv4_3", "fc7", "extra1", "extra2"]
    cfg.MODEL.VGG.OUT_FEATURES = levels
    cfg.MODEL.SSD.IN_FEATURES = levels
    cfg.MODEL.ANCHOR_GENERATOR.RELATIVE_SIZES = [[0.15], [0.3], [0.5], [0.7], [0.9]]
    cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [[1.0, 2.0, 0.5]] * 4
    cfg.MODEL.SSD.SCORE_THRESH_TEST = 0.0
    cfg.MODEL.REFINER.WIDTH_MULT = 0.125
    cfg.MODEL.REFINER.FC_DIM = 16
    cfg.MODEL.REFINER.INPUT_SIZE = 64
    cfg.MODEL.REFINER.BATCH_SIZE_PER_IMAGE = 4
    cfg.MODEL.MCCNN.SCHEDULE = schedule
    cfg.MODEL.MCCNN.DETECTOR_ITERS = detector_iters
    cfg.TEST.DETECTIONS_PER_IMAGE = 5
    return cfg


def batch(n=2, size=64):
    """Images with one bright square 'nodule' each, labelled alternately benign/malignant."""
    g = torch.Generator().manual_seed(0)
    inputs = []
    for i in range(n):
        image = torch.rand(1, size, size, generator=g) * 60
        image[:, 16:40, 20:36] += 150
        inst = Instances((size, size))
        inst.gt_boxes = Boxes(torch.tensor([[20.0, 16.0, 36.0, 40.0]]))
        inst.gt_classes = torch.tensor([i % 2])
        inputs.append({"image": image, "instances": inst, "height": 2 * size, "width": 3 * size, "image_id": i})
    return inputs


def build(schedule="sequential", detector_iters=2):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(schedule, detector_iters))
    assert isinstance(model, MCCNN)
    return model


def detector_params(model):
    return {n: p for n, p in model.named_parameters() if not n.startswith("roi_heads.")}


def refiner_params(model):
    return {n: p for n, p in model.named_parameters() if n.startswith("roi_heads.")}


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)


def test_detector_stage_trains_ec_only():
    model = build().train()
    assert model.stage == "detector"
    with EventStorage():
        losses = model(batch())
    assert set(losses) == {"loss_cls", "loss_box_reg"}
    sum(losses.values()).backward()
    assert all(p.grad is None for p in refiner_params(model).values())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in detector_params(model).values())


def test_refiner_stage_freezes_ec():
    model = build().train()
    optimizer = sgd(model)  # built before the switch, like the trainer's: it holds Ec's weights
    with EventStorage():
        optimizer.zero_grad()
        sum(model(batch()).values()).backward()
        optimizer.step()  # leaves momentum buffers for Ec's weights

        model.set_stage("refiner")
        assert all(not p.requires_grad for p in detector_params(model).values())
        assert all(p.requires_grad for p in refiner_params(model).values())
        model.train()
        assert not model.backbone.training and not model.head.training
        assert model.roi_heads.training
        ec_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("roi_heads.")}
        ef_before = {k: v.clone() for k, v in refiner_params(model).items()}

        optimizer.zero_grad()
        losses = model(batch())
        assert set(losses) == {"loss_refiner"}
        losses["loss_refiner"].backward()
        optimizer.step()

    for k, v in model.state_dict().items():
        if not k.startswith("roi_heads."):
            assert torch.equal(v, ec_before[k]), f"{k} changed while Ec is frozen"
    assert any(not torch.equal(p, ef_before[k]) for k, p in refiner_params(model).items())

    model.set_stage("detector")
    assert all(p.requires_grad for p in model.parameters())
    assert model.backbone.training


def test_joint_schedule_sums_both_losses():
    model = build("joint").train()
    assert model.stage == "joint" and model.stage_for_iteration(10**6) == "joint"
    with EventStorage():
        losses = model(batch())
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_refiner"}
    sum(losses.values()).backward()
    assert model.roi_heads.refiner.conv1.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in detector_params(model).values())


def test_inference_fields_in_the_original_frame():
    model = build().eval()
    with torch.no_grad():
        outputs = model(batch())
    assert len(outputs) == 2
    for out in outputs:
        inst = out["instances"]
        assert inst.image_size == (128, 192)
        assert 0 < len(inst) <= 5
        n = len(inst)
        assert inst.pred_boxes.tensor.shape == (n, 4) and inst.scores.shape == (n,)
        assert inst.pred_classes.dtype == torch.int64
        for field in ("class_probs", "coarse_probs", "fine_probs"):
            probs = inst.get(field)
            assert probs.shape == (n, 2)
            assert torch.allclose(probs.sum(dim=1), torch.ones(n), atol=1e-5)
        assert torch.equal(inst.pred_classes, inst.class_probs.argmax(dim=1))
        assert ((inst.scores >= 0) & (inst.scores <= 1)).all()


def test_inference_without_refine_is_ec_alone():
    """What the trainer evaluates before the refiner has trained: Ec's own detections."""
    model = build().eval()
    with torch.no_grad():
        model.refine = False
        coarse = model(batch())
        ec = MultiScaleSSD.forward(model, batch())
        model.refine = True
        fused = model(batch())
    for c, e, f in zip(coarse, ec, fused):
        c, e, f = c["instances"], e["instances"], f["instances"]
        assert not c.has("fine_probs") and f.has("fine_probs")
        assert torch.equal(c.scores, e.scores) and torch.equal(c.pred_boxes.tensor, e.pred_boxes.tensor)


def test_unknown_schedule_and_stage_are_rejected():
    cfg = tiny_cfg()
    cfg.MODEL.MCCNN.SCHEDULE = "alternating"
    with pytest.raises(ValueError, match="MODEL.MCCNN.SCHEDULE"):
        build_model(cfg)
    with pytest.raises(ValueError, match="stage"):
        build().set_stage("fine")


class _FakeDefaultTrainer:
    """What the hook reads from detectron2's DefaultTrainer: ``iter`` and ``model``."""

    def __init__(self, model, iteration):
        self.iter = iteration
        self.model = model


def test_hook_sets_the_stage_from_the_iteration():
    model = build(detector_iters=3)
    hook = CascadeStageHook()
    hook.trainer = _FakeDefaultTrainer(DataParallel(model), 0)
    hook.before_step()
    assert model.stage == "detector"
    hook.trainer.iter = 3
    hook.before_step()
    assert model.stage == "refiner"
    # Resuming a fresh model past DETECTOR_ITERS lands in the refiner stage directly.
    fresh = build(detector_iters=3)
    hook.trainer = _FakeDefaultTrainer(fresh, 7)
    hook.before_step()
    assert fresh.stage == "refiner" and not fresh.backbone.training


def test_simple_trainer_crosses_the_stage_change():
    model = build(detector_iters=2).train()
    inputs = batch()
    trainer = SimpleTrainer(model, iter(lambda: inputs, None), sgd(model))
    trainer.register_hooks([CascadeStageHook()])
    snapshots = {}

    class Snapshot(CascadeStageHook):
        def before_step(self):
            snapshots[self.trainer.iter] = {k: v.detach().clone() for k, v in detector_params(model).items()}

    trainer.register_hooks([Snapshot()])
    trainer.train(0, 4)
    assert model.stage == "refiner"
    assert any(not torch.equal(snapshots[1][k], snapshots[0][k]) for k in snapshots[0])  # Ec trained
    for k, v in detector_params(model).items():
        assert torch.equal(v, snapshots[2][k]), f"{k} changed in the refiner stage"


def test_sequential_lr_schedule_restarts_for_the_refiner():
    from thyroid_det.engine.hooks import build_cascade_lr_scheduler

    cfg = tiny_cfg(detector_iters=100)
    cfg.SOLVER.BASE_LR, cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS = 0.1, 150, (50,)
    cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.WARMUP_FACTOR = 10, 0.001
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.SOLVER.BASE_LR)
    scheduler = build_cascade_lr_scheduler(cfg, optimizer)
    lrs = []
    for _ in range(150):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = {0: 1e-4, 20: 0.1, 60: 0.01, 99: 0.01, 100: 1e-4, 110: 0.1, 124: 0.1, 125: 0.01, 149: 0.01}
    for it, lr in expected.items():
        assert lrs[it] == pytest.approx(lr, rel=1e-6), it
    # A split that is not exact in floating point (700 of 850): the last step must work.
    cfg.MODEL.MCCNN.DETECTOR_ITERS, cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS = 700, 850, (550,)
    assert _lr_after(cfg, 850) == pytest.approx(0.01)
    cfg.MODEL.MCCNN.DETECTOR_ITERS, cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS = 100, 150, (50,)
    cfg.MODEL.MCCNN.SCHEDULE = "joint"  # one schedule for the whole run
    assert _lr_after(cfg, 100) == pytest.approx(0.01)


def _lr_after(cfg, steps):
    """The cascade scheduler's learning rate after ``steps`` optimizer steps."""
    from thyroid_det.engine.hooks import build_cascade_lr_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.SOLVER.BASE_LR)
    scheduler = build_cascade_lr_scheduler(cfg, optimizer)
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
    return optimizer.param_groups[0]["lr"]


@pytest.mark.parametrize("name", ["mccnn.yaml", "mccnn_long.yaml", "mccnn_cpu.yaml"])
def test_shipped_recipes_cosine_decay_then_restart_for_the_refiner(name):
    """The from-scratch recipes: cosine to ~0 over Ec's stage, warm-up and cosine again for the
    refiner, and the very last step works."""
    cfg = make_cfg(name)
    assert cfg.SOLVER.LR_SCHEDULER_NAME == "WarmupCosineLR" and cfg.SOLVER.EMA.ENABLED
    detector, total, base = cfg.MODEL.MCCNN.DETECTOR_ITERS, cfg.SOLVER.MAX_ITER, cfg.SOLVER.BASE_LR
    assert _lr_after(cfg, detector // 2) == pytest.approx(base / 2, rel=0.05)
    assert _lr_after(cfg, detector - 1) < base * 1e-3
    assert _lr_after(cfg, detector) < base * 0.01  # the refiner's warm-up starts low
    assert _lr_after(cfg, detector + (total - detector) // 2) == pytest.approx(base / 2, rel=0.1)
    assert _lr_after(cfg, total) < base * 1e-3


@pytest.mark.parametrize(
    "name", ["mccnn.yaml", "mccnn_long.yaml", "mccnn_cpu.yaml", "mccnn_imagenet.yaml"]
)
def test_shipped_recipes_evaluate_ec_last_state_and_keep_few_checkpoints(name):
    """Evaluation lands on Ec's last iteration (its stage's result is measured before the
    refiner trains), and a run keeps a bounded number of checkpoints: detectron2's periodic
    checkpointer keeps every one."""
    cfg = make_cfg(name)
    assert cfg.MODEL.MCCNN.DETECTOR_ITERS % cfg.TEST.EVAL_PERIOD == 0
    assert cfg.SOLVER.MAX_ITER // cfg.SOLVER.CHECKPOINT_PERIOD <= 20
    assert cfg.SOLVER.MAX_ITER // cfg.TEST.EVAL_PERIOD <= 20


def test_cpu_recipe_trains_the_gpu_recipes_model():
    """mccnn_cpu.yaml differs from mccnn.yaml in how it runs (input size, batch, precision,
    schedule), not in the model: the two measure one recipe, and only the refiner reads smaller
    crops at test time on the CPU."""
    gpu, cpu = make_cfg("mccnn.yaml"), make_cfg("mccnn_cpu.yaml")
    assert cpu.MODEL.REFINER.TEST_INPUT_SIZE == 96
    cpu.MODEL.REFINER.TEST_INPUT_SIZE = gpu.MODEL.REFINER.TEST_INPUT_SIZE
    cpu.MODEL.MCCNN.DETECTOR_ITERS = gpu.MODEL.MCCNN.DETECTOR_ITERS  # the schedule's
    assert cpu.MODEL == gpu.MODEL
    for key in ("OPTIMIZER", "WEIGHT_DECAY", "BASE_LR", "LR_SCHEDULER_NAME", "EMA"):
        assert cpu.SOLVER[key] == gpu.SOLVER[key], key


@pytest.mark.parametrize("stage", ["detector", "refiner"])
def test_gpu_recipe_trains_under_fp16_autocast(stage):
    """mccnn.yaml trains with AMP on the GPU (fp16 autocast, a GradScaler). The same step under
    the CPU's fp16 autocast runs the same code on fp16 activations: its losses come out in fp32,
    within 1% of fp32's, and the scaled step leaves finite, updated weights, so no dtype mismatch
    or overflow in the losses is first met on a borrowed GPU."""
    cfg = make_cfg("mccnn.yaml", tiny=True)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.set_stage(stage)
    model.train()
    data = batch(n=4, size=128)
    torch.manual_seed(1)  # the refiner's jitter and dropout draw the same numbers in both passes
    with torch.no_grad():
        reference = model(data)
    activations = []
    hook = model.backbone.register_forward_hook(lambda m, i, out: activations.append(out))
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.float16):
        losses = model(data)
    hook.remove()
    # the convolutions ran in fp16 (conv4_3's L2 normalisation autocasts to fp32)
    assert torch.float16 in {t.dtype for t in activations[0].values()}
    assert set(losses) == set(reference)
    for name, loss in losses.items():
        assert loss.dtype == torch.float32, name
        assert loss.item() == pytest.approx(reference[name].item(), rel=0.01), name
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=cfg.SOLVER.BASE_LR)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    scaler.scale(sum(losses.values())).backward()
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 2.0**8  # no inf or nan among the gradients: the step was taken
    assert all(torch.isfinite(p).all() for p in params)
    assert any(not torch.equal(p, b) for p, b in zip(params, before))
