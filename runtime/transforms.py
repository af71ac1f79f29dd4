"""Fitting a dataset's examples to a model's input: the explicit transforms `plan_fit` chooses and
`Fit.apply` performs (`bnnc run/eval/train/data pack`, recorded in OUT/data.json by `bnnc run`).

Input: the native shape of one example (H, W), (C, H, W), (H, W, C) or (F,), its dtype (uint8
pixels or float features), the model's per-sample input shape (C, H, W) or (F,) and the user's
`--fit` choice. Output: a `Fit` that maps a chunk of native examples (N, *native) to (N, *model
shape) in the same dtype, one step after the other:

1. layout: (H, W) -> (1, H, W); NHWC -> NCHW (a 3-d example whose last axis has 1, 3 or 4
   entries and whose first does not, or `--layout nhwc`);
2. channels: 1 -> C repeats the grey plane (grey -> RGB); 3 -> 1 is ITU-R 601 luma with pillow's
   integer formula (R*19595 + G*38470 + B*7471 + 0x8000) >> 16; a 4th (alpha) channel is dropped;
3. size: `pad` centres the image in the model's H x W (extra row/column at the bottom/right),
   border pixel 0 (float data: 0.0); `resize` is pillow's bilinear resize of each channel to H x W;
4. flat models: the (C, H, W) example flattened in C order (its element count must match); flat
   feature vectors (a CSV of pixel columns) for an image model: reshaped in C, H, W order.

`--fit auto` (the default) pads an image smaller than the model's, keeps one of the same size and
refuses one that is larger or (image folders) images of mixed sizes: `--fit resize` is then the
explicit choice. `--fit none` accepts the exact shape only. Pixel values are never rescaled here:
that is the preprocessing contract (compiler/preprocess.py), applied after the fit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from ..compiler.errors import DataError

FIT_MODES = ("auto", "pad", "resize", "none")
LAYOUTS = ("nchw", "nhwc")
FIT_HELP = ("how examples are fitted to the model's input: auto = pad smaller images, keep equal "
            "ones; pad; resize (bilinear, pillow; also for image folders of mixed sizes); none = "
            "exact shape only. Grey <-> RGB and NHWC -> NCHW are applied as needed")


@dataclass(frozen=True)
class Fit:
    """The transform from a source's examples to the model's input (module docstring)."""
    layout: str                      # "HW" | "NCHW" | "NHWC" | "flat": the native example layout
    src: tuple[int, ...]             # the native example shape (the first image's for folders)
    channels: str                    # "keep" | "grey->rgb" | "rgb->grey" | "drop alpha" | ...
    size: str                        # "keep" | "pad" | "resize"
    dst: tuple[int, ...]             # the model's per-sample input shape

    def describe(self) -> str:
        steps = []
        if self.layout == "NHWC":
            steps.append("NHWC -> NCHW")
        if self.channels != "keep":
            steps.append(self.channels)
        if self.size != "keep":
            steps.append(f"{self.size} to {self.dst[-2]}x{self.dst[-1]}")
        if len(self.dst) == 1 and self.layout != "flat":
            steps.append(f"flatten to {self.dst[0]}")
        if len(self.dst) == 3 and self.layout == "flat":
            steps.append(f"reshape to {'x'.join(map(str, self.dst))}")
        return ", ".join(steps) or "none (the model's shape)"

    def to_dict(self) -> dict:
        return asdict(self) | {"describe": self.describe()}

    def apply(self, x: np.ndarray) -> np.ndarray:
        """(N, *native) -> (N, *dst), the dtype kept."""
        if len(self.dst) == 1 or self.layout == "flat":
            return np.ascontiguousarray(_to_chw(x, self.layout)).reshape((len(x),) + self.dst)
        x = _to_chw(x, self.layout)
        x = _channels(x, self.dst[0])
        h, w = self.dst[1:]
        if x.shape[2:] == (h, w):
            return np.ascontiguousarray(x)
        if self.size == "pad":
            return _pad(x, h, w)
        if self.size == "resize":
            return _resize(x, h, w)
        raise AssertionError(f"example {x.shape[1:]} reaches the model {self.dst} unfitted")


def native_layout(shape: tuple[int, ...], model: tuple[int, ...], layout: str | None) -> str:
    """The layout of a native example shape (HW, NCHW, NHWC or flat)."""
    if len(shape) == 1:
        return "flat"
    if len(shape) == 2:
        return "HW"
    if len(shape) != 3:
        raise DataError(f"examples of shape {shape} are neither images nor feature vectors")
    if layout is not None:
        return layout.upper()
    if shape == tuple(model):
        return "NCHW"
    if len(model) == 3 and shape == (model[1], model[2], model[0]):
        return "NHWC"
    if shape[2] in (1, 3, 4) and shape[0] not in (1, 3, 4):
        return "NHWC"
    return "NCHW"


def plan_fit(shape: tuple[int, ...], model: tuple[int, ...], mode: str = "auto", *,
             layout: str | None = None, what: str = "the data") -> Fit:
    """The Fit of examples of native `shape` to the `model` input; DataError naming `what` when
    they cannot be fitted (or only with an option the user has not given)."""
    if mode not in FIT_MODES:
        raise DataError(f"unknown --fit {mode!r}; choose one of: {', '.join(FIT_MODES)}")
    shape, model = tuple(int(d) for d in shape), tuple(int(d) for d in model)
    lay = native_layout(shape, model, layout)
    chw = _chw_shape(shape, lay)
    if len(model) == 1:
        n = int(np.prod(shape))
        if n != model[0]:
            raise DataError(f"{what}: examples of shape {shape} have {n} values but the model "
                            f"takes {model[0]} inputs", hint="pick data of the model's size")
        return Fit(lay, shape, "keep", "keep", model)
    if chw is None:
        if shape[0] != int(np.prod(model)):
            raise DataError(f"{what}: feature vectors of {shape[0]} values do not fit the model's "
                            f"input {model} ({int(np.prod(model))} values)",
                            hint="pick data of the model's input size")
        return Fit(lay, shape, "keep", "keep", model)     # values in C, H, W order
    c, h, w = chw
    channels = _channel_step(c, model[0], f"{what}: examples of shape {shape} read as {lay}")
    if mode == "resize":      # also images of other sizes further on (image folders)
        size = "resize"
    elif (h, w) == model[1:]:
        size = "keep"
    elif mode == "none":
        raise DataError(f"{what}: examples are {h}x{w}, the model takes {model[1]}x{model[2]} "
                        "(--fit none)", hint="use --fit pad or --fit resize")
    elif h <= model[1] and w <= model[2]:
        size = "pad"
    else:
        raise DataError(f"{what}: examples are {h}x{w}, larger than the model's "
                        f"{model[1]}x{model[2]} input", hint="pass --fit resize to scale them down")
    return Fit(lay, shape, channels, size, model)


def _chw_shape(shape: tuple[int, ...], lay: str) -> tuple[int, int, int] | None:
    if lay == "flat":
        return None
    if lay == "HW":
        return (1, *shape)
    if lay == "NHWC":
        return (shape[2], shape[0], shape[1])
    return shape


def _channel_step(c: int, want: int, what: str) -> str:
    if c == want:
        return "keep"
    if c == 1 and want == 3:
        return "grey->rgb"
    if c == 3 and want == 1:
        return "rgb->grey"
    if c == 4 and want == 3:
        return "drop alpha"
    if c == 4 and want == 1:
        return "drop alpha, rgb->grey"
    raise DataError(f"{what} have {c} channel(s), the model takes {want}",
                    hint="use data with 1 (grey) or 3 (RGB) channels; --layout nchw|nhwc says "
                         "where the channels are")


def _to_chw(x: np.ndarray, lay: str) -> np.ndarray:
    if lay == "HW":
        return x[:, None]
    if lay == "NHWC":
        return x.transpose(0, 3, 1, 2)
    return x


def luma(rgb: np.ndarray) -> np.ndarray:
    """(N, 3, H, W) -> (N, 1, H, W): pillow's convert("L") for uint8, its weights for floats."""
    if rgb.dtype == np.uint8:
        r, g, b = (rgb[:, i].astype(np.uint32) for i in range(3))
        return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)[:, None]
    return (rgb[:, 0] * 0.299 + rgb[:, 1] * 0.587 + rgb[:, 2] * 0.114)[:, None].astype(rgb.dtype)


def _channels(x: np.ndarray, want: int) -> np.ndarray:
    c = x.shape[1]
    if c == want:
        return x
    if c == 4:
        x, c = x[:, :3], 3
        if want == 3:
            return x
    if c == 1 and want == 3:
        return np.repeat(x, 3, axis=1)
    if c == 3 and want == 1:
        return luma(x)
    raise AssertionError((c, want))


def _pad(x: np.ndarray, h: int, w: int) -> np.ndarray:
    dh, dw = h - x.shape[2], w - x.shape[3]
    return np.pad(x, ((0, 0), (0, 0), (dh // 2, dh - dh // 2), (dw // 2, dw - dw // 2)),
                  constant_values=0)


def _resize(x: np.ndarray, h: int, w: int) -> np.ndarray:
    out = np.empty(x.shape[:2] + (h, w), x.dtype)
    mode = "L" if x.dtype == np.uint8 else "F"
    for n in range(x.shape[0]):
        for c in range(x.shape[1]):
            plane = np.ascontiguousarray(x[n, c], np.uint8 if mode == "L" else np.float32)
            img = Image.fromarray(plane, mode=mode).resize((w, h), Image.Resampling.BILINEAR)
            out[n, c] = np.asarray(img)
    return out
