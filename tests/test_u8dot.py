"""The SIMD panel path of the integer first layer (`--input u8`, issue 16) and the SIMD sign(W)
pack of the dense layers: dense_fwd_u8 and dense_dw_bin_u8 with the u8 x s8 cores of
templates/kernels/vector.c.j2 block `u8dot` (the portable core) and its x86 overlay (AVX-512 VNNI
vpdpbusd, AVX2 vpmaddubsw + vpmaddwd); pack_sign_w_dense with block `packw` (AVX-512 16 and AVX2
8 outputs at a time, the rest by the kernel's portable loop).

- Every core, forced, gives the same state after three steps as the portable build
  (-DBNNC_NO_SIMD: the tiled `iand` / `imul` kernels, the portable pack) on shapes at the
  kernels' edges: 3 channels of 5 x 5 pixels (25 per channel: a 4-pixel group is split and one
  pixel is left for the tail), 70 outputs (a partial 16-column vector and a second 64-output
  block), a batch of 70 (two 64-row blocks in the forward, a partial group of 4 samples in the
  dW), rows of zero pixels (features left out of the dW's transposed chunks), exact-zero PO2 codes
  (BNNC_PO2_ZERO), Bop's packed sign(W) (read by the forward's panel build) and a hidden layer
  whose sign(W) pack spans two 64-row chunks and 20 outputs (16 by AVX-512, 4 by the loop).
  The forced cores: the AVX2 one takes the narrow 7-bit digit planes, VNNI and the portable one
  the 8-bit ones. W is bf16 (Adam), packed bits (Bop) and f32 (`state_dtype="f32"`).
- `bnnc check` against the numpy reference runs on the host's own core in tests/test_u8_input.py.
- The host library holds vpdpbusd and vpmaddubsw; a Cortex-M program leaves the path out.
"""

from __future__ import annotations

import platform
import shutil
import subprocess

import numpy as np
import pytest

from graphs import mlp
from bnnc.compiler.config import make_config, with_input
from bnnc.compiler.pipeline import compile_to_c
from bnnc.compiler.preprocess import DEFAULT, pixel_affine
from bnnc.compiler.target import load_target
from bnnc.runtime.host import HostProgram

X86 = platform.machine() in ("x86_64", "AMD64")
# the cores each build takes on this CPU (the run-time choice capped by the flags)
CORES = {"auto": (), "avx2 core": ("-DBNNC_NO_VNNI",), "avx2 build": ("-DBNNC_NO_AVX512",),
         "portable core": ("-DBNNC_U8DOT_PORTABLE",)}


def _cfg(graph, **kw):
    cfg = make_config("proposed", **{"batch": 70, "po2_zero_to_min": False, **kw})
    return with_input(cfg, graph, "u8", pixel_affine(DEFAULT, graph.input_shape[0]))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("so-cache")


@pytest.mark.parametrize("kw,cores", [(dict(optimizer="adam"), tuple(CORES)),
                                      (dict(optimizer="bop"), ("auto",)),
                                      (dict(optimizer="adam", state_dtype="f32"), ("auto",))])
def test_every_core_equals_the_tiled_kernels(kw, cores, tmp_path, cache):
    g = mlp((70, 20), input_shape=(3, 5, 5))
    compile_to_c(g, _cfg(g, **kw), load_target("host"), tmp_path)
    # the reference: the portable build (tiled kernels, the portable sign(W) pack)
    builds = {"tiled": ("-DBNNC_NO_SIMD",), **{k: CORES[k] for k in cores}}
    progs = {k: HostProgram(tmp_path, debug=False, extra_cflags=f, cache=cache)
             for k, f in builds.items()}
    rng = np.random.default_rng(5)
    m = progs["tiled"].manifest
    batches = []
    for _ in range(3):
        u = rng.integers(0, 256, m.input_shape, dtype=np.uint8)
        u[:, :, :2] = 0                                  # zero rows in every sample
        batches.append((u, rng.integers(0, m.classes, m.batch).astype(np.int32)))
    states = {}
    for k, p in progs.items():
        p.init(0)
        start = p.get_state()
        for x, y in batches:
            p.train_step(x, y)
        assert p.get_state() != start
        states[k] = p.get_state()
    for k in cores:
        assert states[k] == states["tiled"], k


@pytest.mark.skipif(not X86 or shutil.which("objdump") is None, reason="x86-64 objdump needed")
def test_where_the_u8_cores_are_compiled(tmp_path):
    g = mlp((32, 16), input_shape=(1, 8, 8))
    cfg = _cfg(g, batch=8)
    compile_to_c(g, cfg, load_target("host"), tmp_path / "host")
    lib = HostProgram(tmp_path / "host", debug=False).library
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(lib)], check=True,
                         capture_output=True, text=True).stdout
    assert "vpdpbusd" in asm and "vpmaddubsw" in asm
    compile_to_c(g, cfg, load_target("cortex-m4"), tmp_path / "m4")
    m4 = "".join(f.read_text() for f in (tmp_path / "m4").glob("*.c"))
    assert "k_dense_fwd_u8" in m4 and "#define BNNC_U8DOT 1" not in m4
