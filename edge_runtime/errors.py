"""The errors the device runtime raises, so callers can tell a bad input from a bug."""


class EdgeRuntimeError(Exception):
    """Base class: a clear, user-facing failure of the device runtime."""


class ManifestError(EdgeRuntimeError):
    """The block manifest is malformed or does not match the graphs it describes."""


class IntegrityError(EdgeRuntimeError):
    """A file's content does not match the hash it is addressed by (corrupted or truncated)."""


class UnsupportedOpError(EdgeRuntimeError):
    """onnxruntime-training has no gradient for an op on the path that must be trained."""

    def __init__(self, op_type: str, node_name: str, detail: str = ""):
        self.op_type = op_type
        self.node_name = node_name
        msg = (f"onnxruntime-training cannot differentiate op '{op_type}' (node '{node_name}'); "
               f"rewrite that layer with differentiable ops or keep it in the frozen prefix")
        super().__init__(msg + (f": {detail}" if detail else ""))


class BudgetError(EdgeRuntimeError):
    """Nothing fits the memory budget; the message says what would be needed.

    needed_bytes is the measured need (with the margin), or the ceiling it was measured
    under when even that did not suffice; 0 when nothing was measured.
    """

    def __init__(self, message: str, needed_bytes: int = 0, budget_bytes: int = 0):
        self.needed_bytes = int(needed_bytes)
        self.budget_bytes = int(budget_bytes)
        super().__init__(message)
