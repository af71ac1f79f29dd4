"""Hostile-input fuzzer for the importer and the compile pipeline: mutated ONNX bytes -> outcome.

    python scripts/fuzz.py --examples 20000 --seconds 2700 [--seed 0] [--emit-c]
                           [--save-failures DIR]

Input: base models (the shipped third-party files in shared/models, three zoo models, five small
graphs built here with onnx.helper), mutated by one of `MUTATORS`. Bytes-level: truncation, byte
flips, splices, garbage, deep protobuf nesting. Model-level (stacked 1-3 deep): initializer
dtypes, dims (0, negative, 2^40, rank 100), values (NaN/Inf, odd scalars, hostile integers in
shape/index constants), cycles, dangling inputs, duplicate outputs, hostile attributes (wrong
types, out of range, 100000-element lists, 5000 unknown ones), hostile names, empty graphs,
unknown domains, missing opsets, changed op types, removed/duplicated/reordered nodes, random ops
spliced in, constant-folding bombs. Output: one `Outcome` per example and, from `main`, counts per
outcome class and per mutator.

The property checked by `check_bytes`: `load_model` on the bytes; then, for an imported graph,
the numpy inference on a random batch (inputs up to MAX_INFER_ELEMENTS) and, for each algorithm
(`standard`, `proposed`, batch 2), `check_config_for_graph`, `build_schedule` and `plan_schedule`
either succeed with every verifier passing (graph.verify, schedule.verify, check_plan, identifiers
`[a-z][a-z0-9_]*` whatever the ONNX names) or raise a `BnncError` whose message is one printable
line naming where (the file at import, the model or a layer later). Anything else is a failure:
another exception type or an importer message marked INTERNAL_ERROR (`crash`), a broken result
(`invalid`), a bad message (`bad-message`), a Python warning (`warning`: garbage went unnoticed),
no answer within the time limit (`timeout`), or death by a signal (`signal`). With `emit_c`
(`--emit-c`), every planned schedule is also emitted as C for the host (`emit_c`) and the host
compiler checks the model and trainer sources (`-fsyntax-only` with the target's -Werror flags):
generated C that does not compile is a failure too (`bad-c`).

`run_isolated` runs one check in a forked child under an address-space limit (the parent's size +
1 GiB) and a wall-clock limit, so a hang, a huge allocation or a native crash is an outcome, not
the end of the fuzzing run. Everything is deterministic for a given seed: `random.Random` drives
all choices, and the base models are rebuilt identically.
"""

from __future__ import annotations

import argparse
import copy
import glob
import math
import os
import pickle
import random
import re
import resource
import select
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, external_data_helper, helper, numpy_helper

from bnnc.compiler.codegen import emit_c as emit_c_sources
from bnnc.compiler.config import check_config_for_graph, make_config
from bnnc.compiler.errors import BnncError, BnncWarning
from bnnc.compiler.frontend import INTERNAL_ERROR, load_model
from bnnc.compiler.plan_check import check_plan
from bnnc.compiler.planner import plan_schedule
from bnnc.compiler.schedule import build_schedule
from bnnc.compiler.target import load_target
from bnnc.compiler.zoo import build_zoo_model
from bnnc.runtime.infer import infer, onnx_input_shape

IDENT = re.compile(r"^[a-z][a-z0-9_]*$")
# schedule tensors are "<layer>.<field>" or a few bare names; fields are bnnc's own
TENSOR_NAME = re.compile(r"^[a-z][a-z0-9_]*(\.[A-Za-z0-9_.]+)?$")
ALGORITHMS = ("standard", "proposed")
BATCH = 2
MAX_MESSAGE_CHARS = 2000
MAX_INFER_ELEMENTS = 1 << 16     # per-sample input size up to which the numpy inference runs too
FAILURE_KINDS = ("crash", "invalid", "bad-message", "warning", "timeout", "signal", "bad-c")

HOSTILE_NAMES = (
    "*/", "/*", "*/ int x; /*", '"', "'", "\\", "a\nb", "\r\n", "\t", "#include <stdio.h>",
    "{{ x }}", "{% if 1 %}", "{# c #}", "$(rm -rf /)", "`id`", "a\x00b", "\x00", "é", "日本語",
    "\u202etxt", "\u2028", "[/bold]", "[red]x", "%s%n%x", "../../etc/passwd", "input", "fc1",
    "x" * 5000, "", " ", "-", "0", "None", "\x1b[31mred", "\\u0000", "'; DROP TABLE t; --",
)


# ---------------------------------------------------------------------------------------------
# base models


def shared_models_dir() -> Path | None:
    """shared/models beside the repo checkout (CI lays it there), else the workplace copy."""
    here = Path(__file__).resolve().parent.parent
    for cand in (here.parent / "shared" / "models", Path("/work/shared/models")):
        if cand.is_dir():
            return cand
    return None


def _model(nodes, inits, in_shape, *, in_name="x", out="y", opsets=(("", 17),)):
    g = helper.make_graph(
        nodes, "fuzz_base", [helper.make_tensor_value_info(in_name, TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    m.ir_version = 9
    return m


def _bn(p: str, c: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {f"{p}_g": rng.uniform(0.5, 1.5, c).astype(np.float32),
            f"{p}_b": rng.normal(0, 0.3, c).astype(np.float32),
            f"{p}_m": rng.normal(0, 1, c).astype(np.float32),
            f"{p}_v": rng.uniform(0.5, 2, c).astype(np.float32)}


def _bn_node(p: str, x: str, y: str) -> onnx.NodeProto:
    return helper.make_node("BatchNormalization", [x, f"{p}_g", f"{p}_b", f"{p}_m", f"{p}_v"],
                            [y], name=f"/{p}/BatchNormalization", epsilon=1e-4)


def _small_models() -> dict[str, onnx.ModelProto]:
    """Tiny graphs that import, each covering ops and attributes the mutators then attack."""
    rng = np.random.default_rng(7)
    N = helper.make_node
    f32 = np.float32
    out = {}
    # MLP: Sign weights, BN, Sign activations, Gemm with transB and bias
    inits = {"w1": rng.normal(0, 1, (8, 6)).astype(f32), "w2": rng.normal(0, 1, (3, 6)).astype(f32),
             "c2": rng.normal(0, 1, 3).astype(f32), **_bn("bn1", 6, rng)}
    out["mlp"] = _model([
        N("Sign", ["x"], ["xs"], name="/in/Sign"), N("Sign", ["w1"], ["w1s"], name="/fc1/SignW"),
        N("MatMul", ["xs", "w1s"], ["h1"], name="/fc1/MatMul"), _bn_node("bn1", "h1", "b1"),
        N("Sign", ["b1"], ["s1"], name="/act1/Sign"), N("Sign", ["w2"], ["w2s"], name="/fc2/SignW"),
        N("Gemm", ["s1", "w2s", "c2"], ["y"], name="/fc2/Gemm", transB=1, alpha=1.0, beta=1.0),
    ], inits, ["N", 8])
    # CNN: real conv with pads, BN, Sign, MaxPool, Flatten, binary MatMul, Softmax
    inits = {"cw": rng.normal(0, 1, (4, 1, 3, 3)).astype(f32), "cb": np.zeros(4, f32),
             "fw": rng.normal(0, 1, (36, 3)).astype(f32), **_bn("bn1", 4, rng)}
    out["cnn"] = _model([
        N("Conv", ["x", "cw", "cb"], ["c1"], name="/conv1/Conv", pads=[1, 1, 1, 1],
          strides=[1, 1], kernel_shape=[3, 3], dilations=[1, 1], group=1),
        _bn_node("bn1", "c1", "b1"), N("Sign", ["b1"], ["s1"], name="/act1/Sign"),
        N("MaxPool", ["s1"], ["p1"], name="/pool1/MaxPool", kernel_shape=[2, 2], strides=[2, 2],
          pads=[0, 0, 0, 0], ceil_mode=0),
        N("Flatten", ["p1"], ["f1"], name="/flat/Flatten", axis=1),
        N("Sign", ["fw"], ["fws"], name="/fc/SignW"),
        N("MatMul", ["f1", "fws"], ["l"], name="/fc/MatMul"),
        N("Softmax", ["l"], ["y"], name="/out/Softmax", axis=-1),
    ], inits, ["N", 1, 6, 6])
    # constant-folding-heavy weights and the Shape/Gather/Concat flatten, Where binarizer
    wflat = rng.normal(0, 1, 2 * 3 * 2 * 2 + 0).astype(f32)
    inits = {"wflat": wflat, "wshape": np.array([2, 3, 2, 2], np.int64),
             "perm_src": rng.normal(0, 1, (4, 2)).astype(f32), "zero": np.array(0.0, f32),
             "one": np.array(1.0, f32), "mone": np.array(-1.0, f32),
             "gidx": np.array(0, np.int64), "m1": np.array([-1], np.int64),
             "sl_s": np.array([0], np.int64), "sl_e": np.array([5], np.int64),
             "ax0": np.array([0], np.int64), **_bn("bn1", 2, rng)}
    out["fold"] = _model([
        N("Reshape", ["wflat", "wshape"], ["cw"], name="/conv/Reshape"),
        N("Transpose", ["cw"], ["cwt"], name="/conv/Transpose", perm=[0, 1, 2, 3]),
        N("Conv", ["x", "cwt"], ["c1"], name="/conv/Conv", strides=[2, 2], auto_pad="VALID"),
        _bn_node("bn1", "c1", "b1"),
        N("GreaterOrEqual", ["b1", "zero"], ["ge"], name="/act/GreaterOrEqual"),
        N("Where", ["ge", "one", "mone"], ["s1"], name="/act/Where"),
        N("AveragePool", ["s1"], ["ap"], name="/pool/AveragePool", kernel_shape=[1, 1],
          strides=[1, 1], count_include_pad=0),
        N("Shape", ["ap"], ["shp"], name="/flat/Shape"),
        N("Gather", ["shp", "gidx"], ["bdim"], name="/flat/Gather", axis=0),
        N("Unsqueeze", ["bdim", "ax0"], ["bdim1"], name="/flat/Unsqueeze"),
        N("Concat", ["bdim1", "m1"], ["tgt"], name="/flat/Concat", axis=0),
        N("Reshape", ["ap", "tgt"], ["f1"], name="/flat/Reshape"),
        N("Transpose", ["perm_src"], ["w2"], name="/fc/Transpose", perm=[1, 0]),
        N("Slice", ["w2", "sl_s", "sl_e", "ax0"], ["w2s"], name="/fc/Slice"),
        N("Squeeze", ["w2s"], ["w2q"], name="/fc/Squeeze"),
        N("Sign", ["w2q"], ["w2b"], name="/fc/SignW"),
        N("MatMul", ["f1", "w2b"], ["y"], name="/fc/MatMul"),
    ], inits, ["N", 3, 3, 3])
    # QONNX: 8-bit input Quant, BipolarQuant weights, MultiThreshold, GlobalAveragePool, residual
    q = "qonnx.custom_op.general"
    inits = {"qs": np.array(1 / 128, f32), "qz": np.array(0, f32), "qb": np.array(8, f32),
             "cw": rng.normal(0, 1, (2, 2, 3, 3)).astype(f32), "ws": np.array(1.0, f32),
             "cw2": rng.normal(0, 1, (2, 2, 1, 1)).astype(f32), "thr": np.zeros((1, 1), f32),
             "fw": rng.normal(0, 1, (2, 4)).astype(f32), **_bn("bn1", 2, rng)}
    out["qonnx"] = _model([
        N("Quant", ["x", "qs", "qz", "qb"], ["xq"], domain=q, name="/in/Quant", signed=1,
          narrow=0, rounding_mode="ROUND"),
        N("BipolarQuant", ["cw", "ws"], ["cwq"], domain=q, name="/c1/BipolarQuant"),
        N("Conv", ["xq", "cwq"], ["c1"], name="/c1/Conv", pads=[1, 1, 1, 1]),
        _bn_node("bn1", "c1", "b1"),
        N("MultiThreshold", ["b1", "thr"], ["s1"], domain=q, name="/a1/MultiThreshold",
          out_scale=2.0, out_bias=-1.0),
        N("BipolarQuant", ["cw2", "ws"], ["cw2q"], domain=q, name="/c2/BipolarQuant"),
        N("Conv", ["s1", "cw2q"], ["c2"], name="/c2/Conv"),
        N("Add", ["c2", "c1"], ["r"], name="/res/Add"),
        N("GlobalAveragePool", ["r"], ["gap"], name="/gap/GlobalAveragePool"),
        N("Flatten", ["gap"], ["f"], name="/flat/Flatten"),
        N("MatMul", ["f", "fw"], ["y"], name="/fc/MatMul"),
    ], inits, ["N", 2, 4, 4], opsets=(("", 17), (q, 1)))
    # tf2onnx-style NHWC input, scaling, Relu, Dropout, Identity, Cast
    inits = {"sc": np.array(0.5, f32), "cw": rng.normal(0, 1, (3, 2, 2, 2)).astype(f32),
             "fw": rng.normal(0, 1, (27, 2)).astype(f32), "fb": np.ones(2, f32)}
    out["nhwc"] = _model([
        N("Mul", ["x", "sc"], ["xm"], name="scale/Mul"),
        N("Transpose", ["xm"], ["xt"], name="to_nchw/Transpose", perm=[0, 3, 1, 2]),
        N("Conv", ["xt", "cw"], ["c1"], name="conv/Conv"),
        N("Relu", ["c1"], ["r1"], name="relu/Relu"),
        N("Dropout", ["r1"], ["d1"], name="drop/Dropout"),
        N("Identity", ["d1"], ["i1"], name="id/Identity"),
        N("Cast", ["i1"], ["k1"], name="cast/Cast", to=TensorProto.FLOAT),
        N("Flatten", ["k1"], ["f1"], name="flat/Flatten"),
        N("MatMul", ["f1", "fw"], ["m"], name="fc/MatMul"),
        N("Add", ["m", "fb"], ["y"], name="fc/Add"),
    ], inits, ["N", 4, 4, 2])
    return out


def base_models() -> dict[str, bytes]:
    """name -> serialized model; the same bytes on every call."""
    bases: dict[str, bytes] = {}
    d = shared_models_dir()
    if d is not None:
        for p in sorted(glob.glob(str(d / "*" / "*.onnx"))):
            bases[f"shipped:{Path(p).stem}"] = Path(p).read_bytes()
    bases["zoo:tfc"] = build_zoo_model("tfc").SerializeToString(deterministic=True)
    bases["zoo:cnv"] = build_zoo_model("cnv", width=0.125).SerializeToString(deterministic=True)
    bases["zoo:cnv_qonnx"] = build_zoo_model("cnv", fmt="qonnx", width=0.125) \
        .SerializeToString(deterministic=True)
    for k, m in _small_models().items():
        bases[f"small:{k}"] = m.SerializeToString(deterministic=True)
    return bases


# ---------------------------------------------------------------------------------------------
# mutators: (rng, bytes) -> bytes. Model-level ones parse, edit the ModelProto, re-serialize.


def _int_hostile(rng: random.Random) -> int:
    return rng.choice([0, -1, -2, 1, 2, 3, 7, 2**31 - 1, 2**31, 2**32, 2**40, -(2**40),
                       2**62, 2**63 - 1, -(2**63), 10**6])


def _dims_hostile(rng: random.Random) -> list[int]:
    kind = rng.randrange(6)
    if kind == 0:
        return []
    if kind == 1:
        return [_int_hostile(rng) for _ in range(rng.randint(1, 4))]
    if kind == 2:
        return [2**40]
    if kind == 3:
        return [2**20, 2**20, 2**20]
    if kind == 4:
        return [1] * rng.choice([8, 33, 100])
    return [rng.randint(-3, 5) for _ in range(rng.randint(1, 5))]


def _truncate(rng, data: bytes) -> bytes:
    return data[:rng.randrange(len(data) + 1)]


def _flip_bytes(rng, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice([1, 1, 2, 4, 16])):
        if b:
            b[rng.randrange(len(b))] ^= rng.randrange(1, 256)
    return bytes(b)


def _splice(rng, data: bytes) -> bytes:
    n = len(data)
    i, j = sorted(rng.randrange(n + 1) for _ in range(2))
    kind = rng.randrange(4)
    if kind == 0:
        return data[:i] + data[j:]                       # delete a chunk
    if kind == 1:
        return data[:j] + data[i:j] + data[j:]           # duplicate a chunk
    if kind == 2:
        return data[:i] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))) + data[i:]
    return data[:i] + b"\xff" * rng.randint(1, 12) + data[i:]    # varint-length bombs


def _garbage(rng, data: bytes) -> bytes:
    n = rng.choice([0, 1, 2, 16, 1000])
    return bytes(rng.randrange(256) for _ in range(n))


def _pick_init(rng, m: onnx.ModelProto) -> TensorProto | None:
    inits = list(m.graph.initializer)
    return rng.choice(inits) if inits else None


def _init_dtype(rng, m):
    t = _pick_init(rng, m)
    if t is None:
        return
    dt = rng.choice([TensorProto.INT64, TensorProto.FLOAT16, TensorProto.DOUBLE,
                     TensorProto.STRING, TensorProto.INT8, TensorProto.BOOL, TensorProto.BFLOAT16,
                     TensorProto.COMPLEX64, TensorProto.UINT64, TensorProto.UNDEFINED, 999])
    if rng.random() < 0.5 and dt not in (TensorProto.UNDEFINED, 999, TensorProto.STRING):
        arr = numpy_helper.to_array(t)
        np_dt = helper.tensor_dtype_to_np_dtype(dt)
        with np.errstate(all="ignore"):
            new = numpy_helper.from_array(np.nan_to_num(arr.astype(np.float64)).astype(np_dt),
                                          t.name)
        t.CopyFrom(new)
    elif dt == TensorProto.STRING and rng.random() < 0.5:
        t.CopyFrom(helper.make_tensor(t.name, TensorProto.STRING, list(t.dims),
                                      [b"s"] * int(np.prod(t.dims, dtype=np.int64))))
    else:
        t.data_type = dt                                  # relabel: payload no longer matches


def _init_dims(rng, m):
    t = _pick_init(rng, m)
    if t is None:
        return
    del t.dims[:]
    t.dims.extend(_dims_hostile(rng))
    if rng.random() < 0.6:                                # dims without data
        t.ClearField("raw_data")
        t.ClearField("float_data")
        t.ClearField("int64_data")
        t.ClearField("int32_data")


def _init_values(rng, m):
    floats = [t for t in m.graph.initializer if t.data_type == TensorProto.FLOAT]
    if not floats:
        return
    t = rng.choice(floats)
    arr = numpy_helper.to_array(t).copy()
    if arr.size == 0:
        return
    flat = arr.reshape(-1)
    special = [np.nan, np.inf, -np.inf, 0.0, -0.0, 3.4e38, -3.4e38, 1e-45, 1.0, -1.0]
    if rng.random() < 0.3:
        flat[:] = rng.choice(special)
    else:
        for _ in range(rng.randint(1, 4)):
            flat[rng.randrange(flat.size)] = rng.choice(special)
    t.CopyFrom(numpy_helper.from_array(arr, t.name))


def _init_other(rng, m):
    g = m.graph
    kind = rng.randrange(5)
    t = _pick_init(rng, m)
    if t is None:
        return
    if kind == 0:
        g.initializer.remove(t)
    elif kind == 1:
        g.initializer.append(copy.deepcopy(t))           # duplicate name
    elif kind == 2:
        t.data_location = TensorProto.EXTERNAL
        del t.external_data[:]
        loc = rng.choice(["missing.bin", "../../../etc/passwd", "/etc/passwd", "", "fuzz.onnx",
                          "a\x00b", "."])
        external_data_helper.set_external_data(t, loc, offset=rng.choice([None, 0, 2**40]),
                                 length=rng.choice([None, 0, 8, 2**40]))
    elif kind == 3:
        g.input.append(helper.make_tensor_value_info(t.name, TensorProto.FLOAT, ["N", 3]))
    else:
        t.name = rng.choice(HOSTILE_NAMES)               # now a dangling reference elsewhere


def _value_info_dims(rng, m):
    g = m.graph
    vis = list(g.input) + list(g.output) + list(g.value_info)
    if not vis:
        return
    vi = rng.choice(vis) if rng.random() < 0.5 else g.input[0]
    kind = rng.randrange(5)
    if kind == 0:
        tt = vi.type.tensor_type
        tt.shape.Clear()
        for d in _dims_hostile(rng):
            tt.shape.dim.add().dim_value = d
        if rng.random() < 0.3:
            tt.shape.dim.add().dim_param = rng.choice(HOSTILE_NAMES)
    elif kind == 1:
        vi.type.tensor_type.ClearField("shape")
    elif kind == 2:
        vi.type.tensor_type.elem_type = rng.choice(
            [TensorProto.INT64, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.STRING, 0,
             12345])
    elif kind == 3:
        vi.type.Clear()
        vi.type.sequence_type.elem_type.tensor_type.elem_type = TensorProto.FLOAT
    else:
        vi.type.Clear()
        vi.type.map_type.key_type = TensorProto.STRING


def _pick_node(rng, m) -> onnx.NodeProto | None:
    nodes = list(m.graph.node)
    return rng.choice(nodes) if nodes else None


def _cycle(rng, m):
    nodes = list(m.graph.node)
    if not nodes:
        return
    i = rng.randrange(len(nodes))
    j = rng.randrange(i, len(nodes))
    if nodes[i].input and nodes[j].output:
        nodes[i].input[rng.randrange(len(nodes[i].input))] = nodes[j].output[0]


def _dangling(rng, m):
    n = _pick_node(rng, m)
    if n is not None and n.input:
        n.input[rng.randrange(len(n.input))] = rng.choice(["nowhere", "", "x_missing"])


def _dup_output(rng, m):
    g = m.graph
    n = _pick_node(rng, m)
    if n is None or not n.output:
        return
    choices = [o for k in g.node for o in k.output] + [i.name for i in g.input] + \
        [t.name for t in g.initializer]
    n.output[0] = rng.choice(choices)


_ATTR_NAMES = ("strides", "pads", "kernel_shape", "dilations", "group", "perm", "axis", "axes",
               "transA", "transB", "alpha", "beta", "epsilon", "momentum", "ceil_mode",
               "auto_pad", "count_include_pad", "to", "allowzero", "start", "end", "value",
               "training_mode", "out_scale", "out_bias", "signed", "narrow", "rounding_mode",
               "value_float", "value_ints", "storage_order", "keepdims")


def _attr_value(rng):
    kind = rng.randrange(9)
    if kind == 0:
        return _int_hostile(rng)
    if kind == 1:
        return [_int_hostile(rng) for _ in range(rng.randint(0, 5))]
    if kind == 2:
        return rng.choice([float("nan"), float("inf"), -float("inf"), -1.0, 0.0, 1e30, 1e-30])
    if kind == 3:
        return rng.choice(["SAME_UPPER", "SAME_LOWER", "VALID", "NOTSET", "", "FLOOR", "bogus",
                           *HOSTILE_NAMES[:8]])
    if kind == 4:
        return [rng.randint(-4, 6) for _ in range(rng.randint(0, 6))]    # perms, pads, axes
    if kind == 5:
        return [float(rng.randint(-3, 3)) for _ in range(rng.randint(0, 3))]
    if kind == 6:
        return numpy_helper.from_array(np.array(rng.choice([[1.0], [], [np.nan]]), np.float32))
    if kind == 7:
        return helper.make_graph([], "sub", [], [])
    return rng.choice([True, 0, 1, -1])


def _attr(rng, m):
    n = _pick_node(rng, m)
    if n is None:
        return
    names = [a.name for a in n.attribute]
    name = rng.choice(names) if names and rng.random() < 0.7 else rng.choice(_ATTR_NAMES)
    for a in list(n.attribute):
        if a.name == name:
            n.attribute.remove(a)
    if rng.random() < 0.15:
        return                                          # a required attribute goes missing
    value = _attr_value(rng)
    if isinstance(value, list) and not value:
        n.attribute.append(helper.make_attribute(name, value, attr_type=onnx.AttributeProto.INTS))
    else:
        n.attribute.append(helper.make_attribute(name, value))


def _attr_many(rng, m):
    n = _pick_node(rng, m)
    if n is None:
        return
    if rng.random() < 0.5:
        n.attribute.extend(helper.make_attribute(f"junk{i}", i) for i in range(5000))
    else:
        name = rng.choice(["pads", "strides", "perm", "kernel_shape", "axes", "value_ints"])
        for a in list(n.attribute):
            if a.name == name:
                n.attribute.remove(a)
        n.attribute.append(helper.make_attribute(name, [1] * 100000))


def _rename_tensor(m: onnx.ModelProto, old: str, new: str) -> None:
    g = m.graph
    for n in g.node:
        n.input[:] = [new if s == old else s for s in n.input]
        n.output[:] = [new if s == old else s for s in n.output]
    for coll in (g.input, g.output, g.value_info, g.initializer):
        for v in coll:
            if v.name == old:
                v.name = new


def _names(rng, m):
    g = m.graph
    kind = rng.randrange(5)
    name = rng.choice(HOSTILE_NAMES)
    if kind == 0 and g.node:
        for n in g.node:
            if rng.random() < 0.5:
                n.name = name + (str(rng.randrange(3)) if rng.random() < 0.5 else "")
    elif kind == 1:
        g.name = name
    elif kind == 2 and g.input:
        _rename_tensor(m, g.input[0].name, name)
    elif kind == 3 and g.output:
        _rename_tensor(m, g.output[0].name, name)
    else:
        tensors = sorted({s for n in g.node for s in (*n.input, *n.output) if s})
        if tensors:
            _rename_tensor(m, rng.choice(tensors), name)


def _empty(rng, m):
    g = m.graph
    kind = rng.randrange(5)
    if kind == 0:
        del g.node[:]
    elif kind == 1:
        m.ClearField("graph")
    elif kind == 2:
        del g.node[:]
        del g.initializer[:]
    elif kind == 3:
        del g.output[:]
    else:
        del g.input[:]


def _domains(rng, m):
    kind = rng.randrange(5)
    if kind == 0:
        del m.opset_import[:]
    elif kind == 1:
        n = _pick_node(rng, m)
        if n is not None:
            n.domain = rng.choice(["com.example", "qonnx.custom_op.general", "ai.onnx.ml",
                                   "com.microsoft", *HOSTILE_NAMES[:6]])
    elif kind == 2:
        for o in m.opset_import:
            o.version = rng.choice([0, 1, -1, 10**9])
    elif kind == 3:
        m.opset_import.append(helper.make_opsetid("", 9))
    else:
        m.ir_version = rng.choice([0, 1, 3, 99, -1])


_OPS = ("MatMul", "Gemm", "Conv", "BatchNormalization", "Sign", "BipolarQuant", "Quant",
        "MultiThreshold", "MaxPool", "AveragePool", "GlobalAveragePool", "Flatten", "Reshape",
        "Relu", "Add", "Sub", "Mul", "Div", "Neg", "Softmax", "Identity", "Dropout", "Transpose",
        "Where", "GreaterOrEqual", "Less", "Shape", "Gather", "Concat", "Cast", "Constant",
        "ConstantOfShape", "Expand", "Slice", "Squeeze", "Unsqueeze", "Pow", "Sqrt", "If", "Loop",
        "LSTM", "Tanh", "NoSuchOp", "")


def _op_type(rng, m):
    n = _pick_node(rng, m)
    if n is not None:
        n.op_type = rng.choice(_OPS)


def _structure(rng, m):
    g = m.graph
    nodes = list(g.node)
    if not nodes:
        return
    n = rng.choice(nodes)
    kind = rng.randrange(6)
    if kind == 0:
        g.node.remove(n)
    elif kind == 1:
        g.node.append(copy.deepcopy(n))                 # also a duplicate producer
    elif kind == 2 and len(n.input) >= 2:
        n.input[0], n.input[1] = n.input[1], n.input[0]
    elif kind == 3 and n.input:
        del n.input[rng.randrange(len(n.input))]
    elif kind == 4:
        n.input.append(rng.choice([i.name for i in g.input] + [t.name for t in g.initializer]
                                  + [""]))
    else:
        order = list(g.node)
        rng.shuffle(order)
        del g.node[:]
        g.node.extend(order)


def _io(rng, m):
    g = m.graph
    kind = rng.randrange(4)
    if kind == 0 and g.output:
        g.output.append(copy.deepcopy(g.output[0]))
    elif kind == 1 and g.input:
        g.input.append(helper.make_tensor_value_info("x_extra", TensorProto.FLOAT, ["N", 4]))
    elif kind == 2 and g.output:
        g.output[0].name = rng.choice([i.name for i in g.input] + [t.name for t in g.initializer]
                                      or ["y"])
    elif kind == 3 and g.node:
        g.output[0].name = rng.choice(g.node).output[0] if g.output else "y"


def _bomb(rng, m):
    """Constant subgraphs whose folded value would be huge, feeding a used weight input."""
    g = m.graph
    targets = [(n, k) for n in g.node for k, s in enumerate(n.input)
               if k > 0 and s in {t.name for t in g.initializer}]
    if not targets:
        return
    n, k = rng.choice(targets)
    big = rng.choice([2**16, 2**20, 2**31, 2**40])
    kind = rng.randrange(4)
    if kind == 0:
        shape = numpy_helper.from_array(np.array([big, big], np.int64), "bomb_shape")
        g.initializer.append(shape)
        g.node.insert(0, helper.make_node("ConstantOfShape", ["bomb_shape"], ["bomb"],
                                          name="bomb/ConstantOfShape"))
    elif kind == 1:
        g.initializer.extend([numpy_helper.from_array(np.ones((1,), np.float32), "bomb_one"),
                              numpy_helper.from_array(np.array([big, 4], np.int64), "bomb_shape")])
        g.node.insert(0, helper.make_node("Expand", ["bomb_one", "bomb_shape"], ["bomb"],
                                          name="bomb/Expand"))
    elif kind == 2:
        side = rng.choice([2**12, 2**15])
        g.initializer.extend([numpy_helper.from_array(np.ones((side, 1), np.float32), "bomb_a"),
                              numpy_helper.from_array(np.ones((1, side), np.float32), "bomb_b")])
        g.node.insert(0, helper.make_node("Mul", ["bomb_a", "bomb_b"], ["bomb"], name="bomb/Mul"))
    else:
        g.initializer.extend([numpy_helper.from_array(np.ones((1, 2**12), np.float32), "bomb_a"),
                              numpy_helper.from_array(np.zeros(2**14, np.int64), "bomb_i")])
        g.node.insert(0, helper.make_node("Gather", ["bomb_a", "bomb_i"], ["bomb"], axis=0,
                                          name="bomb/Gather"))
    n.input[k] = "bomb"


def _int_values(rng, m):
    """Shape, index, axis and bit-width constants get hostile integers (or a new length)."""
    ints = [t for t in m.graph.initializer
            if t.data_type in (TensorProto.INT64, TensorProto.INT32) or
            (t.data_type == TensorProto.FLOAT and math.prod(t.dims) <= 4)]
    if not ints:
        return
    t = rng.choice(ints)
    arr = numpy_helper.to_array(t)
    n = arr.size if rng.random() < 0.7 else rng.randint(0, 6)
    vals = [rng.choice([0, 1, -1, 2, 3, 8, 9, 16, 2**31, -(2**40), 2**40, -987654321])
            for _ in range(n)]
    shape = arr.shape if n == arr.size else (n,)
    with np.errstate(all="ignore"):
        new = np.array(vals, dtype=np.float64).astype(arr.dtype).reshape(shape)
    t.CopyFrom(numpy_helper.from_array(new, t.name))


def _scalar_values(rng, m):
    """Small float constants (scales, thresholds, zero points, BN parameters) get odd values."""
    small = [t for t in m.graph.initializer
             if t.data_type == TensorProto.FLOAT and math.prod(t.dims) <= 64]
    if not small:
        return
    t = rng.choice(small)
    arr = numpy_helper.to_array(t).copy()
    if arr.size == 0:
        return
    flat = arr.reshape(-1)
    pick = [0.0, -0.0, -1.0, 1.0, 0.5, -0.5, 2.0, 1e-45, 1e-30, 3e38, -3e38, 1e4, 255.0]
    if rng.random() < 0.5:
        flat[:] = rng.choice(pick)
    else:
        flat[rng.randrange(flat.size)] = rng.choice(pick)
    t.CopyFrom(numpy_helper.from_array(arr, t.name))


def _insert_node(rng, m):
    """Splice a random op (random attributes, random constant operands) onto a tensor."""
    g = m.graph
    tensors = [i.name for i in g.input] + [o for n in g.node for o in n.output if o]
    if not tensors or not g.node:
        return
    src = rng.choice(tensors)
    new = f"ins{rng.randrange(10**6)}"
    users = [(n, k) for n in g.node for k, s in enumerate(n.input) if s == src]
    op = rng.choice(["Transpose", "Reshape", "Flatten", "Unsqueeze", "Squeeze", "MaxPool",
                     "AveragePool", "GlobalAveragePool", "Relu", "Softmax", "Mul", "Add", "Sub",
                     "Div", "Sign", "Neg", "BatchNormalization", "Dropout", "Cast", "Identity",
                     "Conv", "MatMul", "Gemm", "Where", "Shape", "Concat", "Gather", "Slice"])
    c = f"{new}_c"

    def const(arr):
        g.initializer.append(numpy_helper.from_array(np.asarray(arr), c + str(len(g.initializer))))
        return g.initializer[-1].name

    shape = [rng.choice([1, 2, 3, 4, 6, 8]) for _ in range(rng.randint(0, 4))]
    inputs, attrs = [src], {}
    if op in ("Mul", "Add", "Sub", "Div", "MatMul", "Gemm", "Concat"):
        inputs.append(const(np.full(shape, rng.choice([0.0, 1.0, -2.0, 0.5]), np.float32)))
        if rng.random() < 0.3:
            inputs.reverse()
    elif op == "Conv":
        inputs.append(const(np.ones([rng.randint(1, 4), rng.randint(1, 4), rng.randint(1, 3),
                                     rng.randint(1, 3)], np.float32)))
    elif op == "BatchNormalization":
        ch = rng.choice([1, 2, 3, 4, 6])
        inputs += [const(np.full(ch, v, np.float32)) for v in (1.0, 0.0, 0.0, 1.0)]
    elif op in ("Reshape", "Gather", "Unsqueeze", "Squeeze"):
        inputs.append(const(np.array([rng.choice([-1, 0, 1, 2, 3, 4]) for _ in
                                      range(rng.randint(0, 4))], np.int64)))
    elif op == "Slice":
        inputs += [const(np.array([rng.randint(-2, 2)], np.int64)),
                   const(np.array([rng.randint(-2, 9)], np.int64))]
    elif op == "Where":
        inputs = [const(np.array([True, False][:rng.randint(1, 2)])), src,
                  const(np.float32(rng.choice([1.0, -1.0])))]
    if op in ("Transpose",):
        attrs["perm"] = rng.sample(range(4), rng.randint(1, 4))
    if op in ("MaxPool", "AveragePool", "Conv"):
        attrs["kernel_shape"] = [rng.randint(1, 3)] * 2
        if rng.random() < 0.5:
            attrs["strides"] = [rng.randint(1, 3)] * 2
        if rng.random() < 0.5:
            attrs["pads"] = [rng.randint(0, 1)] * 4
        if rng.random() < 0.2:
            attrs["ceil_mode"] = 1
    if op in ("Flatten", "Softmax", "Concat", "Gather"):
        attrs["axis"] = rng.randint(-3, 3)
    if op == "Cast":
        attrs["to"] = rng.choice([TensorProto.FLOAT, TensorProto.INT64, TensorProto.FLOAT16])
    if op == "Gemm":
        attrs["transB"] = rng.randint(0, 1)
    node = helper.make_node(op, inputs, [new], name=f"ins/{op}", **attrs)
    at = next((i for i, n in enumerate(g.node) if src in n.output), -1) + 1
    g.node.insert(at, node)
    for n, k in users:
        n.input[k] = new
    if not users:
        for o in g.output:
            if o.name == src:
                o.name = new


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, payload: bytes) -> bytes:
    return _varint(num << 3 | 2) + _varint(len(payload)) + payload


def _nest(rng, data: bytes) -> bytes:
    """Appends (protobuf merges it into the graph) a dead node whose graph attribute nests `depth`
    levels deep, written as wire format: helper.make_graph itself refuses deep nesting."""
    depth = rng.choice([5, 30, 40, 200])
    attr = _field(1, b"g") + _varint(20 << 3) + _varint(5)       # AttributeProto name, type=GRAPH
    for _ in range(depth):
        node = _field(4, b"If") + _field(5, attr)                  # NodeProto op_type, attribute
        graph = _field(1, node)                                    # GraphProto.node
        attr = _field(1, b"g") + _varint(20 << 3) + _varint(5) + _field(6, graph)
    node = _field(4, b"If") + _field(3, b"nest/If") + _field(5, attr)
    return data + _field(7, _field(1, node))                       # ModelProto.graph.node


BYTE_MUTATORS: dict[str, Callable[[random.Random, bytes], bytes]] = {
    "truncate": _truncate, "flip_bytes": _flip_bytes, "splice": _splice, "garbage": _garbage,
    "nest": _nest}
MODEL_MUTATORS: dict[str, Callable[[random.Random, onnx.ModelProto], None]] = {
    "init_dtype": _init_dtype, "init_dims": _init_dims, "init_values": _init_values,
    "init_other": _init_other, "value_info_dims": _value_info_dims, "cycle": _cycle,
    "dangling": _dangling, "dup_output": _dup_output, "attr": _attr, "attr_many": _attr_many,
    "names": _names, "empty": _empty, "domains": _domains, "op_type": _op_type,
    "structure": _structure, "io": _io, "bomb": _bomb, "int_values": _int_values,
    "scalar_values": _scalar_values, "insert_node": _insert_node}
MUTATORS = sorted(BYTE_MUTATORS) + sorted(MODEL_MUTATORS)


def mutate(rng: random.Random, data: bytes, mutator: str) -> bytes:
    """Apply `mutator` (bytes-level), or it plus 0-2 random model-level ones, to `data`."""
    if mutator in BYTE_MUTATORS:
        return BYTE_MUTATORS[mutator](rng, data)
    m = onnx.load_model_from_string(data)
    for i in range(1 + rng.choice([0, 0, 1, 2])):
        try:
            MODEL_MUTATORS[mutator if i == 0 else rng.choice(sorted(MODEL_MUTATORS))](rng, m)
        except Exception:   # noqa: BLE001 - a mutator may not apply to an earlier one's result
            continue
    try:
        return m.SerializeToString()
    except Exception:      # e.g. a string field holding bytes that are not UTF-8: not a file
        return data


# ---------------------------------------------------------------------------------------------
# the property


@dataclass(frozen=True)
class Outcome:
    kind: str          # "ok", "rejected", or one of FAILURE_KINDS
    stage: str         # "load", "standard", "proposed" (where it ended); "" for ok
    cls: str           # exception class name ("" for ok)
    message: str

    @property
    def failed(self) -> bool:
        return self.kind in FAILURE_KINDS

    @property
    def label(self) -> str:
        return "ok" if self.kind == "ok" else f"{self.kind}:{self.stage}:{self.cls}"


def message_problem(e: BnncError, where: tuple[str, ...]) -> str | None:
    """Why a BnncError's text is unfit for the one-line CLI report, or None."""
    for what, text in (("message", e.message), ("hint", e.hint)):
        if text is None and what == "hint":
            continue
        if not isinstance(text, str) or not text.strip():
            return f"empty {what}"
        if not text.isprintable():
            return f"{what} has unprintable characters: {text[:200]!r}"
        if len(text) > MAX_MESSAGE_CHARS:
            return f"{what} is {len(text)} characters long"
    if not any(w in e.message for w in where):
        return f"message names none of {where}: {e.message[:300]!r}"
    return None


def _check_identifiers(graph, schedules) -> None:
    assert IDENT.match(graph.name), f"graph name {graph.name!r}"
    for lay in graph.layers:
        assert IDENT.match(lay.name), f"layer name {lay.name!r}"
    for s in schedules:
        for t in s.tensors:
            assert TENSOR_NAME.match(t), f"schedule tensor name {t!r}"
        for st in s.steps:
            assert st.layer is None or st.layer == "" or IDENT.match(st.layer), st.layer


def check_bytes(data: bytes, filename: str = "fuzz_model.onnx", *, emit_c: bool = False) -> Outcome:
    """Run the whole property on one file's bytes, in this process (see `run_isolated`). A
    warning (numpy casting, overflow, ...) is a failure too: it means garbage went unnoticed; a
    BnncWarning (a dropped node) is bnnc telling the user, not a failure."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _check(data, filename, emit_c)
    caught = [w for w in caught if not issubclass(w.category, BnncWarning)]
    if caught and not out.failed:
        w = caught[0]
        return Outcome("warning", out.stage, w.category.__name__,
                       f"{Path(w.filename).name}:{w.lineno}: {w.message}")
    return out


def _check(data: bytes, filename: str, emit_c: bool = False) -> Outcome:
    with tempfile.TemporaryDirectory(prefix="bnnc_fuzz_") as d:
        path = Path(d) / filename
        path.write_bytes(data)
        stage = "load"
        try:
            graph = load_model(path)
        except BnncError as e:
            if INTERNAL_ERROR in e.message:
                cause = e.__cause__
                return Outcome("crash", stage, type(cause).__name__ if cause else "?", e.message)
            bad = message_problem(e, (filename,))
            if bad:
                return Outcome("bad-message", stage, type(e).__name__, bad)
            return Outcome("rejected", stage, type(e).__name__, e.message)
        except AssertionError as e:
            return Outcome("invalid", stage, "AssertionError", str(e)[:500])
        except Exception as e:  # noqa: BLE001 - classifying every escape is the point
            return Outcome("crash", stage, type(e).__name__, str(e)[:500])
    schedules, planned = [], []
    first_reject = None
    try:
        graph.verify()
        _check_identifiers(graph, [])
    except AssertionError as e:
        return Outcome("invalid", stage, "AssertionError", str(e)[:500])
    if math.prod(graph.input_shape) <= MAX_INFER_ELEMENTS:
        stage = "infer"
        try:
            shape = (BATCH, *onnx_input_shape(graph))
            x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
            with np.errstate(all="ignore"):     # huge but finite weights may overflow: allowed
                y = infer(graph, x)
            if y.shape != (BATCH, *graph.output.shape):
                return Outcome("invalid", stage, "shape", f"output shape {y.shape}")
        except Exception as e:  # noqa: BLE001
            return Outcome("crash", stage, type(e).__name__, str(e)[:500])
    for alg in ALGORITHMS:
        stage = alg
        try:
            cfg = make_config(alg, batch=BATCH)
            check_config_for_graph(graph, cfg)
            sched = build_schedule(graph, cfg)
            sched.verify()
            live, plan = plan_schedule(sched)
            check_plan(live, plan)
            schedules.append(sched)
            planned.append((sched, plan))
        except BnncError as e:
            bad = message_problem(e, (f"'{graph.name}'", "layer '"))
            if bad:
                return Outcome("bad-message", stage, type(e).__name__, bad)
            first_reject = first_reject or Outcome("rejected", stage, type(e).__name__,
                                                   e.message)
        except AssertionError as e:
            return Outcome("invalid", stage, "AssertionError", str(e)[:500])
        except Exception as e:  # noqa: BLE001
            return Outcome("crash", stage, type(e).__name__, str(e)[:500])
    try:
        _check_identifiers(graph, schedules)
    except AssertionError as e:
        return Outcome("invalid", "names", "AssertionError", str(e)[:500])
    for sched, plan in planned if emit_c else ():
        out = _check_c(graph, sched, plan)
        if out.failed:
            return out
        first_reject = first_reject or (out if out.kind == "rejected" else None)
    return first_reject or Outcome("ok", "", "", "")


def _check_c(graph, sched, plan) -> Outcome:
    """Emit the host C of one planned schedule and have the host compiler check the model and
    trainer sources (syntax, types and every -Wall -Wextra -pedantic warning, as errors)."""
    stage = f"c-{sched.config.algorithm}"
    tgt = load_target("host")
    with tempfile.TemporaryDirectory(prefix="bnnc_fuzz_c_") as d:
        try:
            em = emit_c_sources(sched, plan, tgt, d)
        except BnncError as e:
            bad = message_problem(e, (f"'{graph.name}'", "layer '", "model"))
            if bad:
                return Outcome("bad-message", stage, type(e).__name__, bad)
            return Outcome("rejected", stage, type(e).__name__, e.message)
        except AssertionError as e:
            return Outcome("invalid", stage, "AssertionError", str(e)[:500])
        except Exception as e:  # noqa: BLE001
            return Outcome("crash", stage, type(e).__name__, str(e)[:500])
        sources = [str(f) for f in em.files if f.suffix == ".c"]
        try:
            r = subprocess.run([tgt.cc, *tgt.cflags, "-fsyntax-only", "-I", d, *sources],
                               capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            return Outcome("bad-c", stage, type(e).__name__, str(e)[:500])
        if r.returncode != 0:
            return Outcome("bad-c", stage, "cc", r.stderr.strip()[-800:])
    return Outcome("ok", "", "", "")


def _vm_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def run_isolated(data: bytes, *, timeout_s: float = 20.0, headroom_bytes: int = 1 << 30,
                 filename: str = "fuzz_model.onnx", emit_c: bool = False) -> Outcome:
    """`check_bytes` in a forked child limited to (current address space + headroom) bytes and
    `timeout_s` seconds; without fork (non-POSIX) it runs in-process, unguarded."""
    if not hasattr(os, "fork") or not os.path.exists("/proc/self/statm"):
        return check_bytes(data, filename, emit_c=emit_c)
    limit = _vm_bytes() + headroom_bytes
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                        # child: never return into the caller
        code = 0
        try:
            os.close(r)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            sys.setrecursionlimit(max(sys.getrecursionlimit(), 3000))
            try:
                out = check_bytes(data, filename, emit_c=emit_c)
            except BaseException as e:  # noqa: BLE001 - e.g. MemoryError outside load_model
                out = Outcome("crash", "", type(e).__name__, str(e)[:500])
            payload = pickle.dumps(out)
            with os.fdopen(w, "wb") as f:
                f.write(payload)
        except BaseException:                           # noqa: BLE001
            code = 3
        finally:
            os._exit(code)
    os.close(w)
    chunks, deadline = [], time.monotonic() + timeout_s
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return Outcome("timeout", "", "", f"no answer within {timeout_s:g} s")
            ready, _, _ = select.select([r], [], [], left)
            if ready:
                chunk = os.read(r, 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
    finally:
        os.close(r)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return Outcome("signal", "", signal.Signals(sig).name, "child killed by a signal")
    if not chunks:
        return Outcome("crash", "", "ChildError",
                       f"child exited with status {os.WEXITSTATUS(status)} and no outcome "
                       "(e.g. MemoryError while reporting)")
    return pickle.loads(b"".join(chunks))


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--examples", type=int, default=1000, help="stop after this many examples")
    ap.add_argument("--seconds", type=float, default=300, help="stop after this much time")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=20.0, help="per-example limit, seconds")
    ap.add_argument("--save-failures", type=Path, default=None,
                    help="write each failing input to DIR/<n>_<mutator>.onnx")
    ap.add_argument("--emit-c", action="store_true",
                    help="also emit the C of every planned schedule and compile-check it")
    args = ap.parse_args(argv)
    bases = base_models()
    names = sorted(bases)
    rng = random.Random(args.seed)
    counts: Counter[str] = Counter()
    per_mutator: dict[str, Counter[str]] = {m: Counter() for m in MUTATORS}
    failures: list[tuple[int, str, str, Outcome]] = []
    start = time.monotonic()
    n = 0
    while n < args.examples and time.monotonic() - start < args.seconds:
        base, mut = rng.choice(names), rng.choice(MUTATORS)
        data = mutate(random.Random(rng.getrandbits(64)), bases[base], mut)
        out = run_isolated(data, timeout_s=args.timeout, emit_c=args.emit_c)
        counts[out.label] += 1
        per_mutator[mut]["failed" if out.failed else out.kind] += 1
        if out.failed:
            failures.append((n, base, mut, out))
            if args.save_failures:
                args.save_failures.mkdir(parents=True, exist_ok=True)
                (args.save_failures / f"{n:05d}_{mut}.onnx").write_bytes(data)
        n += 1
    elapsed = time.monotonic() - start
    print(f"{n} examples in {elapsed:.1f} s (seed {args.seed}, {len(bases)} base models"
          f"{', C emitted and compile-checked' if args.emit_c else ''})")
    print("\noutcome classes:")
    for label, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {c:6d}  {label}")
    print("\nper mutator (ok / rejected / failed):")
    for mut in MUTATORS:
        c = per_mutator[mut]
        print(f"  {mut:<16} {c['ok']:5d} {c['rejected']:5d} {c['failed']:5d}")
    print(f"\nfailures: {len(failures)}")
    for i, base, mut, out in failures[:50]:
        print(f"  #{i} {base} {mut}: {out.label}: {out.message[:200]}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
