"""How edge-bundle's parts speak up: an error stops the bundle, a warning lets it go on.

Every part raises BundleError with a message an operator can act on; the command line alone
decides the exit code (2 for a bad request, 1 for a failed build).
"""
from __future__ import annotations

import sys


class BundleError(Exception):
    """A bundle that cannot be built; the message says why and what to do."""


def warn(message: str) -> None:
    """Something the agent would accept but the operator most likely did not mean."""
    print(f"edge-bundle: warning: {message}", file=sys.stderr)
