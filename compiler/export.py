"""Export a trained model: (ir.Graph, TrainConfig, state tensors) -> an inference ONNX model.

`export_onnx(graph, cfg, state, *, fmt="onnx", name=None) -> onnx.ModelProto`. `state` maps
every `compiler.state.state_tensors(graph, cfg)` name to its value, as
`runtime.reference.TrainState.tensors` holds them (float32; Bop's binary weights int8 or float
+-1). `save_state_npz` / `load_state_npz` keep such a state in an .npz file; `check_state`
validates one, whatever its source (the npz, the reference trainer, or the compiled program's state
blob), so an exporter of the C state is a thin wrapper: read the blob into a dict, call
`export_onnx`. The nodes of each layer kind come from its op family (the `# ---- export` section
of `compiler/ops/<family>.py`, registry view `ops.EXPORT`), written through
`compiler/ops/exportctx.Emitter`; this module walks the graph and adds the model's frame.

Invariants of the result:
- inference semantics = `runtime.reference.predict(graph, cfg, TrainState(state, k), x)`: the graph
  output is `probs` [N, classes], the class probabilities; a Softmax (after a Flatten if needed) is
  appended when the graph ends in logits. BN uses the running statistics; binary layers use
  sign(W) and activations sign(x), both +1 at 0;
- opset 17, IR version 8, one float32 input `input` in the graph's own layout ([N, H, W, C] for an
  NHWC graph, transposed to NCHW by the first node), batch dimension symbolic ("N");
- every node, initializer and tensor is named from bnnc's layer names: a layer's output tensor is
  the layer's name (the last one's is `probs`, or `probs.out` if a layer is called "probs"), its
  parameters `<layer>.<field>`, helper tensors `<layer>.<role>`, shared scalars `const.<value>`
  (a "." never occurs in a layer name, so these cannot collide); no string of the original model
  file is copied;
- the same arguments give byte-identical serializations (no timestamps, fixed iteration orders);
- `onnx.checker.check_model` accepts the plain form, and `compiler.frontend.load_model` re-imports
  both forms into a graph whose `runtime.infer.infer` equals the reference's prediction.

Forms (`fmt`):
- "onnx": plain ONNX, runnable by onnxruntime. Binary weights are folded into +-1 initializers (the
  sign is taken here, with sign(0) = +1). Activations are binarized with
  `Where(GreaterOrEqual(x, 0), 1, -1)`, not ONNX `Sign`, because `Sign(0) = 0` while bnnc's sign is
  +1 at 0: a pre-activation of exactly 0 (common after a +-1 dot product) would give a different
  value than the trained network. INPUT_QUANT becomes the QONNX Quant formula spelled out:
  Div(scale), Add(zero point), Clip(qmin, qmax), Round (half to even, as QONNX ROUND), Sub, Mul.
  The frontend does not re-import that chain (it reads the input quantizer only as QONNX Quant), so
  a model with INPUT_QUANT re-imports into bnnc from the qonnx form only.
- "qonnx": latent float weights behind `BipolarQuant(W, 1)`, activations `BipolarQuant(x, 1)`,
  INPUT_QUANT as QONNX `Quant`, in domain qonnx.custom_op.general (opset import present). This is
  the form to continue training from: the frontend rebuilds the same layers with the latent W.

Batch norm. l2: BatchNormalization(gamma, beta, running_mean, running_var, epsilon = the layer's
eps). l1 (inference: (x - running_mean) / running_psi + beta, no gamma, no eps) is written as the
same op with scale 1 and running_var = running_psi^2 - eps, epsilon = the layer's eps, so that the
frontend's l1 initialisation running_psi = sqrt(var + eps) gives the trained value back (to within
one or two float32 ulps) and a later l2 run still sees the model's eps. When some running_psi^2 <
eps, that layer is written with epsilon 0 and running_var = running_psi^2 instead (exact: in
round-to-nearest sqrt(fl(x^2)) == x for normal x). The state's `running_var` name is kept for
that tensor in both cases. A re-import maps an AFFINE written right after a dense/conv with
per-channel scale and a bias to a (folded) BATCHNORM, which infers the same.

Limits: the exported model is for inference only (no optimizer state); the training step count
is not recorded; quantized (INPUT_QUANT) inputs follow QONNX's clip-then-round formula.
"""

from __future__ import annotations

import io
import json
import os
import re
import zipfile
import zlib
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from .. import __version__
from . import ops
from .config import TrainConfig, trainable_fields
from .errors import ConfigError, DataError
from .ir import INPUT, Graph, LayerKind
from .numerics import store
from .ops.exportctx import Emitter
from .preprocess import CLASSES_KEY, Preprocess
from .preprocess import METADATA_KEY as PREPROCESS_KEY
from .state import StateTensor, state_tensors
from .zoo import IR_VERSION, OPSET, QONNX_DOMAIN

FORMATS = ("onnx", "qonnx")
INPUT_NAME = "input"
OUTPUT_NAME = "probs"
PRODUCER = "bnnc"
_IDENT = re.compile(r"^[a-z][a-z0-9_]*$")
_NPZ_DATE = (1980, 1, 1, 0, 0, 0)       # the earliest zip timestamp: byte-identical archives


# --------------------------------------------------------------------------------------------------
# state validation and .npz files

def _options_hint(graph: Graph, state: Mapping[str, np.ndarray],
                  cfg: TrainConfig | None = None) -> str:
    """What a mismatched state most likely means: another model, another freeze set (which
    parameters have optimizer moments), or other training options (the BN kind, optimizer and
    storage dtype its tensors point to)."""
    names = set(state)
    layers = {lay.name for lay in graph.layers}
    strangers = sorted({n.split(".")[0] for n in names} - layers)
    if strangers:
        return (f"the state has tensors of layer(s) {', '.join(strangers[:3])} that model "
                f"{graph.name!r} does not have: it was saved for another model (or --width)")
    if cfg is not None:
        # a parameter without moments is frozen in the file (partial training)
        params = [f"{lay.name}.{f}" for lay in graph.layers for f in trainable_fields(lay)
                  if f"{lay.name}.{f}" in names]
        moments = {n.rsplit(".", 1)[0] for n in names if n.endswith((".m", ".v"))}
        file_frozen = [p for p in params if p not in moments]
        ours = [p for p in params if p in cfg.frozen]
        if moments and file_frozen != ours:
            said = ", ".join(file_frozen[:4]) + (" ..." if len(file_frozen) > 4 else "")
            return (f"the state was made for another freeze set: it "
                    f"{'freezes ' + said if said else 'trains every parameter'}, this program "
                    f"freezes "
                    f"{', '.join(ours[:4]) + (' ...' if len(ours) > 4 else '') or 'nothing'}; "
                    "compile with the --train/--train-from the state was made with")
    opts = []
    if any(n.endswith(".running_psi") for n in names):
        opts.append("--bn l1")
    elif any(n.endswith(".running_var") for n in names):
        opts.append("--bn l2")
    has_v = any(n.endswith(".v") for n in names)
    lone_m = any(n.endswith(".W.m") and n[:-2] + ".v" not in names for n in names)
    if lone_m and has_v:
        opts.append("--optimizer bop")
    elif has_v:
        opts.append("--optimizer adam")
    elif any(n.endswith(".m") for n in names):
        opts.append("--optimizer sgd")
    floats = [np.asarray(v) for v in state.values() if np.asarray(v).dtype.kind == "f"]
    if floats and all(np.all(np.isfinite(v)) for v in floats):
        for dtype in ("bf16", "f16", "f32"):
            if all(_representable(v.astype(np.float32), dtype) for v in floats):
                opts.append(f"--state-dtype {dtype}")
                break
    told = f"; its tensors suggest {' '.join(opts)}" if opts else ""
    return ("pass the --algorithm/--optimizer/--bn/--state-dtype options the state was trained "
            f"with{told}")


def _representable(v: np.ndarray, dtype: str) -> bool:
    return bool(np.array_equal(store(v, dtype), v))


def check_state(graph: Graph, cfg: TrainConfig, state: Mapping[str, np.ndarray], *,
                source: str = "state") -> dict[str, np.ndarray]:
    """Validate `state` against `state_tensors(graph, cfg)`; return a normalized copy in state
    order (float32 arrays; "bit" tensors int8 +-1).

    DataError (naming `source` and the tensor) on a missing or unexpected name, a wrong shape, a
    value that is not finite, a "bit" tensor that is not +-1, or a value not representable in the
    tensor's storage dtype (cfg.state_dtype: a sign of mismatched training options)."""
    sts = state_tensors(graph, cfg)
    want = {st.name for st in sts}
    missing = [st.name for st in sts if st.name not in state]
    extra = sorted(n for n in state if n not in want)
    try:
        if missing:
            raise DataError(f"{source}: state tensor '{missing[0]}' of model {graph.name!r} is "
                            f"missing ({len(missing)} of {len(sts)} missing)")
        if extra:
            raise DataError(f"{source}: unexpected state tensor '{extra[0]}' ({len(extra)} not "
                            f"in the state of model {graph.name!r} under these options)")
        return {st.name: _check_tensor(st, state[st.name], cfg, source) for st in sts}
    except DataError as e:
        # the diagnosis scans every tensor, so it is made only for a state that failed
        if e.hint is None:
            e.hint = _options_hint(graph, state, cfg)
        raise


def _check_tensor(st: StateTensor, value, cfg: TrainConfig, source: str) -> np.ndarray:
    """One tensor normalized; a DataError without a hint means "probably other options"."""
    v = np.asarray(value)
    where = f"{source}: state tensor '{st.name}'"
    if v.shape != st.shape:
        raise DataError(f"{where} has shape {list(v.shape)}, model expects {list(st.shape)}",
                        hint="the state belongs to another model (or another --width)")
    if v.dtype.kind not in "fiu" or (v.dtype.kind in "iu" and st.dtype != "bit"):
        raise DataError(f"{where} has dtype {v.dtype}; expected float32"
                        + (" or int8 +-1" if st.dtype == "bit" else ""))
    f = v.astype(np.float32)
    if not np.all(np.isfinite(f)):
        raise DataError(f"{where} holds NaN or Inf",
                        hint="the training run diverged or the file is corrupt")
    if not np.array_equal(f, v):
        raise DataError(f"{where} holds {v.dtype} values that float32 cannot represent exactly",
                        hint="store the state as float32")
    if st.dtype == "bit":
        if not np.all(np.abs(f) == 1):
            raise DataError(f"{where} is a Bop binary weight but holds values other than +-1")
        return f.astype(np.int8)
    if not _representable(f, st.dtype):
        raise DataError(f"{where} holds values that are not {st.dtype} numbers "
                        f"(--state-dtype {cfg.state_dtype})")
    return f


MODEL_HASH_KEY = "__model_hash__"     # .npz member binding a state file to a compiled model


def save_state_npz(path: str | os.PathLike, state: Mapping[str, np.ndarray], *,
                   model_hash: int | None = None) -> None:
    """Write `state` (name -> array) as an .npz readable by `np.load` and `load_state_npz`;
    `model_hash` (of a compiled program) is stored as the member `__model_hash__`, so the file
    cannot be used with another compiled model.

    Deterministic: entries in the mapping's order, fixed timestamps, deflate compression (bf16
    values are half zero bytes)."""
    p = Path(path)
    items = list(state.items())
    if model_hash is not None:
        items.append((MODEL_HASH_KEY, np.array([model_hash], dtype=np.uint64)))
    try:
        with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, value in items:
                buf = io.BytesIO()
                np.lib.format.write_array(buf, np.ascontiguousarray(value), allow_pickle=False)
                info = zipfile.ZipInfo(f"{name}.npy", date_time=_NPZ_DATE)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                zf.writestr(info, buf.getvalue())
    except OSError as e:
        raise DataError(f"cannot write state file {p}: {e.strerror or e}") from None


_NPY_HEADER_MAX = 1 << 16      # bytes of an .npy header (numpy's own limit is far below)


def _read_npz_bounded(p: Path, limits: Mapping[str, int], cap: int) -> dict[str, np.ndarray]:
    """The members of an .npz, each read only after its .npy header was checked: at most
    `limits[name]` elements (`cap` for a name the model does not have), and the zip's declared
    size no larger than that; so a header claiming 2^40 elements or a zip bomb costs nothing.
    (Reading stops at the declared size: zipfile never inflates past it.)"""
    out: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(p) as zf:
        infos = zf.infolist()
        if len(infos) > len(limits) + 16:
            raise DataError(f"{p}: {len(infos)} members, the model's state has {len(limits)}")
        for info in infos:
            if not info.filename.endswith(".npy"):
                raise DataError(f"cannot read state file {p}: member '{info.filename[:80]}' is "
                                "not a .npy array")
            name = info.filename[:-4]
            limit = limits.get(name, cap)
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version not in ((1, 0), (2, 0), (3, 0)):
                    raise ValueError(f"npy format {version}")
                shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f)
                                         if version == (1, 0) else
                                         np.lib.format.read_array_header_2_0(f))
                count = int(np.prod(shape, dtype=object)) if shape else 1
                if dtype.hasobject:
                    raise ValueError("object arrays are not state tensors")
                if count > limit or count * dtype.itemsize > limit * 8 \
                        or info.file_size > count * dtype.itemsize + _NPY_HEADER_MAX:
                    raise DataError(f"{p}: member '{name[:80]}' claims {count:,} elements "
                                    f"({info.file_size:,} bytes unpacked); the model's tensor "
                                    f"of that name has at most {limit:,}",
                                    hint="the file is damaged or not a state of this model")
                data = f.read(count * dtype.itemsize)
                if len(data) != count * dtype.itemsize:
                    raise ValueError(f"member '{name[:80]}' is truncated")
                arr = np.frombuffer(data, dtype=dtype, count=count)
                out[name] = arr.reshape(shape, order="F" if fortran else "C")
    return out


def load_state_npz(path: str | os.PathLike, graph: Graph, cfg: TrainConfig, *,
                   model_hash: int | None = None) -> dict[str, np.ndarray]:
    """Read an .npz of state tensors (`np.savez(path, **state)` or `save_state_npz`) and validate
    it with `check_state`; DataError names the file and the tensor. Nothing is allocated or
    inflated beyond what the model's state needs (`_read_npz_bounded`). With `model_hash`, a file
    that carries another model's hash is refused."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"state file {p} does not exist")
    if not zipfile.is_zipfile(p):
        raise DataError(f"{p} is not an .npz archive of state tensors",
                        hint="write it with np.savez(path, **state) or save_state_npz")
    limits = {st.name: max(1, int(np.prod(st.shape))) for st in state_tensors(graph, cfg)}
    limits[MODEL_HASH_KEY] = 1
    try:
        state = _read_npz_bounded(p, limits, cap=max(limits.values()))
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, NotImplementedError,
            RuntimeError, zlib.error) as e:
        raise DataError(f"cannot read state file {p}: {str(e)[:200]}",
                        hint="pass an .npz written by np.savez or save_state_npz") from None
    stored = state.pop(MODEL_HASH_KEY, None)
    if stored is not None and model_hash is not None:
        try:
            ok = stored.size == 1 and int(stored.reshape(-1)[0]) == model_hash
        except (TypeError, ValueError, OverflowError):
            ok = False
        if not ok:
            raise DataError(f"{p} belongs to another compiled model (its model hash is not "
                            f"{model_hash:#x})",
                            hint=_options_hint(graph, state, cfg) if set(state) != set(limits)
                            - {MODEL_HASH_KEY} else "a state fits the model file, options and "
                            "freeze set it was made with: compile again, or pass the state of "
                            "this model")
    return check_state(graph, cfg, state, source=str(p))


# --------------------------------------------------------------------------------------------------
# ONNX emission

def export_onnx(graph: Graph, cfg: TrainConfig, state: Mapping[str, np.ndarray], *,
                fmt: str = "onnx", name: str | None = None,
                preprocess: Preprocess | None = None,
                class_names: Sequence[str] | None = None) -> onnx.ModelProto:
    """The trained network as an inference ONNX model (see the module docstring).

    `state` must hold exactly the tensors of `state_tensors(graph, cfg)` (DataError otherwise);
    `fmt` is "onnx" (plain, onnxruntime) or "qonnx" (latent weights, BipolarQuant); `name` is the
    ONNX graph name (a C identifier, default graph.name). `preprocess` (the input convention,
    compiler/preprocess.py) and `class_names` (index -> name) go into the metadata as
    "bnnc.preprocess" (its spec) and "bnnc.classes" (a JSON list), so bnnc reads them back and
    other tools can show them."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    gname = graph.name if name is None else name
    if not _IDENT.match(gname):
        raise ConfigError(f"model name {gname!r} is not a C identifier [a-z][a-z0-9_]*")
    em = Emitter(graph, cfg, check_state(graph, cfg, state), fmt)
    out_name = OUTPUT_NAME if all(lay.name != OUTPUT_NAME for lay in graph.layers) \
        else f"{OUTPUT_NAME}.out"
    tensor = {INPUT: INPUT_NAME}
    if graph.input_layout == "NHWC":
        tensor[INPUT] = em.node("Transpose", [INPUT_NAME], f"{INPUT_NAME}.nchw", perm=[0, 3, 1, 2])
    last = graph.output
    for lay in graph.layers:
        out = out_name if lay is last and lay.kind is LayerKind.SOFTMAX else lay.name
        ops.EXPORT[lay.kind](em, lay, [tensor[i] for i in lay.inputs], out)
        tensor[lay.name] = out
    if last.kind is not LayerKind.SOFTMAX:
        # predict() reports probabilities: softmax over the flattened logits
        em.node("Softmax", [em.flat(tensor[last.name], last.name, out_name)], out_name,
                name=f"{out_name}.softmax", axis=-1)

    in_shape = graph.input_shape
    if graph.input_layout == "NHWC":
        c, h, w = in_shape
        in_shape = (h, w, c)
    x_info = helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", *in_shape])
    y_info = helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["N", graph.num_classes])
    what = "plain ONNX" if fmt == "onnx" else "QONNX (latent weights, BipolarQuant)"
    doc = (f"bnnc export: {gname} trained with --algorithm {cfg.algorithm} --optimizer "
           f"{cfg.optimizer} --bn {cfg.bn} --state-dtype {cfg.state_dtype}; {what}; output "
           f"{out_name} = class probabilities")
    g = helper.make_graph(em.nodes, gname, [x_info], [y_info], initializer=em.inits,
                          doc_string=doc)
    opsets = [helper.make_opsetid("", OPSET)]
    if fmt == "qonnx":
        opsets.append(helper.make_opsetid(QONNX_DOMAIN, 1))
    model = helper.make_model(g, opset_imports=opsets, producer_name=PRODUCER,
                              producer_version=__version__, ir_version=IR_VERSION)
    helper.set_model_props(model, {"bnnc.export.format": fmt,
                                   "bnnc.train.algorithm": cfg.algorithm,
                                   "bnnc.train.optimizer": cfg.optimizer,
                                   "bnnc.train.bn": cfg.bn,
                                   "bnnc.train.state_dtype": cfg.state_dtype,
                                   "bnnc.source_sha256": graph.source_sha256,
                                   **({PREPROCESS_KEY: preprocess.spec()} if preprocess else {}),
                                   **({CLASSES_KEY: json.dumps(list(map(str, class_names)))}
                                      if class_names else {})})
    return model
