"""edge-coordinator: run the federated coordinator as an MQTT service, or look at a run's state.

  edge-coordinator run      schedule rounds, collect and aggregate updates (until the schedule ends)
  edge-coordinator status   fleet, round, stage and accuracy of a run, from its state directory
  edge-coordinator weights  write a run's current global weights to one safetensors file
  edge-coordinator report   write a run's report: accuracy, memory, bytes and stages as one HTML page
  edge-coordinator acl      write the Mosquitto ACL of a fleet for a production broker (docs/broker.md)
  edge-coordinator bridge   write a site broker's bridge to the core broker, for a fleet over many sites
  edge-coordinator export   export a model with the graphs a board's profiler trains (edge-profile --manifest)

Without --broker the coordinator starts its own Mosquitto on a free loopback port (it
writes the address to WORKDIR/broker.url for the devices) and stops it on exit. Every
piece of state lives in WORKDIR: kill the coordinator at any moment and run the same
command again to continue the same round.

Exit codes of `run`: 0 the schedule ended; 1 the broker cannot be reached or refused the
login (checked in seconds, before the model's export and a profile's measurement), or
the run failed; 2 a configuration it refuses, before anything runs; 130 after Ctrl-C
(SIGINT) and 143 after SIGTERM, when the stop came before the schedule's end (128 plus
the signal's number, as a shell reports it). The other commands exit 0, or 2 with the
reason. Every error is one line on stderr that starts with `edge-coordinator: `.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sqlite3
import sys
import threading
from pathlib import Path

from coordinator import strategies
from coordinator.config import ConfigError, load_config
from coordinator.service import DEFAULTS, check_settings
from edge_runtime import logs, systemd

EPILOG = """examples:
  edge-coordinator run                                   # progressive fmnist_cnn, embedded broker, runs/coordinator
  edge-coordinator run --broker mqtt://10.0.0.2:1883 --fleet lab --min-devices 6
  edge-coordinator run --strategy fedavg --rounds 20     # the full-model FedAvg baseline
  edge-coordinator run --model mine.py:build --eval-data heldout/ --workdir runs/mine   # your own model and data
  edge-coordinator run --config coordinator.toml         # [service], [train] and each strategy's table; flags win
  edge-coordinator status runs/coordinator
  edge-coordinator report runs/coordinator               # runs/coordinator/report/report.html, while it runs too
  edge-coordinator weights runs/coordinator trained.safetensors   # then: run --strategy selective --init-weights
  edge-coordinator run --broker mqtts://broker.lan --fleet lab --username coordinator \
      --password-file /etc/edgeblock/coordinator.password --tls-ca /etc/edgeblock/ca.crt   # TLS on 8883
  edge-coordinator acl --fleet lab --devices ids.txt --out /etc/mosquitto/edgeblock.acl
  edge-coordinator bridge --fleet lab --site north --core mqtts://broker.lan --devices north.txt \
      --password-file ~/edgeblock-secrets/passwords/bridge-north --tls-ca /etc/mosquitto/certs/core-ca.crt \
      --out edgeblock-bridge-lab.conf                  # see: edge-coordinator bridge --help
  edge-coordinator export fmnist_cnn exported/        # then copy exported/ to a board: edge-profile measure
                                                      #   --manifest exported/manifest.json

devices connect with:  edge-device --broker mqtt://HOST:PORT --fleet FLEET --id pi-01 --tier pi-zero-2w --data DIR
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-coordinator", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the service", epilog=EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--config", type=Path, help="TOML file with [service] and [train] tables, and a table per "
                                                  f"strategy ({', '.join(f'[{n}]' for n in strategies.names())})")
    run.add_argument("--workdir", help="state directory: model export, SQLite state, weight blobs, metrics.jsonl")
    run.add_argument("--broker", help="mqtt://host:port or mqtts://host:port (TLS, port 8883) of the broker "
                                      "(default: start an embedded Mosquitto)")
    run.add_argument("--username", help="broker user name")
    run.add_argument("--password-file", help="file whose first line is the broker password (never a flag)")
    run.add_argument("--tls", action="store_true", default=None, help="TLS even without an mqtts:// address")
    run.add_argument("--tls-ca", help="CA certificate (PEM) the broker's certificate must chain to")
    run.add_argument("--tls-cert", help="client certificate (PEM), for a broker that asks for one")
    run.add_argument("--tls-key", help="the client certificate's unencrypted key (PEM)")
    run.add_argument("--fleet", help="fleet name: the topic namespace devices and coordinator share")
    run.add_argument("--model", help="the model to train: a zoo name (fmnist_cnn, vgg_cifar, resnet_small, "
                                     "mobilenet_v2), an export directory, or FILE.py[:NAME] / MODULE:NAME whose NAME "
                                     "(default: model) is a BlockModel or a function returning one. Installed into "
                                     "WORKDIR/model on the first start; later starts keep it (default: the "
                                     "workdir's model, or fmnist_cnn in a new workdir)")
    run.add_argument("--strategy", choices=strategies.names(),
                     help="the schedule; each has a table of its own settings in --config (default "
                          f"{strategies.DEFAULT})")
    run.add_argument("--init-weights", help="start from these weights (safetensors, e.g. a finished run's) "
                                            "instead of the export's initialisation")
    run.add_argument("--eval-data", help="evaluate each round on this dataset directory (inputs.npy, labels.npy) "
                                         "instead of the Fashion-MNIST test set")
    run.add_argument("--validation-data", help="labeled data no device holds and the test set does not hold "
                                               "either (a dataset directory like --eval-data): progressive and "
                                               "layer-wise training freeze a stage once its accuracy on it stops "
                                               "rising (without it every stage trains to its round cap)")
    run.add_argument("--profile", help="profile JSON from `edge-profile measure` (default: measure here once)")
    run.add_argument("--min-devices", type=int, help="online devices needed before a round opens")
    run.add_argument("--round-deadline-s", type=float, help="seconds a round waits for updates")
    run.add_argument("--offline-grace-s", type=float,
                     help="seconds a round keeps waiting for a device that went offline (it may reconnect)")
    run.add_argument("--min-updates", type=int, help="accepted updates a round needs to change the global model")
    run.add_argument("--sample-fraction", type=float, help="fraction of each tier's online devices asked per round")
    run.add_argument("--max-rounds", type=int, help="stop after this many rounds whatever the schedule says")
    run.add_argument("--rounds", type=int, help="rounds of the fedavg baseline")
    run.add_argument("--local-epochs", type=float, help="passes over its local data a device makes per round")
    run.add_argument("--learning-rate", type=float)
    run.add_argument("--update-fp16", action="store_true", default=None, help="devices send updates as float16")
    run.add_argument("--fresh", action="store_true", help="discard the run in --workdir and start over; its model is "
                                                          "kept unless --model names another")
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"])
    weights = sub.add_parser("weights", help="write a run's current global weights to one safetensors file")
    weights.add_argument("workdir", type=Path)
    weights.add_argument("out", type=Path, help="the safetensors file to write (e.g. for --init-weights)")
    status = sub.add_parser("status", help="print a run's state")
    status.add_argument("workdir", type=Path)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    report = sub.add_parser("report", help="write a run's report: one self-contained HTML page with its plots")
    report.add_argument("workdir", type=Path, help="the run's directory (finished or still running)")
    report.add_argument("--baseline", type=Path, help="a full-model FedAvg run's directory to compare accuracy with "
                                                      "(default: a comparable one found beside the run, if any)")
    report.add_argument("--no-baseline", action="store_true", help="compare with no other run")
    report.add_argument("--out", type=Path, help="directory for report.html and its PNGs (default: WORKDIR/report)")
    acl = sub.add_parser("acl", help="write the Mosquitto ACL of a fleet: the coordinator reads and writes the "
                                     "fleet's topics, each device only its own")
    acl.add_argument("--fleet", required=True, help="fleet name, as in the coordinator's and devices' --fleet")
    acl.add_argument("--devices", type=Path, required=True,
                     help="file of device ids, one a line (each device's broker user name is its id)")
    acl.add_argument("--coordinator-user", action="append", metavar="USER",
                     help="the coordinator's broker user name (default: coordinator); repeat it for replicas, "
                          "which log in as a user each")
    acl.add_argument("--site", action="append", default=[], metavar="NAME=FILE",
                     help="a site whose broker bridges to this one (edge-coordinator bridge) and the file of its "
                          "device ids: its bridge user bridge-NAME carries their topics; repeat for each site")
    acl.add_argument("--monitor", action="append", default=[], metavar="USER",
                     help="a read-only user for dashboards: the coordinator's status and metrics, the devices' and "
                          "sites' states; it may publish nothing. Repeat for more")
    acl.add_argument("--out", type=Path, help="the ACL file to write (default: print it)")
    _bridge_parser(sub)
    exp = sub.add_parser("export", help="export a zoo model and build the step graphs of every part a board's "
                                        "profiler may train (a board cannot build them)")
    exp.add_argument("model", help="a zoo name (fmnist_cnn, resnet_small, vgg_cifar, ...) or FILE.py[:NAME] / "
                                   "MODULE:NAME building a BlockModel (as run --model)")
    exp.add_argument("out", type=Path, help="directory to write (manifest.json, graphs/, weights/, parts/)")
    exp.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    return p


def _bridge_parser(sub) -> None:
    from coordinator.ops.broker_bridge import HELP
    bridge = sub.add_parser("bridge", help="write a site broker's bridge to the core broker (a drop-in for the "
                                           "site's /etc/mosquitto/conf.d)", description=HELP,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    bridge.add_argument("--fleet", required=True, help="fleet name, as in the coordinator's and devices' --fleet")
    bridge.add_argument("--site", required=True, help="the site's name (its bridge logs in to the core as "
                                                      "bridge-SITE)")
    bridge.add_argument("--core", required=True, metavar="ADDRESS",
                        help="the core broker as the gateway reaches it: mqtts://HOST[:PORT] (TLS, 8883) or HOST:PORT")
    bridge.add_argument("--devices", type=Path, required=True,
                        help="file of the ids of the devices that log in to this site's broker, one a line")
    bridge.add_argument("--password-file", required=True,
                        help="file whose first line is bridge-SITE's password on the core (make-secrets.sh users)")
    bridge.add_argument("--tls", action="store_true", help="TLS even without an mqtts:// address")
    bridge.add_argument("--tls-ca", default="", help="path ON THE GATEWAY of the CA the core's certificate chains "
                                                     "to (default: the gateway's system CAs)")
    bridge.add_argument("--tls-cert", default="", help="path on the gateway of a client certificate, for a core "
                                                       "that asks for one")
    bridge.add_argument("--tls-key", default="", help="path on the gateway of that certificate's unencrypted key")
    bridge.add_argument("--out", type=Path, required=True,
                        help="the drop-in to write (mode 640: it holds the password)")


def _settings(args) -> dict:
    overrides = {
        "service": {"workdir": args.workdir, "broker": args.broker, "fleet": args.fleet, "model": args.model,
                    "strategy": args.strategy, "profile": args.profile, "min_devices": args.min_devices,
                    "round_deadline_s": args.round_deadline_s, "offline_grace_s": args.offline_grace_s,
                    "min_updates": args.min_updates,
                    "sample_fraction": args.sample_fraction, "max_rounds": args.max_rounds,
                    "update_fp16": args.update_fp16, "init_weights": args.init_weights,
                    "eval_data": args.eval_data, "validation_data": args.validation_data, "username": args.username,
                    "password_file": args.password_file, "tls": args.tls, "tls_ca": args.tls_ca,
                    "tls_cert": args.tls_cert, "tls_key": args.tls_key},
        "train": {"local_epochs": args.local_epochs, "learning_rate": args.learning_rate},
        "fedavg": {"rounds": args.rounds},
    }
    return load_config(DEFAULTS, args.config, overrides)


EXIT_FAILED = 1    # the broker cannot be reached or refused the login, or the run failed: the unit restarts
EXIT_REFUSED = 2   # a ConfigError: the service unit does not restart (deploy/systemd/edge-coordinator.service)
# a stop by signal before the schedule's end exits 128 + the signal's number: 130 after Ctrl-C, 143 after SIGTERM
BROKER_CHECK_S = 5.0   # how long the start waits for the broker's answer before it gives up


class Stopped(KeyboardInterrupt):
    """A stop signal during start-up, raised in the main thread so that whatever it waits for there (the
    broker, the model's export, a profile's measurements in child processes) is left at once."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """SIGTERM and SIGINT for `run`. Once the coordinator serves they only set `stop`: the loop finishes the step
    at hand and leaves cleanly. Before that (nothing of a round is under way) the first one also raises Stopped."""

    def __init__(self, stop: threading.Event, serving: threading.Event):
        self.stop, self.serving = stop, serving
        self.signum: int | None = None     # the first stop signal received
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._caught)

    def _caught(self, signum: int, frame) -> None:
        first = self.signum is None
        self.signum = self.signum or signum
        self.stop.set()
        systemd.notify("STOPPING=1", f"STATUS=stopping ({signal.Signals(signum).name})")
        if first and not self.serving.is_set():
            raise Stopped(signum)


def _stop_children() -> None:
    """Kill the Python children a stopped start-up leaves (a profile's measurements, graph builds): they would
    run on for a minute. Nothing half-done is kept: the next start measures again. The broker is not Python."""
    import psutil
    for child in psutil.Process().children(recursive=True):
        try:
            if child.cmdline()[:1] == [sys.executable]:
                child.kill()
        except psutil.Error:
            pass


def _os_problem(exc: OSError) -> str:
    """'PATH: reason' for a file that cannot be read or written, without errno numbers."""
    return f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else str(exc)


def _fail(message: str, code: int = EXIT_REFUSED) -> int:
    print(f"edge-coordinator: {message}", file=sys.stderr)
    return code


def start_over(settings: dict) -> None:
    """--fresh: discard the workdir's run but keep its model, unless the settings name another one."""
    import shutil

    from coordinator.model import sources
    from coordinator.state_sql import is_database_url
    from edge_runtime.errors import EdgeRuntimeError
    work = Path(settings["service"]["workdir"])
    s = settings["service"]
    if is_database_url(s["state"]):
        raise ConfigError("--fresh with a PostgreSQL state store: the run lives in the database, not only in the "
                          "workdir; point service.state at a new, empty database (and workdir at a new directory)")
    if not work.is_dir():
        return
    if s["model"]:   # install (or keep) the named model before anything is deleted: a bad --model loses nothing
        try:
            sources.install(s["model"], work / "model", s["seed"], replace=True)
        except (EdgeRuntimeError, ValueError) as exc:
            raise ConfigError(str(exc)) from exc
    for entry in work.iterdir():
        if entry.name != "model":
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def run(settings: dict, stop: threading.Event, serving: threading.Event | None = None, fresh: bool = False) -> dict:
    """Run the service until its schedule ends or `stop` is set; `serving` is set once it serves the fleet.
    `fresh` discards the workdir's run first (start_over)."""
    from edge_runtime.wire.mqtt_link import is_loopback, parse_broker_url
    work = Path(settings["service"]["workdir"]).resolve()
    broker = None
    s = settings["service"]
    if s["broker"]:
        try:
            host, port = parse_broker_url(s["broker"])
        except ValueError as exc:
            raise ConfigError(f"broker: {exc}") from None
        if not is_loopback(host) and not (s["username"] or s["tls_cert"]):
            raise ConfigError(f"broker {s['broker']} is not on this machine and the coordinator logs in with no "
                             f"name: anyone who reaches it could read every task and send updates for any "
                             f"device. Give --username and --password-file (or a client certificate), as "
                             f"docs/broker.md sets up")
        check_settings(settings)       # a bad model or evaluation set is refused whatever the broker's state
        check_broker(s, host, port)
    if fresh:   # after the broker check: a run is not discarded for a start that cannot go on
        start_over(settings)
    if not s["broker"]:
        from coordinator.ops.broker import EmbeddedBroker
        try:
            work.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"workdir {_os_problem(exc)}") from None
        url_file = work / "broker.url"
        previous = parse_broker_url(url_file.read_text())[1] if url_file.exists() else None
        try:
            broker = EmbeddedBroker(work / "broker", port=previous).start()
        except Exception:  # the old port is taken: any free one
            broker = EmbeddedBroker(work / "broker").start()
        host, port = broker.host, broker.port
        url_file.write_text(broker.url + "\n")
        logging.getLogger("edge-coordinator").info("embedded broker at %s (devices: --broker %s)", broker.url,
                                                   broker.url)
    systemd.status(f"starting: the model, its evaluation set{'' if s['profile'] else ' and memory profile'}")
    try:
        return _start(settings, host, port).run(stop, serving)
    finally:
        if broker is not None:
            broker.stop()


def check_broker(s: dict, host: str, port: int) -> None:
    """Log in to the broker once, as the run will, before the slow start-up (the model's export, a profile's
    measurement): a wrong address, port, password or CA fails in seconds, not after them.

    The check uses the coordinator's own client id and session expiry, which a broker that names clients by
    their user (use_username_as_clientid) would impose anyway: it subscribes to nothing and acknowledges
    nothing, so the messages the session holds for the coordinator are delivered again when the run connects.
    """
    from coordinator.replicas import link_identity
    from edge_runtime.wire.mqtt_link import MqttLink, security_from_settings
    try:
        security = security_from_settings(s, s["broker"])
    except ValueError as exc:   # a TLS file or the password file
        raise ConfigError(str(exc)) from None
    systemd.status(f"checking the broker at {host}:{port}")
    client_id, expiry = link_identity(s)    # a replica's own id, and no session left behind for it
    probe = MqttLink(client_id, host, port, [], manual_ack=True, security=security,
                     **({} if expiry is None else {"session_expiry_s": expiry}))
    try:
        probe.start(timeout_s=BROKER_CHECK_S)
    except ConnectionError as exc:
        raise ConnectionError(f"{exc}; nothing was started: check the broker address (--broker, service.broker) "
                              f"and that the broker runs and is reachable from here") from None
    finally:
        probe.stop()


def _start(settings: dict, host: str, port: int):
    """The Coordinator, or ConfigError saying why this configuration cannot run (before any round)."""
    from coordinator.service import Coordinator
    from edge_runtime.errors import EdgeRuntimeError
    try:
        return Coordinator(settings, host, port)
    except (EdgeRuntimeError, ValueError) as exc:   # the model, its export or its profile does not fit
        raise ConfigError(str(exc)) from exc
    except OSError as exc:   # a file the settings name (init_weights, eval_data, ...) cannot be read
        raise ConfigError(_os_problem(exc)) from exc


def status(workdir: Path, as_json: bool) -> int:
    """The run at a glance (coordinator/observe/run_status.py); safe beside a running coordinator."""
    from coordinator.observe.run_status import snapshot, status_lines
    from coordinator.state_sql import StoreError
    from coordinator.state_store import run_store, run_store_location
    try:
        snap = snapshot(workdir)
        if snap is None:
            return _fail(f"{workdir} holds no coordinator state (no state.db)")
        state = run_store(workdir)
        devices = state.devices()
        state.close()
    except (sqlite3.Error, StoreError, OSError) as exc:   # not a database, or of another edgeblock's schema
        return _fail(f"{run_store_location(workdir)} cannot be read: {exc}")
    if as_json:
        print(json.dumps(dict(snap.to_dict(), devices=devices), indent=1))
        return 0
    print("\n".join(status_lines(snap, devices)))
    return 0


def export_weights(workdir: Path, out: Path) -> int:
    """The weights after the last closed round (the initial ones before any), as one file."""
    from coordinator.global_model import GlobalModel
    from coordinator.state_sql import StoreError
    from coordinator.state_store import run_store, run_store_location
    from edge_runtime.wire import weights as wcodec
    from edge_runtime.wire.transfer import BlobStore
    if run_store_location(workdir) is None:
        return _fail(f"{workdir} holds no coordinator state (no state.db)")
    try:
        row = run_store(workdir, readonly=False).current_round()
    except (sqlite3.Error, StoreError) as exc:
        return _fail(f"{run_store_location(workdir)} cannot be read: {exc}")
    if row is None:
        return _fail(f"{workdir} has no round yet")
    index = row.weights_after if row.state == "closed" else row.weights_before
    try:
        wcodec.save(out, GlobalModel(workdir / "model", BlobStore(workdir / "blobs")).load(index))
    except OSError as exc:
        return _fail(_os_problem(exc))
    print(f"wrote the weights after round {row.round if row.state == 'closed' else row.round - 1} to {out}")
    return 0


def write_report(workdir: Path, baseline: Path | None, no_baseline: bool, out: Path | None) -> int:
    """The run's HTML report; its path on stdout, so a script can open or mail it."""
    from coordinator.observe.run_report import write_report as write
    try:
        page = write(workdir, out, False if no_baseline else baseline)
    except FileNotFoundError as exc:   # no run there: the message says what is missing
        return _fail(str(exc))
    except (OSError, sqlite3.Error) as exc:
        return _fail(_os_problem(exc) if isinstance(exc, OSError) else f"{workdir}: {exc}")
    print(page)
    return 0


def write_acl(fleet: str, devices: Path, coordinator_user: list[str], out: Path | None, sites: list[str] = (),
              monitors: list[str] = ()) -> int:
    from coordinator.ops.broker_acl import AclError, fleet_acl, read_device_ids, read_sites, write_fleet_acl
    try:
        ids = read_device_ids(devices)
        at = read_sites(sites)
        if out is None:
            print(fleet_acl(fleet, ids, coordinator_user, at, monitors), end="")
        else:
            write_fleet_acl(out, fleet, ids, coordinator_user, at, monitors)
            print(f"wrote the ACL of fleet {fleet} ({len(ids)} devices, {len(at)} sites, {len(monitors)} monitors) "
                  f"to {out}; reload Mosquitto to apply it")
    except (AclError, OSError) as exc:
        print(f"edge-coordinator: {exc}", file=sys.stderr)
        return 2
    return 0


def export_model(model: str, out: Path, seed: int) -> int:
    """An export a board profiles from; its path on stdout."""
    from coordinator.model.zoo_profile import export_for_boards
    from edge_runtime.errors import EdgeRuntimeError
    try:
        manifest = export_for_boards(model, out, seed)
    except (EdgeRuntimeError, ValueError) as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(_os_problem(exc))
    print(manifest)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "status":
        return status(args.workdir, args.json)
    if args.command == "weights":
        return export_weights(args.workdir, args.out)
    if args.command == "acl":
        return write_acl(args.fleet, args.devices, args.coordinator_user or ["coordinator"], args.out, args.site,
                         args.monitor)
    if args.command == "bridge":
        from coordinator.ops.broker_bridge import cli_write_bridge
        return cli_write_bridge(args)
    if args.command == "report":
        return write_report(args.workdir, args.baseline, args.no_baseline, args.out)
    if args.command == "export":
        return export_model(args.model, args.out, args.seed)
    logs.configure(args.log_level, "%(asctime)s %(name)s %(levelname)s %(message)s")
    stop, serving = threading.Event(), threading.Event()
    signals = StopSignals(stop, serving)
    from coordinator.state_sql import StoreError
    from edge_runtime.errors import EdgeRuntimeError
    try:
        summary = run(_settings(args), stop, serving, fresh=args.fresh)
    except Stopped as exc:
        _stop_children()
        logging.getLogger("edge-coordinator").info("stopped by %s while starting; the next start continues the run",
                                                   signal.Signals(exc.signum).name)
        return 128 + exc.signum
    except ConfigError as exc:
        return _fail(str(exc), EXIT_REFUSED)
    except (EdgeRuntimeError, ValueError, ConnectionError, StoreError) as exc:   # StoreError: the database
        return _fail(str(exc), EXIT_FAILED)
    finally:
        systemd.notify("STOPPING=1")
    print(json.dumps(summary))
    return 0 if summary["finished"] or signals.signum is None else 128 + signals.signum


if __name__ == "__main__":
    sys.exit(main())
