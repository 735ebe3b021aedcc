"""The run report, built from a real federated run: a real Mosquitto, the coordinator service
and two device agents as processes (a 256 MB board with its tier's budget, as a flashed one
runs, too small for whole-model training; and a larger one given a budget of its own), a
short progressive run with the freezing window shortened so the metric has values (on a
validation set of training images no device holds), and a
full-model FedAvg baseline beside it. The page's numbers are checked against metrics.jsonl, the memory
chart's data against the devices' budgets, and headless Chromium must render every image
of it without fetching anything.
"""
import json
import re
import shutil
import sqlite3
import subprocess
import time
from dataclasses import replace
from html.parser import HTMLParser

import pytest
from fleet_helpers import MB, LocalFleet, fleet_specs, read_metrics, settings

from coordinator.observe.plots import memory_bars
from coordinator.observe.run_data import device_rows, load_run
from coordinator.observe.run_report import write_report
from coordinator.ops.broker import EmbeddedBroker
from edge_runtime.device.tiers import find_tier

PLOTS = {"accuracy", "memory", "bytes", "timeline", "freezing"}
SMALL_TIER = "generic-256mb"
TIERS_TEXT = f"{SMALL_TIER}: 1 (small-0); pi-zero-2w: 1 (big-0)"


def _settings(work, profile, strategy, validation):
    s = settings(work, profile, strategy, min_devices=2, eval_samples=2000, validation_data=str(validation),
                 validation_samples=1000)
    # three rounds per block and a window of three: every block logs one slope (its third round's)
    s["progressive"] = {"shrink_rounds": 0, "min_rounds_per_block": 3, "max_rounds_per_block": 3,
                        "max_extra_blocks": 1, "freeze_window": 3, "freeze_threshold": 0.8, "freeze_patience": 1}
    s["fedavg"] = {"rounds": 2}
    return s


def _run(root, broker, profile, specs, strategy, during=None):
    """One run to its end in root/<strategy>/coordinator; `during(workdir)` is called while it goes on."""
    work = root / strategy
    with LocalFleet(work, broker.url, fleet=f"report-{strategy}") as fleet:
        fleet.start_run(_settings(work / "coordinator", profile, strategy, root / "validation"), specs)
        proc, deadline = fleet.procs["coordinator"], time.monotonic() + 600
        while proc.poll() is None:
            assert time.monotonic() < deadline, fleet.log_tail("coordinator")
            if during is not None:
                during(work / "coordinator")
            time.sleep(0.5)
        assert proc.returncode == 0, fleet.log_tail("coordinator")
    return work / "coordinator"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A finished progressive run, a FedAvg run beside it, and a report made while the progressive one ran."""
    from coordinator.local.data import write_validation_data
    from coordinator.model.zoo_profile import measured_profile
    root = tmp_path_factory.mktemp("report")
    measured_profile(root / "measured", "fmnist_cnn", [32, 64])
    specs = fleet_specs(root / "data", samples=3000, alpha=0.5, small=1, big=1)
    write_validation_data(root / "validation", samples=3000, count=1000)
    # the small device is a 256 MB board with its tier's budget (the coordinator can tell its whole budget: 96 MB for
    # jobs + 48 MB for the agent); the big one has a budget of its own (296 MB: the coordinator cannot tell it)
    specs = [replace(s, tier=SMALL_TIER, budget_mb=None) if s.device_id.startswith("small") else s for s in specs]
    live = {}

    def report_mid_run(work):
        if "page" not in live and len(read_metrics(work)) >= 2:
            before = len(read_metrics(work))
            live["page"] = write_report(work, out_dir=root / "live", baseline=False)
            live["closed"] = (before, len(read_metrics(work)))

    with EmbeddedBroker(root / "broker") as broker:
        progressive = _run(root, broker, root / "measured" / "profile.json", specs, "progressive", during=report_mid_run)
        fedavg = _run(root, broker, root / "measured" / "profile.json", specs, "fedavg")
    return {"root": root, "progressive": progressive, "fedavg": fedavg, "live": live}


class _Page(HTMLParser):
    """The parts of the page the tests read: texts by element id, table rows by id, images."""

    def __init__(self, text: str):
        super().__init__()
        self.text, self.rows, self.imgs, self.cells, self._id, self._row = {}, {}, [], {}, None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a)
        if tag == "tr" and a.get("id", "").startswith("device-"):
            self._row = a["id"].removeprefix("device-")
            self.rows[self._row] = {"class": a.get("class"), "cells": []}
        elif tag == "td" and self._row is not None:
            self.rows[self._row]["cells"].append(a)
        if a.get("id"):
            self._id = a["id"]
            self.text[self._id] = ""

    def handle_endtag(self, tag):
        if tag == "tr":
            self._row = None
        self._id = None

    def handle_data(self, data):
        if self._id is not None:
            self.text[self._id] += data


def _pct(x):
    return f"{100 * x:.2f}%"


def test_report_numbers_match_the_metrics_file(runs):
    work = runs["progressive"]
    metrics, baseline = read_metrics(work), read_metrics(runs["fedavg"])
    assert metrics[-1]["finished"] and len(metrics) == 12
    page_path = write_report(work)
    assert page_path == work / "report" / "report.html"
    page = _Page(page_path.read_text())
    last, best = metrics[-1], max(metrics, key=lambda m: m["accuracy"])
    assert page.text["final-accuracy"] == f"{_pct(last['accuracy'])} (round {last['round']})"
    assert page.text["best-accuracy"] == f"{_pct(best['accuracy'])} (round {best['round']})"
    assert page.text["rounds"] == "12" and page.text["state"] == "finished"
    assert page.text["model"] == "fmnist_cnn" and page.text["strategy"] == "progressive"
    # the FedAvg run next to it was found and is the baseline
    assert page.text["baseline-accuracy"].startswith(f"{_pct(baseline[-1]['accuracy'])} after 2 rounds of fedavg")
    assert page.text["updates"].startswith(f"{sum(m['updates'] for m in metrics)} accepted, "
                                           f"{sum(m['rejected'] for m in metrics)} rejected, "
                                           f"{sum(m['failed'] for m in metrics)} failed")
    # every device, with the budget it announced, its largest measured peaks, and red only when a job was over
    rows = [(m["round"], d, r) for m in metrics for d, r in m["devices"].items()]
    assert sorted(page.rows) == sorted({d for _, d, _ in rows}) == ["big-0", "small-0"]
    whole = {"small-0": find_tier(SMALL_TIER).device_budget_bytes, "big-0": None}
    for device, row in page.rows.items():
        mine = [r for _, d, r in rows if d == device]
        budget, job, agent, both = (int(row["cells"][i]["data-bytes"]) for i in (2, 3, 4, 5))
        assert budget == mine[-1]["budget_bytes"]
        assert job == max(r["peak_rss_bytes"] for r in mine)
        assert agent == max(r["agent_peak_rss_bytes"] for r in mine)
        assert both == max(r["peak_rss_bytes"] + r["agent_peak_rss_bytes"] for r in mine)
        assert row["cells"][6].get("data-bytes") == (str(whole[device]) if whole[device] else None)
        over = any(r["peak_rss_bytes"] > r["budget_bytes"] for r in mine) or \
            bool(whole[device] and both > whole[device])
        assert row["class"] == ("over" if over else "ok")
    assert page.text["devices-per-tier"] == TIERS_TEXT
    # every plot is embedded and written next to the page, byte for byte the same
    import base64
    assert {i["id"].removeprefix("img-") for i in page.imgs} == PLOTS
    for img in page.imgs:
        png = (work / "report" / (img["id"].removeprefix("img-") + ".png")).read_bytes()
        assert img["src"] == "data:image/png;base64," + base64.b64encode(png).decode()
        assert png.startswith(b"\x89PNG")


def test_the_freezing_metric_is_the_schedules_and_absent_for_fedavg(runs):
    from coordinator.observe.run_data import freezing_series, load_run
    metrics = read_metrics(runs["progressive"])
    kind, series, threshold, metric = freezing_series(load_run(runs["progressive"]))
    logged = {(m["stage"]["block"], m["round"], m["schedule"]["accuracy_slope"]) for m in metrics}
    assert kind == "block" and threshold == 0.8 and metric == "accuracy_slope"
    assert {(b, r, v) for b, pts in series.items() for r, v in pts} == logged
    assert sorted(series) == [0, 1, 2, 3] and all(v is not None for pts in series.values() for _, v in pts[2:])
    # what the slope is fitted to: the stage's accuracy on the validation set, measured every round
    assert all(0.0 <= m["schedule"]["validation_accuracy"] <= 1.0 for m in metrics)
    page = _Page(write_report(runs["fedavg"]).read_text())
    assert "not recorded for this strategy (fedavg)" in page.text["no-freezing"]
    assert {i["id"] for i in page.imgs} == {"img-" + p for p in PLOTS - {"freezing"}}
    assert not (runs["fedavg"] / "report" / "freezing.png").exists()


def test_a_report_made_while_the_run_went_on(runs):
    live = runs["live"]
    assert "page" in live, "the run ended before a report could be made during it"
    page = _Page(live["page"].read_text())
    before, after = live["closed"]
    assert before <= int(page.text["rounds"]) <= after
    assert page.text["state"].startswith("in progress"), page.text["state"]
    assert page.text["devices-per-tier"] == TIERS_TEXT


def test_a_truncated_last_line_and_a_locked_store_do_not_stop_the_report(runs, tmp_path):
    work = tmp_path / "coordinator"
    (work / "model").mkdir(parents=True)
    shutil.copy(runs["progressive"] / "model" / "manifest.json", work / "model" / "manifest.json")
    shutil.copy(runs["progressive"] / "state.db", work / "state.db")
    lines = (runs["progressive"] / "metrics.jsonl").read_text().splitlines()
    (work / "metrics.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    lock = sqlite3.connect(work / "state.db", isolation_level=None)
    lock.execute("PRAGMA locking_mode=EXCLUSIVE")
    lock.execute("BEGIN EXCLUSIVE")
    lock.execute("INSERT OR REPLACE INTO meta VALUES ('lock', '1')")   # holds the write lock until rollback
    try:
        t0 = time.monotonic()
        page = _Page(write_report(work, out_dir=tmp_path / "out", baseline=False).read_text())
        assert time.monotonic() - t0 < 60
    finally:
        lock.rollback()
        lock.close()
    second_last = json.loads(lines[-2])
    assert page.text["rounds"] == str(len(lines) - 1)
    assert page.text["final-accuracy"].startswith(_pct(second_last["accuracy"]))
    assert sorted(page.rows) == ["big-0", "small-0"]
    assert len(page.imgs) == len(PLOTS)
    assert "1 line(s) of metrics.jsonl could not be read" in (tmp_path / "out" / "report.html").read_text()


def _copy_run(src, dst, lines):
    """A run directory like src's (its manifest and state store) whose metrics.jsonl holds these lines."""
    (dst / "model").mkdir(parents=True)
    shutil.copy(src / "model" / "manifest.json", dst / "model" / "manifest.json")
    shutil.copy(src / "state.db", dst / "state.db")
    (dst / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    return dst


def _worst_task(metrics, device):
    """The device's accepted task whose job + agent peak was the largest."""
    tasks = [m["devices"][device] for m in metrics if m["devices"].get(device, {}).get("status") == "accepted"]
    return max(tasks, key=lambda r: r["peak_rss_bytes"] + r["agent_peak_rss_bytes"])


def test_the_memory_chart_holds_each_device_to_its_whole_budget(runs, tmp_path):
    """Within budget: the 256 MB board's job + agent rises above its job budget (96 MB), never its whole (144 MB)."""
    work = runs["progressive"]
    metrics = read_metrics(work)
    bars = {b.device_id: b for b in memory_bars(device_rows(load_run(work)))}
    small, big = bars["small-0"], bars["big-0"]
    tier = find_tier(SMALL_TIER)
    assert small.device_budget_mb == tier.device_budget_bytes / MB == tier.budget_mb + 48
    assert big.device_budget_mb is None          # started with a budget of its own: the coordinator cannot tell it
    for b in bars.values():
        worst = _worst_task(metrics, b.device_id)
        assert (b.job_mb, b.agent_mb) == (worst["peak_rss_bytes"] / MB, worst["agent_peak_rss_bytes"] / MB)
        assert b.job_budget_mb == metrics[-1]["devices"][b.device_id]["budget_bytes"] / MB
        assert b.job_mb <= b.job_peak_mb <= b.job_budget_mb and not b.over
    # what was drawn as over budget: the stack passes the job budget, yet the device kept within its whole budget
    assert small.job_budget_mb < small.top_mb <= small.device_budget_mb
    assert 40 <= small.device_budget_mb - small.job_budget_mb <= 56      # the agent's share: its RSS + 8 MB
    page = _Page(write_report(work, out_dir=tmp_path, baseline=False).read_text())
    assert page.rows["small-0"]["class"] == "ok" and "img-memory" in {i["id"] for i in page.imgs}


def test_a_device_over_a_budget_is_drawn_above_it_and_named(runs, tmp_path):
    """Over budget, from the real run's rounds: in round 3 the board's agent grew past its share (job + agent over
    the whole budget), and the big device's job passed its job budget (what its hard limit should never allow)."""
    metrics = read_metrics(runs["progressive"])
    edited = json.loads(json.dumps(metrics))
    small, big = (edited[2]["devices"][d] for d in ("small-0", "big-0"))
    assert small["status"] == big["status"] == "accepted"
    whole = find_tier(SMALL_TIER).device_budget_bytes
    small["agent_peak_rss_bytes"] = whole - small["peak_rss_bytes"] + 4 * MB
    big["peak_rss_bytes"] = big["budget_bytes"] + 2 * MB
    work = _copy_run(runs["progressive"], tmp_path / "over", edited)
    bars = {b.device_id: b for b in memory_bars(device_rows(load_run(work)))}
    assert bars["small-0"].over and bars["small-0"].top_mb == pytest.approx(whole / MB + 4)
    assert bars["small-0"].top_mb > bars["small-0"].device_budget_mb
    assert bars["big-0"].over and bars["big-0"].job_mb > bars["big-0"].job_budget_mb
    page = _Page(write_report(work, baseline=False).read_text())
    assert page.rows["small-0"]["class"] == page.rows["big-0"]["class"] == "over"
    html = (work / "report" / "report.html").read_text()
    assert "job + agent OVER the device budget in round(s) 3" in html and "job OVER its budget in round(s) 3" in html
    assert "img-memory" in {i["id"] for i in page.imgs}


def test_a_plot_with_nothing_to_show_is_left_out_and_the_page_says_why(runs, tmp_path):
    """Nothing froze: the run's first round, before any block trained its window; no round at all: no plot."""
    metrics = read_metrics(runs["progressive"])
    first = [m for m in metrics[:1] if m["schedule"].get("accuracy_slope") is None]
    assert first, "the run's first round already has a freezing value"
    page = _Page(write_report(_copy_run(runs["progressive"], tmp_path / "first", first), baseline=False).read_text())
    assert {i["id"].removeprefix("img-") for i in page.imgs} == PLOTS - {"freezing"}
    assert page.text["no-freezing"].startswith("No block froze yet: the freezing metric has a value only once a "
                                               "block has trained its window of 3 rounds")
    assert not (tmp_path / "first" / "report" / "freezing.png").exists()
    # the whole run has values: the plot is there, with a note only when no value went under the threshold
    series = [m["schedule"]["accuracy_slope"] for m in metrics]
    page = _Page(write_report(runs["progressive"], out_dir=tmp_path / "whole", baseline=False).read_text())
    assert "img-freezing" in {i["id"] for i in page.imgs} and "no-freezing" not in page.text
    froze = any(v is not None and v < 0.8 for v in series)
    assert ("freezing-note" in page.text) != froze, (series, page.text.get("freezing-note"))
    # no round closed yet: every plot says why in its place, and no empty frame is drawn
    page = _Page(write_report(_copy_run(runs["progressive"], tmp_path / "none", []), baseline=False).read_text())
    assert page.imgs == []
    assert {k.removeprefix("no-") for k in page.text if k.startswith("no-")} == PLOTS
    assert page.text["no-accuracy"] == "No round has closed yet: this plot appears after the first one."
    assert not list((tmp_path / "none" / "report").glob("*.png"))


def test_edge_coordinator_report_prints_the_page(runs, tmp_path, capsys):
    from coordinator.cli import main as cli
    assert cli(["report", str(runs["progressive"]), "--baseline", str(runs["fedavg"]),
                "--out", str(tmp_path / "r")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "r" / "report.html")
    assert cli(["report", str(tmp_path / "nothing")]) == 2


def _chromium(page, tmp_path, name):
    """Load a page in headless Chromium: (the <body> attributes after load, the URLs the page itself requested).

    Its network log tells the page's requests (initiator: the page's origin, "null" for a
    file) from the browser's own (component updates and the like: "not an origin"); host
    names resolve to nothing, so none of them leaves the machine.
    """
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is needed (tools/bootstrap.sh installs it)"
    netlog = tmp_path / f"{name}.netlog.json"
    out = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update",
                          "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={tmp_path / name}",
                          f"--log-net-log={netlog}", "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    body = re.search(r"<body([^>]*)>", out.stdout)
    assert body, out.stderr[-2000:]
    log = json.loads(netlog.read_text())
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    requested = [e["params"]["url"] for e in log["events"] if e["type"] == start
                 and "url" in e.get("params", {}) and e["params"].get("initiator") != "not an origin"]
    return dict(re.findall(r'(data-[\w-]+)="(\d+)"', body.group(1))), requested


def test_headless_chromium_renders_every_image_and_fetches_nothing(runs, tmp_path):
    page = write_report(runs["progressive"], out_dir=tmp_path / "page")
    html = page.read_text()
    imgs = _Page(html).imgs
    assert len(imgs) == len(PLOTS) and all(i["src"].startswith("data:image/png;base64,") for i in imgs)
    assert not re.search(r"""\b(src|href)\s*=\s*(?!["']?data:)""", html), "the page refers to another file"
    attrs, requested = _chromium(page, tmp_path, "report")
    assert attrs.get("data-images") == str(len(PLOTS)), attrs
    assert attrs["data-images-rendered"] == str(len(PLOTS))
    assert attrs["data-resources-fetched"] == "0"
    assert requested == []
    # the check sees a page's requests: a page with an image and a style sheet on a closed loopback port
    control = tmp_path / "control.html"
    control.write_text('<!DOCTYPE html><html><body><img src="http://127.0.0.1:9/a.png">'
                       '<link rel="stylesheet" href="http://127.0.0.1:9/b.css"></body></html>')
    assert sorted(_chromium(control, tmp_path, "control")[1]) == ["http://127.0.0.1:9/a.png",
                                                                   "http://127.0.0.1:9/b.css"]
