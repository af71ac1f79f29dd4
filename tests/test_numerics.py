"""compiler/numerics.py against hand-derived values and independent implementations (pure-Python
ints, struct bit patterns, torch's bfloat16/half casts, float64 log2)."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch

from bnnc.compiler import numerics as nx
from pyref import lowbias32


def _bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def _flt(u: int) -> float:
    return struct.unpack("<f", struct.pack("<I", u & 0xFFFFFFFF))[0]


_py_hash32 = lowbias32


def _f32(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


# ---- hashing -------------------------------------------------------------------------------------

def test_hash32_matches_pure_python():
    xs = [0, 1, 2, 3, 12345, 0x7FFFFFFF, 0x80000000, 0xDEADBEEF, 0xFFFFFFFF]
    got = nx.hash32(np.array(xs, dtype=np.uint32))
    assert got.dtype == np.uint32
    assert [int(v) for v in got] == [_py_hash32(x) for x in xs]
    assert int(nx.hash32(np.array([0], np.uint32))[0]) == 0          # 0 is a fixed point
    assert int(nx.hash32(-1)) == _py_hash32(0xFFFFFFFF)               # reduced mod 2^32 first


def test_sr_bits_chain_and_range():
    seed, step, tid, n = 7, 3, 11, 1000
    k = _py_hash32(_py_hash32(_py_hash32(seed) ^ step) ^ tid)
    want = [_py_hash32(k ^ i) & 0xFFFF for i in range(n)]
    got = nx.sr_bits(seed, step, tid, n)
    assert got.dtype == np.uint32 and [int(v) for v in got] == want
    assert got.max() <= 0xFFFF
    assert not np.array_equal(got, nx.sr_bits(seed, step, tid + 1, n))
    assert not np.array_equal(got, nx.sr_bits(seed, step + 1, tid, n))
    assert not np.array_equal(got, nx.sr_bits(seed + 1, step, tid, n))
    # roughly uniform: the mean of 16-bit uniforms is 32767.5
    assert abs(float(nx.sr_bits(0, 1, 0, 100_000).mean()) - 32767.5) < 400


# ---- bfloat16 ------------------------------------------------------------------------------------

def test_bf16_sr_bits_zero_truncates_and_all_ones_rounds_up_unless_exact():
    xs = [1.0, 1.0 + 2**-9, -3.14159, 1e-30, 3.0e38, -2.5e-42, 65504.0, 0.1]
    x = _f32(xs)
    lo = nx.to_bf16_sr(x, np.zeros(len(xs), np.uint32))
    assert [_bits(float(v)) for v in lo] == [_bits(v) & 0xFFFF0000 for v in x.tolist()]
    hi = nx.to_bf16_sr(x, np.full(len(xs), 0xFFFF, np.uint32))
    for v, h in zip(x.tolist(), hi.tolist()):
        u = _bits(v)
        want = u & 0xFFFF0000 if (u & 0xFFFF) == 0 else (u & 0xFFFF0000) + 0x10000
        assert _bits(h) == want, (v, h)


def test_bf16_sr_hand_example():
    # 1 + 2^-9 = 0x3F804000: the low half is 0x4000, a quarter of the way to the next bf16 (1 +
    # 2^-7)
    x = _f32([1.0 + 2**-9] * 2)
    got = nx.to_bf16_sr(x, np.array([0xBFFF, 0xC000], np.uint32))
    assert got.tolist() == [1.0, 1.0 + 2**-7]


def test_bf16_nan_inf_pass_through():
    x = _f32([np.inf, -np.inf, np.nan, -np.nan])
    for y in (nx.to_bf16_sr(x, np.full(4, 0xFFFF, np.uint32)), nx.to_bf16_rne(x)):
        assert y[0] == np.inf and y[1] == -np.inf and np.isnan(y[2]) and np.isnan(y[3])
    # a NaN with payload only in the low half must stay NaN (plain truncation would make it inf)
    low_nan = np.array([0x7F800001], np.uint32).view(np.float32)
    assert np.isnan(nx.to_bf16_sr(low_nan, np.zeros(1, np.uint32))[0])
    assert np.isnan(nx.to_bf16_rne(low_nan)[0])


def test_bf16_sr_is_unbiased_over_seeds():
    x = _f32([1.0 + 2**-9, 0.1, -7.3, 3e-5])
    n = 4000
    draws = np.stack([nx.to_bf16_sr(x, nx.sr_bits(s, 1, 0, x.size)) for s in range(n)])
    ulp = np.array([2**-7, 2**-11, 2**-5, 2.0**-22], np.float64)   # bf16 spacing at each value
    # SR variance <= ulp^2/4, so 6 standard errors is ulp * 3 / sqrt(n)
    assert np.all(np.abs(draws.mean(0) - x.astype(np.float64)) < 3 * ulp / math.sqrt(n))
    assert set(np.unique(draws[:, 0]).tolist()) == {1.0, 1.0 + 2**-7}


def test_bf16_rne_matches_torch_and_hand_ties():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(10_000) * 10.0 ** rng.integers(-20, 20, 10_000)).astype(np.float32)
    want = torch.from_numpy(x).to(torch.bfloat16).to(torch.float32).numpy()
    assert np.array_equal(nx.to_bf16_rne(x), want)
    # ties go to the even bf16: 1 + 2^-8 -> 1 ; 1 + 3 * 2^-8 -> 1 + 2^-6
    assert nx.to_bf16_rne(_f32([1 + 2**-8, 1 + 3 * 2**-8])).tolist() == [1.0, 1 + 2**-6]
    assert nx.to_bf16_rne(_f32([3.4e38]))[0] == np.inf


# ---- binary16 ------------------------------------------------------------------------------------

def _f16_trunc(v: float) -> float:
    """Largest-magnitude binary16 value <= |v| (sign kept), by stepping numpy's RNE result."""
    t = np.float16(v)
    if abs(float(t)) > abs(v):
        t = np.nextafter(t, np.float16(0))
    return float(t)


def test_f16_sr_bits_zero_truncates_toward_zero():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(3000) * 2.0 ** rng.integers(-26, 16, 3000)).astype(np.float32)
    x = x[np.abs(x) < 65504]
    got = nx.to_f16_sr(x, np.zeros(x.size, np.uint32))
    assert [float(v) for v in got] == [_f16_trunc(float(v)) for v in x]
    assert np.array_equal(got, got.astype(np.float16).astype(np.float32))   # representable


def test_f16_sr_all_ones_rounds_up_unless_exact_in_normal_range():
    rng = np.random.default_rng(2)
    x = (rng.uniform(1, 2, 2000) * 2.0 ** rng.integers(-14, 15, 2000)).astype(np.float32)
    x[:10] = np.float16(x[:10]).astype(np.float32)       # some exact binary16 values
    got = nx.to_f16_sr(x, np.full(x.size, 0xFFFF, np.uint32))
    for v, g in zip(x.tolist(), got.tolist()):
        t = _f16_trunc(v)
        want = t if t == v else float(np.nextafter(np.float16(t), np.float16(np.inf)))
        assert g == want, (v, g, want)


def test_f16_sr_hand_values_subnormal_overflow_specials():
    tiny = 2.0**-24                                    # smallest binary16 subnormal
    x = _f32([1.5 * tiny, 1.5 * tiny, 2.0**-26, 2.0**-26, 65519.0, 65519.0, 1e6, -1e6,
              np.inf, -np.inf, np.nan, -0.0])
    r = np.array([0, 0xFFFF, 0, 0xFFFF, 0, 0xFFFF, 0, 0, 0, 0, 0, 0], np.uint32)
    got = nx.to_f16_sr(x, r)
    assert got[:8].tolist() == [tiny, 2 * tiny, 0.0, tiny, 65504.0, np.inf, np.inf, -np.inf]
    assert got[8] == np.inf and got[9] == -np.inf and np.isnan(got[10])
    assert got[11] == 0 and math.copysign(1, got[11]) == -1
    # sign symmetry
    y = _f32(np.linspace(-3, 3, 101))
    b = nx.sr_bits(5, 1, 2, y.size)
    assert np.array_equal(nx.to_f16_sr(-y, b), -nx.to_f16_sr(y, b))


def test_f16_sr_is_unbiased_over_seeds():
    # 2^-26 is a quarter of the smallest subnormal: rounds up with probability exactly 1/4
    x = _f32([1.0 + 2**-12, 0.3, 2.0**-26, -1234.567])
    n = 4000
    draws = np.stack([nx.to_f16_sr(x, nx.sr_bits(s, 2, 9, x.size)) for s in range(n)])
    ulp = np.array([2**-10, 2**-12, 2.0**-24, 1.0])
    assert np.all(np.abs(draws.mean(0) - x.astype(np.float64)) < 3 * ulp / math.sqrt(n))


def test_f16_rne_matches_torch_half():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(10_000) * 2.0 ** rng.integers(-30, 18, 10_000)).astype(np.float32)
    want = torch.from_numpy(x).half().float().numpy()
    assert np.array_equal(nx.to_f16_rne(x), want)


def test_store_dispatch():
    x = _f32([1.0 + 2**-9, -0.0, 2.5])
    assert np.array_equal(nx.store(x, "f32"), x)
    assert np.array_equal(nx.store(x, "bf16"), nx.to_bf16_rne(x))
    b = nx.sr_bits(1, 1, 1, 3)
    assert np.array_equal(nx.store(x, "bf16", b), nx.to_bf16_sr(x, b))
    assert np.array_equal(nx.store(x, "f16", b), nx.to_f16_sr(x, b))
    assert nx.store(x, "bit").tolist() == [1, 1, 1] and nx.store(x, "bit").dtype == np.int8
    with pytest.raises(ValueError):
        nx.store(x, "f8")


# ---- PO2 -----------------------------------------------------------------------------------------

def test_po2_hand_vector():
    # m = 1.5, round(log2 1.5 = 0.585) = 1, b = 8 - 1 = 7
    # 0.5 -> e = -1 + 7 = 6; -0.25 -> 5; 0.001 -> round(-9.97) + 7 = -3; 0 -> -8; 1.5 -> 8, clipped
    # to 7
    codes, b = nx.po2_quantize(_f32([0.5, -0.25, 0.001, 0.0, 1.5]))
    assert b == 7
    assert codes.tolist() == [6 + 8, 16 | (5 + 8), -3 + 8, 0, 7 + 8]
    assert nx.po2_decode(codes, b).tolist() == [0.5, -0.25, 2.0**-10, 2.0**-15, 1.0]


def test_po2_all_zero_and_single_element():
    codes, b = nx.po2_quantize(np.zeros((2, 3), np.float32))
    assert b == 8 and codes.shape == (2, 3) and not codes.any()
    assert np.all(nx.po2_decode(codes, b) == 2.0**-16)
    codes, b = nx.po2_quantize(np.zeros(4, np.float32), zero_to_min=False)
    assert b == 8 and np.all(codes == nx.PO2_ZERO) and not nx.po2_decode(codes, b).any()
    # log2 3 = 1.585 -> 2, b = 6, e = 2 + 6 = 8 -> 7: value -2^(7-6)
    codes, b = nx.po2_quantize(_f32([-3.0]))
    assert b == 6 and codes.tolist() == [16 | 15] and nx.po2_decode(codes, b).tolist() == [-2.0]


def test_po2_exponent_bounds_and_zero_handling():
    g = _f32([1.0, 2.0**-15, 2.0**-16, 2.0**-17, 2.0**-30, 0.0, -0.0, -(2.0**-3)])
    codes, b = nx.po2_quantize(g)          # m = 1 -> b = 8
    assert b == 8
    want = [2.0**-1, 2.0**-15, 2.0**-16, 2.0**-16, 2.0**-16, 2.0**-16, 2.0**-16, -(2.0**-3)]
    assert nx.po2_decode(codes, b).tolist() == want
    assert codes[6] == 0                   # -0.0 has sign +1 like 0.0
    codes, b = nx.po2_quantize(g, zero_to_min=False)
    assert codes[5] == codes[6] == nx.PO2_ZERO and codes[4] == 0
    assert nx.po2_decode(codes, b)[5] == 0
    # bias 6: the largest entry lands at exponent 6 and is not clipped
    codes, b = nx.po2_quantize(_f32([1.0, 0.5]), bias=6)
    assert b == 6 and nx.po2_decode(codes, b).tolist() == [1.0, 0.5]


def test_po2_log2_rounding_threshold_is_exact():
    # the two float32 significands around sqrt(2): log2 rounds down below, up at/above 0xB504F4
    below, above = 0xB504F3 * 2.0**-23, 0xB504F4 * 2.0**-23
    assert math.log2(below) < 0.5 < math.log2(above)
    for k in (-20, -1, 0, 3):
        got = nx.round_log2(_f32([below * 2.0**k, above * 2.0**k]))
        assert got.tolist() == [k, k + 1]
    # subnormal float32 inputs take the same rule: 181 * 2^-149 = 1.4140625 * 2^-142 (< sqrt 2),
    # 182 * 2^-149 = 1.421875 * 2^-142
    assert nx.round_log2(_f32([181 * 2.0**-149, 182 * 2.0**-149])).tolist() == [-142, -141]
    rng = np.random.default_rng(4)
    x = (rng.uniform(0.5, 1, 20_000) * 2.0 ** rng.integers(-60, 60, 20_000)).astype(np.float32)
    want = np.round(np.log2(x.astype(np.float64))).astype(np.int64)
    assert np.array_equal(nx.round_log2(x), want)


def test_po2_codes_decode_by_layout():
    codes = np.arange(32, dtype=np.uint8)
    want = [(-1.0 if c & 16 else 1.0) * 2.0 ** ((c & 15) - 8 - 3) for c in range(32)]
    assert nx.po2_decode(codes, 3).tolist() == want


def test_po2_rejects_non_finite():
    with pytest.raises(ValueError):
        nx.po2_quantize(_f32([1.0, np.nan]))


# ---- bit packing ---------------------------------------------------------------------------------

def test_pack_layout_by_hand():
    w = nx.pack_bits(np.array([1, -1, -1, 1], np.int8))
    assert w.dtype == np.uint64 and w.tolist() == [0b1001]
    x = -np.ones(130, np.int8)
    x[[0, 64, 129]] = 1
    assert nx.pack_bits(x).tolist() == [1, 1, 2]               # element 129 = bit 1 of word 2
    assert nx.pack_bits(np.array([0, 1, 1, 0, 5])).tolist() == [0b10110]   # masks: nonzero -> 1
    x = np.ones(64, np.int8)
    assert nx.pack_bits(x).tolist() == [2**64 - 1]


@pytest.mark.parametrize("n", [1, 7, 63, 64, 65, 128, 130, 1000])
def test_pack_unpack_round_trip(n):
    rng = np.random.default_rng(n)
    x = np.where(rng.random((3, n)) < 0.5, 1, -1).astype(np.int8)
    w = nx.pack_bits(x)
    assert w.shape == (3, -(-n // 64))
    last = w[:, -1]
    pad = 64 * w.shape[1] - n
    if pad:
        assert np.all(last >> np.uint64(64 - pad) == 0)       # padding bits are 0
    assert np.array_equal(nx.unpack_bits(w, n), x)
    m = (x > 0).astype(np.int8)
    assert np.array_equal(nx.unpack_bits(nx.pack_bits(m), n, pm1=False), m)
    # along axis 0 as well
    assert np.array_equal(nx.unpack_bits(nx.pack_bits(x.T, axis=0), n, axis=0), x.T)
