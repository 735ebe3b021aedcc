"""The main job: block-by-block training of the Fashion-MNIST CNN through the device runtime."""
import copy
import json

from coordinator.local import blockwise


def test_block_by_block_reaches_85_percent_within_budget(tmp_path):
    settings = copy.deepcopy(blockwise.DEFAULTS)
    settings["run"].update(workdir=str(tmp_path / "run"), samples=30000)
    settings["train"].update(epochs=2.0)
    settings["device"].update(budget_mb=192)
    summary = blockwise.run(settings)

    assert summary["final_test_accuracy"] >= 0.85
    blocks = summary["blocks"]
    assert [b["block"] for b in blocks] == [0, 1, 2, 3]
    for b in blocks:
        assert b["peak_rss_mb"] <= 192, f"block {b['block']} peaked at {b['peak_rss_mb']:.0f} MB"
        assert b["micro_batch_size"] == 64
    # every block after the first trained from its prefix's cached activations, built once
    assert all(b["prefix_computed"] for b in blocks[1:])
    # each block improves on the sub-model before it
    accs = [b["test_accuracy"] for b in blocks]
    assert accs == sorted(accs)
    assert json.loads((tmp_path / "run" / "results.json").read_text())["final_test_accuracy"] == \
        summary["final_test_accuracy"]
