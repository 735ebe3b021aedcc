"""The run report: one self-contained HTML page, and its plots as PNG files, from a run's directory.

`edge-coordinator report WORKDIR` writes WORKDIR/report/report.html. The run is read by
run_data (it works on a finished run and on one still running) and drawn by plots; this
module only lays the page out: templates/report.html, shipped as package data, filled
with `string.Template`, every value escaped on the way in.

The page shows test accuracy per round (against a full-model FedAvg baseline when one
ran: given, or found beside the run), each device's largest measured peak RSS (training
job and agent, stacked) against its whole budget and the job budget it announced, grouped
by tier, bytes to and from the devices per round, which block or layer each device
trained in each round, and the freezing metric per block when the strategy records one.
A plot with nothing to show is left out, a sentence saying why in its place. Its images
are data URIs and it loads nothing else: it can be mailed, archived, or opened on a
machine with no network.
"""
from __future__ import annotations

import base64
import html
import time
from importlib.resources import files
from pathlib import Path
from string import Template

from coordinator.observe.plots import PLOT_NAMES, draw_plots
from coordinator.observe.run_data import (
    MB,
    DeviceRow,
    Run,
    absent_plot_note,
    device_rows,
    find_baseline,
    freezing_note,
    load_run,
    ranges_text,
    round_notes,
    summary_items,
)
from edge_runtime.store import atomic_write_bytes, atomic_write_text

REPORT = "report.html"


class _Markup(str):
    """HTML this module built from escaped values: put into a template as it is."""


def _fill(template: Template, **values) -> _Markup:
    """The template with every value escaped, except the _Markup built here from escaped values."""
    return _Markup(template.substitute(
        {k: v if isinstance(v, _Markup) else html.escape(str(v)) for k, v in values.items()}))


def _page_template() -> Template:
    """The page skeleton, its CSS and its check script: package data, so an installed wheel has it too."""
    return Template((files("coordinator.observe") / "templates" / REPORT).read_text(encoding="utf-8"))


# the pieces the page is assembled from; every $value in them is escaped by _fill
IMG = Template('<img id="img-$name" src="data:image/png;base64,$data" alt="$alt">')
NOTE = Template('<p class="note">$text</p>')
ABSENT = Template('<p class="note" id="no-$name">$text</p>')     # in place of a plot with nothing to show
FREEZING_NOTE = Template('<p class="note" id="freezing-note">$text</p>')
SUMMARY_ROW = Template('<tr><th>$label</th><td id="$key">$text</td></tr>')
DEVICE_HEAD = _Markup(
    "<tr><th>device</th><th>tier</th><th>job budget (MB)</th><th>job peak (MB)</th><th>agent peak (MB)</th>"
    "<th>job + agent, one task (MB)</th><th>device budget (MB)</th><th>job headroom (MB)</th>"
    "<th>trained / scored / failed / idle rounds</th><th>verdict</th></tr>")
DEVICE_ROW = Template('<tr id="device-$device" class="$verdict_class"><td>$device</td><td>$tier</td>$budget'
                      '<td class="num" data-bytes="$job_peak_bytes">$job_peak_mb$peak_round</td>'
                      '$agent_peak$job_plus_agent$device_budget$headroom'
                      '<td class="num">$trained / $scored / $failed / $idle</td><td>$verdict</td></tr>')
MB_CELL = Template('<td class="num" data-bytes="$n">$mb</td>')
NO_MB_CELL = _Markup('<td class="num">-</td>')
ROUND_NOTE = Template("<li>$text</li>")
# what a plot shows, above it (a plot left out takes its caption with it)
ALTS = {"accuracy": "test accuracy per round", "memory": "peak RSS per device", "bytes": "bytes per round",
        "timeline": "stage timeline", "freezing": "freezing metric"}
CAPTIONS = {
    "memory": Template(
        "Bars: each device's largest peak RSS, its training (or scoring) job's VmHWM with its agent's peak in the "
        "same task hatched on top. The solid line is the device's whole budget, everything it runs: its tier's "
        "budget_mb plus the agent reserve. The dashed line is the job budget the device announced: the whole less "
        "the share it keeps for its agent (the shaded band). A device within its budget stays under the solid line, "
        "its job under the dashed one; a device started with its own --budget-mb, or of a tier with no file here, "
        "has only the dashed line: the coordinator does not learn its whole budget. A tick above a bar is the job's "
        "largest peak when another task's was higher. Red: over a budget in some round (the table names them)."),
    "timeline": Template(
        "One column per round: the schedule's stage on top, then each device, grouped by tier. A cell names what "
        "the device trained ($parts); its colour is the lowest $unit of it. S: the device scored its layers (no "
        "weights changed); idle: nothing of this stage fits the device; red: the task failed or was rejected."),
}
CAPTION = Template("<p>$text</p>")


def _img(name: str, png: bytes, alt: str) -> _Markup:
    return _fill(IMG, name=name, data=base64.b64encode(png).decode("ascii"), alt=alt)


def _summary_html(items: list[tuple[str, str, str]]) -> _Markup:
    rows = "".join(_fill(SUMMARY_ROW, label=label, key=key, text=text) for key, label, text in items)
    return _Markup(f'<table class="summary">{rows}</table>')


def _devices_html(devices: list[DeviceRow]) -> _Markup:
    body = "".join(_device_tr(d) for d in devices)
    return _Markup(f'<table id="device-table">{DEVICE_HEAD}{body}</table>')


def _mb_cell(n_bytes: int | None) -> _Markup:
    return NO_MB_CELL if n_bytes is None else _fill(MB_CELL, n=n_bytes, mb=f"{n_bytes / MB:.1f}")


def _device_tr(d: DeviceRow) -> _Markup:
    used = d.job_peak_bytes > 0
    if d.over:
        verdict = "; ".join(
            ([f"job OVER its budget in round(s) {ranges_text(d.over_rounds)}"] if d.over_rounds else [])
            + ([f"job + agent OVER the device budget in round(s) {ranges_text(d.device_over_rounds)}"]
               if d.device_over_rounds else []))
    elif used:
        verdict = "within budget" if d.device_budget_bytes else "job within its budget"
    else:
        verdict = "no task ran"
    headroom = (d.budget_bytes - d.job_peak_bytes) if (d.budget_bytes and used) else None
    return _fill(DEVICE_ROW, device=d.device_id, verdict_class="over" if d.over else "ok", tier=d.tier,
                 budget=_mb_cell(d.budget_bytes), job_peak_bytes=d.job_peak_bytes,
                 job_peak_mb=f"{d.job_peak_bytes / MB:.1f}", peak_round=f" (round {d.job_peak_round})" if used else "",
                 agent_peak=_mb_cell(d.agent_peak_bytes), job_plus_agent=_mb_cell(d.device_peak_bytes),
                 device_budget=_mb_cell(d.device_budget_bytes), headroom=_mb_cell(headroom), trained=d.trained,
                 scored=d.scored, failed=d.failed, idle=d.idle, verdict=verdict)


def _round_notes_html(run: Run) -> _Markup:
    notes = round_notes(run)
    if not notes:
        return _fill(NOTE, text="Every round closed with every task settled." if run.rounds else
                     "No round has closed yet.")
    return _Markup("<ul>" + "".join(_fill(ROUND_NOTE, text=n) for n in notes) + "</ul>")


def _baseline_note(run: Run, baseline: Run | None) -> _Markup:
    if baseline is not None:
        return _Markup("")
    if run.strategy == "fedavg":
        return _fill(NOTE, text="This run is the full-model FedAvg baseline.")
    return _fill(NOTE, text="No full-model FedAvg baseline: none was given (--baseline DIR) and none of the same "
                            "model, evaluation and fleet was found beside this run.")


def _figure(name: str, run: Run, images: dict[str, bytes], **caption) -> _Markup:
    """A plot with its caption, or the sentence saying why it has nothing to show."""
    if name not in images:
        return _fill(ABSENT, name=name, text=absent_plot_note(name, run))
    text = _fill(CAPTION, text=CAPTIONS[name].substitute(caption)) if name in CAPTIONS else _Markup("")
    return _Markup(text + _img(name, images[name], ALTS[name]))


def render(run: Run, baseline: Run | None, devices: list[DeviceRow], images: dict[str, bytes]) -> str:
    """The page: summary, then one section per plot, the devices' table and the rounds worth a note."""
    note = freezing_note(run) if "freezing" in images else None    # without its plot the note stands in for it
    progressive = run.strategy == "progressive"
    return _fill(
        _page_template(),
        title=f"edgeblock run report: {run.strategy} on {run.model} ({run.workdir.parent.name}/{run.workdir.name})",
        workdir=run.workdir, made_at=time.strftime("%Y-%m-%d %H:%M:%S"),
        summary=_summary_html(summary_items(run, baseline, devices)),
        baseline_note=_baseline_note(run, baseline) if run.rounds else _Markup(""),
        device_table=_devices_html(devices),
        fig_accuracy=_figure("accuracy", run, images), fig_memory=_figure("memory", run, images),
        fig_bytes=_figure("bytes", run, images),
        fig_timeline=_figure("timeline", run, images,
                             parts="blocks, b1-2 = blocks 1 and 2" if progressive else "layers; +h = and the head",
                             unit="block" if progressive else "layer"),
        freezing_note=_fill(FREEZING_NOTE, text=note) if note else _Markup(""),
        fig_freezing=_figure("freezing", run, images),
        round_notes=_round_notes_html(run))


def write_report(workdir, out_dir=None, baseline=None) -> Path:
    """Write report.html (plots inline) and the plots as PNGs into out_dir (default WORKDIR/report).

    baseline: another run's directory to compare accuracy with; None looks for a comparable
    full-model FedAvg run beside this one; False compares with nothing.
    """
    run = load_run(Path(workdir))
    if baseline is None:
        found = find_baseline(run)
        base = load_run(found) if found else None
    else:
        base = load_run(Path(baseline)) if baseline else None
    out = Path(out_dir) if out_dir else run.workdir / "report"
    out.mkdir(parents=True, exist_ok=True)
    devices = device_rows(run)
    images = draw_plots(run, base, devices)
    for name, png in images.items():
        atomic_write_bytes(out / f"{name}.png", png)
    for name in set(PLOT_NAMES) - images.keys():    # a plot this run no longer has must not sit beside the page
        (out / f"{name}.png").unlink(missing_ok=True)
    page = out / REPORT
    atomic_write_text(page, render(run, base, devices, images))
    return page
