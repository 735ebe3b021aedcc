"""The freezing rule: a block has converged once the fleet's loss on it stops improving."""
import json
import math

import numpy as np
import pytest

from coordinator.strategies.freezing import BlockProgress, FreezeRule, part_key, round_gain


def test_a_round_gain_pairs_each_device_with_itself_and_takes_the_median():
    before = {"a": 2.0, "b": 1.0, "c": 0.5, "gone": 9.0}
    after = {"a": 1.8, "b": 0.95, "c": 0.6, "new": 0.1}
    # a: 10 %, b: 5 %, c: -20 %; the devices in one round only are not compared
    assert round_gain(before, after) == pytest.approx(0.05)
    assert math.isnan(round_gain({}, after)) and math.isnan(round_gain(before, {"new": 1.0}))
    # one device's swing (a straggler, a poisoner) does not decide: the median of the others holds
    assert round_gain({**before, "x": 1.0, "y": 1.0}, {**after, "x": 1e-6, "y": 0.99}) == pytest.approx(0.05)


def test_the_same_device_on_another_part_is_another_series():
    assert part_key("pi-1", 0, 2, 5) != part_key("pi-1", 0, 3, 6)
    assert part_key("pi-1", 0, 2, 5) == part_key("pi-1", 0, 2, 5)


def _progress(rule: FreezeRule, levels: list[float], trend, rounds: int, rng) -> tuple[BlockProgress, list[float]]:
    """Devices at their own loss levels (non-IID), each following trend(r), with 0.5 % noise a round."""
    p, signals = BlockProgress(rule), []
    for r in range(rounds):
        signals.append(p.observe({f"d{i}": level * trend(r) * (1 + 0.005 * rng.standard_normal())
                                  for i, level in enumerate(levels)}))
        if p.converged:
            break
    return p, signals


def test_a_flat_loss_freezes_as_soon_as_the_rule_can_tell_and_a_falling_one_never():
    rule, rng = FreezeRule(), np.random.default_rng(0)
    levels = [0.3, 0.5, 1.2, 2.0]
    flat, signals = _progress(rule, levels, lambda r: 1.0, 40, rng)
    assert flat.converged and len(signals) == rule.earliest == rule.window + rule.patience
    # a value once `window` gains exist (a gain compares two rounds): NaN before, never after
    assert all(math.isnan(v) for v in signals[:rule.window]) and all(math.isfinite(v) for v in signals[rule.window:])
    falling, signals = _progress(rule, levels, lambda r: 0.97 ** r, 40, rng)     # 3 % a round
    assert not falling.converged and min(signals[rule.window:]) > rule.threshold
    # learning that slows down: frozen once the gain is under 1 % a round, not before
    slowing, signals = _progress(rule, levels, lambda r: 1 + 2 * 0.8 ** r, 60, rng)
    gain_then = [1 - (1 + 2 * 0.8 ** (r + 1)) / (1 + 2 * 0.8 ** r) for r in range(60)]
    froze = len(signals)
    assert slowing.converged and all(g < 0.0125 for g in gain_then[froze - rule.patience - rule.window:froze])
    assert gain_then[froze - 2 * rule.window - rule.patience] > rule.threshold


def test_a_round_no_device_can_be_compared_in_neither_helps_nor_resets():
    rule = FreezeRule(window=2, patience=1)
    p = BlockProgress(rule)
    for losses in ({"a": 1.0}, {"a": 1.0}, {"b": 5.0}, {"b": 5.0}):   # the fleet changed between rounds 2 and 3
        p.observe(losses)
    assert list(p.gains) == [0.0, 0.0] and p.converged


def test_the_record_survives_json_as_the_state_store_keeps_it():
    rule, rng = FreezeRule(), np.random.default_rng(1)
    p, _ = _progress(rule, [1.0, 2.0], lambda r: 0.9 ** r, 4, rng)
    restored = BlockProgress.from_state(rule, json.loads(json.dumps(p.state())))
    assert restored.state() == p.state()
    nxt = {"d0": 0.5, "d1": 1.0}
    assert restored.observe(nxt) == p.observe(nxt) and restored.below == p.below
    assert BlockProgress.from_state(rule, None).state() == BlockProgress(rule).state()


@pytest.mark.parametrize("bad", [dict(window=0), dict(threshold=0.0), dict(threshold=1.0), dict(patience=0)])
def test_settings_that_could_never_decide_are_refused(bad):
    with pytest.raises(ValueError, match="freeze_window"):
        FreezeRule(**bad)
