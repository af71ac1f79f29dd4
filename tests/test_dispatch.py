"""Run-time kernel dispatch on x86-64 (issue 16) and `bnnc profile`.

- Every forced host variant (runtime/host.py KERNEL_VARIANTS: AVX2 cap, SSE2 cap, portable C;
  "auto" takes AVX-512 on a CPU that has it) passes `bnnc check` against the numpy reference on a
  small CNV (conv, dense, l1 BN, pooling, sign, PO2, Adam): each variant is right, not only equal
  to the others (tests/test_neon.py pins their traces byte for byte).
- The variants are really compiled in: the host library of the plain build has AVX-512 (zmm)
  and AVX2 (ymm) code in the multiversioned kernels, and -DBNNC_NO_SIMD has neither.
- `split_function`, which turns one rendered kernel into its multiversioned form, and its refusal
  of anything that is not exactly one function.
- `bnnc profile OUT`: one row per kernel of the step, the kernels' times add up, MACs of the
  weight-layer products are numel(out) x fan_in; a bare-metal OUT is refused with one line.
"""

from __future__ import annotations

import platform
import re
import shutil
import subprocess

import pytest

from graphs import cnv
from bnnc.cli import main as cli_main
from bnnc.compiler.config import make_config
from bnnc.compiler.contract import read_manifest
from bnnc.compiler.templating import split_function
from bnnc.runtime.check import run_check
from bnnc.runtime.host import KERNEL_VARIANTS, HostProgram
from bnnc.runtime.peak import measure_peaks
from bnnc.runtime.profile import profile

X86 = platform.machine() in ("x86_64", "AMD64")


@pytest.mark.parametrize("variant", [v for v in KERNEL_VARIANTS if v != "auto"])
def test_every_forced_variant_passes_check(variant, tmp_path):
    rep = run_check(cnv(8), make_config("proposed", batch=6), steps=2, work_dir=tmp_path,
                    extra_cflags=KERNEL_VARIANTS[variant])
    assert rep.ok, [r.name for r in rep.failures][:8]


@pytest.mark.skipif(not X86 or shutil.which("objdump") is None, reason="x86-64 objdump needed")
def test_avx512_and_avx2_clones_are_compiled_in(tmp_path):
    from bnnc.compiler.pipeline import compile_to_c
    from bnnc.compiler.target import load_target

    compile_to_c(cnv(8), make_config("proposed", batch=6), load_target("host"), tmp_path)

    def disasm(flags):
        lib = HostProgram(tmp_path, debug=False, extra_cflags=flags).library
        return subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(lib)], check=True,
                              capture_output=True, text=True).stdout

    plain, portable = disasm(()), disasm(("-DBNNC_NO_SIMD",))
    assert "%zmm" in plain and "%ymm" in plain
    clones = set(re.findall(r"<k_\w+_(avx2|avx512)(?:\.\w+)*>:", plain))
    assert clones == {"avx2", "avx512"}, clones
    assert "%zmm" not in portable and "%ymm" not in portable
    assert not re.search(r"<k_\w+_avx(2|512)(?:\.\w+)*>:", portable)


def test_split_function():
    src = "/* doc */\nstatic void k_a(const float *x, int32_t n)\n{\n    int i;\n}\n\n"
    assert split_function(src, "k_a") == ("/* doc */\n", "const float *x, int32_t n",
                                          "    int i;", "\n\n")
    assert split_function(src, "k_b") is None
    two = src + "static void k_c(void)\n{\n}\n"
    assert split_function(two, "k_a") is None


def test_profile_table(tmp_path, capsys):
    from bnnc.compiler.pipeline import compile_to_c
    from bnnc.compiler.target import load_target
    from graphs import mlp

    g = mlp((32, 32))
    compile_to_c(g, make_config("proposed", batch=8), load_target("host"), tmp_path)
    prof = profile(tmp_path, steps=2, warmup=1)
    kernels = {s.kernel for s in prof.steps}
    assert {"dense_fwd_signw", "dense_fwd_xnor", "dense_dw_bin", "adam_update"} <= kernels
    assert all(s.ms >= 0 for s in prof.steps) and sum(s.ms for s in prof.steps) > 0
    # fc2: 8 samples x 32 outputs, fan-in 32
    fc2 = [s for s in prof.steps if s.layer == "fc2" and s.kernel == "dense_fwd_xnor"]
    assert fc2 and fc2[0].macs == 8 * 32 * 32
    assert [k for k, *_ in prof.by_kernel()] == sorted(kernels, key=lambda k: -sum(
        s.ms for s in prof.steps if s.kernel == k))
    # what each step reads and writes, and the class of its products' factors
    assert fc2[0].cls == "bit"                     # packed sign1.out x packed fc2.Wb
    rows = {t.name: t.nbytes for t in read_manifest(tmp_path).tensors}
    assert fc2[0].nbytes == rows["sign1.out"] + rows["fc2.Wb"] + rows["fc2.out"]
    assert rows["fc2.out"] == 8 * 32 * 4
    cls = {(s.kernel, s.layer): s.cls for s in prof.steps if s.macs}
    assert cls[("dense_fwd_signw", "fc1")] == "float"      # f32 input x sign(W)
    assert cls[("dense_dw_bin", "fc1")] == "float"         # f32 input x PO2 codes
    assert cls[("dense_dx_po2", "fc2")] == "int"           # PO2 codes x sign(W)
    assert cls[("dense_dw_bin", "fc2")] == "int"           # packed signs x PO2 codes
    assert {s.cls for s in prof.steps if not s.macs} == {""}
    by = prof.macs_by_class()
    assert sum(by.values()) == sum(s.macs for s in prof.steps)
    assert by["bit"] == 8 * (32 * 32 + 32 * 10)            # the XNOR forwards of fc2, fc3
    assert cli_main(["profile", str(tmp_path), "--steps", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "dense_dw_bin" in out and "GMAC/s" in out and "% peak" in out
    assert "this core (probe, one thread)" in out and "% of peak" in out


def test_profile_counts_u8_pixels_as_integer_factors(tmp_path):
    from bnnc.compiler.config import with_input
    from bnnc.compiler.pipeline import compile_to_c
    from bnnc.compiler.preprocess import DEFAULT, pixel_affine
    from bnnc.compiler.target import load_target
    from graphs import mlp

    g = mlp((32,))
    cfg = with_input(make_config("proposed", batch=8), g, "u8", pixel_affine(DEFAULT, 1))
    compile_to_c(g, cfg, load_target("host"), tmp_path)
    prof = profile(tmp_path, steps=1, warmup=0)
    cls = {(s.kernel, s.layer): s.cls for s in prof.steps if s.macs}
    assert cls[("dense_fwd_u8", "fc1")] == "int" and cls[("dense_dw_bin", "fc1")] == "int"


def test_peak_probe_rates():
    """The probe's loops run and rank as the hardware does: a 64-bit word of XNOR-popcount does
    64 binary MACs, more than any vector of floats does per instruction."""
    p = measure_peaks()
    assert all(v > 1e8 for v in p.mac_per_s.values()), p
    assert p.mac_per_s["bit"] > p.mac_per_s["float"]
    assert p.read_l2 > 1e9 and p.read_dram > 1e8
    assert "GMAC/s" in p.describe()


def test_profile_refuses_a_bare_metal_build(tmp_path, capsys):
    from bnnc.compiler.pipeline import compile_to_c
    from bnnc.compiler.target import load_target
    from graphs import mlp

    compile_to_c(mlp((16,)), make_config("proposed", batch=4), load_target("cortex-m7"), tmp_path)
    assert cli_main(["profile", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bare-metal" in err
