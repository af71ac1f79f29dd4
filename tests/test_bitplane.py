"""Bit-plane popcount kernels of the dense PO2 products (issue 16; templates/kernels/dense.c.j2
`bitplane`, cores in kernels/vector.c.j2 and its x86/NEON overlays).

- The AVX-512 (auto on a CPU with VPOPCNTDQ), AVX2 (vpshufb popcounts) and portable cores pass
  `bnnc check` against the numpy reference on an MLP whose shapes reach the kernels' edges: a dW
  with 4100 outputs (more Q rows than one plane block holds, 481 at batch 70, so blocks start off
  a 64-bit word and end in a partial word), a batch of 70 (two words, the second partial),
  exact-zero codes (`po2_zero_to_min=False`: BNNC_PO2_ZERO), three threads (a thread's dW rows
  start off a multiple of 64) and a dX reducing over those 4100 outputs, past BNNC_BP_MAXW, so
  that product keeps the tiled `iand` kernel. tests/test_dispatch.py checks every forced variant
  (SSE2 too) on a small CNV; the rpi4 (NEON) core is checked under QEMU in tests/test_neon.py,
  which pins all traces byte for byte.
- The bit-plane path computes the same bits as the tiled `iand` kernels it replaces
  (-DBNNC_NO_BITPLANE builds the latter): same state after three steps from the same start.
- Where it is compiled: the host library has the AVX-512 core's vpopcntq and the AVX2 core; a
  Cortex-M program leaves the bit-plane path out (no popcount instruction there: the tiled
  kernels stay its path).
"""

from __future__ import annotations

import platform
import shutil
import subprocess

import numpy as np
import pytest

from graphs import mlp
from bnnc.compiler.config import make_config
from bnnc.compiler.pipeline import compile_to_c
from bnnc.compiler.target import load_target
from bnnc.runtime.check import run_check
from bnnc.runtime.host import KERNEL_VARIANTS, HostProgram

X86 = platform.machine() in ("x86_64", "AMD64")
GRAPH = mlp((16, 4100, 100), input_shape=(1, 4, 4))
CFG = make_config("proposed", batch=70, po2_zero_to_min=False)


@pytest.mark.parametrize("variant", ["auto", "avx2", "portable"])
def test_every_variant_passes_check_at_the_edges(variant, tmp_path):
    rep = run_check(GRAPH, CFG, steps=2, work_dir=tmp_path, threads=3,
                    extra_cflags=KERNEL_VARIANTS[variant])
    assert rep.ok, [r.name for r in rep.failures][:8]


def states_with_and_without_bitplane(graph, cfg, out, seed: int) -> list[bytes]:
    """The host program's state after three steps (same start, same random batches), built as it
    is and with -DBNNC_NO_BITPLANE (the kernels the bit-plane paths replace)."""
    compile_to_c(graph, cfg, load_target("host"), out)
    progs = [HostProgram(out, debug=False, extra_cflags=flags)
             for flags in ((), ("-DBNNC_NO_BITPLANE",))]
    rng = np.random.default_rng(seed)
    m = progs[0].manifest
    batches = [(progs[0].pixel_batch(rng.integers(0, 256, m.input_shape, dtype=np.uint8)),
                rng.integers(0, m.classes, m.batch).astype(np.int32)) for _ in range(3)]
    states = []
    for p in progs:
        p.init(0)
        start = p.get_state()
        for x, y in batches:
            p.train_step(x, y)
        assert p.get_state() != start
        states.append(p.get_state())
    return states


def test_bitplane_equals_the_tiled_kernels(tmp_path):
    states = states_with_and_without_bitplane(mlp((200, 96), input_shape=(1, 12, 12)),
                                              make_config("proposed", batch=50), tmp_path, 1)
    assert states[0] == states[1]


@pytest.mark.skipif(not X86 or shutil.which("objdump") is None, reason="x86-64 objdump needed")
def test_where_the_bitplane_kernels_are_compiled(tmp_path):
    g, cfg = mlp((64, 64), input_shape=(1, 8, 8)), make_config("proposed", batch=8)
    compile_to_c(g, cfg, load_target("host"), tmp_path / "host")
    lib = HostProgram(tmp_path / "host", debug=False).library
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(lib)], check=True,
                         capture_output=True, text=True).stdout
    assert "vpopcntq" in asm and "<bnnc_bp_dots_avx512" in asm and "<bnnc_bp_dots_avx2" in asm
    compile_to_c(g, cfg, load_target("cortex-m4"), tmp_path / "m4")
    host = "".join(f.read_text() for f in (tmp_path / "host").glob("*.c"))
    m4 = "".join(f.read_text() for f in (tmp_path / "m4").glob("*.c"))
    assert "#define BNNC_BITPLANE 1" in host
    assert "k_dense_dx_po2" in m4 and "#define BNNC_BITPLANE" not in m4
