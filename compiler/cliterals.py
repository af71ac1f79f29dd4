"""C literals shared by the Linux and the bare-metal emission: floats, strings, the pixel table.

`codegen.py` (the model and the Linux trainer) and `baremetal.py` (the microcontroller trainer) both
print float32 constants and the u8-pixel lookup table into C; they import them from here, so neither
imports the other for them. Values are printed as the double `repr` of what the numpy side uses,
cast to float in C: C and numpy round the same double to float32.
"""

from __future__ import annotations

import math

import numpy as np

# u8 pixel -> 2*x/255 - 1, one rounding of the exact rational (runtime/datasets.py scale_pixels)
PIXEL_LUT = ((2.0 * np.arange(256) - 255.0) / 255.0).astype(np.float32)


def c_float(v: float) -> str:
    """A float32 constant as C: the double's repr cast to float (what np.float32(v) rounds).

    >>> c_float(0.9)
    '(float)0.9'
    >>> c_float(1e-07)
    '(float)1e-07'
    >>> c_float(2.0)
    '(float)2.0'
    """
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"non-finite constant {v}")
    return f"(float){v!r}"


def pixel_lut_c() -> list[str]:
    """The 256 entries of the trainers' `pixel_lut` table as C float constants."""
    return [c_float(v) for v in PIXEL_LUT]


def c_string(text: str) -> str:
    """A C string literal for `text` (ASCII; anything else escaped).

    >>> c_string('fc1.W')
    '"fc1.W"'
    >>> c_string('a"b')
    '"a\\\\"b"'
    """
    out = []
    for ch in str(text):
        if ch in '"\\':
            out.append("\\" + ch)
        elif 32 <= ord(ch) < 127 and ch != "?":
            out.append(ch)
        else:
            out.append(f"\\{ord(ch) & 0xFF:03o}")
    return '"' + "".join(out) + '"'
