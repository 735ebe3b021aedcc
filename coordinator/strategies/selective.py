"""Selective layer fine-tuning (Sun, Xie, Ding, Li, Zhang; arXiv 2408.15600).

Rounds alternate between scoring and training. A score round asks each device for its
layers' gradient scores on its local data (forward and backward only; no weight
changes; edge_runtime/train/layer_scores.py). The `rescore_every` train rounds after it give
each device the set of at most `max_units` units (layers with parameters, and the final
head as one more unit; the paper's per-client layer budget) chosen by
coordinator/strategies/layer_selection.py: the largest total score minus `lam` times the
disagreement between devices, with every set inside its device's measured memory budget.
A device that can hold the whole model may train twice `max_units`. A device without
scores of its own (it joined after the score round, or its score job did not fit) waits
for the next score round, and is told why: giving it the fleet's mean scores instead was
measured and made fine-tuning worse (docs/benchmarks.md): the smallest devices could
afford only the last layer, which then only they trained, on their skewed data.
Aggregation is per parameter over the devices that trained it (Strategy.aggregate).

A set's cost is the profile's predicted peak of training the span from its lowest layer
to the final head, at the device's batch, plus the margin. Frozen layers inside the span
still keep activations for the backward pass, so the span is what the device must hold;
it is an upper bound, because frozen layers keep no optimizer state. A device scores only
the layers it could ever train: those from the lowest layer whose span fits its budget.
No unit lies in the model's frozen prefix (Manifest.frozen_prefix): those layers never train.
"""
from __future__ import annotations

from dataclasses import dataclass

from coordinator.strategies.base import Assignment, RoundPlan, Strategy
from coordinator.strategies.layer_selection import SelectionProblem, solve

HEAD = "head"


@dataclass(frozen=True)
class SelectiveSettings:
    """[selective]: train rounds, how often to score again, the disagreement weight and the unit budget."""
    rounds: int = 6
    rescore_every: int = 3
    lam: float = 0.0
    max_units: int = 2


class Selective(Strategy):
    name = "selective"
    Settings = SelectiveSettings

    def __init__(self, *args, rounds: int = SelectiveSettings.rounds, rescore_every: int = SelectiveSettings.rescore_every,
                 lam: float = SelectiveSettings.lam, max_units: int = SelectiveSettings.max_units, **kwargs):
        super().__init__(*args, **kwargs)
        if rounds < 1 or rescore_every < 1 or lam < 0 or max_units < 1:
            raise ValueError("need rounds >= 1, rescore_every >= 1, lam >= 0 and max_units >= 1")
        self.rounds, self.rescore_every, self.lam, self.max_units = rounds, rescore_every, lam, max_units
        m = self.manifest
        self.last = len(m.layers) - 1
        self.units = [*self.trainable(l.index for l in m.layers if l.params), HEAD]
        self.phase = "score"
        self.train_rounds_done = 0
        self.scores: dict[str, dict[str, float]] = {}     # device -> {unit key: score}
        self.selections: list[dict] = []                   # per train round: device -> chosen units
        self.asked: list[str] = []                         # devices given a score task in the open score round
        self.unscored: set[str] = set()                    # asked to score in the last score round, sent nothing

    # -- costs and batches --------------------------------------------------------------------
    def _cost(self, first: int, batch: int) -> float:
        return self.predict(first, self.last, batch) * (1 + self.margin)

    def _batch(self, device) -> int | None:
        """The batch that leaves the device the most layers to choose from, the largest such; None if not even
        the head (behind the frozen model) fits."""
        options = [b for b in self.batch_sizes if self._cost(self.last, b) <= device.budget_bytes]
        if not options:
            return None
        lowest = min(self._lowest(device, b) for b in options)
        return max(b for b in options if self._lowest(device, b) == lowest)

    def _lowest(self, device, batch: int) -> int:
        return next(l for l in range(self.first_trainable, self.last + 1)
                    if self._cost(l, batch) <= device.budget_bytes)

    # -- the contract -------------------------------------------------------------------------
    def plan_round(self, round_no, devices):
        if self.finished:
            return RoundPlan(round_no, (), {d.device_id: "training is finished" for d in devices}, {"phase": "done"})
        stage = {"phase": self.phase, "train_round": self.train_rounds_done}
        fitting, idle = [], {}
        for d in devices:
            batch = self._batch(d)
            if batch is None:
                idle[d.device_id] = f"even the head alone does not fit {d.budget_bytes / 2**20:.0f} MB; " \
                                    + self.need_text(self.last, self.last)
            else:
                fitting.append((d, batch))
        if self.phase == "score":
            assignments = [self._score_assignment(d, b) for d, b in fitting]
            self.asked = [a.device_id for a in assignments]   # advance() sees only the devices that answered
        else:
            assignments = self._select(fitting, idle)
        return RoundPlan(round_no, tuple(assignments), idle, stage)

    def _score_assignment(self, device, batch: int) -> Assignment:
        first = self._lowest(device, batch)
        layers = tuple(u for u in self.units if u != HEAD and u >= first)
        return Assignment(device.device_id, first, self.last, layers, self.manifest.final_head.index, batch,
                          int(self.predict(first, self.last, batch)), True, "score")

    def _select(self, fitting, idle) -> list[Assignment]:
        scored = [(d, b) for d, b in fitting if d.device_id in self.scores]
        for d, _ in fitting:   # a device with earlier scores trains on them, whatever its last score job did
            if d.device_id not in self.scores:
                idle[d.device_id] = ("its score job in the last score round sent no scores (the round log says "
                                     "why); it scores again in the next score round") if d.device_id in self.unscored \
                    else "no layer scores from this device yet: it scores in the next score round"
        if not scored:
            return []
        table = [[self.scores[d.device_id].get(str(u), 0.0) for u in self.units] for d, _ in scored]

        def cost(i: int, chosen: frozenset) -> float:
            layers = [self.units[j] for j in chosen if self.units[j] != HEAD]
            return self._cost(min(layers) if layers else self.last, scored[i][1])

        # a device that can hold the whole model trains twice as many units: more memory, more training
        caps = [2 * self.max_units if self._cost(self.first_trainable, b) <= d.budget_bytes else self.max_units
                for d, b in scored]
        problem = SelectionProblem(table, [d.budget_bytes for d, _ in scored], cost, lam=self.lam, max_units=caps)
        selection = solve(problem)
        out, chosen_log = [], {}
        for (d, batch), chosen in zip(scored, selection.sets):
            units = [self.units[j] for j in sorted(chosen)]
            chosen_log[d.device_id] = [str(u) for u in units]
            if not units:
                idle[d.device_id] = "the selection gave it no layers (they score low here, or do not fit)"
                continue
            layers = tuple(sorted(u for u in units if u != HEAD))
            first = min(layers) if layers else self.last
            out.append(Assignment(d.device_id, first, self.last, layers, self.manifest.final_head.index, batch,
                                  int(self.predict(first, self.last, batch)), HEAD in units, "train"))
        if out:  # the round opens with this plan
            self.selections.append({"method": selection.method, "objective": selection.objective,
                                    "sets": chosen_log})
        return out

    def advance(self, plan, before, after, results=()):
        if self.finished or not plan.assignments:
            return
        if self.phase == "score":
            for r in results:
                if r.scores is not None:
                    self.scores[r.assignment.device_id] = {str(k): float(v) for k, v in r.scores.items()}
            self.unscored = set(self.asked) - {r.assignment.device_id for r in results if r.scores is not None}
            if self.scores:
                self.phase = "train"
            return
        self.train_rounds_done += 1
        if self.train_rounds_done % self.rescore_every == 0 and not self.finished:
            self.phase = "score"

    @property
    def finished(self):
        return self.train_rounds_done >= self.rounds

    def rounds_left(self) -> tuple[int, int]:
        """Train rounds left plus the score rounds before them (one now if scoring, one per rescore_every)."""
        train = max(0, self.rounds - self.train_rounds_done)
        if not train:
            return 0, 0
        first = self.train_rounds_done % self.rescore_every    # train rounds done since the last score round
        scores = (self.phase == "score") + (first + train - 1) // self.rescore_every
        return train + scores, train + scores

    def round_report(self, round_no: int) -> dict:
        return {"phase": self.phase, "selection": self.selections[-1] if self.selections else None}

    def state(self):
        return {"phase": self.phase, "train_rounds_done": self.train_rounds_done, "scores": self.scores,
                "selections": self.selections, "asked": self.asked, "unscored": sorted(self.unscored)}

    def load_state(self, state):
        self.phase = state.get("phase", "score")
        self.train_rounds_done = int(state.get("train_rounds_done", 0))
        self.scores = {d: dict(s) for d, s in state.get("scores", {}).items()}
        self.selections = list(state.get("selections", []))
        self.asked = list(state.get("asked", []))
        self.unscored = set(state.get("unscored", []))
