"""The model zoo: the paper's architectures (ALGORITHM.md §5) as ONNX files a user could export.

Input -> output: `build_zoo_model("cnv", fmt="onnx", seed=0, width=1.0)` -> an untrained
`onnx.ModelProto`. Names: `mlp`, `tfc`, `sfc`, `lfc` (MNIST MLPs), `cnv`, `binarynet` (CIFAR-10
CNNs), `resnete18`, `birealnet18` (ImageNet, Larq Zoo definitions).
`zoo_weight_count(name, ...)` counts the weights without drawing them.

Invariants:
- same arguments -> byte-identical serialized model (producer "bnnc-zoo", no timestamps; weights
  from `np.random.default_rng(seed)`, drawn in layer order);
- every binary layer reads latent float32 weights `W ~ N(0, 1/fan_in)` through a binarizer, never
  pre-binarized values; real layers (ImageNet stems, shortcuts, classifier) use plain float weights
  drawn the same way, and the classifier bias starts at 0;
- BatchNormalization starts at gamma 1, beta 0, mean 0, var 1 (ALGORITHM.md §1 init);
- the batch dimension is symbolic ("N"); the input is real (no binarizer on the network input);
- binary dense weights are `[in, out]` for `MatMul`, conv weights `[Cout, Cin, kh, kw]`; binary
  layers have no bias;
- initializers are named as torch names them, numbered per kind in creation order
  (`conv3.weight`, `fc1.weight`, `fc1.bias`, `bn2.weight` / `.bias` / `.running_mean` /
  `.running_var`); nodes are `/<scope>/<Op>`; the graph input is `input` [N, C, H, W] and the
  output `probs` [N, classes].

Binarizer idioms (`fmt`): "onnx" writes `Where(GreaterOrEqual(x, 0), 1, -1)`, whose sign(0) = +1
is bnnc's, so onnxruntime and bnnc agree exactly (ONNX `Sign` would give 0); "qonnx" writes QONNX
`BipolarQuant(x, scale=1)` in domain `qonnx.custom_op.general`. Weights and activations alike.

Layer order of the paper's nets: binary layer -> BN (eps 1e-4, momentum 0.9) -> sign; the last
one binary -> BN -> Softmax. CNV uses 'valid' 3x3 convs with the 2x2/2 max-pool after the sign;
BinaryNet 'same' convs with the pool between conv and BN. ResNetE-18 / Bi-Real-18 follow
larq_zoo.literature (resnet_e.py, birealnet.py): real 7x7/2 stem, blocks
`Add(BN(BinaryConv3x3(sign(x))), shortcut)` with shortcut `BN(Conv1x1(AvgPool2x2/2(x)))` where the
block downsamples, GlobalAveragePool, real Dense with bias, Softmax; their BN eps/momentum are
Larq's. Where these two deviate from Larq it is said at the spot (`_resnete18`, `_birealnet18`).

`width` scales every hidden width and channel count (`round(c * width)`, at least 1), so `cnv` at
width 0.25 is FINN's CNV small; the class count is never scaled. `image_size` is accepted only by
the ImageNet models (224 by default): the paper's nets have fixed input sizes. Limits: square
inputs only; the models are untrained (weights for shape, memory and speed studies, or training).
"""

from __future__ import annotations

import math
import numbers
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .. import __version__
from .errors import ConfigError
from .preprocess import DEFAULT as DEFAULT_PREPROCESS
from .preprocess import METADATA_KEY as PREPROCESS_KEY

FORMATS = ("onnx", "qonnx")
QONNX_DOMAIN = "qonnx.custom_op.general"
OPSET = 17            # what torch.onnx.export writes by default; every op used here exists there
IR_VERSION = 8        # the IR version that goes with opset 17, readable by older runtimes too
PRODUCER = "bnnc-zoo"
INPUT_NAME = "input"
OUTPUT_NAME = "probs"


@dataclass(frozen=True)
class BnSpec:
    eps: float
    momentum: float


PAPER_BN = BnSpec(eps=1e-4, momentum=0.9)      # ALGORITHM.md §1
RESNETE_BN = BnSpec(eps=1e-5, momentum=0.9)    # resnet_e.py: BatchNormalization(0.9, epsilon=1e-5)
BIREAL_BN = BnSpec(eps=1e-3, momentum=0.8)     # birealnet.py: momentum=0.8, Keras default eps


class _Net:
    """Accumulates the nodes and initializers of one model and tracks per-sample shapes.

    With `rng=None` nothing is drawn: the builder only counts weights (`weight_count`), which is how
    `zoo_weight_count` and `bnnc zoo --list` stay cheap for the 14M-weight BinaryNet.
    """

    def __init__(self, fmt: str, rng: np.random.Generator | None, bn: BnSpec,
                 input_shape: tuple[int, ...]):
        self.fmt, self.rng, self.bn_spec = fmt, rng, bn
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.shape: dict[str, tuple[int, ...]] = {INPUT_NAME: input_shape}
        self.counter: Counter[str] = Counter()
        self.consts: set[str] = set()
        self.weight_count = 0

    # ---- plumbing -------------------------------------------------------------------------------
    def scope(self, kind: str) -> str:
        self.counter[kind] += 1
        return f"{kind}{self.counter[kind]}"

    def node(self, op: str, scope: str, inputs: list[str], shape: tuple[int, ...], *,
             domain: str = "", **attrs) -> str:
        out = f"/{scope}/{op}_output_0"
        assert out not in self.shape, f"duplicate tensor {out}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"/{scope}/{op}", domain=domain,
                                           **attrs))
        self.shape[out] = shape
        return out

    def const(self, name: str, value: float) -> str:
        # one shared scalar per value, as exporters de-duplicate equal constants
        if name not in self.consts:
            self.inits.append(numpy_helper.from_array(np.array(value, dtype=np.float32), name))
            self.consts.add(name)
        return name

    def param(self, name: str, shape: tuple[int, ...], *, fan_in: int | None = None,
              fill: float = 0.0, weight: bool = False) -> str:
        """An initializer: N(0, 1/fan_in) when fan_in is given, else constant `fill`."""
        if weight:
            self.weight_count += math.prod(shape)
        self.shape[name] = shape
        if self.rng is not None:
            if fan_in is not None:
                arr = self.rng.standard_normal(shape, dtype=np.float32)
                arr *= np.float32(1.0 / math.sqrt(fan_in))
            else:
                arr = np.full(shape, fill, dtype=np.float32)
            self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def binarize(self, x: str, scope: str) -> str:
        if self.fmt == "qonnx":
            return self.node("BipolarQuant", scope, [x, self.const("one", 1.0)], self.shape[x],
                             domain=QONNX_DOMAIN)
        ge = self.node("GreaterOrEqual", scope, [x, self.const("zero", 0.0)], self.shape[x])
        plus, minus = self.const("one", 1.0), self.const("minus_one", -1.0)
        return self.node("Where", scope, [ge, plus, minus], self.shape[x])

    # ---- layers -------------------------------------------------------------------------------
    def dense(self, x: str, n_out: int, *, binary: bool, bias: bool = False) -> str:
        (n_in,) = self.shape[x]
        s = self.scope("fc")
        w = self.param(f"{s}.weight", (n_in, n_out), fan_in=n_in, weight=True)
        if binary:
            w = self.binarize(w, s)
        y = self.node("MatMul", s, [x, w], (n_out,))
        if bias:
            # MatMul + Add is how tf2onnx writes a Keras Dense (Larq Zoo models are Keras)
            y = self.node("Add", s, [y, self.param(f"{s}.bias", (n_out,), fill=0.0, weight=True)],
                          (n_out,))
        return y

    def conv(self, x: str, c_out: int, k: int, *, binary: bool, stride: int = 1,
             padding: str = "valid") -> str:
        c_in, h, w_ = self.shape[x]
        s = self.scope("conv")
        w = self.param(f"{s}.weight", (c_out, c_in, k, k), fan_in=c_in * k * k, weight=True)
        if binary:
            w = self.binarize(w, s)
        pads, (oh, ow) = _pads(s, (h, w_), k, stride, padding)
        return self.node("Conv", s, [x, w], (c_out, oh, ow), kernel_shape=[k, k], pads=pads,
                         strides=[stride, stride], dilations=[1, 1], group=1)

    def batchnorm(self, x: str) -> str:
        c = self.shape[x][0]
        s = self.scope("bn")
        ins = [x] + [self.param(f"{s}.{f}", (c,), fill=v)
                     for f, v in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0),
                                  ("running_var", 1.0))]
        return self.node("BatchNormalization", s, ins, self.shape[x], epsilon=self.bn_spec.eps,
                         momentum=self.bn_spec.momentum)

    def sign(self, x: str) -> str:
        return self.binarize(x, self.scope("sign"))

    def relu(self, x: str) -> str:
        return self.node("Relu", self.scope("relu"), [x], self.shape[x])

    def pool(self, op: str, x: str, k: int, stride: int, padding: str = "valid") -> str:
        c, h, w = self.shape[x]
        s = self.scope("pool")
        pads, (oh, ow) = _pads(s, (h, w), k, stride, padding)
        # AveragePool's default count_include_pad=0 divides by the in-bounds count, as Keras 'same'
        return self.node(op, s, [x], (c, oh, ow), kernel_shape=[k, k], strides=[stride, stride],
                         pads=pads)

    def global_avgpool(self, x: str) -> str:
        return self.node("GlobalAveragePool", self.scope("gap"), [x], (self.shape[x][0], 1, 1))

    def flatten(self, x: str) -> str:
        return self.node("Flatten", self.scope("flatten"), [x], (math.prod(self.shape[x]),), axis=1)

    def add(self, a: str, b: str) -> str:
        assert self.shape[a] == self.shape[b], (a, self.shape[a], b, self.shape[b])
        return self.node("Add", self.scope("add"), [a, b], self.shape[a])

    def softmax(self, x: str) -> str:
        return self.node("Softmax", self.scope("softmax"), [x], self.shape[x], axis=1)


def _pads(scope: str, hw: tuple[int, int], k: int, stride: int,
          padding: str) -> tuple[list[int], tuple[int, int]]:
    """ONNX pads [top, left, bottom, right] and the output size, Keras/TF padding semantics."""
    if padding == "valid":
        oh, ow = ((d - k) // stride + 1 for d in hw)
        if min(oh, ow) < 1:
            raise ConfigError(f"zoo layer '{scope}': a {k}x{k} window does not fit the "
                              f"{hw[0]}x{hw[1]} input; use a larger --image-size")
        return [0, 0, 0, 0], (oh, ow)
    assert padding == "same", padding
    before, after, outs = [], [], []
    for d in hw:
        o = -(-d // stride)
        total = max((o - 1) * stride + k - d, 0)
        # TF puts the odd pixel of 'same' padding at the end (bottom/right)
        before.append(total // 2)
        after.append(total - total // 2)
        outs.append(o)
    return before + after, (outs[0], outs[1])


def _scaled(c: int, width: float) -> int:
    return max(1, int(math.floor(c * width + 0.5)))


# ---- architectures: each builds on a _Net and returns the output tensor --------------------------

def _fc_head(net: _Net, x: str, hidden: tuple[int, ...], width: float, classes: int) -> str:
    x = net.flatten(x)
    for h in hidden:
        x = net.sign(net.batchnorm(net.dense(x, _scaled(h, width), binary=True)))
    return net.softmax(net.batchnorm(net.dense(x, classes, binary=True)))


def _mlp_family(hidden: tuple[int, ...]) -> Callable[[_Net, float, int], str]:
    return lambda net, width, classes: _fc_head(net, INPUT_NAME, hidden, width, classes)


def _cnv(net: _Net, width: float, classes: int) -> str:
    x = INPUT_NAME
    for c, pool in ((64, False), (64, True), (128, False), (128, True), (256, False), (256, False)):
        x = net.sign(net.batchnorm(net.conv(x, _scaled(c, width), 3, binary=True)))
        if pool:
            x = net.pool("MaxPool", x, 2, 2)
    return _fc_head(net, x, (512, 512), width, classes)


def _binarynet(net: _Net, width: float, classes: int) -> str:
    x = INPUT_NAME
    for c, pool in ((128, False), (128, True), (256, False), (256, True), (512, False),
                    (512, True)):
        y = net.conv(x, _scaled(c, width), 3, binary=True, padding="same")
        if pool:
            y = net.pool("MaxPool", y, 2, 2)
        x = net.sign(net.batchnorm(y))
    return _fc_head(net, x, (1024, 1024), width, classes)


def _residual_block(net: _Net, x: str, filters: int, downsample: bool) -> str:
    # Larq decides "downsample" by comparing channel counts; bnnc uses the stage boundary so that
    # tiny --width values (where 64*w == 128*w after rounding) keep the stride-2 shape right.
    if downsample:
        # 'same' AvgPool: identical to Larq at the even sizes ImageNet/CIFAR give; at odd sizes it
        # keeps the shortcut's shape equal to the stride-2 'same' conv's (ResNetE's 'valid' pool
        # would not)
        r = net.pool("AveragePool", x, 2, 2, padding="same")
        r = net.batchnorm(net.conv(r, filters, 1, binary=False))
    else:
        r = x
    y = net.conv(net.sign(x), filters, 3, binary=True, stride=2 if downsample else 1,
                 padding="same")
    return net.add(net.batchnorm(y), r)


def _resnete18(net: _Net, width: float, classes: int) -> str:
    """larq_zoo.literature.resnet_e.BinaryResNetE18.

    Deviations: the ImageNet stem is used at every --image-size (Larq swaps in a CIFAR 3x3 stem
    below 50 px; bnnc keeps the ImageNet topology so small test variants exercise it); SteSign's
    clip 1.25 and the WeightClip constraint are training-time details ONNX cannot carry (bnnc's STE
    clips at 1); weights are N(0, 1/fan_in), not Larq's he_normal/glorot_normal.
    """
    x = net.conv(INPUT_NAME, _scaled(64, width), 7, binary=False, stride=2, padding="same")
    x = net.relu(net.batchnorm(x))
    # Keras MaxPool 'same' pads with -inf; ONNX MaxPool ignores pads the same way
    x = net.batchnorm(net.pool("MaxPool", x, 3, 2, padding="same"))
    for stage, filters in enumerate((64, 128, 256, 512)):
        for j in range(4):   # Larq: 2 ResNet blocks per stage, each split into 2 one-conv blocks
            x = _residual_block(net, x, _scaled(filters, width), downsample=stage > 0 and j == 0)
    x = net.flatten(net.global_avgpool(net.relu(x)))
    return net.softmax(net.dense(x, classes, binary=False, bias=True))


def _birealnet18(net: _Net, width: float, classes: int) -> str:
    """larq_zoo.literature.birealnet.BiRealNet.

    Deviations: the weight quantizer is plain sign, not magnitude_aware_sign (sign(W) * mean|W|
    per output channel): that positive per-channel scale is cancelled by the BatchNormalization
    right after the conv whenever it normalizes with batch statistics, i.e. in training, and
    bnnc's binary conv has no scale. ApproxSign differs from sign only in its backward pass.
    Weights are N(0, 1/fan_in), not glorot_normal.
    """
    x = net.conv(INPUT_NAME, _scaled(64, width), 7, binary=False, stride=2, padding="same")
    x = net.pool("MaxPool", net.batchnorm(x), 3, 2, padding="same")
    for stage, filters in enumerate((64, 128, 256, 512)):
        for j in range(4):
            x = _residual_block(net, x, _scaled(filters, width), downsample=stage > 0 and j == 0)
    x = net.flatten(net.global_avgpool(x))
    return net.softmax(net.dense(x, classes, binary=False, bias=True))


@dataclass(frozen=True)
class ZooEntry:
    name: str
    description: str
    channels: int                       # input channels
    image_size: int                     # input height = width (default for ImageNet models)
    num_classes: int                    # default class count
    imagenet: bool                      # accepts image_size; has real (non-binary) layers
    bn: BnSpec
    build: Callable[[_Net, float, int], str]


ZOO: dict[str, ZooEntry] = {e.name: e for e in (
    ZooEntry("mlp", "MNIST MLP 784-256x4-10, all layers binary (the paper's MLP)",
             1, 28, 10, False, PAPER_BN, _mlp_family((256,) * 4)),
    ZooEntry("tfc", "FINN TFC: MNIST MLP 784-64x3-10, all layers binary",
             1, 28, 10, False, PAPER_BN, _mlp_family((64,) * 3)),
    ZooEntry("sfc", "FINN SFC: MNIST MLP 784-256x3-10, all layers binary",
             1, 28, 10, False, PAPER_BN, _mlp_family((256,) * 3)),
    ZooEntry("lfc", "FINN LFC: MNIST MLP 784-1024x3-10, all layers binary",
             1, 28, 10, False, PAPER_BN, _mlp_family((1024,) * 3)),
    ZooEntry("cnv", "FINN CNV: CIFAR-10 CNN, 6 'valid' 3x3 convs + 3 FC, pool after sign",
             3, 32, 10, False, PAPER_BN, _cnv),
    ZooEntry("binarynet", "BinaryNet (Courbariaux): CIFAR-10 CNN, 6 'same' convs + 3 FC",
             3, 32, 10, False, PAPER_BN, _binarynet),
    ZooEntry("resnete18", "Larq BinaryResNetE18: ImageNet, real stem/shortcuts/classifier",
             3, 224, 1000, True, RESNETE_BN, _resnete18),
    ZooEntry("birealnet18", "Larq Bi-Real Net 18: ImageNet, real stem/shortcuts/classifier",
             3, 224, 1000, True, BIREAL_BN, _birealnet18),
)}


def _entry(name: str) -> ZooEntry:
    if name not in ZOO:
        raise ConfigError(f"unknown zoo model {name!r}; choose one of: {', '.join(ZOO)}",
                          hint="`bnnc zoo --list` describes them")
    return ZOO[name]


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _validate(e: ZooEntry, fmt: str, seed: int, width: float, image_size: int | None,
              num_classes: int | None) -> tuple[int, int]:
    if fmt not in FORMATS:
        raise ConfigError(f"unknown zoo format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if not _is_int(seed) or seed < 0:
        raise ConfigError(f"zoo --seed must be a non-negative integer, got {seed!r}")
    if not (isinstance(width, (int, float)) and math.isfinite(width) and width > 0):
        raise ConfigError(f"zoo --width must be a positive number, got {width!r}")
    if image_size is not None and not e.imagenet:
        raise ConfigError(f"zoo model {e.name!r} has a fixed {e.image_size}x{e.image_size} input; "
                          f"--image-size applies to "
                          f"{', '.join(n for n, z in ZOO.items() if z.imagenet)} only")
    size = e.image_size if image_size is None else image_size
    if not _is_int(size) or size < 1:
        raise ConfigError(f"zoo --image-size must be a positive integer, got {image_size!r}")
    classes = e.num_classes if num_classes is None else num_classes
    if not _is_int(classes) or classes < 2:
        raise ConfigError(f"zoo --classes must be an integer >= 2, got {num_classes!r}")
    return int(size), int(classes)


def _construct(name: str, fmt: str, seed: int, width: float, image_size: int | None,
               num_classes: int | None, draw: bool) -> tuple[_Net, str, ZooEntry, int, int]:
    e = _entry(name)
    size, classes = _validate(e, fmt, seed, width, image_size, num_classes)
    net = _Net(fmt, np.random.default_rng(int(seed)) if draw else None, e.bn, (e.channels, size, size))
    out = e.build(net, float(width), classes)
    return net, out, e, size, classes


def zoo_weight_count(name: str, *, width: float = 1.0, num_classes: int | None = None) -> int:
    """Elements of the W (and b) of every conv/dense layer, BN excluded; no weights are drawn."""
    return _construct(name, "onnx", 0, width, None, num_classes, draw=False)[0].weight_count


def build_zoo_model(name: str, *, fmt: str = "onnx", seed: int = 0, width: float = 1.0,
                    image_size: int | None = None,
                    num_classes: int | None = None) -> onnx.ModelProto:
    """The zoo model `name` as an untrained ONNX model.

    `num_classes=None` takes the model's default (10, or 1000 for the ImageNet models);
    `image_size` is for resnete18/birealnet18 only (default 224). Raises ConfigError on an unknown
    name or a bad option."""
    net, out, e, size, classes = _construct(name, fmt, seed, width, image_size, num_classes,
                                            draw=True)
    x_info = helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT,
                                           ["N", e.channels, size, size])
    y_info = helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", classes])
    # the last node writes the graph output directly, as exporters do
    net.nodes[-1].output[0] = OUTPUT_NAME
    args = f"--format {fmt} --seed {seed} --width {width:g}"
    if e.imagenet:
        args += f" --image-size {size}"
    args += f" --classes {classes}"
    graph = helper.make_graph(net.nodes, e.name, [x_info], [y_info], initializer=net.inits,
                              doc_string=f"bnnc zoo {e.name} {args}: {e.description} (untrained)")
    opsets = [helper.make_opsetid("", OPSET)]
    if fmt == "qonnx":
        opsets.append(helper.make_opsetid(QONNX_DOMAIN, 1))
    model = helper.make_model(graph, opset_imports=opsets, producer_name=PRODUCER,
                              producer_version=__version__, ir_version=IR_VERSION)
    helper.set_model_props(model, {"bnnc.zoo.name": e.name, "bnnc.zoo.args": args,
                                   "bnnc.zoo.weights": str(net.weight_count),
                                   PREPROCESS_KEY: DEFAULT_PREPROCESS.spec()})
    assert out in net.shape and net.shape[out] == (classes,), (out, net.shape[out])
    return model
