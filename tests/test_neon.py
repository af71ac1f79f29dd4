"""NEON kernels of the Raspberry Pi targets: the ARM builds compute the same bits as the host.

(a) For the zoo MLP and a small CNV, both algorithms, the debug trainer (`--check-in/--check-out`,
the trace `bnnc check` reads: every tensor after every step, state before and after) is built for
the host, for rpi4 (run under qemu-aarch64 -cpu cortex-a72) and rpi3 (cortex-a53), and for rpi4
with -DBNNC_NO_SIMD (the portable C of the same source); all traces of the same input must be
byte-identical, and so must every forced host variant of the CNV: AVX-512 where the CPU has it
(the plain host build), -DBNNC_NO_AVX512 (AVX2), -DBNNC_NO_AVX2 (the SSE2 kernels) and
-DBNNC_NO_SIMD (the portable C), so every dispatch variant is pinned to the same bits (the MLP:
the SSE2 one). (b) The NEON path is really compiled in: the rpi4 C has the intrinsics and the host C has
none, and the rpi4 program has 128-bit `cnt` (vcntq_u8) only when SIMD is on (the portable build's
popcount is the scalar `cnt v.8b`).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from bnnc.compiler.target import load_target
from bnnc.compiler.config import make_config
from bnnc.compiler.frontend import load_model
from bnnc.compiler.pipeline import compile_to_c
from bnnc.compiler.zoo import build_zoo_model
from bnnc.runtime import reference as ref
from bnnc.compiler.contract import read_manifest
from bnnc.runtime.programs import LocalRunner, build_trainer, check_result
from bnnc.runtime.trace import trace_input

TOOLS = ("cc", "aarch64-linux-gnu-gcc", "qemu-aarch64", "aarch64-linux-gnu-objdump")
pytestmark = pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS),
                                reason=f"needs {', '.join(TOOLS)} (see targets/rpi4.toml)")

# (zoo model, width, batch): the MLP at a quarter width; CNV at 1/8 width with an odd batch, so
# row blocks of the dense kernels end in a partial block
CASES = {"mlp": ("mlp", 0.25, 100), "cnv": ("cnv", 0.125, 7)}
# (label, target, extra cflags); the host's forced dispatch variants (x86-64 run-time choice capped
# at AVX2, at SSE2, and the portable C) run for the CNV, whose step has every kernel family (conv,
# dense, BN, pool, sign, PO2, loss, Adam); the MLP keeps the SSE2 one
BUILDS = (("host", "host", ()), ("rpi4", "rpi4", ()), ("rpi4-portable", "rpi4", ("-DBNNC_NO_SIMD",)),
          ("rpi3", "rpi3", ()))
HOST_VARIANTS = (("host-avx2", "host", ("-DBNNC_NO_AVX512",)),
                 ("host-sse2", "host", ("-DBNNC_NO_AVX2",)),
                 ("host-portable", "host", ("-DBNNC_NO_SIMD",)))
STEPS = 2
_RUNS: dict = {}      # (case, algorithm) -> (compile root, {label: (program, trace bytes)})


def _trace(label, target, flags, root, trace_in):
    """(program, --check-out bytes) of the debug trainer compiled in root/<target>. Programs go to
    the shared program cache (keyed by the sha256 of sources and flags, so a hit is the same
    program): a rerun of this module skips the cross builds."""
    tgt = load_target(target)
    exe = build_trainer(root / target, tgt, debug=True, extra_cflags=flags)
    fin, fout = root / f"{label}.in", root / f"{label}.out"
    fin.write_bytes(trace_in)
    res = LocalRunner(tgt).run(exe, ["--check-in", str(fin), "--check-out", str(fout)],
                               timeout=600)
    check_result(res, f"the {label} check program")
    return exe, fout.read_bytes()


def _run(case, algorithm, root):
    """Compile `case` for every target, run the same trace through every build (memoized: the
    compiled-in test below reads the MLP's programs)."""
    if (case, algorithm) in _RUNS:
        return _RUNS[case, algorithm]
    name, width, batch = CASES[case]
    graph = load_model(build_zoo_model(name, width=width))
    cfg = make_config(algorithm, batch=batch)
    for target in {t for _, t, _ in BUILDS}:
        compile_to_c(graph, cfg, load_target(target), root / target)
    rng = np.random.default_rng(3)
    batches = [((rng.integers(-128, 128, (batch,) + graph.input_shape) / 128.0).astype(np.float32),
                rng.integers(0, graph.num_classes, batch).astype(np.int32)) for _ in range(STEPS)]
    # the same state layout on every target, so one input file serves all
    manifests = {t: read_manifest(root / t) for _, t, _ in BUILDS}
    assert len({repr(m.state) for m in manifests.values()}) == 1
    trace_in = trace_input(manifests["host"], ref.init_state(graph, cfg).tensors, batches)
    builds = BUILDS + (HOST_VARIANTS if name == "cnv" else HOST_VARIANTS[1:2])
    with ThreadPoolExecutor(max_workers=2) as pool:    # builds dominate; two cores
        outs = dict(zip([b[0] for b in builds], pool.map(
            lambda b: _trace(*b, root, trace_in), builds)))
    _RUNS[case, algorithm] = root, outs
    return root, outs


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("algorithm", ["proposed", "standard"])
def test_arm_traces_match_host_bit_for_bit(case, algorithm, tmp_path_factory):
    _, outs = _run(case, algorithm, tmp_path_factory.mktemp(f"{case}-{algorithm}"))
    host = outs["host"][1]
    assert len(host) > 8 and host[:4] == b"BNCO"
    for label, (_, raw) in outs.items():
        if raw != host:
            a, b = np.frombuffer(host, np.uint8), np.frombuffer(raw, np.uint8)
            diff = np.flatnonzero(a != b)[:8] if len(a) == len(b) else "lengths differ"
            raise AssertionError(f"{case}/{algorithm}: the {label} trace differs from the host's "
                                 f"(bytes {diff})")


def _disassemble(exe):
    return subprocess.run(["aarch64-linux-gnu-objdump", "-d", "--no-show-raw-insn", str(exe)],
                          check=True, capture_output=True, text=True).stdout


def test_neon_kernels_are_compiled_in(tmp_path_factory):
    root, outs = _run("mlp", "proposed", tmp_path_factory.mktemp("mlp-proposed"))
    model = read_manifest(root / "host").source
    arm, host = (root / "rpi4" / model).read_text(), (root / "host" / model).read_text()
    for needle in ("#include <arm_neon.h>", "vcntq_u8", "vandq_s32", "veorq_u32",
                   "#if defined(__ARM_NEON) && !defined(BNNC_NO_SIMD)"):
        assert needle in arm, needle
    assert "arm_neon" not in host and "vcntq_u8" not in host
    # the static programs: the XNOR kernels of the NEON build have 128-bit cnt (vcntq_u8); the
    # portable build has none (static libc has none either), only the scalar popcount's 8b cnt
    cnt16 = re.compile(r"\bcnt\s+v\d+\.16b")
    neon, portable = _disassemble(outs["rpi4"][0]), _disassemble(outs["rpi4-portable"][0])
    assert cnt16.search(neon), "no 128-bit cnt in the NEON build of the XNOR kernels"
    assert not cnt16.search(portable), "the -DBNNC_NO_SIMD build still has vcntq_u8"
    assert re.search(r"\bcnt\s+v\d+\.8b", portable), "the portable popcount changed shape"
