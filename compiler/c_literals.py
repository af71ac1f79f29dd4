"""C literals shared by the Linux and the bare-metal emission: floats, strings, the pixel tables.

The pixel tables (`pixel_lut_c`, from compiler/preprocess.py's per-channel affine map) are computed
once for the template context (codegen.py) that both the Linux trainer and the bare-metal one
(baremetal.py) render;
`c_string` is the templates' `cstr` filter (templating.py); `c_float` prints the lowering's float
constants. Floats are printed as the double `repr` of what the numpy side uses, cast to float in
C: C and numpy round the same double to float32.
"""

from __future__ import annotations

import math
import re

import numpy as np

from .preprocess import DEFAULT, Preprocess, pixel_lut

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NOT_WORD = re.compile(r"[^A-Za-z0-9_]")
LABEL_CHARS = 60                  # c_label keeps at most this many characters
# the default table: u8 pixel -> 2*x/255 - 1 (runtime/datasets.py scale_pixels)
PIXEL_LUT: np.ndarray = pixel_lut(DEFAULT, 1)[0]


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


def pixel_lut_c(pre: Preprocess = DEFAULT, channels: int = 1) -> list[list[str]]:
    """The trainers' `pixel_lut` tables as C float constants: one row of 256 per input channel, or
    a single row when every channel maps pixels the same way."""
    lut = pixel_lut(pre, channels)
    if all(np.array_equal(lut[0], row) for row in lut[1:]):
        lut = lut[:1]
    return [[c_float(v) for v in row] for row in lut]


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


def c_comment(text: str) -> str:
    """Text made safe inside a /* */ comment (no comment terminators, printable ASCII).

    >>> c_comment("a */ b\\n")
    'a * / b '
    """
    s = "".join(ch if 32 <= ord(ch) < 127 else " " for ch in str(text))
    return s.replace("*/", "* /").replace("/*", "/ *")


def c_ident(text: str) -> str:
    """Check that `text` is a C identifier (bnnc chooses them; this guards against a bug).

    >>> c_ident("fc1")
    'fc1'
    """
    if not _IDENT.match(text):
        raise AssertionError(f"{text!r} is not a C identifier")
    return text


def c_param_names(params: str) -> str:
    """The argument list that forwards a C parameter list (bnnc's own kernel signatures) unchanged:
    the last identifier of each comma-separated parameter.

    >>> c_param_names("const float *x, uint16_t *m, int32_t count")
    'x, m, count'
    >>> c_param_names("void")
    ''
    """
    if params.strip() == "void":
        return ""
    names = [re.findall(r"[A-Za-z_][A-Za-z0-9_]*", p)[-1] for p in params.split(",")]
    return ", ".join(c_ident(n) for n in names)


def c_label(text: str) -> str:
    """A name from a model file as it may appear in a generated comment: every character that is
    not a letter, digit or `_` becomes `_`, cut to LABEL_CHARS (nothing of the file reaches the C
    raw; the name stays recognizable: `/conv1/Conv` -> `_conv1_Conv`).

    >>> c_label('*/ #include "x" /*')
    '____include__x____'
    """
    return _NOT_WORD.sub("_", str(text))[:LABEL_CHARS]
