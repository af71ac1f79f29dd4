"""The fast stride-1 conv, pool, BN and element-wise kernels (templates/kernels/conv.c.j2 and
friends) at shapes that leave a partial block in every loop, under `bnnc check` against the numpy
reference: output channels not a multiple of 4/8/16 (partial sign-pattern groups and output blocks),
70 input channels (two words per pixel, the second partial), rows whose width has no 8..32 divisor
but itself, rows narrower than 8 (the 4-sample lanes), a batch of 7 (partial groups of 4 and 8
samples), 'same' padding (border columns, padded rows), odd max-pool inputs (a row and a column past
the last window), a real first layer (direct kernels) and a stride-2 conv (portable loops). A small
scratch budget forces channel blocks and the narrowest output blocks. Each test also checks that
the intended kernel variant was emitted, so a planner change cannot silently skip a path.

The bit/byte/mask and popcount helpers of the numerics runtime are compared with numpy directly.
"""

from __future__ import annotations

import re
import shutil

import cffi
import numpy as np
import pytest

from bnnc.compiler import lower
from bnnc.compiler.target import load_target
from bnnc.compiler.templating import numerics_source
from bnnc.compiler.config import make_config
from bnnc.compiler.ir import LayerKind
from bnnc.runtime.check import format_report, run_check
from bnnc.runtime.host import build_shared

from graphs import _Builder, residual

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc) installed")

HOST = load_target("host")


def _valid_net():
    """'valid' convs: real 3->9 first layer, 9->70 (rows 16 wide: column lanes), pool of a 8x16
    map... then 70->13 on a 4x8 map (rows of 6: sample lanes, 2 words per pixel)."""
    b = _Builder("fastvalid", (3, 12, 20), seed=5)
    b.conv("conv1", 9)
    b.bn("bn1")
    b.unary("sign1", LayerKind.SIGN)
    b.conv("conv2", 70)
    b.bn("bn2")
    b.unary("sign2", LayerKind.SIGN)
    b.pool("pool2")
    b.conv("conv3", 13)
    b.bn("bn3")
    b.unary("sign3", LayerKind.SIGN)
    b.flatten("flatten3")
    b.dense("fc4", 10)
    b.bn("bn4")
    b.unary("softmax", LayerKind.SOFTMAX)
    return b.build()


def _same_net():
    """'same' convs (border columns and padded rows): 3->11 on 9x11 (rows of 11: a lane segment
    of 11), 11->20 with a max-pool of an odd 9x11 map between conv and BN, 20->66 on 4x5."""
    b = _Builder("fastsame", (3, 9, 11), seed=6)
    b.conv("conv1", 11, pad=1)
    b.bn("bn1")
    b.unary("sign1", LayerKind.SIGN)
    b.conv("conv2", 20, pad=1)
    b.pool("pool2")
    b.bn("bn2")
    b.unary("sign2", LayerKind.SIGN)
    b.conv("conv3", 66, pad=1)
    b.bn("bn3")
    b.unary("sign3", LayerKind.SIGN)
    b.flatten("flatten3")
    b.dense("fc4", 10)
    b.bn("bn4")
    b.unary("softmax", LayerKind.SOFTMAX)
    return b.build()


def _check(graph, cfg, tmp_path, expect: tuple[str, ...] = ()):
    rep = run_check(graph, cfg, steps=2, work_dir=tmp_path / "c", cache=tmp_path / "so")
    assert rep.ok, format_report(rep)
    src = (tmp_path / "c" / f"{graph.name}.c").read_text()
    kernels = set(re.findall(r"^static void (k_\w+)\(", src, re.M))
    for pattern in expect:
        assert any(re.search(pattern, k) for k in kernels), (pattern, sorted(kernels))
    return kernels


@pytest.mark.parametrize("algorithm,overrides,expect", [
    # XNOR rows, exact integer binary dW (column and sample positions), PO2 dX (both lane kinds)
    ("proposed", {}, (r"^k_conv_fwd_fast_bits", r"^k_conv_dw_fr_int_bits.*modeox",
                      r"^k_conv_dw_fr_int_bits.*modeimg", r"^k_conv_dx_fr_po2.*modeox",
                      r"^k_conv_dx_fr_po2.*modeimg", r"^k_conv_dw_direct_bin",
                      r"^k_conv_fwd_fast_signw", r"^k_maxpool_p22_fwd_mask")),
    # +-1 f32 inputs packed on the fly, float dW by lookup, f32 dX, I32 argmax pool
    ("standard", {}, (r"^k_conv_fwd_fast_pm1", r"^k_conv_dw_fr_f32_pm1",
                      r"^k_conv_dx_fr_f32", r"^k_conv_dw_direct_f32", r"^k_maxpool_p22_fwd_widx")),
    # f32 dW from PO2 codes by lookup
    ("proposed", {"binary_dw": False}, (r"^k_conv_dw_fr_po2_bits", r"^k_conv_dw_direct_po2")),
    # binary dW from f16 G (float sums), dX from f16 G
    ("proposed", {"po2": False}, (r"^k_conv_dw_fr_f32_bits.*outbin", r"^k_conv_dx_fr_f32")),
])
def test_valid_convs_match_reference(tmp_path, algorithm, overrides, expect):
    _check(_valid_net(), make_config(algorithm, batch=7, **overrides), tmp_path, expect)


def test_padded_convs_and_bop_match_reference(tmp_path):
    # Bop's packed latent-free weights are what the forward and the dX sign patterns read here
    _check(_same_net(), make_config("proposed", batch=5, optimizer="bop"), tmp_path,
           (r"^k_conv_fwd_fast_bits", r"^k_conv_dx_fr_po2_bit_", r"^k_conv_dw_fr_int_bits",
            r"^k_maxpool_p22_bwd_mask"))


def test_small_scratch_forces_blocks(tmp_path, monkeypatch):
    # 6 KiB: channel blocks below the layer width, 4-wide output blocks, output-channel blocks of
    # the packed forward, some layers left to the portable loops -- all must agree
    monkeypatch.setattr(lower, "CONV_SCRATCH_BYTES", 6 * 1024)
    kernels = _check(_valid_net(), make_config("standard", batch=7), tmp_path,
                     (r"_cb(8|16|32)_", r"_kb4_", r"^k_conv_fwd_fast_pm1.*_kb([1-9]|[1-5][0-9])_"))
    assert any(re.search(r"^k_conv_(dw|dx)_f32_", k) for k in kernels), kernels


def test_stride2_and_real_layers_keep_the_portable_loops(tmp_path):
    kernels = _check(residual(), make_config("proposed", batch=6, po2=False, binary_dw=False),
                     tmp_path, (r"^k_conv_fwd_fast_f32",))
    # the stride-2 binary conv has no fast variant
    assert any(k.startswith("k_conv_fwd_xnor") or k.startswith("k_conv_fwd_signw")
               for k in kernels), kernels


# --------------------------------------------------------------------------------------------------
# numerics helpers, element by element

HARNESS = r"""
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
{numerics}
void t_bytes(const uint64_t *w, uint8_t *out, int n)
{{ int i; for (i = 0; i < n; i++) bnnc_bits_to_bytes(w[i], out + 64 * i); }}
void t_bits(const uint8_t *f, uint64_t *w, int n)
{{ int i; for (i = 0; i < n; i++) w[i] = bnnc_bytes_to_bits(f + 64 * i); }}
void t_masks(const uint64_t *w, uint32_t *out, int n)
{{ int i; uint32_t mt[64]; bnnc_mask_table(mt, 0xA5A5A5A5u, 0x0F0F0F0Fu);
   for (i = 0; i < n; i++) bnnc_bits_to_masks(w[i], mt, out + 64 * i); }}
void t_pop(const uint64_t *w, uint32_t *out, int n)
{{ int i; for (i = 0; i < n; i++) out[i] = bnnc_fold_bytes(bnnc_pop_bytes(w[i])); }}
void t_at(const uint64_t *row, const int *pos, const int *cnt, uint64_t *out, int n)
{{ int i; for (i = 0; i < n; i++) out[i] = bnnc_bits_at(row, (size_t)pos[i], cnt[i]); }}
"""
CDEF = """
void t_bytes(const uint64_t *w, uint8_t *out, int n);
void t_bits(const uint8_t *f, uint64_t *w, int n);
void t_masks(const uint64_t *w, uint32_t *out, int n);
void t_pop(const uint64_t *w, uint32_t *out, int n);
void t_at(const uint64_t *row, const int *pos, const int *cnt, uint64_t *out, int n);
"""


@pytest.fixture(scope="module")
def helpers(tmp_path_factory):
    d = tmp_path_factory.mktemp("fast-numerics")
    src = d / "harness.c"
    src.write_text(HARNESS.format(numerics=numerics_source()))
    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    lib = ffi.dlopen(str(build_shared(src, target=HOST, cache=d / "so")))
    return ffi, lib


def _ptr(ffi, a):
    return ffi.cast("void *", ffi.from_buffer(a))


def _words(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.integers(0, 2 ** 63, n, dtype=np.uint64) | (rng.integers(0, 2, n, dtype=np.uint64)
                                                         << np.uint64(63))
    return np.concatenate([w, np.array([0, 2 ** 64 - 1, 1, 2 ** 63], np.uint64)])


def _unpack(w: np.ndarray) -> np.ndarray:
    return ((w[:, None] >> np.arange(64, dtype=np.uint64)) & np.uint64(1)).astype(np.uint8)


def test_bit_byte_and_mask_helpers_match_numpy(helpers):
    ffi, lib = helpers
    w = _words(500, 1)
    bits = _unpack(w)
    out = np.zeros(w.size * 64, np.uint8)
    lib.t_bytes(_ptr(ffi, w), _ptr(ffi, out), w.size)
    assert np.array_equal(out.reshape(-1, 64), bits)
    back = np.zeros(w.size, np.uint64)
    lib.t_bits(_ptr(ffi, np.ascontiguousarray(bits.ravel())), _ptr(ffi, back), w.size)
    assert np.array_equal(back, w)
    masks = np.zeros(w.size * 64, np.uint32)
    lib.t_masks(_ptr(ffi, w), _ptr(ffi, masks), w.size)
    assert np.array_equal(masks.reshape(-1, 64), np.where(bits == 1, 0xA5A5A5A5, 0x0F0F0F0F))


def test_popcount_and_bit_window_helpers_match_numpy(helpers):
    ffi, lib = helpers
    w = _words(500, 2)
    pop = np.zeros(w.size, np.uint32)
    lib.t_pop(_ptr(ffi, w), _ptr(ffi, pop), w.size)
    assert np.array_equal(pop, _unpack(w).sum(axis=1))
    row = _words(8, 3)
    flat = _unpack(row).ravel()
    rng = np.random.default_rng(4)
    cnt = rng.integers(1, 65, 300).astype(np.int32)
    pos = np.array([rng.integers(0, flat.size - c + 1) for c in cnt], np.int32)
    out = np.zeros(cnt.size, np.uint64)
    lib.t_at(_ptr(ffi, row), _ptr(ffi, pos), _ptr(ffi, cnt), _ptr(ffi, out), cnt.size)
    got = _unpack(out)
    for i, (p, c) in enumerate(zip(pos, cnt)):
        assert np.array_equal(got[i, :c], flat[p:p + c]), (p, c)
