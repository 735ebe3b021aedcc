"""The errors the device runtime raises, so callers can tell a bad input from a bug."""


class EdgeRuntimeError(Exception):
    """Base class: a clear, user-facing failure of the device runtime."""


class ManifestError(EdgeRuntimeError):
    """The block manifest is malformed or does not match the graphs it describes."""


class IntegrityError(EdgeRuntimeError):
    """A file's content does not match the hash it is addressed by (corrupted or truncated)."""


class UnsupportedOpError(EdgeRuntimeError):
    """An op on the path that must be trained has no gradient a device can compute.

    op_type and node_name are ONNX's, for experts. `where` says it in the model's own terms
    (the layer or head, and the torch module when the export had the model at hand), and
    `layer` / `head` index it in the manifest, so a caller can tell a layer that may stay in
    the frozen prefix from a head, which must train; both None when the node is not in a
    layer or head graph. `note` adds what the caller concluded (e.g. why it refuses).
    """

    def __init__(self, op_type: str, node_name: str, detail: str = "", where: str = "",
                 layer: int | None = None, head: int | None = None, note: str = ""):
        self.op_type = op_type
        self.node_name = node_name
        self.detail = detail
        self.where = where
        self.layer = layer
        self.head = head
        self.note = note
        expert = f"ONNX node '{node_name}'" + (f": {detail}" if detail else "")
        super().__init__(f"{self.summary}; {self.advice}" + (f" ({note})" if note else "") + f" [{expert}]")

    @property
    def summary(self) -> str:
        """What cannot be trained, without the advice: what a manifest records as its frozen prefix's reason."""
        what = f"{self.where} exports to ONNX op {self.op_type}" if self.where else f"ONNX op {self.op_type}"
        return f"{what}, which the device runtime cannot differentiate"

    @property
    def advice(self) -> str:
        instead = _DIFFERENTIABLE_INSTEAD.get(self.op_type)
        replace = f"replace it (e.g. by {instead})" if instead else "replace it with differentiable ops"
        if self.head is not None:
            return f"{replace}: an output head always trains"
        return f"{replace} or put it in the frozen prefix (the first layers), which never trains"

    def located(self, where: str, layer: int | None = None, head: int | None = None,
                note: str = "") -> "UnsupportedOpError":
        """The same failure told in the model's terms (keeps what is already known when given None)."""
        return UnsupportedOpError(self.op_type, self.node_name, self.detail, where or self.where,
                                  self.layer if layer is None else layer, self.head if head is None else head,
                                  note or self.note)


# ops torch exports that have no gradient here, and the module to use instead
_DIFFERENTIABLE_INSTEAD = {"InstanceNormalization": "BatchNorm2d"}


class BudgetError(EdgeRuntimeError):
    """Nothing fits the memory budget; the message says what would be needed.

    needed_bytes is the measured need (with the margin), or the ceiling it was measured
    under when even that did not suffice; 0 when nothing was measured.
    """

    def __init__(self, message: str, needed_bytes: int = 0, budget_bytes: int = 0):
        self.needed_bytes = int(needed_bytes)
        self.budget_bytes = int(budget_bytes)
        super().__init__(message)
