"""The freezing rule (coordinator/strategies/freezing.py): a stage freezes once its validation accuracy stops rising.

Checked on numbers with a known answer, and on a recorded real federated run
(tests/data/progressive_history.json, written by tools/bench_freezing.py --record: progressive
training with the rule off, every block trained to its cap of 12 rounds).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from coordinator.strategies.freezing import BlockProgress, FreezeRule, accuracy_slope

HISTORY = Path(__file__).parent / "data" / "progressive_history.json"


def _first_freeze(accuracies, rule: FreezeRule = FreezeRule()) -> int | None:
    """The stage round (1-based) after which the rule freezes a block with these validation accuracies; None: never."""
    progress = BlockProgress(rule)
    for r, a in enumerate(accuracies, 1):
        progress.observe(a)
        if progress.converged:
            return r
    return None


def test_the_slope_is_the_least_squares_fit_in_points_per_round():
    rng = np.random.default_rng(0)
    y = 80 + 0.7 * np.arange(6) + rng.normal(0, 0.5, 6)
    assert accuracy_slope(y) == pytest.approx(np.polyfit(np.arange(6), y, 1)[0])
    assert np.isnan(accuracy_slope([81.0]))


def test_a_flat_noisy_block_freezes_and_a_rising_one_does_not():
    rng = np.random.default_rng(1)
    flat, rising = 0.0, 0.0
    for _ in range(200):
        noise = rng.normal(0, 0.007, 12)             # a round's accuracy swings by about 0.7 points
        flat += _first_freeze(0.85 + noise) is not None
        rising += _first_freeze(0.70 + 0.01 * np.arange(12) + noise) is not None   # a point a round
    assert flat / 200 > 0.95 and rising / 200 < 0.02, (flat, rising)


def test_the_slope_is_logged_from_the_round_the_window_fills_and_a_missing_measure_decides_nothing():
    rule = FreezeRule(window=4, threshold=0.25, patience=2)
    progress = BlockProgress(rule)
    slopes = [progress.observe(0.8) for _ in range(4)]
    assert all(np.isnan(s) for s in slopes[:3]) and slopes[3] == 0.0
    assert progress.below == 1 and not progress.converged       # patience 2: one more
    assert np.isnan(progress.observe(None)) and progress.below == 0
    progress.observe(0.8)
    assert not progress.converged
    progress.observe(0.8)
    assert progress.converged


def test_a_restored_record_decides_as_the_uninterrupted_one():
    rule = FreezeRule()
    rng = np.random.default_rng(2)
    a = BlockProgress(rule)
    for acc in 0.8 + 0.005 * np.arange(15) * (np.arange(15) < 8) + rng.normal(0, 0.004, 15):
        b = BlockProgress.from_state(rule, json.loads(json.dumps(a.state())))   # a restart, through JSON
        np.testing.assert_equal(a.observe(acc), b.observe(acc))
        assert (a.below, a.rounds, a.converged) == (b.below, b.rounds, b.converged)


@pytest.mark.parametrize("window, threshold, patience", [(2, 0.25, 1), (5, 0.0, 1), (5, 0.25, 0)])
def test_settings_that_cannot_decide_are_refused(window, threshold, patience):
    with pytest.raises(ValueError, match="freeze_window"):
        FreezeRule(window=window, threshold=threshold, patience=patience)


# -- the recorded run ------------------------------------------------------------------------------------------

def _recorded() -> tuple[dict, dict[int, list[dict]]]:
    if not HISTORY.exists():
        pytest.fail(f"{HISTORY} is missing: record it with tools/bench_freezing.py --record")
    history = json.loads(HISTORY.read_text())
    blocks: dict[int, list[dict]] = {}
    for r in history["rounds"]:
        blocks.setdefault(r["block"], []).append(r)
    return history, blocks


def _level(rounds: list[dict], key: str) -> float:
    """Where a block ended up in the capped run: the mean of its last three rounds, in points."""
    return 100 * float(np.mean([r[key] for r in rounds[-3:]]))


def test_on_the_recorded_run_most_blocks_freeze_before_their_cap_at_their_final_accuracy():
    history, blocks = _recorded()
    early = {}
    for block, rounds in blocks.items():
        at = _first_freeze([r["validation_accuracy"] for r in rounds])
        if at is not None and at < history["cap"]:
            early[block] = at
            # frozen where the capped run ended up: its test accuracy then is within a point of the end's (one
            # round's accuracy swings by about that much around the block's level)
            assert 100 * rounds[at - 1]["accuracy"] >= _level(rounds, "accuracy") - 1.0, (block, at)
    assert 2 * len(early) >= len(blocks), early


def test_on_the_recorded_run_no_block_freezes_while_it_is_still_learning():
    """Not frozen in any round whose last three validation accuracies sit a point or more under the block's end."""
    _, blocks = _recorded()
    for block, rounds in blocks.items():
        progress = BlockProgress(FreezeRule())
        end = _level(rounds, "validation_accuracy")
        for r, row in enumerate(rounds):
            progress.observe(row["validation_accuracy"])
            recent = 100 * float(np.mean([x["validation_accuracy"] for x in rounds[max(0, r - 2):r + 1]]))
            if recent <= end - 1.0:
                assert not progress.converged, (block, r + 1, recent, end)
