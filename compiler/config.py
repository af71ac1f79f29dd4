"""Training configuration: the algorithm as a policy of switchable techniques (ALGORITHM.md §1-3).

`make_config("proposed", batch=100, po2=False)` starts from the algorithm's defaults and overrides
technique by technique. The schedule, the numpy reference and codegen all read the same `TrainConfig`.

Partial training (issue 14): `TrainConfig.frozen` names the parameters the optimizer leaves alone
(`("fc1.W", "bn1.beta", ...)`, `<layer>.<field>` over `trainable_fields`), in graph order.
`resolve_frozen(graph, train=..., train_from=...)` turns the CLI's `--train LAYER[,LAYER...]` /
`--train bn` / `--train-from LAYER` into that tuple; `check_config_for_graph` rejects names the
graph does not have and a freeze set that leaves nothing to train.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from .errors import ConfigError
from .ir import INPUT, WEIGHT_KINDS, Graph, Layer, LayerKind

ALGORITHMS = ("standard", "proposed")
OPTIMIZERS = ("adam", "sgd", "bop")
STATE_DTYPES = ("f32", "bf16", "f16")
BN_KINDS = ("l2", "l1")
LR_SCHEDULES = ("constant", "linear", "cosine")
INPUT_KINDS = ("f32", "u8")


@dataclass(frozen=True)
class TrainConfig:
    algorithm: str = "proposed"
    batch: int = 100
    optimizer: str = "adam"
    # techniques of the proposed algorithm (ALGORITHM.md §2); standard = all off, f32 state, l2 BN
    binary_dw: bool = True          # 1-bit weight gradients, scaled 1/sqrt(N_W)
    po2: bool = True                # 5-bit power-of-two activation gradients
    po2_bias: int = 8
    po2_zero_to_min: bool = True    # exact zeros -> +2^(-8-b) (bnnc choice); False maps them to 0
    bn: str = "l1"                  # "l1" (1-bit backward) or "l2"
    state_dtype: str = "bf16"       # storage of W, optimizer moments, BN params/stats
    save_bits: bool = True          # binary layers keep their saved input / masks as packed bits
    # the plan's memory fusions (compiler/README.md "Fused conv -> max-pool", "Fused conv -> l1
    # BN -> sign"): only a chunk of a conv's f32 output exists; False = separate steps (faster,
    # the whole tensor in the arena). Needs save_bits (the fused steps keep bits) to apply
    fuse: bool = True
    # hyper-parameters (the authors' values)
    lr: float = 1e-3
    # the lr of step t (1-based) of a run of `horizon` steps: lr * f((t-1)/horizon), f = 1
    # (constant), 1 - p (linear) or (1 + cos(pi p))/2 (cosine), 0 past the horizon; a program or
    # reference without a horizon (0: firmware library, fleet) trains at lr (numerics.lr_at;
    # compiler/README.md, "Learning-rate schedule")
    lr_schedule: str = "linear"
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-7
    sgd_momentum: float = 0.9
    bop_gamma: float = 1e-4         # Bop's momentum rate (Larq's gamma)
    bop_threshold: float = 32.0     # flip when |momentum| > this many mean gradient steps
    bop_bn_shift: bool = True       # a flip of a dense W shifts the next BN's running mean too
    bn_momentum: float = 0.9        # running = momentum * running + (1 - momentum) * batch
    # (l2 BN eps is a property of the model: each BATCHNORM layer's `eps` attr, e.g. 1e-4 for the
    # paper's nets in the zoo, Larq's own values for ResNetE/Bi-Real)
    seed: int = 0
    # parameters not trained (partial training): "<layer>.<field>", graph order; () = train all
    frozen: tuple[str, ...] = ()
    # how the batch input is stored (compiler/README.md "The u8 input"): "f32" (any float input)
    # or "u8" (8-bit pixels, quantised once at load; the first layer, a binary dense layer,
    # multiplies them exactly in int32 and applies the pixel map x = a_c u + b_c per channel
    # after the sum). `input_affine` = ((a_c, ...), (b_c, ...)) in double, from
    # compiler/preprocess.py `pixel_affine`; () under "f32"
    input: str = "f32"
    input_affine: tuple = ()
    # frozen batch norms with nothing trainable upstream (ops.eval_mode_bns): "batch" = batch
    # statistics, running statistics updated (adapts to a new input distribution, AdaBN);
    # "running" = inference mode (running statistics, constant); compiler/README.md, partial training
    frozen_bn: str = "batch"

    def as_dict(self) -> dict:
        """The config as JSON-able fields; the input storage only when it is not the default
        f32, `fuse` only when off (so a default program's manifest, state hash and C are what
        they were before these fields)."""
        d = asdict(self)
        if self.input == "f32":
            del d["input"], d["input_affine"]
        if self.fuse:                   # the default: manifests and hashes as before the switch
            del d["fuse"]
        return d


_DEFAULTS = {
    "standard": dict(binary_dw=False, po2=False, bn="l2", state_dtype="f32", save_bits=False),
    "proposed": dict(binary_dw=True, po2=True, bn="l1", state_dtype="bf16", save_bits=True),
}


# an optimizer's own defaults over TrainConfig's (compiler/README.md, "Bop"): Bop trains the
# real-valued tensors (BN beta, ...) with Adam at 3e-2 (first pass 1e-2, as Larq pairs them; 3e-2
# under the linear lr decay: TFC at B=32, 2 epochs, seeds 0-4, 91.80 -> 92.16 %)
OPTIMIZER_DEFAULTS = {"bop": dict(lr=3e-2)}


def make_config(algorithm: str = "proposed", **overrides) -> TrainConfig:
    """The algorithm's and the optimizer's defaults with `overrides` applied; raises ConfigError on
    nonsense."""
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"unknown algorithm {algorithm!r}; choose one of: {', '.join(ALGORITHMS)}")
    unknown = set(overrides) - set(TrainConfig.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"unknown training option(s): {', '.join(sorted(unknown))}")
    given = {k: v for k, v in overrides.items() if v is not None}
    if "frozen" in given:     # a manifest's JSON list, or any iterable of names
        given["frozen"] = tuple(given["frozen"])
    if "input_affine" in given:     # JSON lists -> tuples
        given["input_affine"] = tuple(tuple(float(v) for v in part)
                                      for part in given["input_affine"])
    cfg = replace(TrainConfig(algorithm=algorithm, **_DEFAULTS[algorithm]),
                  **{**OPTIMIZER_DEFAULTS.get(given.get("optimizer", TrainConfig.optimizer), {}),
                     **given})
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    if not isinstance(cfg.batch, int) or cfg.batch < 1:
        raise ConfigError(f"batch size must be a positive integer, got {cfg.batch!r}")
    if cfg.optimizer not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {cfg.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
    if cfg.state_dtype not in STATE_DTYPES:
        raise ConfigError(f"unknown state dtype {cfg.state_dtype!r}; choose one of: "
                          f"{', '.join(STATE_DTYPES)}")
    if cfg.bn not in BN_KINDS:
        raise ConfigError(f"unknown batch norm {cfg.bn!r}; choose l1 or l2")
    if not -16 <= cfg.po2_bias <= 24:
        raise ConfigError(f"--po2-bias {cfg.po2_bias} is out of range [-16, 24]")
    if not cfg.po2 and cfg.po2_bias != 8:
        raise ConfigError("--po2-bias has no effect with --no-po2; drop one of them")
    if cfg.lr <= 0:
        raise ConfigError(f"learning rate must be positive, got {cfg.lr}")
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"unknown learning-rate schedule {cfg.lr_schedule!r}; choose one of: "
                          f"{', '.join(LR_SCHEDULES)}")
    if not 0 < cfg.bop_gamma < 1:
        raise ConfigError(f"--bop-gamma must lie in (0, 1), got {cfg.bop_gamma}")
    if cfg.bop_threshold < 0:
        raise ConfigError(f"--bop-threshold must be >= 0, got {cfg.bop_threshold}")
    if not 0 <= cfg.bn_momentum < 1:
        raise ConfigError(f"--bn-momentum must lie in [0, 1), got {cfg.bn_momentum}")
    if cfg.frozen_bn not in FROZEN_BN:
        raise ConfigError(f"unknown --frozen-bn {cfg.frozen_bn!r}; choose one of: "
                          f"{', '.join(FROZEN_BN)}")
    if not isinstance(cfg.frozen, tuple) or not all(
            isinstance(f, str) and f.count(".") == 1 for f in cfg.frozen):
        raise ConfigError(f"frozen parameters must be '<layer>.<field>' names, got {cfg.frozen!r}")
    if cfg.input not in INPUT_KINDS:
        raise ConfigError(f"unknown input storage {cfg.input!r}; choose f32 or u8")
    if cfg.input == "u8":
        a = cfg.input_affine
        if (len(a) != 2 or not a[0] or len(a[0]) != len(a[1])
                or not all(isinstance(v, float) and v == v and abs(v) < 1e30 for v in a[0] + a[1])
                or min(a[0]) <= 0):
            raise ConfigError(f"--input u8 needs the pixel map (a_c, b_c) of every input channel "
                              f"with a_c > 0, got {a!r}")
        if not (cfg.binary_dw and cfg.po2):
            raise ConfigError("--input u8 trains its integer first layer with 1-bit weight "
                              "gradients of PO2-quantized activation gradients",
                              hint="drop --no-binary-dw / --no-po2 (or --algorithm standard), "
                                   "or keep --input f32")
    elif cfg.input_affine:
        raise ConfigError("an input pixel map is given but the input is f32")


# ---- gradient scaling ------------------------------------------------------------------------

def grads_f16(cfg: TrainConfig) -> bool:
    """Is the activation-gradient path (the loss gradient, every binary layer's dX, the G entering
    each BN, dY before PO2) stored in float16? Under l1 BN (which reads fp16(G) anyway), else
    float32 (compiler/schedule.py)."""
    return cfg.bn == "l1"


def grad_scale_log2(cfg: TrainConfig) -> int:
    """s of the loss scale 2^s: the loss writes G = (p - onehot) / B * 2^s and every optimizer
    update reads a real-valued gradient times 2^-s (a 1-bit dW is a sign, scale-free). Both are
    exact power-of-two products, so in float32 the scale changes nothing; it moves the float16
    gradient path away from f16's subnormals. **[bnnc choice]** s = 8 + floor(log2 B) under
    `grads_f16` (so |G| <= 2^8 at the loss, 2^7 below f16's largest value), else 0
    (compiler/README.md, "Loss scale of the f16 gradient path")."""
    return 8 + (cfg.batch.bit_length() - 1) if grads_f16(cfg) else 0


# ---- partial training ------------------------------------------------------------------------

FROZEN_BN = ("running", "batch")   # TrainConfig.frozen_bn
TRAIN_BN = "bn"          # `--train bn`: batch-norm parameters and biases only (TinyTL style)


def trainable_fields(lay: Layer) -> tuple[str, ...]:
    """The fields of `lay` an optimizer may train (whatever the config): W [, b] of a weight layer,
    gamma and beta of a batch norm (l1 BN has no gamma in its state; freezing it is a no-op)."""
    if lay.kind in WEIGHT_KINDS:
        return ("W",) + (("b",) if "b" in lay.params else ())
    if lay.kind is LayerKind.BATCHNORM:
        return ("gamma", "beta")
    return ()


def is_frozen(cfg: TrainConfig, layer: str, fieldname: str) -> bool:
    return f"{layer}.{fieldname}" in cfg.frozen


def trained_fields(lay: Layer, cfg: TrainConfig) -> tuple[str, ...]:
    """The fields of `lay` the optimizer updates under `cfg`: `trainable_fields` that are in the
    state (no gamma under l1 BN) and not frozen."""
    return tuple(f for f in trainable_fields(lay)
                 if not (f == "gamma" and cfg.bn == "l1") and not is_frozen(cfg, lay.name, f))


def resolve_frozen(graph: Graph, *, train: str | None = None, train_from: str | None = None,
                   bn: str = "l2") -> tuple[str, ...]:
    """The frozen parameters of `--train SPEC` and/or `--train-from LAYER` (their union is
    trained; neither = train everything), among those the state has under `--bn` (l1: no
    gamma). SPEC is a comma-separated list of layer names and/or
    the word `bn` (every batch norm and every bias). ConfigError on an unknown layer name (the
    message lists the layer names), a layer without parameters in --train, or nothing to train."""
    if train is None and train_from is None:
        return ()
    names = [lay.name for lay in graph.layers]
    owners = [lay.name for lay in graph.layers if trainable_fields(lay)]

    def unknown(what: str, name: str) -> ConfigError:
        return ConfigError(f"{what}: model {graph.name!r} has no layer {name!r}; its layers: "
                           f"{', '.join(names)}", hint="`bnnc info MODEL` lists them")

    trained: set[str] = set()
    if train is not None:
        items = [t.strip() for t in train.split(",")]
        if not any(items):
            raise ConfigError("--train is empty; name layers (e.g. --train fc3,bn3), 'bn', or "
                              "drop it to train everything")
        for item in items:
            if item == TRAIN_BN:
                for lay in graph.layers:
                    trained.update(f"{lay.name}.{f}" for f in trainable_fields(lay) if f != "W")
            elif item not in names:
                raise unknown(f"--train {train}", item)
            elif item not in owners:
                raise ConfigError(f"--train {train}: layer {item!r} has no parameters to train; "
                                  f"layers with parameters: {', '.join(owners)}")
            else:
                lay = graph.layer(item)
                trained.update(f"{item}.{f}" for f in trainable_fields(lay))
    if train_from is not None:
        if train_from not in names:
            raise unknown(f"--train-from {train_from}", train_from)
        start = names.index(train_from)
        for lay in graph.layers[start:]:
            trained.update(f"{lay.name}.{f}" for f in trainable_fields(lay))
    if not trained:
        raise ConfigError(f"--train/--train-from leave nothing to train in model {graph.name!r} "
                          f"(no batch norm or bias for 'bn', no parameters from the layer on); "
                          f"layers with parameters: {', '.join(owners)}")
    return tuple(f"{lay.name}.{f}" for lay in graph.layers for f in trainable_fields(lay)
                 if f"{lay.name}.{f}" not in trained and not (f == "gamma" and bn == "l1"))


def check_config_for_graph(graph: Graph, cfg: TrainConfig) -> None:
    """Raise ConfigError when a technique of `cfg` cannot act on `graph` (an ir.Graph).

    Nonsense, decided here: Bop, PO2 gradients or binary dW on a model without a binary dense/conv
    layer (they only ever touch binary layers); training BN on vectors with batch < 2 (every
    normalized value would be 0); a frozen parameter the graph does not have, or a freeze set that
    leaves no parameter to train.
    """
    known = [f"{lay.name}.{f}" for lay in graph.layers for f in trainable_fields(lay)]
    bad = [f for f in cfg.frozen if f not in known]
    if bad:
        raise ConfigError(f"frozen parameter {bad[0]!r} is not a parameter of model "
                          f"{graph.name!r}; its layers: {', '.join(l.name for l in graph.layers)}",
                          hint="the state or config was made for another model; compile again")
    live = [f for f in known if f not in cfg.frozen and not (
        cfg.bn == "l1" and f.endswith(".gamma"))]
    if cfg.frozen and not live:
        raise ConfigError(f"the freeze set leaves nothing to train in model {graph.name!r}",
                          hint="name at least one layer with parameters in --train / "
                               "--train-from, or drop them to train everything")
    binary = [lay.name for lay in graph.layers
              if lay.kind in WEIGHT_KINDS and lay.binary]
    if not binary:
        used = [flag for flag, on in (("--optimizer bop", cfg.optimizer == "bop"),
                                      ("PO2 gradients", cfg.po2),
                                      ("binary weight gradients", cfg.binary_dw)) if on]
        if used:
            raise ConfigError(f"model {graph.name!r} has no binary dense/conv layer, so "
                              f"{' and '.join(used)} would change nothing",
                              hint="use --optimizer adam/sgd and --no-po2 --no-binary-dw "
                                   "(or --algorithm standard)")
    if cfg.input == "u8":
        u8_input_layer(graph)
        channels = graph.input_shape[0] if len(graph.input_shape) == 3 else 1
        if len(cfg.input_affine[0]) != channels:
            raise ConfigError(f"--input u8: the pixel map has {len(cfg.input_affine[0])} "
                              f"channel(s) but model {graph.name!r} takes {channels}")
    vec_bn = [lay.name for lay in graph.layers
              if lay.kind is LayerKind.BATCHNORM and len(lay.shape) == 1]
    if vec_bn and cfg.batch < 2:
        raise ConfigError(f"batch {cfg.batch} leaves batch norm {vec_bn[0]!r} (model "
                          f"{graph.name!r}) with one value per channel; use --batch 2 or more "
                          "(the authors used 100)")


def u8_input_layer(graph: Graph) -> Layer:
    """The layer that multiplies the u8 input (`--input u8`): the network input must reach exactly
    one binary dense layer, through flattens only, and nothing else; ConfigError naming the
    reader otherwise."""
    readers = {INPUT: [lay for lay in graph.layers if INPUT in lay.inputs]}
    chain = readers[INPUT]
    while len(chain) == 1 and chain[0].kind is LayerKind.FLATTEN:
        chain = [lay for lay in graph.layers if chain[0].name in lay.inputs]
    if len(chain) == 1 and chain[0].kind is LayerKind.DENSE and chain[0].binary:
        return chain[0]
    what = (", ".join(f"{lay.name} ({lay.kind.value}{', binary' if lay.binary else ''})"
                      for lay in chain) or "nothing")
    raise ConfigError(f"--input u8: the input of model {graph.name!r} is read by {what}; the u8 "
                      "input needs exactly one binary dense layer reading it (through flattens)",
                      hint="conv first layers and real first layers keep --input f32")


INPUT_HELP = ("how the batch input is stored: f32 (any float input) or u8 (8-bit pixels "
              "quantised once at load: 4x fewer arena bytes, and a first binary dense layer "
              "that multiplies them exactly in int32 with the preprocessing applied per channel "
              "after the sum; needs --binary-dw --po2 and image/pixel data; every target, the "
              "firmware API then takes u8 samples) [default: f32]")


def with_input(cfg: TrainConfig, graph: Graph, kind: str | None, affine) -> TrainConfig:
    """`cfg` with `--input KIND` (compiler/README.md "The u8 input"): "u8" records the pixel map
    `affine` = preprocess.pixel_affine(pre, channels) and checks the graph."""
    if kind in (None, "f32"):
        return cfg
    if kind not in INPUT_KINDS:
        raise ConfigError(f"unknown --input {kind!r}; choose f32 or u8")
    cfg = replace(cfg, input="u8", input_affine=tuple(tuple(float(v) for v in p) for p in affine))
    validate(cfg)
    check_config_for_graph(graph, cfg)
    return cfg
