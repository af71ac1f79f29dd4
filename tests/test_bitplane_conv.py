"""Bit-plane popcount paths of the conv layers' PO2 products (issue 16; templates/kernels/conv.c.j2
`dx_bitplane` and `dw_bitplane`, the cores bnnc_bp_dots of kernels/vector.c.j2 and its x86/NEON
overlays).

The paths serve the binary convs the table-lookup kernels do not (strides > 1, or their scratch
too large), which ran the portable per-element loops before: the PO2 dX (`dx_bitplane`) and the
binary dW from packed X and PO2 G (`dw_bitplane`). The graph below reaches their edges: two
strided binary convs, one padded with 70 output channels (dX: ceil(70 / 64) = 2 words per tap,
the second partial; dW: 2 blocks of 64 output channels, the second partial, and its taps that
read the padding, whose terms are added back) and one unpadded reading those 70 channels (dX: two
blocks of bit rows, the second partial; a tap whose output position does not divide by the
stride adds nothing; dW: 630 bit rows, 10 blocks). Batch 11 gives conv2's dW 539 positions:
two chunks of the reduction (512 positions at most), the first ending inside a sample. The
real-input first layer has stride 2 too: its forward takes the direct rows (conv_fwd_fast, f32)
and its dW the direct kernel (conv_dw_direct), which now serve every stride with the portable
loops' sums in the same order.

- Every host core (the AVX-512 VPOPCNTDQ one, auto on a CPU that has it; AVX2; the portable C)
  passes `bnnc check` against the numpy reference, with two threads (split over samples).
- The bit-plane path computes the same bits as the portable loops it replaces
  (-DBNNC_NO_BITPLANE builds those): the same state after three steps from the same start.
- The NEON core (rpi4 under QEMU) passes `bnnc check` too.
"""

from __future__ import annotations

import re
import shutil

import pytest

from graphs import _binary_block, _Builder
from test_bitplane import states_with_and_without_bitplane
from bnnc.compiler.config import make_config
from bnnc.compiler.pipeline import compile_to_c
from bnnc.compiler.target import load_target
from bnnc.runtime.check import run_check
from bnnc.runtime.host import KERNEL_VARIANTS


def strided():
    b = _Builder("strided", (3, 27, 27), 5)
    b.conv("conv1", 8, binary=False, stride=2, pad=1)      # 27 -> 14, real input (conv_dw_direct)
    _binary_block(b, 1, last=False)
    b.conv("conv2", 70, stride=2, pad=1)        # 14 -> 7
    _binary_block(b, 2, last=False)
    b.conv("conv3", 12, stride=2)               # 7 -> 3, reads 70 channels
    _binary_block(b, 3, last=False)
    b.flatten("flatten3")
    b.dense("fc4", 10)
    _binary_block(b, 4, last=True)
    return b.build()


GRAPH = strided()
CFG = make_config("proposed", batch=11)


def test_the_strided_convs_take_the_bitplane_path(tmp_path):
    compile_to_c(GRAPH, CFG, load_target("host"), tmp_path)
    src = "".join(f.read_text() for f in tmp_path.glob("*.c"))
    # conv2 and conv3's dX (conv1 is the first layer: no dX). bpt: blocks of 64 input channels
    # x 9 taps x words over the outputs x 64 rows; bpr: 3 output rows of 17 planes per pixel
    assert "k_conv_dx_po2_bf16_f16_binary1_bpa21_bpr714_bpt1152" in src    # 1 x 9 x 2 x 64
    assert "k_conv_dx_po2_bf16_f16_binary1_bpa9_bpr153_bpt1152" in src     # 2 x 9 x 1 x 64
    # and their binary dW, packed X with PO2 G
    assert "k_conv_dw_bin_bits_bptaps9_po21" in src
    assert "bnnc_bp_dots(qp, qm" in src
    # the real-input stride-2 first layer: its forward along output rows and its dW by the
    # vectorized direct kernel, not the portable loops
    assert "k_conv_dw_direct_f32_f16_f16" in src
    assert re.search(r"k_conv_fwd_fast_f32_\w*_strided1", src)


@pytest.mark.parametrize("variant", ["auto", "avx2", "portable"])
def test_every_variant_passes_check(variant, tmp_path):
    rep = run_check(GRAPH, CFG, steps=1, work_dir=tmp_path, threads=2,
                    extra_cflags=KERNEL_VARIANTS[variant])
    assert rep.ok, [r.name for r in rep.failures][:8]


def test_bitplane_equals_the_portable_loops(tmp_path):
    states = states_with_and_without_bitplane(GRAPH, CFG, tmp_path, 2)
    assert states[0] == states[1]


@pytest.mark.skipif(any(shutil.which(t) is None for t in ("aarch64-linux-gnu-gcc", "qemu-aarch64")),
                    reason="needs the rpi4 cross toolchain and QEMU")
def test_the_neon_core_passes_check(tmp_path):
    rep = run_check(GRAPH, CFG, steps=1, work_dir=tmp_path, target="rpi4")
    assert rep.ok, [r.name for r in rep.failures][:8]
