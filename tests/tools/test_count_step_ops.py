"""tools/count_step_ops.py counts a real config's training step on phantoms: every phase issues
operations, and the forward with its loss hardly any that would make a GPU wait."""
import json


def test_counts_a_training_step_by_phase(tool, phantom_root, tiny_opts, tmp_path):
    output = tmp_path / "ops.json"
    result = tool("count_step_ops").main(
        [
            "--config-file", "configs/mccnn_synthetic.yaml", "--batches", "1",
            "--output", str(output), *tiny_opts, "DATASETS.TRAIN", "('synthetic_tiny',)",
            "SOLVER.IMS_PER_BATCH", "4",
        ]
    )  # fmt: skip
    assert json.loads(output.read_text()) == result
    assert set(result["ops"]) == {"forward", "backward", "optimizer"}
    assert all(n > 0 for n in result["ops"].values())
    assert result["waiting_ops"]["forward"] <= 4
    assert result["images_per_step"] == 4 and result["cpu_ms_optimizer_step"] > 0


def test_counts_the_inference_per_image(tool, phantom_root, tiny_opts):
    """A batch of 4 evaluated images issues fewer operations per image than one at a time."""
    count = tool("count_step_ops").main
    results = {
        batch: count(
            [
                "--config-file", "configs/mccnn_synthetic.yaml", "--inference", "--batches", "1",
                *tiny_opts, "DATASETS.TEST", "('synthetic_tiny',)", "TEST.IMS_PER_BATCH", str(batch),
                "DATALOADER.NUM_WORKERS", "0",
            ]
        )  # fmt: skip
        for batch in (1, 4)
    }
    assert results[1]["images"] == 1 and results[4]["images"] == 4
    assert results[4]["ops_per_image"] < 0.7 * results[1]["ops_per_image"]
    assert 0 < results[4]["waiting_ops_per_image"] <= results[1]["waiting_ops_per_image"]
