"""The Cortex-M kernel overlay (templates/targets/cortex-m/kernels/dense.c.j2) and the per-function
instruction counts (runtime/insncount.py, the QEMU plugin's `syms=`).

- The overlay's kernels are really the ones emitted for a bare-metal target (and not for the host),
  and the portable ones stay where the overlay does not apply (Adam's float W).
- `bnnc check` of a small TFC on cortex-m7 and cortex-m4 gives exactly the host's comparison rows
  (every tensor's max |C - reference| equal, bit for bit; libm's softmax/loss left out) and the
  overlay kernels' outputs bit-identical to the reference's for the same inputs: the overlay's C
  computes the same values as the host's kernels, for Bop (packed W, the overlay) and Adam (float
  W), at odd batches and widths (the edge tiles).
- Per-function counts: the rows add up to the total per step, the overlay's kernels are among
  them, and `bnnc run --emulate --count` prints the table.
- `elf_functions` turns `nm -S` output into sorted disjoint ranges (aliases, the Thumb bit).
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from bnnc.cli import main
from bnnc.compiler.config import make_config
from bnnc.compiler.pipeline import compile_to_c
from bnnc.compiler.target import load_target
from bnnc.runtime import baremetal, insncount
from bnnc.runtime.check import run_check
from bnnc.runtime.model_source import load_graph
from mnist_like import write_mnist_like

arm = pytest.mark.skipif(not (shutil.which("arm-none-eabi-gcc")
                              and shutil.which("qemu-system-arm")),
                         reason="needs gcc-arm-none-eabi, libnewlib-arm-none-eabi, qemu-system-arm")

OVERLAY_MARK = "Cortex-M: a"       # every overlay kernel's comment says what it keeps in registers


def _tfc(width=0.25):
    return load_graph("tfc", width=width)


def test_overlay_kernels_are_emitted_for_cortex_m_only(tmp_path):
    cfg = make_config("proposed", batch=8, optimizer="bop")
    compile_to_c(_tfc(), cfg, load_target("cortex-m4"), tmp_path / "m4")
    compile_to_c(_tfc(), cfg, load_target("host"), tmp_path / "host")
    m4, host = (tmp_path / "m4" / "tfc.c").read_text(), (tmp_path / "host" / "tfc.c").read_text()
    # first layer forward and dW, hidden layers' dW and dX
    assert m4.count(OVERLAY_MARK) == 4, m4.count(OVERLAY_MARK)
    assert OVERLAY_MARK not in host
    # Adam keeps float W: the sign-W forward and the PO2 dX fall back to the portable kernels
    compile_to_c(_tfc(), make_config("proposed", batch=8), load_target("cortex-m4"),
                 tmp_path / "adam")
    adam = (tmp_path / "adam" / "tfc.c").read_text()
    assert adam.count(OVERLAY_MARK) == 2, adam.count(OVERLAY_MARK)


LIBM = {"softmax1.out", "loss"}     # expf/logf: newlib's and glibc's may differ in the last bit


@pytest.mark.skipif(shutil.which("arm-none-eabi-gcc") is None, reason="needs gcc-arm-none-eabi")
def test_the_thumb2_instructions_are_compiled_in_and_no_simd_drops_them(tmp_path):
    """The overlay's asm (vmla.f32; vsub.f32 under an IT block) is in the M4 object; with
    -DBNNC_NO_SIMD the same kernels compile from the plain C and have neither."""
    tgt = load_target("cortex-m4")
    compile_to_c(_tfc(), make_config("proposed", batch=8, optimizer="bop"), tgt, tmp_path)

    def disasm(*extra):
        obj = tmp_path / "tfc.o"
        subprocess.run([tgt.cc, *tgt.cflags, *extra, "-c", str(tmp_path / "tfc.c"), "-o", str(obj)],
                       check=True, cwd=tmp_path)
        return subprocess.run(["arm-none-eabi-objdump", "-d", str(obj)], check=True,
                              capture_output=True, text=True).stdout

    plain, portable = disasm(), disasm("-DBNNC_NO_SIMD")
    assert "vmla.f32" in plain and re.search(r"vsubcc\.f32", plain)
    assert "vmla.f32" not in portable and not re.search(r"vsubcc\.f32", portable)


def _rows(rep):
    return [(r.step, r.name, r.max_abs, r.max_rel, r.mismatches) for r in rep.rows
            if r.name not in LIBM]


@arm
@pytest.mark.parametrize("target,optimizer,batch,width", [("cortex-m7", "bop", 6, 0.25),
                                                           ("cortex-m4", "bop", 9, 0.25),
                                                           ("cortex-m4", "adam", 5, 0.25),
                                                           ("cortex-m7", "bop", 67, 1.1),
                                                           ("cortex-m7", "bop", 130, 0.25)])
def test_check_rows_equal_the_hosts(target, optimizer, batch, width, tmp_path):
    """Odd batches and widths whose layers are not multiples of the tiles: the edge tiles; batches
    and layers past the kernels' stack panels (64 rows; 128 for the hidden dW): the other loops."""
    cfg = make_config("proposed", batch=batch, optimizer=optimizer)
    host = run_check(_tfc(width), cfg, steps=2, work_dir=tmp_path / "host")
    arm_ = run_check(_tfc(width), cfg, steps=2, target=target, work_dir=tmp_path / "arm")
    assert host.ok and arm_.ok, [r.name for r in arm_.failures]
    assert _rows(arm_) == _rows(host)
    exact = {r.name for r in arm_.rows if r.max_abs == 0}
    assert {"fc1.out", "fc1.dW", "fc2.dW", "fc4.dW"} <= exact, sorted(exact)


def test_elf_functions_ranges(tmp_path, monkeypatch):
    nm_out = ("00000100 00000010 T a\n00000100 00000010 T alias_of_a\n00000111 00000008 t thumb\n"
              "00000118 00000010 T overlaps\n00000200 00000004 D data\n00000300 00000000 T empty\n")

    class Res:
        returncode, stdout, stderr = 0, nm_out, ""

    monkeypatch.setattr(insncount.subprocess, "run", lambda *a, **k: Res())
    assert insncount.elf_functions("nm", tmp_path / "x.elf") == [
        (0x100, 0x110, "a"), (0x110, 0x118, "thumb"), (0x118, 0x128, "overlaps")]


@arm
def test_per_function_counts_add_up_and_the_cli_prints_them(tmp_path, capsys):
    out = tmp_path / "m4"
    assert main(["compile", "tfc", "--width", "0.25", "--target", "cortex-m4", "--batch", "8",
                 "--optimizer", "bop", "-o", str(out)]) == 0
    write_mnist_like(tmp_path / "data", 64, 16, seed=1)
    capsys.readouterr()
    assert main(["run", str(out), "--emulate", "--count", "--data", "mnist", "--data-dir",
                 str(tmp_path / "data"), "--steps", "2"]) == 0
    text = capsys.readouterr().out
    assert "instructions/step" in text and "k_dense_fwd_signw" in text, text
    train = out / "data" / "train.bnnd"
    c = baremetal.count_step_instructions(out, train=train, steps=2,
                                          start_blob=baremetal.start_state_blob(out))
    rows = c.per_function()
    assert sum(n for _, n in rows) == pytest.approx(c.per_step, abs=1e-6)
    names = [n for n, _ in rows]
    for kernel in ("k_dense_fwd_signw", "k_dense_dw_bin_real", "k_dense_dw_bin_bits",
                   "k_dense_dx_po2"):
        assert any(n.startswith(kernel) for n in names), (kernel, names)
    assert all(n > 0 for _, n in rows)
