"""The input preprocessing of a model: which float a stored u8 pixel becomes, one per-channel affine
map `x = a_c * u8 + b_c`, computed here and nowhere else.

Part of a compiled program's contract (`Manifest.preprocess`, compiler/contract.py): the trainers'
pixel tables (compiler/c_literals.py), the numpy paths (runtime/datasets.py `preprocess_pixels`),
`bnnc eval` and `bnnc export` (the ONNX metadata) all take the map from `pixel_affine`.

Kinds (the `--preprocess` spec):

    symmetric            x = 2 u / 255 - 1           range [-1, 1]   (bnnc's default, the paper's)
    unit                 x = u / 255                 range [0, 1]    (PyTorch ToTensor)
    norm:M[,M..]/S[,S..] x = (u / 255 - M_c) / S_c   per channel     (torchvision Normalize)

a_c and b_c are doubles (`pixel_affine`); each pixel value is `float32(a_c * u + b_c)`, one
rounding of the double (`pixel_lut`), so every consumer gets bit-identical inputs. For symmetric
and unit this equals one rounding of the exact rational (2u - 255) / 255 and u / 255 for all 256
pixels (tests/test_preprocess.py). Data stored as floats (a float .npz, a CSV) are taken as model
inputs unchanged: the map is for u8 pixels only.

ONNX metadata: a model file records its convention as `metadata_props["bnnc.preprocess"] = spec`
(zoo models: symmetric; `bnnc export` writes what the program was compiled with).
`from_model(model)` reads it back; a file that says nothing gets DEFAULT (symmetric), and callers
print one notice line (`DEFAULT_NOTICE`). Exports also record the class names (`CLASSES_KEY`,
`class_names_from_model`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError, ModelError

KINDS = ("symmetric", "unit", "norm")
METADATA_KEY = "bnnc.preprocess"
CLASSES_KEY = "bnnc.classes"          # the class names, index -> name, as a JSON list
SPEC_HELP = ("symmetric = 2u/255-1 in [-1,1]; unit = u/255 in [0,1]; norm:M[,M,M]/S[,S,S] = "
             "(u/255-M)/S per channel (torchvision Normalize)")


@dataclass(frozen=True)
class Preprocess:
    """A preprocessing convention; `mean`/`std` (pixel/255 units) for kind "norm" only, one value
    or one per input channel."""
    kind: str = "symmetric"
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def spec(self) -> str:
        """The `--preprocess` / metadata string that parses back to this value."""
        if self.kind != "norm":
            return self.kind
        return f"norm:{','.join(map(repr, self.mean))}/{','.join(map(repr, self.std))}"

    def describe(self) -> str:
        return {"symmetric": "2u/255 - 1, range [-1, 1]", "unit": "u/255, range [0, 1]"}.get(
            self.kind, f"(u/255 - mean) / std, mean {list(self.mean)}, std {list(self.std)}")


DEFAULT = Preprocess("symmetric")
DEFAULT_NOTICE = (f"notice: {{model}} does not record its input preprocessing "
                  f"(ONNX metadata '{METADATA_KEY}'); using the default {DEFAULT.kind} "
                  "(2u/255 - 1); pass --preprocess to choose")


def parse_preprocess(spec: str, *, where: str = "--preprocess") -> Preprocess:
    """A Preprocess from its spec string; ConfigError naming `where` when malformed."""
    s = str(spec).strip()
    if s in ("symmetric", "unit"):
        return Preprocess(s)
    if s.startswith("norm:"):
        parts = s[5:].split("/")
        try:
            if len(parts) != 2:
                raise ValueError("expected MEAN/STD")
            mean = tuple(float(v) for v in parts[0].split(","))
            std = tuple(float(v) for v in parts[1].split(","))
        except ValueError as err:
            raise ConfigError(f"{where} {spec!r}: {err}", hint=SPEC_HELP) from None
        if len(mean) != len(std):
            raise ConfigError(f"{where} {spec!r}: {len(mean)} means but {len(std)} stds",
                              hint=SPEC_HELP)
        if not all(math.isfinite(v) for v in mean + std) or min(std) <= 0:
            raise ConfigError(f"{where} {spec!r}: means must be finite and stds positive",
                              hint=SPEC_HELP)
        return Preprocess("norm", mean, std)
    raise ConfigError(f"{where} {spec!r} is not a preprocessing spec", hint=SPEC_HELP)


def input_channels(input_shape: tuple[int, ...]) -> int:
    """Channels of a per-sample NCHW input shape (1 for a flat input)."""
    return int(input_shape[0]) if len(input_shape) == 3 else 1


def resolved(pre: Preprocess, channels: int) -> Preprocess:
    """`pre` with one mean/std per channel (a single value broadcast); ConfigError otherwise."""
    if pre.kind not in KINDS:
        raise ConfigError(f"unknown preprocessing kind {pre.kind!r}", hint=SPEC_HELP)
    if pre.kind != "norm":
        return Preprocess(pre.kind)
    if len(pre.mean) == 1:
        return Preprocess("norm", pre.mean * channels, pre.std * channels)
    if len(pre.mean) != channels:
        raise ConfigError(f"preprocessing {pre.spec()!r} has {len(pre.mean)} channel values but "
                          f"the model input has {channels} channel(s)",
                          hint="give one mean/std, or one per input channel")
    return pre


def pixel_affine(pre: Preprocess, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(a_c, b_c) for c in 0..channels-1: the float of pixel u in channel c is a_c * u + b_c."""
    pre = resolved(pre, channels)
    if pre.kind == "symmetric":
        return (2.0 / 255.0,) * channels, (-1.0,) * channels
    if pre.kind == "unit":
        return (1.0 / 255.0,) * channels, (0.0,) * channels
    return (tuple(1.0 / (255.0 * s) for s in pre.std),
            tuple(-m / s for m, s in zip(pre.mean, pre.std)))


def pixel_lut(pre: Preprocess, channels: int) -> np.ndarray:
    """float32 [channels, 256]: row c maps a u8 pixel of channel c to its model input."""
    return affine_lut(*pixel_affine(pre, channels))


def affine_lut(a, b) -> np.ndarray:
    """float32 [C, 256] of the per-channel map x = a_c * u + b_c (doubles, rounded once)."""
    u = np.arange(256, dtype=np.float64)
    return np.stack([(ac * u + bc) for ac, bc in zip(a, b)]).astype(np.float32)


def to_pixels(x, affine, input_shape: tuple[int, ...]) -> np.ndarray:
    """The u8 pixels of a batch for a program compiled with `--input u8` (TrainConfig.input_affine
    = (a_c, b_c)): a uint8 batch as it is, or float inputs that are pixel values under the map
    (what `pixel_lut` gives) mapped back exactly; ValueError naming the first float that is not
    one (e.g. CSV features: such data need `--input f32`)."""
    a = np.asarray(x)
    if a.dtype == np.uint8:
        return a
    if a.dtype.kind != "f":
        raise ValueError(f"input batch has type {a.dtype}; expected uint8 pixels or their floats")
    lut = affine_lut(*affine)
    n = int(np.prod(input_shape))
    flat = a.reshape(-1, lut.shape[0], n // lut.shape[0]).astype(np.float32)
    out = np.empty(flat.shape, np.uint8)
    for c, row in enumerate(lut):
        v = flat[:, c]
        # the map's inverse, rounded, then checked against the table (exact for any a_c that
        # keeps neighbouring pixels apart; a table search where it does not)
        with np.errstate(invalid="ignore"):
            u = np.clip(np.rint((v.astype(np.float64) - affine[1][c]) / affine[0][c]), 0, 255)
        u = np.nan_to_num(u).astype(np.intp)
        bad = row[u] != v
        if np.any(bad):
            order = np.argsort(row, kind="stable")
            u = order[np.clip(np.searchsorted(row[order], v), 0, 255)]
            bad = row[u] != v
        if np.any(bad):
            raise ValueError(f"input value {float(v[bad][0])!r} (channel {c}) is not a pixel "
                             "value under the program's preprocessing")
        out[:, c] = u
    return out.reshape(a.shape)


def from_model(model) -> Preprocess | None:
    """The convention an onnx.ModelProto records (METADATA_KEY), or None if it records none."""
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            try:
                return parse_preprocess(prop.value, where=f"metadata '{METADATA_KEY}'")
            except ConfigError as err:
                raise ModelError(f"the model's {err.message}", hint=err.hint) from None
    return None


def class_names_from_model(model) -> tuple[str, ...] | None:
    """The class names an onnx.ModelProto records (CLASSES_KEY), or None."""
    for prop in model.metadata_props:
        if prop.key == CLASSES_KEY:
            try:
                names = json.loads(prop.value)
            except json.JSONDecodeError:
                names = None
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ModelError(f"the model's metadata '{CLASSES_KEY}' is not a JSON list of "
                                 "class names")
            return tuple(names)
    return None
