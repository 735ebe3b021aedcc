"""Layer-wise personalised aggregation with hypernetworks: pFedLA and HeurpFedLA (Ma et al., CVPR 2022;
arXiv 2205.03993).

Every device has a model of its own. The coordinator keeps, per device i, its own copy theta_i
of every layer and a hypernetwork HN_i (coordinator/strategies/hypernetwork.py) that gives,
layer by layer, how much of every device's copy i's model takes: theta_bar_i^l =
sum_j alpha_ij^l theta_j^l. A round sends each device its theta_bar_i (device_weights: a
weight index of its own, so it downloads only the layers whose mixture changed), the device
trains, and aggregate() takes its change delta_i = trained - theta_bar_i:

- its own copy moves by it: theta_i <- theta_i + delta_i (the paper's update; a layer the
  device did not train keeps its value);
- its hypernetwork descends the device's loss through the mixture: with the upstream gradient
  g^l = theta_bar_i^l - trained^l (local training moved the weights down the loss, so -delta
  points up it), dLoss/dalpha_ij^l = <g^l, theta_j^l>, and the chain rule carries that into
  HN_i, which takes one SGD step of `hn_lr` (the sign is tested: tests/test_hypernetwork.py).

HeurpFedLA (`k_local` > 0): the k layers with the largest self-weight alpha_ii^l are the
device's own alone. `k_local` at least the number of layers is local-only training.

Memory tiers: a device trains the layers from the lowest one whose span to the head fits its
measured budget (as the other schedules fit parts); the layers below come as its cached
prefix, from its own mixture. A device that fits not even the head alone is idle, told why.

A "layer" here is a layer with parameters after the model's frozen prefix, and the final
head; running statistics are mixed with their layer but carry no gradient. The weights the
round returns (the service's "global" model) are the mean of the devices' own copies: a
reference the coordinator tests, not what any device runs; each device's accuracy is measured
on the rows it holds out ([train] holdout_fraction).
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from coordinator.strategies.base import Assignment, FixedRounds, RoundPlan
from coordinator.strategies.hypernetwork import (
    grow,
    hypernetwork_grads,
    init_hypernetwork,
    layer_weights,
    mix,
    sgd_step,
)


@dataclass(frozen=True)
class PFedLASettings:
    """[pfedla]: rounds; k_local layers kept local (0: pFedLA, k > 0: HeurpFedLA); the hypernetworks."""
    rounds: int = 10
    k_local: int = 0
    # the step on a mixing weight is an inner product over a whole layer: 5 lets the hypernetworks learn within a
    # few rounds on fmnist_cnn (0.05 left them uniform: docs/benchmarks.md); lower it if a model's layers are far
    # larger and each device's weights collapse onto its own copy within a round or two
    hn_lr: float = 5.0
    embedding_dim: int = 100
    hidden_dim: int = 100


class PFedLA(FixedRounds):
    name = "pfedla"
    Settings = PFedLASettings
    personalized = True

    def __init__(self, *args, rounds: int = PFedLASettings.rounds, k_local: int = PFedLASettings.k_local,
                 hn_lr: float = PFedLASettings.hn_lr, embedding_dim: int = PFedLASettings.embedding_dim,
                 hidden_dim: int = PFedLASettings.hidden_dim, seed: int = 0, **kwargs):
        super().__init__(*args, rounds=rounds, **kwargs)
        if rounds < 1 or k_local < 0 or not hn_lr > 0 or embedding_dim < 1 or hidden_dim < 1:
            raise ValueError("need rounds >= 1, k_local >= 0, hn_lr > 0, embedding_dim and hidden_dim >= 1")
        self.k_local, self.hn_lr = k_local, hn_lr
        self.dims = (embedding_dim, hidden_dim)
        self.seed = seed
        m = self.manifest
        self.last = len(m.layers) - 1
        specs = m.param_specs()
        # the mixed units: trainable layers with parameters, then the final head; each unit's tensors
        units = [(f"layer {l.index}", [p.name for p in l.params]) for l in m.layers
                 if l.params and l.index >= self.first_trainable]
        units.append((f"head {m.final_head.index}", [p.name for p in m.final_head.params]))
        self.unit_names = [u for u, names in units if names]
        self.unit_tensors = [names for _, names in units if names]
        self.unit_grads = [[n for n in names if specs[n].kind == "param"] for names in self.unit_tensors]
        self.roster: list[str] = []            # devices in the order they joined: their column in every head
        self.own: dict[str, str] = {}          # device -> weight index of its own copy theta_i
        self.hn: dict[str, str] = {}           # device -> blob of its hypernetwork's parameters (npz)
        self.alphas: dict[str, list] = {}      # device -> the layer weights its last task was mixed with
        self._own_cache: dict[str, dict[str, np.ndarray]] = {}
        self._hn_cache: dict[str, dict[str, np.ndarray]] = {}

    @classmethod
    def constructor_args(cls, settings, seed: int) -> dict:
        from dataclasses import asdict
        return {**asdict(settings), "seed": seed}

    # -- the devices' own state, in the vault --------------------------------------------------
    def _own_weights(self, device: str) -> dict[str, np.ndarray]:
        if device not in self._own_cache:
            self._own_cache[device] = self.vault.load(self.own[device])
        return self._own_cache[device]

    def _hypernet(self, device: str) -> dict[str, np.ndarray]:
        if device not in self._hn_cache:
            with np.load(io.BytesIO(self.vault.get_bytes(self.hn[device])), allow_pickle=False) as saved:
                params = {k: saved[k] for k in saved.files}
            self._hn_cache[device] = self._grown(device, params)
        return self._hn_cache[device]

    def _grown(self, device: str, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The hypernetwork with a column for every device of the roster. Column c's initial values depend only on
        (seed, owner, c): a restarted coordinator grows a saved hypernetwork to the very same values."""
        i = self.roster.index(device)
        for c in range(next(iter(v for k, v in params.items() if k.startswith("head."))).shape[0],
                       len(self.roster)):
            params = grow(params, c + 1, np.random.default_rng([self.seed, i, c, 1]))
        return params

    def _store_hypernet(self, device: str, params: Mapping[str, np.ndarray]) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, **params)
        self.hn[device] = self.vault.put_bytes(buffer.getvalue())
        self._hn_cache[device] = dict(params)

    def _join(self, device: str) -> None:
        """A device new to the fleet: a fresh hypernetwork, and a column for it in every other one (a hypernetwork
        not loaded yet grows when it is). Its own copy is made from the fleet's reference model before the round's
        first mixture (_own_copies)."""
        self.roster.append(device)
        i = len(self.roster) - 1
        self._store_hypernet(device, init_hypernetwork(len(self.unit_names), len(self.roster),
                                                       np.random.default_rng([self.seed, i, 0, 0]), *self.dims))
        for other in list(self._hn_cache):
            self._hn_cache[other] = self._grown(other, self._hn_cache[other])

    # -- the contract -------------------------------------------------------------------------
    def _own_copies(self, global_weights: Mapping[str, np.ndarray]) -> None:
        """Every device of the roster has its own copy: a newcomer's starts as the fleet's reference model."""
        for device in self.roster:
            if device not in self.own:
                self.own[device] = self.vault.save(global_weights)
                self._own_cache[device] = {n: np.asarray(v, np.float32) for n, v in global_weights.items()}

    def plan_round(self, round_no, devices):
        if self.finished:
            return RoundPlan(round_no, (), {d.device_id: "training is finished" for d in devices}, {"phase": "done"})
        head = self.manifest.final_head.index
        assignments, idle = [], {}
        for d in devices:
            for first in range(self.first_trainable, self.last + 1):   # the most layers its budget holds
                fit = self.fit(d, first, self.last)
                if fit is not None:
                    assignments.append(Assignment(d.device_id, first, self.last, tuple(range(first, self.last + 1)),
                                                  head, *fit))
                    break
            else:
                idle[d.device_id] = f"even the last layer and the head do not fit {d.budget_bytes / 2**20:.0f} MB; " \
                                    + self.need_text(self.last, self.last)
        for a in assignments:    # every newcomer joins before any mixture of the round is made
            if a.device_id not in self.roster:
                self._join(a.device_id)
        phase = "pfedla" if not self.k_local else "local" if self.k_local >= len(self.unit_names) else "heurpfedla"
        stage = {"phase": phase, "round": self.rounds_done}
        return RoundPlan(round_no, tuple(assignments), idle, stage)

    def device_weights(self, device_id, global_weights):
        self._own_copies(global_weights)
        i = self.roster.index(device_id)
        alphas, _ = layer_weights(self._hypernet(device_id), i, self.k_local)
        self.alphas[device_id] = [[round(float(a), 4) for a in row] for row in alphas]
        mixed = dict(self._own_weights(device_id))     # the frozen prefix and other heads: its own
        copies = [self._own_weights(j) for j in self.roster]
        for row, names in zip(alphas, self.unit_tensors):
            for name in names:
                mixed[name] = mix(row, [c[name] for c in copies])
        return mixed

    def aggregate(self, plan, results, failures, global_weights):
        """Each device's own copy takes its change; its hypernetwork takes one step down its loss. Every step is
        computed from the state the round opened with, then all are applied."""
        copies = {j: self._own_weights(j) for j in self.roster}
        new_own, new_hn = {}, {}
        for r in results:
            device = r.assignment.device_id
            if r.start is None or not r.update or device not in self.own:   # a task from before a restart's plan
                continue
            i = self.roster.index(device)
            dalpha = np.zeros((len(self.unit_names), len(self.roster)))
            for l, names in enumerate(self.unit_grads):
                for name in names:
                    if name not in r.update:
                        continue                   # a layer below the device's span: no gradient reached it
                    g = r.start[name].astype(np.float64) - np.asarray(r.update[name], np.float64)
                    for j, other in enumerate(self.roster):
                        dalpha[l, j] += float(np.vdot(g, copies[other][name]))
            params = self._hypernet(device)
            new_hn[device] = sgd_step(params, hypernetwork_grads(params, i, self.k_local, dalpha), self.hn_lr)
            own = dict(copies[device])
            for name in r.update:
                own[name] = (own[name] + (np.asarray(r.update[name], np.float32) - r.start[name])).astype(np.float32)
            new_own[device] = own
        for device, params in new_hn.items():
            self._store_hypernet(device, params)
        for device, own in new_own.items():
            self.own[device] = self.vault.save(own)
            self._own_cache[device] = own
        return self._reference(global_weights)

    def _reference(self, global_weights) -> dict[str, np.ndarray]:
        """The mean of the devices' own copies: what the coordinator's test set measures for this schedule."""
        if not self.roster:
            return dict(global_weights)
        out = dict(global_weights)
        for names in self.unit_tensors:
            for name in names:
                out[name] = np.mean([self._own_weights(j)[name] for j in self.roster], axis=0, dtype=np.float64
                                    ).astype(np.float32)
        return out

    def advance(self, plan, before, after, results=()):
        if plan.assignments:
            super().advance(plan, before, after, results)

    def round_report(self, round_no: int) -> dict:
        """The layer weights each device's last model was mixed with: rows are layers, columns the roster."""
        return {"roster": list(self.roster), "units": list(self.unit_names), "alphas": dict(self.alphas),
                "k_local": self.k_local}

    def blobs_in_use(self) -> tuple[set[str], set[str]]:
        return set(self.own.values()), set(self.hn.values())

    def state(self):
        return {**super().state(), "roster": list(self.roster), "own": dict(self.own),
                "hn": dict(self.hn), "alphas": dict(self.alphas)}

    def load_state(self, state):
        super().load_state(state)
        self.roster = list(state.get("roster", []))
        self.own, self.hn = dict(state.get("own", {})), dict(state.get("hn", {}))
        self.alphas = dict(state.get("alphas", {}))
        self._own_cache, self._hn_cache = {}, {}
