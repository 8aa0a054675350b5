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
