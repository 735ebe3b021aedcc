"""The profiler on the real runtime: measurements, the memory model, partitions per tier, the file."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from edge_runtime.device.tiers import Tier
from edge_runtime.jobs.child import device_child_env
from edge_runtime.jobs.worker import JobSpec, run_worker
from edge_runtime.memory import MIB
from edge_runtime.profiling.memory_model import (
    CandidateFit,
    Measurement,
    Predictor,
    fit_candidate,
    fit_span_model,
    span_features,
)
from edge_runtime.profiling.profile_file import Profile, ProfileError, StagePlan, TierPlan
from edge_runtime.profiling.profiler import Profiler, format_profile, run_profile
from edge_runtime.wire.manifest import Manifest
from edge_runtime.wire.part import TrainablePart

BATCHES = [16, 64]


def _tier(name, budget_mb):
    return Tier(name=name, description="test tier", ram_mb=4096, budget_mb=budget_mb, storage_gb=8, cores=2,
                cpu="test", source="test", path=Path(f"{name}.toml"))


MARGIN = 0.10


def _tiers(manifest_path: Path, work: Path) -> list[Tier]:
    """Budgets set from this machine's own measurements, so each tier falls where the test means it to
    (fixed numbers sat within a few MB of the whole model's peak, and a loaded machine crossed them):
    tight lies between the heaviest single block and the whole model at the smallest batch, so it must
    split; medium fits the whole model at the smallest batch only; roomy fits everything."""
    prof = Profiler(manifest_path, work / "calibrate", max_batch=BATCHES[0])
    n = len(prof.manifest.layers)
    blocks = [(b.layers[0], b.layers[-1]) for b in prof.manifest.blocks]
    block_mb = max(prof.measure(a, z, BATCHES[0]).peak_bytes for a, z in blocks) / MIB
    whole_mb = prof.measure(0, n - 1, BATCHES[0]).peak_bytes / MIB
    assert whole_mb > block_mb * 1.06, "the whole model must cost clearly more than its heaviest block"
    budget = lambda usable_mb: int(usable_mb * (1 + MARGIN)) + 1  # noqa: E731
    return [_tier("below-baseline", 40), _tier("tight", budget((block_mb + whole_mb) / 2)),
            _tier("medium", budget(whole_mb * 1.08)), _tier("roomy", 400)]


@pytest.fixture(scope="module")
def profiled(fmnist_model, tmp_path_factory):
    m, _ = fmnist_model
    work = tmp_path_factory.mktemp("profile")
    tiers = _tiers(m.root / "manifest.json", work)
    profile = run_profile(m.root / "manifest.json", tiers, BATCHES, work, margin=MARGIN, verify=True,
                          log=lambda s: None)
    return m, profile, work


def test_predictions_within_10_percent_on_untried_batch_sizes(profiled):
    m, profile, work = profiled
    baseline = profile.baseline_bytes
    prof = Profiler(m.root / "manifest.json", work / "holdout", max_batch=128)
    for first, last in [(1, 2), (0, 2), (3, 4)]:
        fit = fit_candidate([prof.measure(first, last, b) for b in BATCHES], baseline)
        for b in (32, 128):  # never used for fitting
            measured = prof.measure(first, last, b).peak_bytes
            assert fit.predict(baseline, b) == pytest.approx(measured, rel=0.10), (first, last, b)
    # the span model predicts a span that was never measured: the whole model
    from edge_runtime.profiling.memory_model import Measurement
    points = [Measurement(**p) for p in profile.measurements]
    predictor = Predictor(m, baseline, [], fit_span_model(points, baseline))
    assert (0, 4) not in {(p.first, p.last) for p in points}
    for b in (16, 64):
        measured = prof.measure(0, 4, b).peak_bytes
        assert predictor.predict(0, 4, b) == pytest.approx(measured, rel=0.10)


def test_every_chosen_stage_measures_within_its_budget(profiled):
    _, profile, _ = profiled
    feasible = [t for t in profile.tiers if t.feasible]
    assert {t.tier for t in feasible} == {"tight", "medium", "roomy"}
    for t in feasible:
        assert t.stages[0].first == 0 and t.stages[-1].last == 4
        for s in t.stages:
            assert s.measured_peak_bytes is not None
            assert s.measured_peak_bytes <= t.budget_bytes, (t.tier, s)
    stages = [len(profile.tier(name).stages) for name in ("tight", "medium", "roomy")]
    assert stages == sorted(stages, reverse=True)  # more memory never needs more stages
    assert stages[-1] == 1 and stages[0] > 1       # the roomy tier trains the whole model; the tight one cannot


def test_budget_below_the_runtime_baseline_is_refused(profiled):
    _, profile, _ = profiled
    t = profile.tier("below-baseline")
    assert not t.feasible and not t.stages
    assert "below the runtime's own baseline" in t.reason and f"{profile.baseline_bytes / MIB:.0f} MB" in t.reason


def test_chosen_configuration_trains_to_the_end_under_a_hard_limit(profiled, small_dataset, tmp_path):
    m, profile, _ = profiled
    tight = profile.tier("tight")
    for i, s in enumerate(tight.stages):
        part = TrainablePart(span=tuple(range(s.first, s.last + 1)), trainable_layers=tuple(range(s.first, s.last + 1)),
                             head=s.head)
        spec = JobSpec(manifest=str(m.root / "manifest.json"), weights=str(m.graph_path(m.weights)),
                       dataset=str(small_dataset.root), state_dir=str(tmp_path / "state"), task_id=f"stage{i}",
                       part=part.to_dict(),
                       config={"batch_size": tight.batch_size, "epochs": 1.0})
        report, child = run_worker(spec, tmp_path / "jobs", memory_limit_bytes=tight.budget_bytes)
        assert child.returncode == 0 and not child.killed_by_oom, child.stderr[-1000:]
        assert report["ok"] and report["result"]["steps"] == -(-len(small_dataset) // tight.batch_size)
        assert child.peak_rss_bytes <= tight.budget_bytes


def test_probe_sees_the_cgroup_limit_it_runs_under(tmp_path):
    script = ("import json; from edge_runtime.device.probe import probe; "
              f"print(json.dumps(probe({str(tmp_path)!r}, 0.1).to_dict()))")
    from edge_runtime.jobs.child import run_child
    child = run_child([sys.executable, "-c", script], env=device_child_env(), memory_limit_bytes=300 * MIB)
    d = json.loads(child.stdout.strip().splitlines()[-1])
    from edge_runtime.jobs.limits import detect_mechanism
    if detect_mechanism() == "watchdog":
        pytest.skip("no writable cgroup on this machine")
    assert d["cgroup_limit_bytes"] == 300 * MIB
    assert d["usable_budget_bytes"] <= 0.9 * 300 * MIB
    assert d["cores"] >= 1 and d["disk_free_bytes"] > 0


def test_profile_file_round_trips(profiled, tmp_path):
    _, profile, _ = profiled
    profile.save(tmp_path / "p.json")
    again = Profile.load(tmp_path / "p.json")
    assert again.tiers == profile.tiers and again.baseline_bytes == profile.baseline_bytes
    raw = json.loads((tmp_path / "p.json").read_text())   # a model without members writes the file it always did
    assert not any("member" in t for t in raw["tiers"])
    assert not any("skip" in e for e in raw["measurements"] + raw["fits"])


def _refused_when_broken(profile, tmp_path, breakage, message) -> None:
    """The profile saved, broken on disk by `breakage`, and refused on load with `message`."""
    profile.save(tmp_path / "p.json")
    raw = json.loads((tmp_path / "p.json").read_text())
    breakage(raw)
    (tmp_path / "p.json").write_text(json.dumps(raw))
    with pytest.raises(ProfileError, match=message):
        Profile.load(tmp_path / "p.json")


@pytest.mark.parametrize("breakage, message", [
    (lambda r: r.update(format="edgeblock-profile/0"), "format"),
    (lambda r: r.pop("baseline_bytes"), "missing field 'baseline_bytes'"),
    (lambda r: r["tiers"][1].update(batch_size="64"), r"tiers\[1\]: field 'batch_size' must be int"),
    (lambda r: r["tiers"][1].update(usable_bytes=r["tiers"][1]["budget_bytes"] + 1), "exceeds budget_bytes"),
    (lambda r: r["tiers"][1]["stages"][0].update(first=1), r"tiers\[1\].stages\[0\]: covers layers"),
    (lambda r: r["tiers"][1]["stages"][0].update(measured_peak_bytes=-5), "measured_peak_bytes"),
    (lambda r: r["tiers"][0].pop("reason"), r"tiers\[0\]: missing field 'reason'"),
    (lambda r: r["tiers"][2].update(feasible="yes"), "'feasible' must be bool"),
])
def test_malformed_profile_is_rejected_with_the_reason(profiled, tmp_path, breakage, message):
    _, profile, _ = profiled
    _refused_when_broken(profile, tmp_path, breakage, message)


# -- a model family (FedIN): each tier trains the largest member that fits ----------------------------------

FAMILY_BATCHES = [16, 32]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """fmnist_fedin as the coordinator profiles a model when it is given no profile (zoo_profile.measured_profile):
    exported, then every member's part measured at small batches. Its members differ a lot in activation memory:
    1 layer 32 wide, 2 layers 96 wide, 3 layers 192 wide at 32x14x14."""
    from coordinator.model.zoo_profile import measured_profile
    root = tmp_path_factory.mktemp("fedin")
    profile = Profile.load(measured_profile(root, "fmnist_fedin", FAMILY_BATCHES))
    return Manifest.load(root / "model" / "manifest.json"), profile


def test_a_family_profile_measures_every_member_and_larger_members_need_more(family):
    m, profile = family
    last = len(m.layers) - 1
    points = [Measurement(**p) for p in profile.measurements]
    members = {x.name: m.member_skip(x.name) for x in m.members}
    assert sorted((p.skip, p.batch_size) for p in points) == sorted((s, b) for s in members.values()
                                                                      for b in FAMILY_BATCHES)
    assert {(p.first, p.last, p.head) for p in points} == {(0, last, m.final_head.index)}
    assert sorted(tuple(f["skip"]) for f in profile.fits) == sorted(members.values())
    for p in points:   # a member's part trains the extractor, its own layers and the classifier
        own = m.extractor_layers + m.member_of(p.skip).layers
        assert p.param_bytes == sum(m.layers[i].param_bytes for i in own) + m.final_head.param_bytes
        assert p.activation_bytes_per_sample == (sum(m.layers[i].activation_bytes_per_sample for i in own)
                                                 + m.final_head.activation_bytes_per_sample)
    for b in FAMILY_BATCHES:
        peaks = [next(p.peak_bytes for p in points if (p.skip, p.batch_size) == (skip, b))
                 for skip in members.values()]
        assert peaks[0] < peaks[1] < peaks[2], (b, [f"{x / MIB:.0f} MB" for x in peaks])


def test_predict_with_a_member_skip_is_that_members_own_fit(family):
    m, profile = family
    last = len(m.layers) - 1
    predictor = Predictor.from_profile(m, profile)
    for x in m.members:
        part = TrainablePart.member(m, x.name)
        fit = next(CandidateFit(**f) for f in profile.fits if tuple(f["skip"]) == part.skip)
        for b in (8, 16, 24, 64):
            assert predictor.predict(part.span[0], part.span[-1], b, skip=part.skip) == \
                fit.predict(profile.baseline_bytes, b)
    # what was never measured (the whole family, nothing skipped; one member's layers alone) comes from the span
    # model, with the skipped layers left out of its features
    span = predictor.span_model
    for skip in ((), (1, 2, 3, 4, 5)):
        assert predictor.predict(0, last, 32, skip=skip) == span.predict(*span_features(m, 0, last, skip), 32)
    assert span_features(m, 0, last, (1, 2, 3, 4, 5)) < span_features(m, 0, last)
    assert predictor.predict(0, last, 32) == predictor.predict(0, last, 32, skip=())   # callers without skip


def test_each_tier_gets_the_largest_member_that_fits(family, tmp_path):
    m, calibration = family
    predictor = Predictor.from_profile(m, calibration)
    need_mb = {x.name: predictor.predict(0, len(m.layers) - 1, FAMILY_BATCHES[0], skip=m.member_skip(x.name)) / MIB
               for x in m.members}
    budget = lambda usable_mb: int(usable_mb * (1 + MARGIN)) + 1  # noqa: E731
    tiers = [_tier("too-small", budget((calibration.baseline_bytes / MIB + need_mb["small"]) / 2)),
             _tier("between", budget((need_mb["medium"] + need_mb["large"]) / 2)),   # large fits at no batch
             _tier("roomy", 400)]
    lines = []
    profile = run_profile(m.root / "manifest.json", tiers, FAMILY_BATCHES, tmp_path, margin=MARGIN, verify=True,
                          steps=4, log=lines.append)
    too_small, between, roomy = (profile.tier(t.name) for t in tiers)
    assert not too_small.feasible and too_small.member is None
    assert too_small.reason.startswith("the smallest member, small, needs")
    assert (between.member, roomy.member) == ("medium", "large")
    assert roomy.batch_size == FAMILY_BATCHES[-1]
    fits = Predictor.from_profile(m, profile)
    medium = [b for b in FAMILY_BATCHES
              if fits.predict(0, len(m.layers) - 1, b, skip=m.member_skip("medium")) <= between.usable_bytes]
    assert between.batch_size == max(medium)   # the largest batch at which the member fits
    for t in (between, roomy):
        (stage,) = t.stages
        assert (stage.first, stage.last, stage.head) == (0, len(m.layers) - 1, m.final_head.index)
        assert stage.measured_peak_bytes <= t.budget_bytes
    assert any(line.startswith("between: trains member medium") for line in lines)
    assert "member medium, trained whole at batch" in format_profile(profile)
    profile.save(tmp_path / "p.json")
    assert Profile.load(tmp_path / "p.json").tiers == profile.tiers


@pytest.mark.parametrize("breakage, message", [
    (lambda r: r["measurements"][0].update(skip=[1, 9]), r"measurements\[0\]: skip\[1\] must be a layer index"),
    (lambda r: r["fits"][0].update(skip="1"), r"fits\[0\]: field 'skip' must be list"),
    (lambda r: r["fits"][1].update(skip=[2, 2]), "names a layer twice"),
    (lambda r: r["tiers"][0].update(member=3), r"tiers\[0\]: field 'member' must be str"),
    (lambda r: r["tiers"][0]["stages"].append(dict(r["tiers"][0]["stages"][0], first=7, last=7)),
     "trained whole, in one stage"),
    (lambda r: r["tiers"][1].update(feasible=False, reason="no", member="small"),
     "an infeasible tier names no member"),
])
def test_malformed_member_fields_are_rejected(family, tmp_path, breakage, message):
    m, profile = family
    profile.tiers = [TierPlan("t", 500 * MIB, 400 * MIB, True, None, 16,
                              (StagePlan(0, len(m.layers) - 1, m.final_head.index, 100 * MIB),), "large")] * 2
    _refused_when_broken(profile, tmp_path, breakage, message)


def test_a_profile_written_before_members_loads_unchanged(tmp_path):
    old = {"format": "edgeblock-profile/1", "model": "fmnist_cnn", "manifest_sha256": "0" * 64,
           "created": "2026-11-21T07:55:00+00:00", "device": {}, "baseline_bytes": 50 * MIB, "margin": 0.1,
           "measurements": [{"first": 0, "last": 1, "head": 0, "batch_size": b, "peak_bytes": (60 + b) * MIB,
                             "step_seconds": 0.01, "param_bytes": 1000, "activation_bytes_per_sample": 100}
                            for b in (16, 64)],
           "fits": [{"first": 0, "last": 1, "fixed_bytes": 1e7, "per_sample_bytes": 1e6, "max_rel_error": 0.0}],
           "span_model": {"baseline_bytes": 50 * MIB, "per_param_byte": 0.0, "fixed_bytes": 0.0,
                          "per_activation_byte": 0.0, "per_sample_bytes": 0.0, "max_rel_error": 0.0},
           "tiers": [{"tier": "t", "budget_bytes": 200 * MIB, "usable_bytes": 180 * MIB, "feasible": True,
                      "reason": None, "batch_size": 64,
                      "stages": [{"first": 0, "last": 1, "head": 0, "predicted_peak_bytes": 124 * MIB,
                                  "measured_peak_bytes": None, "step_seconds": None}]}]}
    (tmp_path / "old.json").write_text(json.dumps(old))
    profile = Profile.load(tmp_path / "old.json")
    assert profile.tier("t").member is None and profile.tier("t").stages[0].last == 1
    assert Measurement(**profile.measurements[0]).skip == ()
    assert Predictor.from_profile(None, profile).predict(0, 1, 32) == 50 * MIB + 1e7 + 1e6 * 32
    profile.save(tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text())["tiers"] == old["tiers"]


# A board has none of these: the profiler there runs on the graphs its export came with.
BOARD = ("import importlib.abc, runpy, sys\n"
         "class NotOnABoard(importlib.abc.MetaPathFinder):\n"
         "    def find_spec(self, name, path=None, target=None):\n"
         "        if name.split('.')[0] in ('coordinator', 'torch', 'onnx'):\n"
         "            raise ImportError(name + ' is not on this board')\n"
         "sys.meta_path.insert(0, NotOnABoard())\n"
         "sys.argv[0] = 'edge-profile'\n"
         "runpy.run_module('edge_runtime.profiling.profiler', run_name='__main__')\n")


def test_cli_measures_shows_and_plots_on_a_board(tmp_path):
    """`edge-coordinator export` on the coordinator, then `edge-profile measure --manifest` where neither the
    coordinator nor torch nor onnx can import: every part it trains came with the export."""
    exported = tmp_path / "exported"
    made = subprocess.run([sys.executable, "-m", "coordinator.cli", "export", "fmnist_cnn", str(exported)],
                          capture_output=True, text=True, env=device_child_env(), timeout=600)
    assert made.returncode == 0, made.stderr[-2000:]
    repo_profiles = Path(__file__).resolve().parent.parent / "profiles"
    out, png = tmp_path / "profile.json", tmp_path / "profile.png"
    run = subprocess.run([sys.executable, "-c", BOARD, "measure", "--manifest",
                          str(exported / "manifest.json"), "--tiers", str(repo_profiles), "--tier", "generic-256mb",
                          "--tier", "pi-zero-2w", "--batches", "16,32", "--workdir", str(tmp_path / "w"),
                          "--out", str(out), "--plot", str(png)], capture_output=True, text=True,
                         env=device_child_env(), timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "pi-zero-2w: budget" in run.stdout and "[1/" in run.stderr  # a table, and progress while measuring
    profile = Profile.load(out)
    assert [t.tier for t in profile.tiers] == ["generic-256mb", "pi-zero-2w"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    shown = subprocess.run([sys.executable, "-m", "edge_runtime.profiling.profiler", "show", str(out)], capture_output=True,
                           text=True, env=device_child_env())
    assert shown.returncode == 0 and "generic-256mb" in shown.stdout
    bad = subprocess.run([sys.executable, "-m", "edge_runtime.profiling.profiler", "show", str(tmp_path / "missing.json")],
                         capture_output=True, text=True, env=device_child_env())
    assert bad.returncode == 1 and "does not exist" in bad.stderr
