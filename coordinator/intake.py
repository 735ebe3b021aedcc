"""Judging what a device sends back: every check from the sender's identity to the tensor values.

Cheap checks that need no blob come first (identity, registration, task, round), then the
reported loss (never negative, never far above chance and the fleet's range), then the
blob (declared size, completeness, format), then the tensors (names, dtypes, shapes,
finite values, norm of the change; coordinator/strategies/aggregation.py). A rejection carries its
reason and its kind (guards.REJECTION_KINDS): the service logs it, counts it in the state store by kind and
sends the reason back in the Ack,
and a rejected update never touches the global model. A second copy of an accepted
update is a duplicate: acknowledged again, counted once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from coordinator.guards import REJECTION_KINDS
from coordinator.state_store import StateStore, TaskRow
from coordinator.strategies.aggregation import UpdateCheck, UpdateRejected, validate_update
from coordinator.strategies.shared_features import feature_limit_bytes, is_integer, split_update, validate_features
from edge_runtime.errors import IntegrityError
from edge_runtime.wire import weights as wcodec
from edge_runtime.wire.manifest import Manifest
from edge_runtime.wire.protocol import Failed, Scores, Update
from edge_runtime.wire.transfer import BlobStore

BLOB_SLACK_BYTES = 64 * 1024     # safetensors header and alignment around the tensors


@dataclass(frozen=True)
class Verdict:
    status: str                  # accepted | duplicate | rejected | pending (blob not complete yet)
    reason: str = ""
    settles_task: bool = False   # a rejection of the scheduled device's own update ends its task
    kind: str = ""               # a rejection's kind (guards.REJECTION_KINDS), what it is counted under

    def __post_init__(self):
        if self.status == "rejected" and self.kind not in REJECTION_KINDS:
            raise ValueError(f"a rejection needs one of the kinds {', '.join(REJECTION_KINDS)}, not {self.kind!r}")


def _rejected(kind: str, reason: str, settles: bool = False) -> Verdict:
    return Verdict("rejected", reason, settles, kind)


def expected_shapes(manifest: Manifest, task: TaskRow) -> dict[str, tuple[int, ...]]:
    """The parameters a task's device must send back: its trainable layers and (if it trains) its head."""
    specs = manifest.param_specs()
    return {n: tuple(specs[n].shape) for n in task.assignment.trained_names(manifest)}


def share_rows(task: TaskRow) -> int:
    """How many rows of features the task asked its device to share (FedIN); 0 for every other task."""
    return int(task.spec.get("task", {}).get("config", {}).get("share_rows", 0) or 0)


def update_limit_bytes(manifest: Manifest, task: TaskRow) -> int:
    """The most bytes a task's update blob can take: its tensors in float32, the features it may share, and the
    safetensors header."""
    return (sum(int(np.prod(s)) * 4 for s in expected_shapes(manifest, task).values())
            + feature_limit_bytes(manifest, share_rows(task)) + BLOB_SLACK_BYTES)


# A cross-entropy loss is never negative, and one far above both a random model's (ln C) and the fleet's
# recent losses means the device's data or labels are wrong (or it lies): refused, so it cannot ruin a run.
NEGATIVE_LOSS_TOLERANCE = 1e-4
CHANCE_MULTIPLE = 3.0       # x ln(num_classes): what an untrained model scores, with room for a bad start
FLEET_MULTIPLE = 4.0        # x the median loss of the fleet's recently accepted updates


def loss_ceiling(num_classes: int, recent_losses: list[float]) -> float:
    """The highest training loss an update may report: above both bounds it is implausible for the task."""
    chance = CHANCE_MULTIPLE * math.log(max(num_classes, 2))
    if not recent_losses:
        return chance
    return max(chance, FLEET_MULTIPLE * float(np.median(recent_losses)))


def implausible_loss(loss: float, num_classes: int, recent_losses: list[float]) -> str | None:
    """Why a reported training loss cannot come from valid data, or None."""
    if loss < -NEGATIVE_LOSS_TOLERANCE:
        return (f"loss {loss:.4g} is negative, which a cross-entropy cannot be: the device's labels are likely "
                f"outside 0..{num_classes - 1} (its data check should have said so; check its labels.npy)")
    ceiling = loss_ceiling(num_classes, recent_losses)
    if loss > ceiling:
        fleet = f"{np.median(recent_losses):.3g}" if recent_losses else "none yet"
        return (f"loss {loss:.4g} is implausible for this task: above {ceiling:.3g}, the larger of "
                f"{CHANCE_MULTIPLE:g} x ln({num_classes} classes) and {FLEET_MULTIPLE:g} x the fleet's median "
                f"recent loss ({fleet}); the device's data or labels are likely wrong")
    return None


def _check_task(msg: Update | Failed | Scores, sender: str, state: StateStore,
                open_round: int | None) -> tuple[TaskRow | None, Verdict | None]:
    """The task a message answers, or the verdict that ends it before any blob is read."""
    if msg.device_id != sender:
        return None, _rejected("wrong_identity", f"device {msg.device_id!r} sent on the topic of device {sender!r}")
    if not state.has_device(sender):
        return None, _rejected("unknown_device", f"unknown device {sender!r}: it never said hello")
    task = state.task(msg.task_id)
    if task is None:
        return None, _rejected("unknown_task", f"unknown task {msg.task_id!r}")
    if task.device_id != sender:
        return None, _rejected("wrong_task", f"task {msg.task_id} was scheduled to {task.device_id}, not {sender}")
    if msg.round != task.round:
        return None, _rejected("wrong_task", f"says round {msg.round}, but task {msg.task_id} is of round "
                                             f"{task.round}")
    if task.status == "accepted":
        return task, Verdict("duplicate", "already stored")
    if task.status != "sent":
        return None, _rejected("stale", f"task {msg.task_id} is already {task.status}: {task.reason}")
    if open_round != task.round:
        return None, _rejected("stale", f"round {task.round} is closed: a late or replayed message")
    return task, None


def judge_update(update: Update, sender: str, state: StateStore, open_round: int | None, incoming: BlobStore,
                 manifest: Manifest, sent_weights: Callable[[TaskRow], Mapping[str, np.ndarray]],
                 check: UpdateCheck = UpdateCheck()) -> Verdict:
    """Accepted, pending (its blob is still arriving) or rejected with the reason. The update is checked against
    the weights its task was sent (sent_weights(task): the global ones, or the device's own in a personalised
    schedule)."""
    task, verdict = _check_task(update, sender, state, open_round)
    if verdict is not None:
        return verdict
    # the fleet's range is read only for an update that answers a task of the open round
    why = implausible_loss(update.loss, manifest.num_classes, state.recent_losses(task.round))
    if why:
        return _rejected("implausible_loss", why, settles=True)
    expected = expected_shapes(manifest, task)
    limit = update_limit_bytes(manifest, task)
    if update.blob_size > limit:
        return _rejected("oversize", f"declared update size {update.blob_size} bytes exceeds the {limit} bytes its "
                                     f"parameters can take", settles=True)
    if not incoming.has(update.blob_sha256):
        return Verdict("pending", "update blob not complete yet")
    path = incoming.path(update.blob_sha256)
    size = path.stat().st_size
    if size != update.blob_size:
        return _rejected("integrity", f"declared size {update.blob_size} bytes, but the blob has {size}", settles=True)
    try:
        values, features = split_update(wcodec.decode(path.read_bytes(), what=f"update of {update.task_id}",
                                                      integers=is_integer))
    except IntegrityError as exc:   # the blob matched its hash: what it holds is not an update
        return _rejected("bad_update", str(exc), settles=True)
    try:
        validate_features(features, manifest, share_rows(task))
    except UpdateRejected as exc:
        return _rejected("bad_features", str(exc), settles=True)
    try:
        validate_update(values, expected, sent_weights(task), check)
    except UpdateRejected as exc:
        return _rejected("bad_update", str(exc), settles=True)
    return Verdict("accepted")


def judge_scores(msg: Scores, sender: str, state: StateStore, open_round: int | None) -> Verdict:
    """A score task's answer: a score for exactly the layers (and head) the task named, each finite and >= 0."""
    task, verdict = _check_task(msg, sender, state, open_round)
    if verdict is not None:
        return verdict
    a = task.assignment
    if a.kind != "score":
        return _rejected("wrong_task", f"task {msg.task_id} is a training task: it needs an update, not scores",
                         settles=True)
    expected = {str(i) for i in a.trainable} | ({"head"} if a.train_head else set())
    if set(msg.scores) != expected:
        return _rejected("bad_update", f"scores name {sorted(msg.scores)}, the task asked for {sorted(expected)}",
                         settles=True)
    return Verdict("accepted")


def judge_failure(failed: Failed, sender: str, state: StateStore, open_round: int | None) -> Verdict:
    """A device's report that it could not do its task: accepted when it is about a task it holds."""
    _, verdict = _check_task(failed, sender, state, open_round)
    return verdict or Verdict("accepted", failed.reason, settles_task=True)
