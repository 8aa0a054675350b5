"""detectron2's export route on Ec and on the cascade: TracingAdapter, torch.jit.trace, save and
load; the reloaded model gives the eager model's outputs, also on images of another size and
with fewer detections than the traced one."""
import pytest
import torch
from detectron2.export import TracingAdapter
from detectron2.modeling import build_model


from ..conftest import make_cfg


def build(config):
    cfg = make_cfg(config, tiny=True)
    torch.manual_seed(0)
    return build_model(cfg).eval()


def fields(instances):
    return {k: getattr(v, "tensor", v) for k, v in instances.get_fields().items()}


@pytest.mark.parametrize("config", ["configs/mssd_vgg16.yaml", "configs/mccnn.yaml"])
def test_traced_model_reloads_with_eager_outputs(config, tmp_path):
    model = build(config)
    generator = torch.Generator().manual_seed(0)
    traced_image = torch.rand(3, 90, 150, generator=generator) * 255  # BGR, not FIXED_SIZE
    other = torch.rand(3, 128, 128, generator=generator) * 255  # FIXED_SIZE itself
    with torch.no_grad():
        other_scores = model([{"image": other}])[0]["instances"].scores
    # A score threshold within `other`'s scores, so that the two images keep different numbers
    # of detections: the traced graph must not fix the count it saw.
    model.test_score_thresh = float(other_scores[3] + other_scores[4]) / 2

    adapter = TracingAdapter(model, [{"image": traced_image}])
    with torch.no_grad():
        traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)
    path = str(tmp_path / "model.ts")
    torch.jit.save(traced, path)
    reloaded = torch.jit.load(path)

    counts = []
    for image in (traced_image, other):
        with torch.no_grad():
            eager = fields(model([{"image": image}])[0]["instances"])
            exported = fields(adapter.outputs_schema(reloaded(image))[0]["instances"])
        assert eager.keys() == exported.keys()
        for key, value in eager.items():
            torch.testing.assert_close(exported[key], value, msg=key)
        counts.append(len(eager["scores"]))
    assert counts[0] != counts[1] and min(counts) > 0, counts
