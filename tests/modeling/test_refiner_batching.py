"""The cascade refines all detections of a batch in one refiner call, across images."""
import os

import torch
from detectron2.modeling import build_model


from ..conftest import make_cfg

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "mccnn_synthetic.yaml")


def test_batch_of_8_calls_the_refiner_once():
    cfg = make_cfg(CONFIG, tiny=True)
    cfg.MODEL.SSD.SCORE_THRESH_TEST = 0.0
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    calls = []
    model.roi_heads.refiner.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    images = [{"image": torch.randint(0, 255, (3, 96, 120), dtype=torch.uint8)} for _ in range(8)]
    with torch.no_grad():
        outputs = model(images)
    detections = sum(len(o["instances"]) for o in outputs)
    assert detections == 8 * cfg.TEST.DETECTIONS_PER_IMAGE
    assert calls == [detections]
