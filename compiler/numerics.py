"""Bit-exact numerics shared by the numpy reference and the generated C: hashing, 16-bit stores,
PO2, bits.

Input -> output: numpy arrays -> numpy arrays; every function is pure and vectorized. Each docstring
states the exact integer/bit semantics so the C runtime can reproduce it bit for bit (the C side is
tested against these functions, never the other way round).

Invariants:
- 16-bit stores return float32 arrays holding values exactly representable in the target format, so
  a float32 array is the host-side stand-in for a bf16/f16 buffer (the C side keeps the 16-bit
  pattern).
- Randomness is counter based (`sr_bits`): the same (seed, step, tensor id, index) always gives the
  same 16 bits, with no global RNG state (ALGORITHM.md §2a).
- PO2 codes fit 5 bits (bit 4 = sign, bits 0-3 = exponent + 8) except `PO2_ZERO`, used only when
  exact zeros are kept as zeros (`zero_to_min=False`).

Limits: stochastic rounding resolves the discarded part of the value to 16 bits (like the bf16 case:
a discarded part below 2^-16 of the output's last place never rounds up); NaN inputs come back as
quiet NaN, not with their payload; PO2 takes its input as float32 and must be finite.
"""

from __future__ import annotations

import math

import numpy as np

F16_MAX = 65504.0

# Smallest 24-bit significand s (value = s * 2^(E-23), 2^23 <= s < 2^24) with s >= 2^23 * sqrt(2),
# i.e. log2 of the value rounds up.  s^2 >= 2^47 and 2^47 is no perfect square, so this is
# isqrt(2^47) + 1 and no float can sit exactly on a tie: log2 rounding in bnnc has no ties at all.
PO2_ROUND_UP_SIGNIFICAND = math.isqrt(2**47) + 1          # 0xB504F4 (mantissa field 0x3504F4)
PO2_EMIN, PO2_EMAX = -8, 7
PO2_ZERO = 0x20   # code of an exact zero when zero_to_min=False (outside 5 bits on purpose)


# --------------------------------------------------------------------------------------------------
# counter-based random bits

def hash32(x) -> np.ndarray:
    """Chris Wellons' `lowbias32` on uint32 (all arithmetic mod 2^32), elementwise.

    x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16.
    Accepts anything convertible to integers; values are reduced mod 2^32 first. Returns uint32,
    same shape.
    """
    a = np.asarray(x)
    shape = a.shape
    if a.dtype.kind not in "iub":
        raise TypeError(f"hash32 needs integers, got {a.dtype}")
    if a.dtype != np.uint32:
        a = (a.astype(np.int64) & 0xFFFFFFFF).astype(np.uint32)
    v = a.reshape(-1).copy()
    # 1-D arrays wrap silently in numpy; scalars would warn on the (intended) overflow
    v ^= v >> np.uint32(16)
    v *= np.uint32(0x7FEB352D)
    v ^= v >> np.uint32(15)
    v *= np.uint32(0x846CA68B)
    v ^= v >> np.uint32(16)
    return v.reshape(shape)


def _h1(x: int) -> int:
    return int(hash32(np.array([x & 0xFFFFFFFF], dtype=np.uint32))[0])


def sr_bits(seed: int, step: int, tensor_id: int, n: int) -> np.ndarray:
    """16 random bits per element for stochastic rounding, as uint32 in [0, 0xFFFF].

    k = hash32(hash32(hash32(seed) ^ step) ^ tensor_id);  bits[i] = hash32(k ^ i) & 0xFFFF, i =
    0..n-1, with seed, step, tensor_id taken mod 2^32 and i as uint32 (n < 2^32). Element i of a
    tensor is its index in C (row-major) order.
    """
    k = _h1(_h1(_h1(seed) ^ (step & 0xFFFFFFFF)) ^ (tensor_id & 0xFFFFFFFF))
    idx = np.arange(n, dtype=np.uint32)
    return hash32(idx ^ np.uint32(k)) & np.uint32(0xFFFF)


# --------------------------------------------------------------------------------------------------
# 16-bit stores (float32 in, float32 holding a bf16/f16 value out)

def _f32_bits(x) -> tuple[np.ndarray, np.ndarray]:
    f = np.ascontiguousarray(x, dtype=np.float32)
    return f, f.view(np.uint32)


def _bits16(bits, shape) -> np.ndarray:
    r = np.asarray(bits, dtype=np.uint32)
    if r.size != int(np.prod(shape, dtype=np.int64)):
        raise ValueError(f"need {int(np.prod(shape))} random values, got {r.size}")
    return (r.reshape(shape) & np.uint32(0xFFFF))


def _quiet_nan(u: np.ndarray) -> np.ndarray:
    # a NaN whose payload sits only in the low half would turn into inf when truncated to 16 bits
    return (u & np.uint32(0xFFFF0000)) | np.uint32(0x00400000)


def to_bf16_sr(x, bits) -> np.ndarray:
    """Stochastic rounding of float32 to bfloat16: u = (u + r) & 0xFFFF0000 on the float32 bit
    pattern.

    r = the 16 random bits of each element (`sr_bits`). The carry of the add rounds the magnitude up
    with probability (low 16 bits of u) / 2^16, so the rounding is unbiased; it may carry into the
    exponent (including up to +-inf from above the largest bf16). +-inf is unchanged; NaN -> quiet
    NaN ((u & 0xFFFF0000) | 0x00400000, sign and high payload kept).
    """
    f, u = _f32_bits(x)
    r = _bits16(bits, u.shape)
    v = (u + r) & np.uint32(0xFFFF0000)
    special = ~np.isfinite(f)
    if special.any():                   # rare: keep the common path free of selects
        v = np.where(np.isnan(f), _quiet_nan(u), np.where(special, u, v)).astype(np.uint32)
    return v.view(np.float32)


def to_bf16_rne(x) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16: u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000.

    Overflow rounds to +-inf; +-inf unchanged; NaN -> quiet NaN as in `to_bf16_sr`.
    """
    f, u = _f32_bits(x)
    v = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    nan = np.isnan(f)
    if nan.any():
        v = np.where(nan, _quiet_nan(u), v).astype(np.uint32)
    return v.view(np.float32)


def to_f16_rne(x) -> np.ndarray:
    """IEEE binary16 round-to-nearest-even (numpy's float16 cast: subnormals, overflow -> +-inf)."""
    with np.errstate(over="ignore"):
        return np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float32)


def to_f16_sr(x, bits) -> np.ndarray:
    """Stochastic rounding of float32 to IEEE binary16 with 16 random bits per element.

    Exact definition (integers only):
        |x| = sig * 2^(e - 23)   normal: sig = 2^23 | mantissa, e = exponent - 127;
                                 subnormal: sig = mantissa, e = -126
        qe = max(e, -14) - 10                 quantum of the binary16 grid at that magnitude
        d = min(13 + max(0, -14 - e), 40)     discarded low bits of sig (13 in the normal range)
        radd = r >> (16 - d)  if d <= 16  else  r << (d - 16)     r aligned to the discarded field
        q = (sig + radd) >> d;   |y| = q * 2^qe;   |y| > 65504 or e >= 16 -> inf;   y has x's sign
    Capping d at 40 changes nothing (from d = 40 on, q = 0 for every r) and keeps sig + radd in 64
    bits. +-inf unchanged, NaN -> quiet NaN. With d <= 16 the rounding is exactly unbiased
    (P(up) = discarded / 2^d).
    """
    f, u = _f32_bits(x)
    r = _bits16(bits, u.shape).astype(np.int64)
    u64 = u.astype(np.int64)
    exp = (u64 >> 23) & 0xFF
    man = u64 & 0x7FFFFF
    sig = np.where(exp > 0, man | 0x800000, man)
    e = np.where(exp > 0, exp - 127, -126)
    qe = np.maximum(e, -14) - 10
    d = np.minimum(13 + np.maximum(0, -14 - e), 40)
    radd = np.where(d <= 16, r >> np.clip(16 - d, 0, 16), r << np.clip(d - 16, 0, 24))
    q = (sig + radd) >> d
    with np.errstate(over="ignore"):   # inf/NaN lanes are replaced below
        mag = np.ldexp(q.astype(np.float32), qe.astype(np.int32)).astype(np.float32)
    mag = np.where((mag > F16_MAX) | (e >= 16), np.float32(np.inf), mag)
    y = np.where(u64 >> 31 == 1, -mag, mag).astype(np.float32)
    nan = np.isnan(f)
    y = np.where(np.isinf(f), f, y)
    return np.where(nan, _quiet_nan(u).view(np.float32), y).astype(np.float32)


def store(x, dtype: str, bits=None) -> np.ndarray:
    """Store float values as `dtype`: "f32" (exact float32 cast), "bf16"/"f16" (stochastic rounding
    with
    `bits` when given, else round-to-nearest-even), or "bit" (int8 sign, sign(0) = +1)."""
    if dtype == "f32":
        return np.asarray(x, dtype=np.float32).copy()
    if dtype == "bf16":
        return to_bf16_rne(x) if bits is None else to_bf16_sr(x, bits)
    if dtype == "f16":
        return to_f16_rne(x) if bits is None else to_f16_sr(x, bits)
    if dtype == "bit":
        return np.where(np.asarray(x) >= 0, 1, -1).astype(np.int8)
    raise ValueError(f"unknown storage dtype {dtype!r}")


# --------------------------------------------------------------------------------------------------
# power-of-two gradient quantizer (ALGORITHM.md §2 item 2)

def round_log2(a) -> np.ndarray:
    """round(log2 |a|) for float32 a != 0, exactly, as int64 (zeros give a very negative sentinel).

    |a| = s * 2^(E-23) with a 24-bit normalized significand 2^23 <= s < 2^24 (subnormals
    normalized): round(log2 |a|) = E + (s >= PO2_ROUND_UP_SIGNIFICAND). There are no ties (see the
    constant), so the result is the exact mathematical rounding; C gets E and s from the bit pattern
    (clz for subnormals).
    """
    f = np.abs(np.asarray(a, dtype=np.float32)).astype(np.float64)
    frac, ex = np.frexp(f)                  # f = frac * 2^ex, frac in [0.5, 1), exact in float64
    s = frac * 2.0**24                              # the integer significand, exact
    k = (ex.astype(np.int64) - 1) + (s >= PO2_ROUND_UP_SIGNIFICAND)
    return np.where(f == 0, np.int64(-(1 << 20)), k)


def po2_quantize(g, bias: int = 8, zero_to_min: bool = True) -> tuple[np.ndarray, int]:
    """Quantize a gradient tensor to 5-bit signed powers of two with one integer bias per tensor.

    m = max |g|; b = bias - round(log2 m) (m == 0: b = bias); for each element
    e = clamp(round(log2 |g|) + b, -8, 7) (this is round(log2(|g| * 2^b)) computed without scaling,
    so it cannot over/underflow), s = sign(g) with sign(0) = +1 (and -0.0 -> +1), value s * 2^(e -
    b). Code (uint8): bit 4 = 1 for negative, bits 0-3 = e + 8. Exact zeros take e = -8 (the
    smallest magnitude +2^(-8-b), code 0x00) when zero_to_min, else the code PO2_ZERO (value 0).
    `round(log2)` is `round_log2`: exact, no ties. g is taken as float32 and must be finite.
    Returns (codes with g's shape, b as a Python int).
    """
    a = np.asarray(g, dtype=np.float32)
    if not np.all(np.isfinite(a)):
        raise ValueError("po2_quantize: gradient has NaN/inf entries (training diverged)")
    k = round_log2(a)
    m_k = int(k.max()) if a.size and np.any(a != 0) else 0
    b = int(bias) - m_k
    e = np.clip(k + b, PO2_EMIN, PO2_EMAX)
    codes = ((a < 0).astype(np.uint8) << 4) | (e + 8).astype(np.uint8)
    if not zero_to_min:
        codes = np.where(a == 0, np.uint8(PO2_ZERO), codes).astype(np.uint8)
    return codes.astype(np.uint8), b


def po2_decode(codes, b: int) -> np.ndarray:
    """float32 value of each code: (-1)^bit4 * 2^((code & 15) - 8 - b); PO2_ZERO -> 0.

    Exact whenever 2^(e-b) is a float32 (b <= 141); np.ldexp rounding applies below that.
    """
    c = np.asarray(codes, dtype=np.uint8)
    e = (c & 15).astype(np.int32) - 8 - int(b)
    sgn = np.where(c & 16, np.float32(-1), np.float32(1)).astype(np.float32)
    v = np.ldexp(sgn, e).astype(np.float32)
    return np.where(c == PO2_ZERO, np.float32(0), v).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# bit packing

def pack_bits(x, axis: int = -1) -> np.ndarray:
    """Pack along `axis` into uint64 words: bit i of word j is element 64*j + i (x > 0 -> 1; so +1
    -> 1, -1 -> 0 for +-1 data and 1 -> 1, 0 -> 0 for masks). The axis of n elements becomes
    ceil(n/64)
    words; the padding bits of the last word are 0. Other axes keep their order."""
    a = np.moveaxis(np.asarray(x), axis, -1) > 0
    n = a.shape[-1]
    nw = max(1, -(-n // 64))
    padded = np.zeros(a.shape[:-1] + (nw * 64,), dtype=bool)
    padded[..., :n] = a
    by = np.packbits(padded.reshape(a.shape[:-1] + (nw, 64)), axis=-1, bitorder="little")
    words = np.ascontiguousarray(by).view("<u8").reshape(a.shape[:-1] + (nw,)).astype(np.uint64)
    return np.moveaxis(words, -1, axis)


def unpack_bits(words, n: int, axis: int = -1, *, pm1: bool = True) -> np.ndarray:
    """Inverse of `pack_bits`: the first n bits along `axis`, as int8 +-1 (pm1) or 0/1."""
    w = np.moveaxis(np.asarray(words, dtype=np.uint64), axis, -1)
    by = np.ascontiguousarray(w.astype("<u8")).view(np.uint8)
    by = by.reshape(w.shape[:-1] + (w.shape[-1] * 8,))
    bits = np.unpackbits(by, axis=-1, bitorder="little")[..., :n].astype(np.int8)
    out = (2 * bits - 1).astype(np.int8) if pm1 else bits
    return np.moveaxis(out, -1, axis)


def one_minus_pow(b: float, t: int) -> np.float32:
    """Adam's bias correction 1 - b^t in float32 as the C computes it (bnnc_one_minus_pow): b^t by
    binary powering in float32, low bit of t first, so no target needs doubles."""
    base, r = np.float32(b), np.float32(1.0)
    with np.errstate(under="ignore"):
        while t:
            if t & 1:
                r = np.float32(r * base)
            base = np.float32(base * base)
            t >>= 1
    return np.float32(np.float32(1.0) - r)


# ---- learning-rate schedule (compiler/README.md, "Learning-rate schedule") ----------------------
# The C (templates/model.c.j2 `bnnc_lr`) computes the same float32 operations in the same order
# with these coefficients (c_float), built with -ffp-contract=off: no libm call, so glibc, newlib
# and numpy give the same bits.

LR_HORIZON_MAX = 2**32 - 1          # the C keeps the horizon in a uint32
HALF_PI = math.pi / 2
COS_TAYLOR = (1.0, -1 / 2, 1 / 24, -1 / 720, 1 / 40320, -1 / 3628800)     # cos x, powers of x^2
SIN_TAYLOR = (1.0, -1 / 6, 1 / 120, -1 / 5040, 1 / 362880, -1 / 39916800)  # sin x / x


def _horner_f32(coeffs: tuple[float, ...], x2: np.float32) -> np.float32:
    """sum_k c_k x2^k in float32 by Horner, highest power first: r = c_k + x2 * r."""
    r = np.float32(coeffs[-1])
    for c in reversed(coeffs[:-1]):
        r = np.float32(np.float32(c) + np.float32(x2 * r))
    return r


def cos2_half_pi(p: np.float32) -> np.float32:
    """(1 + cos(pi p)) / 2 = cos^2(pi p / 2) for p in [0, 1] in float32: for p <= 1/2 the Taylor
    polynomial of cos at x = p pi/2 (x <= pi/4), else that of sin at x = (1 - p) pi/2 (1 - p is
    exact there), so the small values near p = 1 keep their relative precision; truncation error
    below 2e-10 on [0, pi/4]."""
    p = np.float32(p)
    if p <= np.float32(0.5):
        x = np.float32(p * np.float32(HALF_PI))
        v = _horner_f32(COS_TAYLOR, np.float32(x * x))
    else:
        x = np.float32(np.float32(np.float32(1.0) - p) * np.float32(HALF_PI))
        v = np.float32(x * _horner_f32(SIN_TAYLOR, np.float32(x * x)))
    return np.float32(v * v)


def lr_at(lr: float, schedule: str, t: int, horizon: int) -> np.float32:
    """The float32 learning rate of step t (1-based: the step being taken) of a run of `horizon`
    steps, as the C's `bnnc_lr` computes it: p = (t - 1) / horizon in float32 (1 past the
    horizon), lr * (1 - p) for "linear", lr * cos2_half_pi(p) for "cosine"; lr itself for
    "constant" or when no horizon is known (0). The horizon is capped at LR_HORIZON_MAX."""
    base = np.float32(lr)
    if schedule == "constant" or horizon <= 0:
        return base
    h = min(int(horizon), LR_HORIZON_MAX)
    if t <= 1:                      # step 0 (before any step): the first step's lr
        return base
    p = np.float32(1.0) if t > h else np.float32(np.float32(t - 1) / np.float32(h))
    f = np.float32(np.float32(1.0) - p) if schedule == "linear" else cos2_half_pi(p)
    return np.float32(base * f)
