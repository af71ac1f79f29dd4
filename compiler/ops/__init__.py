"""The op registry: one module per op family, each exporting one `OpFamily` record (`base.py`).

Every per-op table of the pipeline is a view derived here from `FAMILIES`; nothing else keeps a
table keyed by layer kind, ONNX op type or kernel name. Adding an op = adding (or extending) one
family module and listing it in `FAMILIES` (compiler/README.md walks through an example).
"""

from __future__ import annotations

from ..ir import LayerKind
from . import activation, batchnorm, conv, dense, loss, optim, pool, structural
from .base import KernelSpec, LayerSpec, OpFamily

FAMILIES: tuple[OpFamily, ...] = tuple(m.FAMILY for m in (
    dense, conv, batchnorm, activation, pool, structural, loss, optim))


def _merge(field: str) -> dict:
    out: dict = {}
    for fam in FAMILIES:
        for key, value in getattr(fam, field).items():
            assert key not in out, f"{field}: {key} is owned by two op families"
            out[key] = value
    return out


KERNELS: dict[str, KernelSpec] = {k.name: k for fam in FAMILIES for k in fam.kernels}
LAYERS: dict[LayerKind, LayerSpec] = {s.kind: s for fam in FAMILIES for s in fam.layers}
ONNX_HANDLERS = _merge("onnx")
SCHEDULE_FORWARD = _merge("forward")
SCHEDULE_BACKWARD = _merge("backward")
REFERENCE_FORWARD = _merge("reference_forward")
REFERENCE_BACKWARD = _merge("reference_backward")
REFERENCE_UPDATE = _merge("reference_update")
EXPORT = _merge("export")
