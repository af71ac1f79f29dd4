"""Codegen and the host runtime: the C numerics against compiler/numerics.py (itself tested against
torch and pure-Python integers), the emitted program's C hygiene (-Werror, C99, no malloc, includes,
identifiers), determinism, the C API (state load/read, blob, init, predict) and a sanitizer run.

Every test that needs a C compiler skips when `cc` is missing (CI installs it)."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from graphs import cnv
from bnnc.compiler.c_literals import c_comment, c_float, c_label, c_string
from bnnc.compiler.codegen import emit_c
from bnnc.compiler.target import Target, load_target
from bnnc.compiler.templating import numerics_source
from bnnc.compiler.config import make_config
from bnnc.compiler.errors import DataError, TargetError
from bnnc.compiler.frontend import load_model
from bnnc.compiler.ops import KERNELS
from bnnc.compiler.planner import plan_schedule
from bnnc.compiler.schedule import build_schedule
from bnnc.compiler.zoo import build_zoo_model
from bnnc.compiler import numerics as nx
from bnnc.runtime import reference as ref
from bnnc.runtime.host import HostProgram, build_shared

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc) installed")

HOST = load_target("host")
STRICT = ("-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-ffp-contract=off")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("so-cache")


@pytest.fixture(scope="module")
def mlp_graph():
    return load_model(build_zoo_model("mlp", width=0.125, seed=3))


def _emit(graph, cfg, out: Path):
    schedule = build_schedule(graph, cfg)
    _, plan = plan_schedule(schedule, align=HOST.align)
    return emit_c(schedule, plan, HOST, out, command="test", model_sha256=graph.source_sha256,
                  onnx_names={lay.name: lay.onnx_name for lay in graph.layers})


def _batch(graph, batch: int, seed: int):
    rng = np.random.default_rng(seed)
    x = (rng.integers(-128, 128, (batch,) + graph.input_shape) / 128).astype(np.float32)
    return x, rng.integers(0, graph.num_classes, batch).astype(np.int32)


# --------------------------------------------------------------------------------------------------
# the C numerics, element by element

HARNESS = r"""
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
{numerics}
#define LOOP for (i = 0; i < n; i++)
void t_hash(const uint32_t *x, uint32_t *y, int n) {{ int i; LOOP y[i] = bnnc_hash32(x[i]); }}
void t_sr_bits(uint32_t seed, uint32_t step, uint32_t tid, uint32_t *y, int n)
{{ int i; uint32_t k = bnnc_sr_key(seed, step, tid); LOOP y[i] = bnnc_sr_bits(k, (uint32_t)i); }}
void t_bf16_sr(const float *x, const uint32_t *r, uint16_t *y, int n)
{{ int i; LOOP y[i] = bnnc_f32_to_bf16_sr(x[i], r[i]); }}
void t_bf16_rne(const float *x, uint16_t *y, int n)
{{ int i; LOOP y[i] = bnnc_f32_to_bf16_rne(x[i]); }}
void t_f16_sr(const float *x, const uint32_t *r, uint16_t *y, int n)
{{ int i; LOOP y[i] = bnnc_f32_to_f16_sr(x[i], r[i]); }}
void t_f16_rne(const float *x, uint16_t *y, int n)
{{ int i; LOOP y[i] = bnnc_f32_to_f16_rne(x[i]); }}
void t_f16_ld(const uint16_t *h, float *y, int n) {{ int i; LOOP y[i] = bnnc_f16_to_f32(h[i]); }}
void t_round_log2(const float *x, int32_t *y, int n) {{ int i; LOOP y[i] = bnnc_round_log2(x[i]); }}
"""
CDEF = """
void t_hash(const uint32_t *x, uint32_t *y, int n);
void t_sr_bits(uint32_t seed, uint32_t step, uint32_t tid, uint32_t *y, int n);
void t_bf16_sr(const float *x, const uint32_t *r, uint16_t *y, int n);
void t_bf16_rne(const float *x, uint16_t *y, int n);
void t_f16_sr(const float *x, const uint32_t *r, uint16_t *y, int n);
void t_f16_rne(const float *x, uint16_t *y, int n);
void t_f16_ld(const uint16_t *h, float *y, int n);
void t_round_log2(const float *x, int32_t *y, int n);
"""


@pytest.fixture(scope="module")
def cnum(tmp_path_factory, cache):
    import cffi
    d = tmp_path_factory.mktemp("numerics")
    src = d / "harness.c"
    src.write_text(HARNESS.format(numerics=numerics_source()))
    lib_path = build_shared(src, target=HOST, cache=cache)
    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    lib = ffi.dlopen(str(lib_path))

    def call(fn, *arrays_and_args, out_dtype, n):
        out = np.zeros(n, out_dtype)
        keep = [np.ascontiguousarray(a) for a in arrays_and_args if isinstance(a, np.ndarray)]
        it = iter(keep)
        args = [ffi.cast("void *", ffi.from_buffer(next(it))) if isinstance(a, np.ndarray) else a
                for a in arrays_and_args]
        getattr(lib, fn)(*args, ffi.cast("void *", ffi.from_buffer(out)), n)
        return out
    return call


def _floats(seed: int, n: int) -> np.ndarray:
    """Random bit patterns (every class: subnormals, NaN, inf) plus hand-picked edge values."""
    rng = np.random.default_rng(seed)
    u = rng.integers(0, 2 ** 32, n, dtype=np.uint64).astype(np.uint32)
    edge = np.array([0.0, -0.0, 1.0, -1.0, 65504.0, 65519.99, 65520.0, 70000.0, 6e-8, 5.96e-8,
                     2.98e-8, 6.1e-5, 6.09e-5, 3.4e38, np.inf, -np.inf, np.nan, 1e-45, -1e-45,
                     1.1754942e-38, 1.4142135, 1.4142137, 0.70710677, 0.7071068], np.float32)
    # magnitudes where f16 matters most: spread over [2^-30, 2^20]
    mid = rng.uniform(-30, 20, n)
    vals = np.concatenate([u.view(np.float32), edge,
                           (np.sign(rng.standard_normal(n)) * 2.0 ** mid).astype(np.float32)])
    return vals.astype(np.float32)


def test_hash_and_sr_bits_match_numerics(cnum):
    x = np.random.default_rng(0).integers(0, 2 ** 32, 5000, dtype=np.uint64).astype(np.uint32)
    assert np.array_equal(cnum("t_hash", x, out_dtype=np.uint32, n=x.size), nx.hash32(x))
    for seed, step, tid in ((0, 1, 0), (7, 123456, 41), (0xFFFFFFFF, 2 ** 32 - 1, 3)):
        got = cnum("t_sr_bits", seed, step, tid, out_dtype=np.uint32, n=4096)
        assert np.array_equal(got, nx.sr_bits(seed, step, tid, 4096))


def test_bf16_stores_match_numerics(cnum):
    x = _floats(1, 20000)
    r = nx.sr_bits(5, 9, 2, x.size)
    got = cnum("t_bf16_sr", x, r, out_dtype=np.uint16, n=x.size)
    want = (nx.to_bf16_sr(x, r).view(np.uint32) >> 16).astype(np.uint16)
    assert np.array_equal(got, want)
    got = cnum("t_bf16_rne", x, out_dtype=np.uint16, n=x.size)
    want = (nx.to_bf16_rne(x).view(np.uint32) >> 16).astype(np.uint16)
    assert np.array_equal(got, want)


def _f16_value(bits: np.ndarray) -> np.ndarray:
    return bits.view(np.float16).astype(np.float32)


def _same_floats(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal values with equal signs of zero; any NaN equals any NaN."""
    nan = np.isnan(a)
    return bool(np.array_equal(nan, np.isnan(b)) and np.array_equal(a[~nan], b[~nan])
                and np.array_equal(np.signbit(a[~nan]), np.signbit(b[~nan])))


def test_f16_stores_and_loads_match_numerics(cnum):
    x = _floats(2, 20000)
    got = cnum("t_f16_rne", x, out_dtype=np.uint16, n=x.size)
    with np.errstate(over="ignore"):
        want = x.astype(np.float16)
    assert _same_floats(_f16_value(got), want.astype(np.float32))
    r = nx.sr_bits(3, 4, 5, x.size)
    got = cnum("t_f16_sr", x, r, out_dtype=np.uint16, n=x.size)
    assert _same_floats(_f16_value(got), nx.to_f16_sr(x, r))
    every = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    got = cnum("t_f16_ld", every, out_dtype=np.float32, n=every.size)
    assert _same_floats(got, _f16_value(every))


def test_round_log2_matches_numerics(cnum):
    x = _floats(4, 20000)
    x = x[np.isfinite(x) & (x != 0)]
    # right at the rounding threshold sqrt(2) * 2^k, both sides, and subnormals
    sig = np.array([nx.PO2_ROUND_UP_SIGNIFICAND - 1, nx.PO2_ROUND_UP_SIGNIFICAND], np.float64)
    near = np.concatenate([np.ldexp(sig, k - 23) for k in range(-140, 120, 7)]).astype(np.float32)
    x = np.concatenate([x, near, -near])
    got = cnum("t_round_log2", x, out_dtype=np.int32, n=x.size)
    assert np.array_equal(got, nx.round_log2(x))


# --------------------------------------------------------------------------------------------------
# the emitted program

def test_c_literal_helpers():
    assert c_float(0.9) == "(float)0.9" and float(np.float32(0.9)) != 0.9
    assert c_comment("x */ y\n") == "x * / y "
    assert c_string('a"b\\c') == '"a\\"b\\\\c"'
    with pytest.raises(ValueError):
        c_float(float("inf"))


@pytest.mark.parametrize("algorithm,optimizer", [("proposed", "bop"), ("standard", "sgd")])
def test_emitted_c_is_strict_c99(tmp_path, mlp_graph, algorithm, optimizer):
    e = _emit(mlp_graph, make_config(algorithm, batch=8, optimizer=optimizer), tmp_path / "o")
    src = e.source.read_text()
    for cc in [c for c in ("gcc", "clang") if shutil.which(c)]:
        for extra, dump in (((), set()), (("-DBNNC_DEBUG_DUMP",), {"bnnc_dump"})):
            obj = tmp_path / "m.o"
            res = subprocess.run([cc, *STRICT, "-O2", *extra, "-c", str(e.source), "-o", str(obj)],
                                 capture_output=True, text=True)
            assert res.returncode == 0, res.stderr
            if shutil.which("nm"):
                # writable objects: the arena and the state (and the dump buffer of debug builds)
                syms = [ln.split()[-2:] for ln in subprocess.run(
                    ["nm", str(obj)], capture_output=True, text=True).stdout.splitlines()]
                bss = {name for kind, name in syms if kind in "bB"}
                assert bss == {"bnnc_arena", "bnnc_state"} | dump, bss
                data = {name.split(".")[0] for kind, name in syms if kind in "dD"}
                assert data <= {"bnnc_tensors", "text"}, data     # const tables holding pointers
    assert re.search(r"^static const bnnc_mlp_tensor_info_t bnnc_tensors\[", src, re.M)
    assert "static const char *const text[]" in src
    # time.h only for the opt-in step timer (-DBNNC_PROFILE, `bnnc profile`)
    plain = re.sub(r"^#if defined\(BNNC_PROFILE\)\n.*?^#else\n", "", src, flags=re.S | re.M)
    assert "<time.h>" in src and "<time.h>" not in plain
    # the x86 intrinsics header only where the AVX2 kernels are compiled (x86-64 builds; the
    # bit-plane popcount cores): a build for any other target never reads it
    guarded = re.findall(r"^#if ([^\n]*)\n#include <immintrin.h>$", plain, re.M)
    assert guarded == ["defined(BNNC_AVX2)"] * len(guarded)
    assert "#define BNNC_AVX2 1" in plain.split("defined(__x86_64__)", 1)[1]
    plain = re.sub(r"^#if defined\(BNNC_AVX2\)\n#include <immintrin.h>$", "", plain, flags=re.M)
    includes = set(re.findall(r"#include <([^>]+)>", plain))
    assert includes <= {"math.h", "stddef.h", "stdint.h", "string.h"}, includes
    assert not re.search(r"\b(malloc|calloc|realloc|free|printf)\s*\(", src)
    steps = re.findall(r"^static void (step_\d{3}_\w+)\(", src, re.M)
    body = src[src.index("int bnnc_mlp_train_step"):]
    calls = re.findall(r"^    (step_\d{3}_\w+)\(", body.split("\n}\n")[0], re.M)
    assert steps == calls and len(steps) == len(build_schedule(
        mlp_graph, make_config(algorithm, batch=8, optimizer=optimizer)).steps)
    code = re.sub(r"/\*.*?\*/", "", src, flags=re.S)
    named = [lay.onnx_name for lay in mlp_graph.layers if lay.onnx_name]
    assert named and any(f'ONNX node "{c_label(n)}"' in src for n in named)
    for n in named:                      # ONNX node names appear in comments only
        assert n not in code, n
    hdr = e.header.read_text()
    for s in ("#define BNNC_MLP_ARENA_BYTES", "#define BNNC_MLP_STATE_BYTES",
              "#define BNNC_MLP_BATCH 8",
              "int bnnc_mlp_train_step(const float *input, const int32_t *labels, float *loss, "
              "float *accuracy);", "void bnnc_mlp_init(uint32_t seed);", "/* BEGIN CDEF */"):
        assert s in hdr


def test_emission_is_deterministic(tmp_path, mlp_graph):
    cfg = make_config("proposed", batch=8)
    a = _emit(mlp_graph, cfg, tmp_path / "a")
    b = _emit(mlp_graph, cfg, tmp_path / "b")
    for fa, fb in zip(a.files, b.files):
        assert fa.name == fb.name and fa.read_bytes() == fb.read_bytes(), fa.name


def test_state_load_read_blob_and_init(tmp_path, mlp_graph, cache):
    cfg = make_config("proposed", batch=8)
    _emit(mlp_graph, cfg, tmp_path / "o")
    hp = HostProgram(tmp_path / "o", cache=cache)
    st = ref.init_state(mlp_graph, cfg)
    hp.load_state(st.tensors, step=0, seed=cfg.seed)
    back = hp.read_state()
    for k, v in st.tensors.items():
        assert np.array_equal(back[k].reshape(v.shape), v), k
    blob = hp.get_state()
    x, y = _batch(mlp_graph, 8, 0)
    hp.train_step(x, y)
    assert hp.step_count == 1 and any(not np.array_equal(hp.read_state()[k], back[k]) for k in back)
    hp.set_state(blob)
    assert hp.step_count == 0
    assert all(np.array_equal(hp.read_state()[k], back[k]) for k in back)
    bad = bytearray(blob)
    bad[8] ^= 1                                 # model hash
    with pytest.raises(DataError, match="model hash"):
        hp.set_state(bytes(bad))
    with pytest.raises(DataError, match="size"):
        hp.set_state(blob[:-1])
    with pytest.raises(DataError, match="label"):
        hp.train_step(x, np.full(8, 10, np.int32))
    # init: W ~ N(0, 1/fan_in), BN beta 0 and running psi 1, moments 0, step 0
    hp.init(123)
    s = hp.read_state()
    w = s["fc2.W"]
    fan_in = w.shape[0]
    assert abs(float(w.mean())) < 0.05 / math.sqrt(fan_in) * 10
    assert 0.8 < float(w.std()) * math.sqrt(fan_in) < 1.2
    assert not np.any(s["bn1.beta"]) and np.all(s["bn1.running_psi"] == 1)
    assert not np.any(s["fc2.W.m"]) and hp.step_count == 0
    hp.init(124)
    assert not np.array_equal(hp.read_state()["fc2.W"], w)


@pytest.mark.parametrize("model,algorithm", [("mlp", "proposed"), ("cnv", "standard"),
                                            ("cnv", "proposed")])
def test_training_moves_every_weight_and_predict_matches_reference(tmp_path, mlp_graph, cache,
                                                                   model, algorithm):
    graph = mlp_graph if model == "mlp" else cnv(16)
    cfg = make_config(algorithm, batch=16)
    _emit(graph, cfg, tmp_path / "o")
    hp = HostProgram(tmp_path / "o", debug=False, cache=cache)
    st = ref.init_state(graph, cfg)
    hp.load_state(st.tensors, seed=cfg.seed)
    w0 = hp.read_state()
    for k in range(4):
        x, y = _batch(graph, 16, k)
        loss, acc = hp.train_step(x, y)
        assert math.isfinite(loss) and 0.0 <= acc <= 1.0
    w1 = hp.read_state()
    for name in (n for n in w1 if n.endswith(".W")):
        assert np.all(np.isfinite(w1[name])) and not np.array_equal(w0[name], w1[name]), name
    state = ref.TrainState({k: v.astype(np.float32) for k, v in w1.items()}, hp.step_count)
    x, _ = _batch(graph, 16, 99)
    want = ref.predict(graph, cfg, state, x)
    got = hp.predict(x)
    assert np.allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.allclose(got.sum(axis=1), 1.0, atol=1e-5)


def test_every_registry_kernel_has_a_c_lowering():
    assert all(callable(k.lower) for k in KERNELS.values())


DRIVER = r"""
#include <stdio.h>
#include "%(model)s.h"
int main(void)
{
    static float x[%(P)s_INPUT_ELEMS], probs[%(P)s_BATCH * %(P)s_CLASSES];
    static int32_t y[%(P)s_BATCH];
    float loss = 0.0f, acc = 0.0f;
    int i, s;
    %(p)s_init(7u);
    for (s = 0; s < 2; s++) {
        for (i = 0; i < %(P)s_INPUT_ELEMS; i++)
            x[i] = (float)((i * 37 + s * 11) %% 256 - 128) / 128.0f;
        for (i = 0; i < %(P)s_BATCH; i++) y[i] = (i + s) %% %(P)s_CLASSES;
        if (%(p)s_train_step(x, y, &loss, &acc) != BNNC_OK) return 3;
        printf("step %%d loss %%.6f acc %%.3f\n", s, loss, acc);
    }
    return %(p)s_predict(x, probs) == BNNC_OK ? 0 : 4;
}
"""


@pytest.mark.parametrize("model,algorithm,optimizer", [("mlp", "proposed", "adam"),
                                                       ("cnv", "standard", "bop")])
def test_sanitizer_build_runs_two_steps_clean(tmp_path, mlp_graph, model, algorithm, optimizer):
    graph = mlp_graph if model == "mlp" else cnv(16)
    e = _emit(graph, make_config(algorithm, batch=8, optimizer=optimizer), tmp_path)
    (tmp_path / "main.c").write_text(DRIVER % dict(model=e.model, P=e.prefix.upper(), p=e.prefix))
    exe = tmp_path / "train"
    cmd = ["cc", *STRICT, "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
           "-DBNNC_DEBUG_DUMP", "-I", str(tmp_path), str(e.source), str(tmp_path / "main.c"),
           "-o", str(exe), "-lm"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "runtime error" not in run.stderr and "AddressSanitizer" not in run.stderr
    losses = [float(m) for m in re.findall(r"loss (\S+)", run.stdout)]
    assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses)


def test_unknown_target_and_compile_errors(tmp_path):
    with pytest.raises(TargetError, match="unknown target 'nope'"):
        load_target("nope")
    src = tmp_path / "bad.c"
    src.write_text("int f(void) { return undefined_thing; }\n")
    with pytest.raises(TargetError, match="compiling .*bad.c failed"):
        build_shared(src, target=HOST, cache=tmp_path)
    t = Target("x", "no-such-cc-bnnc", (), (), 16)
    with pytest.raises(TargetError, match="not found"):
        build_shared(src, target=t, cache=tmp_path)
