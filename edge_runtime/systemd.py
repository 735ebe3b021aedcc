"""Tell systemd how a service is doing (`Type=notify` units): ready, what it is at, stopping.

A unit with `Type=notify` counts as started only when its process says `READY=1`, so
`systemctl start` returns, and units ordered after it start, once the coordinator or the
agent is connected to its broker and serving, not merely once the process exists.
`STATUS=` lines show in `systemctl status`; `STOPPING=1` says a stop has begun.

The protocol is one datagram of `KEY=VALUE` lines to the Unix socket systemd names in
$NOTIFY_SOCKET ('@' means Linux's abstract namespace). It is spoken here with the
standard library alone: the device side installs no systemd bindings, and a process
started without systemd (no $NOTIFY_SOCKET) sends nothing.
"""
from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(*fields: str) -> bool:
    """Send `fields` ("READY=1", "STATUS=round 3 open", ...) to systemd; False when there is no one to tell.

    Never raises: a service keeps running whether or not its supervisor heard it.
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):   # unset, or a kind of socket (vsock) this does not speak
        return False
    # a field is one line: a newline inside a STATUS text would start a field of its own
    message = "\n".join(" ".join(field.splitlines()) for field in fields).encode("utf-8", "replace")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, address)
    except OSError as exc:
        log.debug("systemd did not take %s: %s", fields, exc)
        return False
    return True


def status(text: str) -> bool:
    """The one-line `STATUS=` that `systemctl status` shows."""
    return notify(f"STATUS={text}")
