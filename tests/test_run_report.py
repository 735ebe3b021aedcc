"""The run report, built from a real federated run: a real Mosquitto, the coordinator service
and two device agents as processes (one of them too small for whole-model training), a
short progressive run with the freezing window shortened so the metric has values, and a
full-model FedAvg baseline beside it. The page's numbers are checked against metrics.jsonl,
and headless Chromium must render every image of it without fetching anything.
"""
import json
import re
import shutil
import sqlite3
import subprocess
import time
from html.parser import HTMLParser

import pytest
from fleet_helpers import LocalFleet, fleet_specs, read_metrics, settings

from coordinator.observe.run_report import write_report
from coordinator.ops.broker import EmbeddedBroker

PLOTS = {"accuracy", "memory", "bytes", "timeline", "freezing"}


def _settings(work, profile, strategy):
    s = settings(work, profile, strategy, min_devices=2, eval_samples=2000)
    # two rounds per block and a window of two: every block logs one effective movement
    s["progressive"] = {"shrink_rounds": 0, "min_rounds_per_block": 2, "max_rounds_per_block": 2,
                        "max_extra_blocks": 1, "freeze_window": 2, "freeze_threshold": 0.8, "freeze_patience": 1}
    s["fedavg"] = {"rounds": 2}
    return s


def _run(root, broker, profile, specs, strategy, during=None):
    """One run to its end in root/<strategy>/coordinator; `during(workdir)` is called while it goes on."""
    work = root / strategy
    with LocalFleet(work, broker.url, fleet=f"report-{strategy}") as fleet:
        fleet.start_run(_settings(work / "coordinator", profile, strategy), specs)
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
    from coordinator.model.zoo_profile import measured_profile
    root = tmp_path_factory.mktemp("report")
    measured_profile(root / "measured", "fmnist_cnn", [32, 64])
    specs = fleet_specs(root / "data", samples=3000, alpha=0.5, small=1, big=1)
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
    assert metrics[-1]["finished"] and len(metrics) == 8
    page_path = write_report(work)
    assert page_path == work / "report" / "report.html"
    page = _Page(page_path.read_text())
    last, best = metrics[-1], max(metrics, key=lambda m: m["accuracy"])
    assert page.text["final-accuracy"] == f"{_pct(last['accuracy'])} (round {last['round']})"
    assert page.text["best-accuracy"] == f"{_pct(best['accuracy'])} (round {best['round']})"
    assert page.text["rounds"] == "8" and page.text["state"] == "finished"
    assert page.text["model"] == "fmnist_cnn" and page.text["strategy"] == "progressive"
    # the FedAvg run next to it was found and is the baseline
    assert page.text["baseline-accuracy"].startswith(f"{_pct(baseline[-1]['accuracy'])} after 2 rounds of fedavg")
    assert page.text["updates"].startswith(f"{sum(m['updates'] for m in metrics)} accepted, "
                                           f"{sum(m['rejected'] for m in metrics)} rejected, "
                                           f"{sum(m['failed'] for m in metrics)} failed")
    # every device, with the budget it announced, its largest measured peaks, and red only when a job was over
    rows = [(m["round"], d, r) for m in metrics for d, r in m["devices"].items()]
    assert sorted(page.rows) == sorted({d for _, d, _ in rows}) == ["big-0", "small-0"]
    for device, row in page.rows.items():
        mine = [r for _, d, r in rows if d == device]
        budget, job, agent = (int(row["cells"][i]["data-bytes"]) for i in (2, 3, 4))
        assert budget == mine[-1]["budget_bytes"]
        assert job == max(r["peak_rss_bytes"] for r in mine)
        assert agent == max(r["agent_peak_rss_bytes"] for r in mine)
        over = any(r["peak_rss_bytes"] > r["budget_bytes"] for r in mine)
        assert row["class"] == ("over" if over else "ok")
    assert page.text["devices-per-tier"] == "pi-zero-2w: 1 (big-0); small-140mb: 1 (small-0)"
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
    kind, series, threshold = freezing_series(load_run(runs["progressive"]))
    logged = {(m["stage"]["block"], m["round"], m["schedule"]["effective_movement"]) for m in metrics}
    assert kind == "block" and threshold == 0.8
    assert {(b, r, v) for b, pts in series.items() for r, v in pts} == logged
    assert sorted(series) == [0, 1, 2, 3] and all(v is not None for pts in series.values() for _, v in pts[1:])
    page = _Page(write_report(runs["fedavg"]).read_text())
    assert "not recorded for this strategy (fedavg)" in page.text["freezing-note"]
    assert {i["id"] for i in page.imgs} == {"img-" + p for p in PLOTS - {"freezing"}}
    assert not (runs["fedavg"] / "report" / "freezing.png").exists()


def test_a_report_made_while_the_run_went_on(runs):
    live = runs["live"]
    assert "page" in live, "the run ended before a report could be made during it"
    page = _Page(live["page"].read_text())
    before, after = live["closed"]
    assert before <= int(page.text["rounds"]) <= after
    assert page.text["state"].startswith("in progress"), page.text["state"]
    assert page.text["devices-per-tier"] == "pi-zero-2w: 1 (big-0); small-140mb: 1 (small-0)"


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
