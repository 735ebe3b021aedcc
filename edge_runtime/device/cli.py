"""edge-device: the agent a board runs to train its share of each federated round.

It connects to the fleet's MQTT broker, announces the device and the memory budget its
training jobs get, then takes tasks one at a time: fetch only the blobs it lacks,
lay them out as a model, fit the job into the budget by measuring (calibration runs in
child processes; the chosen micro-batch is cached per model part), train in a
memory-limited child, send the update in chunks and wait until the coordinator
acknowledges it. Everything is kept in a state directory and survives kill -9: a
restarted agent resumes the interrupted task, the trainer resumes from its checkpoint,
and an update already prepared is only sent again.

This process never imports onnxruntime or torch: training runs in child processes, so
the agent stays small (about 40 MB), and its own memory is subtracted from the budget
announced for jobs, because every process a device runs counts.
"""
from __future__ import annotations

import argparse
import logging
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

from edge_runtime import logs, systemd
from edge_runtime.device.agent import Agent, budgeted_jobs, job_budget_bytes
from edge_runtime.device.settings import DEFAULTS, ConfigError, DeviceConfig, load_settings, resolve
from edge_runtime.memory import current_rss_bytes, size_text
from edge_runtime.wire.mqtt_link import BrokerRefused, MqttLink
from edge_runtime.wire.protocol import Status

log = logging.getLogger("edge_runtime.device")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that even a blocking wait for a training child is left at once."""


def connect(cfg: DeviceConfig, stop: threading.Event) -> MqttLink | None:
    """Connect, retrying with backoff until connect_timeout_s: a board often boots before its network."""
    t = cfg.topics
    deadline = time.monotonic() + cfg.connect_timeout_s
    delay = 1.0
    while True:
        link = MqttLink(f"edge-device-{cfg.device_id}", cfg.host, cfg.port,
                        subscriptions=[(t.device(cfg.device_id, kind), 1) for kind in ("task", "blob", "ack")]
                        + [(t.coordinator_status, 1)],
                        will=(t.device(cfg.device_id, "status"), Status("offline").encode()),
                        security=cfg.security)
        try:
            return link.start(timeout_s=max(1.0, min(5.0, deadline - time.monotonic())))
        except BrokerRefused as exc:  # a refused login or an untrusted certificate: no retry can help
            log.error("%s", exc)
            return None
        except ConnectionError as exc:
            left = deadline - time.monotonic()
            if left <= 0 or stop.is_set():
                log.error("%s; gave up after %.0f s", exc, cfg.connect_timeout_s)
                return None
            log.warning("%s; retrying in %.0f s", exc, min(delay, left))
            stop.wait(min(delay, left))
            delay = min(delay * 2, 30.0)


def _stop_jobs() -> None:
    """Kill a training job still running (the agent is leaving): its trainer resumes from its checkpoint.

    Only job children (edge_runtime.jobs.worker): the process may run other children of its own.
    """
    import psutil
    for child in psutil.Process().children(recursive=True):
        try:
            if "edge_runtime.jobs.worker" in child.cmdline():
                child.kill()
        except psutil.Error:
            pass


def refuse(problem: object) -> int:
    """Bad settings: one line on stderr, as every edgeblock command says it, and exit code 2 (not restarted)."""
    print(f"edge-device: {problem}", file=sys.stderr)
    return 2


def run_agent(settings: dict, stop: threading.Event | None = None) -> int:
    """Run the agent until `stop` is set, SIGTERM or Ctrl-C. Exit code: 0 stopped (SIGTERM), 1 no broker,
    2 bad settings, 130 Ctrl-C."""
    stop = stop or threading.Event()
    try:
        cfg = resolve(settings)
    except ConfigError as exc:
        return refuse(exc)
    link = None
    try:
        link = connect(cfg, stop)
        if link is None:
            return 1
        # started up (modules loaded, the network thread running), plus room to grow while working
        job_budget = job_budget_bytes(cfg.budget_bytes, current_rss_bytes())
        agent_share = cfg.budget_bytes - job_budget
        if job_budget <= 0:
            return refuse(f"a budget of {size_text(cfg.budget_bytes)} leaves nothing for training beside the "
                          f"agent's own {size_text(agent_share)}")
        log.info("device %s (tier %s): budget %s = jobs %s + agent %s; state in %s", cfg.device_id, cfg.tier,
                 size_text(cfg.budget_bytes), size_text(job_budget), size_text(agent_share), cfg.state)
        jobs = budgeted_jobs(cfg, job_budget)
        if cfg.job_python:
            log.info("training jobs start with: %s", shlex.join(cfg.job_python))
        agent = Agent(cfg, link, jobs, stop)
        # connected and about to serve: a Type=notify unit's start is complete
        systemd.notify("READY=1", f"STATUS=device {cfg.device_id} (tier {cfg.tier}) connected to "
                                  f"{cfg.host}:{cfg.port}")
        agent.serve()
        return 0
    except ConfigError as exc:
        return refuse(exc)
    except KeyboardInterrupt as exc:  # maybe raised mid-job (the stop event only acts between jobs)
        log.info("stopping (%s)", "SIGTERM" if isinstance(exc, Terminated) else "interrupted")
        _stop_jobs()
        return 0 if isinstance(exc, Terminated) else 130
    finally:
        stop.set()
        systemd.notify("STOPPING=1")
        if link is not None:
            link.stop(final=(cfg.topics.device(cfg.device_id, "status"), Status("offline", at=time.time()).encode()))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edge-device", formatter_class=argparse.RawDescriptionHelpFormatter, description=__doc__,
        epilog="""examples:
  edge-device --id pi-01 --tier pi-zero-2w --broker mqtt://coordinator.lan:1883 --data /srv/edge/data
  edge-device --config /etc/edge-device.toml          # settings in a [device] table; flags win
  edge-device --id pi-01 --broker 10.0.0.5 --data data --budget-mb 300 --log-level debug
  edge-device --id pi-01 --broker mqtts://broker.lan --password-file pw.txt --tls-ca ca.crt --data data
                                        # TLS on port 8883, logged in as user pi-01 (its id)

/etc/edge-device.toml:
  [device]
  id = "pi-01"
  tier = "pi-zero-2w"          # profiles/<tier>.toml gives the default budget
  broker = "mqtt://coordinator.lan:1883"
  data = "/srv/edge/data"      # inputs.npy (float32) + labels.npy (int64)
  state = "/var/lib/edge-device"

A production broker (docs/broker.md) takes broker = "mqtts://broker.lan" (TLS, port
8883), tls_ca = "/etc/edge-device/ca.crt" and password_file = "/etc/edge-device/password"
(mode 600, the password on its first line); the user name is the device id.

The budget announced to the coordinator is what training jobs get: the device budget
less this agent's own memory. State (blobs, caches, checkpoints, the current task)
lives in --state; stop the agent at any time and start it again to resume.
Exit codes: 0 stopped (SIGTERM), 1 no broker within --connect-timeout, or it refused the
login or its certificate is not trusted, 2 bad settings (a line on stderr that starts with
`edge-device: `), 130 Ctrl-C. Under systemd (Type=notify) it reports ready once connected.""")
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="TOML file with a [device] table (keys as the flags, with _)")
    p.add_argument("--id", help="this device's id (letters, digits, '_', '.', '-'); required")
    p.add_argument("--tier", help="tier name (profiles/<tier>.toml) or a tier file; default 'custom' (no file, "
                                  "the budget measured); another name without a file needs --budget-mb")
    p.add_argument("--fleet", help="fleet name, the topic prefix edgeblock/v1/<fleet>/ (default 'default')")
    p.add_argument("--broker", metavar="URL",
                   help="the coordinator's broker, mqtt://host:port or mqtts://host:port (TLS, port 8883); required")
    p.add_argument("--data", metavar="DIR",
                   help="local training data: a directory with inputs.npy (float32, N x the model's input shape) "
                        "and labels.npy (int64 class indices, N); required. Checked against each task's model "
                        "whenever the files change: bad data fails each task with a reason naming the rows")
    p.add_argument("--state", metavar="DIR", help="state directory (default device-state/<id>)")
    p.add_argument("--budget-mb", type=float, metavar="MB",
                   help="memory for agent and jobs together (0 = the tier's, else measured); capped by what is free")
    p.add_argument("--margin", type=float, help="safety margin over a job's measured peak (default 0.10)")
    p.add_argument("--threads", type=int, help="onnxruntime threads per job (0 = the task's setting or the default)")
    p.add_argument("--ack-timeout", dest="ack_timeout_s", type=float, metavar="S",
                   help="seconds to wait for the coordinator's ack before sending again (default 30)")
    p.add_argument("--connect-timeout", dest="connect_timeout_s", type=float, metavar="S",
                   help="seconds to keep trying the broker at start-up (default 60)")
    p.add_argument("--username", help="broker user name (default with --password-file: the device id, "
                                      "which a production broker's ACL expects)")
    p.add_argument("--password-file", metavar="FILE",
                   help="file whose first line is the broker password (a password is never a flag)")
    p.add_argument("--tls", action="store_true", default=None, help="TLS even without an mqtts:// address")
    p.add_argument("--tls-ca", metavar="FILE", help="CA certificate (PEM) the broker's certificate must chain to")
    p.add_argument("--tls-cert", metavar="FILE", help="client certificate (PEM), for a broker that asks for one")
    p.add_argument("--tls-key", metavar="FILE", help="the client certificate's unencrypted key (PEM)")
    p.add_argument("--job-python", metavar="COMMAND",
                   help="the command that starts a training job's interpreter, split like a shell's words "
                        "(default: the interpreter running this agent); for a board whose Python must be "
                        "started through a wrapper, e.g. an aarch64 userland under qemu user mode "
                        "without binfmt_misc: --job-python /opt/a64/venv/bin/python (a launcher script)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    flags = {key: getattr(args, key) for key in DEFAULTS}
    try:
        settings = load_settings(args.config, flags)
    except ConfigError as exc:
        return refuse(exc)
    name = str(settings["id"] or "?").replace("%", "%%")
    logs.configure(args.log_level.upper(), f"%(asctime)s edge-device[{name}] %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, _raise_terminated)
    return run_agent(settings)


if __name__ == "__main__":
    sys.exit(main())
