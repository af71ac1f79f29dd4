"""Federated training of a compiled OUT/ across a fleet of devices: what travels, how the server
aggregates it, how BN statistics are pooled and how the data is partitioned. Pure functions and
small records, so the simulation, the deployment and the tests all run the same code. The rest of
the fleet without Flower: its state on disk (the global checkpoint, each device's own state) is
runtime/fleet_store.py, a device's work on the emitted C (local training, BN calibration,
evaluation) runtime/fleet_local.py; the Flower apps are runtime/fleet_flower.py, run by
runtime/fleet_run.py.

What a fleet exchanges: `fleet_tensors(manifest)` selects, from the manifest's state table, the
tensors the server aggregates -- every trainable parameter (latent 16-bit weights, BN betas/gammas,
biases; Bop's 1-bit weights), the Bop momenta, and the BN running statistics only when
`bn_stats="mean"` (averaged from the devices' training). Adam/SGD moments stay on the device. A
frozen parameter (partial training: the manifest's `frozen`) is never selected.

BN running statistics of the global model (`bn_stats`; [bnnc choice] `"calibrate"`, measured in
README "Train a fleet"): FedAvg's global weights are never run forward on data, so no device's
statistics belong to them. `"calibrate"`: after each round's aggregation every device measures
the batch statistics of the new global weights on its own data (`fleet_local.calibration_stats`,
the emitted C) and the server pools them (`pool_bn_stats`, `bn_stat_tensors` travel). `"mean"`:
the devices' running statistics from training, averaged. `"local"`: FedBN, kept on each device.

On the wire every tensor travels in its storage dtype (`to_wire`): bf16 as its 16 bits, f16, f32,
1-bit weights packed 8 per byte. With the 1-bit uplink (`uplink="sign"`, signSGD-style) a device
sends, per non-bit tensor, the sign of its update (packed) and one float32 scale, mean |update|;
the server reconstructs `global + scale * sign`. With error feedback (EF-signSGD,
`feedback_residual`) a device adds to each update what its earlier signs left out; the residual is
saved next to its state (DIR/residual-rNNNNN.npz, before the state: both or neither count).

Aggregation (`aggregate`), in device order (so the float sums are reproducible whatever order the
replies arrive in): FedAvg weighted by each device's number of training examples for real-valued
tensors, accumulated in float64 and rounded to the storage dtype with round-to-nearest-even
([bnnc choice]: the global model is always exactly representable, so loading it on a device is
lossless); a weighted majority vote for 1-bit weights (a tie keeps the global bit). A reply from
another model (its manifest's model hash), with a wrong tensor set, shape or dtype, or with a NaN /
Inf value is refused (`RefusedUpdate`), logged, and left out of the round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from ..compiler.contract import Manifest
from ..compiler.errors import ConfigError, DataError
from ..compiler.numerics import store

PARTITIONS = ("iid", "dirichlet")
BN_STATS = ("calibrate", "mean", "local")
UPLINKS = ("full", "sign")
SCALES = "__scales__"          # the 1-bit uplink's per-tensor scales, one float32 each


# --------------------------------------------------------------------------------------------------
# what travels

@dataclass(frozen=True)
class FleetTensor:
    name: str
    dtype: str                 # storage dtype: "bf16" | "f16" | "f32" | "bit"
    shape: tuple[int, ...]
    rule: str                  # "mean" (FedAvg) | "vote" (1-bit weights: weighted majority)
    kind: str = "param"        # "param" | "bn_stat" | "momentum": --server-lr acts on params

    @property
    def size(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1


def _frozen(manifest: Manifest) -> set[str]:
    """The frozen parameters of a partially trained OUT (`--train` / `--train-from`: the
    manifest's `frozen`, role "frozen parameter" in the state table)."""
    return set(manifest.frozen) | {st.name for st in manifest.state
                                   if st.role == "frozen parameter"}


def fleet_tensors(manifest: Manifest, bn_stats: str = "calibrate", *,
                  moments: bool = False) -> tuple[FleetTensor, ...]:
    """The state tensors a fleet aggregates, in state order (module docstring); `moments` adds
    every optimizer moment (Adam's m and v too, averaged). The one place that decides it:
    everything else (wire, aggregation, bytes) iterates over this list."""
    if bn_stats not in BN_STATS:
        raise ConfigError(f"--bn-stats {bn_stats!r}: use one of {', '.join(BN_STATS)}")
    frozen = _frozen(manifest)
    bits = {st.name for st in manifest.state if st.role == "parameter" and st.dtype == "bit"}
    out = []
    for st in manifest.state:
        if st.name in frozen:
            continue
        if st.role == "parameter":
            rule, kind = ("vote" if st.dtype == "bit" else "mean"), "param"
        elif st.role == "bn state" and bn_stats == "mean":    # "calibrate": bn_stat_tensors
            rule, kind = "mean", "bn_stat"
        elif st.role == "optimizer state" and (st.name.rsplit(".", 1)[0] in bits or moments) \
                and st.name.rsplit(".", 1)[0] not in frozen:
            rule, kind = "mean", "momentum"   # Bop's momentum decides the flips: shared
        else:
            continue
        out.append(FleetTensor(st.name, st.dtype, tuple(st.shape), rule, kind))
    if not out:
        raise ConfigError(f"{manifest.model}: no trainable state to federate (all frozen?)")
    return tuple(out)


def bn_stat_tensors(manifest: Manifest) -> tuple[FleetTensor, ...]:
    """The BN running statistics a calibration exchanges (`bn_stats="calibrate"`), state order."""
    frozen = _frozen(manifest)
    return tuple(FleetTensor(st.name, st.dtype, tuple(st.shape), "mean", "bn_stat")
                 for st in manifest.state if st.role == "bn state" and st.name not in frozen)


def float32_model_nbytes(manifest: Manifest) -> int:
    """Bytes of the same network's parameters as float32: the yardstick for the wire."""
    return 4 * sum(int(np.prod(st.shape)) for st in manifest.state if st.role == "parameter")


def to_wire(values: np.ndarray, dtype: str) -> np.ndarray:
    """Float32 values (bits: +-1) -> the array sent for them (module docstring)."""
    v = np.asarray(values, np.float32).reshape(-1)
    if dtype == "bit":
        return np.packbits(v >= 0)
    if dtype == "bf16":
        return (store(v, "bf16").view(np.uint32) >> 16).astype(np.uint16)
    if dtype == "f16":
        return store(v, "f16").astype(np.float16)
    if dtype == "f32":
        return v.copy()
    raise AssertionError(dtype)


_WIRE_DTYPE = {"bit": np.uint8, "bf16": np.uint16, "f16": np.float16, "f32": np.float32}


def _wire_len(ft: FleetTensor, dtype: str) -> int:
    return -(-ft.size // 8) if dtype == "bit" else ft.size


def from_wire(arr: np.ndarray, ft: FleetTensor, *, dtype: str | None = None) -> np.ndarray:
    """The inverse of `to_wire` (as `dtype`, default the tensor's), checked: RefusedUpdate if the
    array has the wrong dtype or length, or decodes to a NaN / Inf."""
    dtype = dtype or ft.dtype
    a = np.asarray(arr)
    if a.dtype != _WIRE_DTYPE[dtype] or a.ndim != 1 or a.size != _wire_len(ft, dtype):
        raise RefusedUpdate(f"tensor {ft.name}: {a.dtype} x {a.size} on the wire, expected "
                            f"{np.dtype(_WIRE_DTYPE[dtype])} x {_wire_len(ft, dtype)}")
    if dtype == "bit":
        v = np.unpackbits(a)[:ft.size].astype(np.float32) * 2 - 1
    elif dtype == "bf16":
        v = (a.astype(np.uint32) << 16).view(np.float32)
    else:
        v = a.astype(np.float32)
    if not np.all(np.isfinite(v)):
        raise RefusedUpdate(f"tensor {ft.name} holds NaN or Inf values")
    return v.reshape(ft.shape)


def encode_global(tensors: Mapping[str, np.ndarray],
                  specs: Sequence[FleetTensor]) -> dict[str, np.ndarray]:
    """The server -> device arrays: every fleet tensor in its storage dtype."""
    return {ft.name: to_wire(tensors[ft.name], ft.dtype) for ft in specs}


def decode_global(arrays: Mapping[str, np.ndarray],
                  specs: Sequence[FleetTensor]) -> dict[str, np.ndarray]:
    missing = [ft.name for ft in specs if ft.name not in arrays]
    if missing:
        raise RefusedUpdate(f"the global model lacks {', '.join(missing[:3])}")
    return {ft.name: from_wire(arrays[ft.name], ft) for ft in specs}


def encode_update(local: Mapping[str, np.ndarray], glob: Mapping[str, np.ndarray],
                  specs: Sequence[FleetTensor], uplink: str, *,
                  residual: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The device -> server arrays: the local tensors as they are (`full`), or for `sign` the sign
    of each real tensor's update, packed, plus the per-tensor scales mean |update| (1-bit weights
    are 1 bit either way). `residual` (error feedback, `sign` only) is added to the update first:
    what earlier 1-bit updates left out (`feedback_residual`)."""
    if uplink == "full":
        return encode_global(local, specs)
    out, scales = {}, []
    for ft in specs:
        if ft.dtype == "bit":
            out[ft.name] = to_wire(local[ft.name], "bit")
            continue
        d = (np.asarray(local[ft.name], np.float64) - np.asarray(glob[ft.name], np.float64))
        if residual is not None and ft.name in residual:
            d += np.asarray(residual[ft.name], np.float64)
        out[ft.name] = np.packbits(d.reshape(-1) >= 0)
        scales.append(np.float32(np.mean(np.abs(d))) if d.size else np.float32(0))
    out[SCALES] = np.asarray(scales, np.float32)
    return out


def decode_update(arrays: Mapping[str, np.ndarray], glob: Mapping[str, np.ndarray],
                  specs: Sequence[FleetTensor], uplink: str) -> dict[str, np.ndarray]:
    """A device's tensors from its reply (RefusedUpdate if anything does not fit)."""
    want = {ft.name for ft in specs} | ({SCALES} if uplink == "sign" else set())
    if set(arrays) != want:
        extra, missing = sorted(set(arrays) - want), sorted(want - set(arrays))
        raise RefusedUpdate(f"wrong tensor set (missing {missing[:3]}, unexpected {extra[:3]})")
    if uplink == "full":
        return {ft.name: from_wire(arrays[ft.name], ft) for ft in specs}
    real = [ft for ft in specs if ft.dtype != "bit"]
    scales = np.asarray(arrays[SCALES])
    if scales.dtype != np.float32 or scales.shape != (len(real),):
        raise RefusedUpdate(f"{len(real)} float32 scales expected, got {scales.dtype} "
                            f"{scales.shape}")
    if not np.all(np.isfinite(scales)) or np.any(scales < 0):
        raise RefusedUpdate("a scale of the 1-bit update is negative, NaN or Inf")
    out, k = {}, 0
    for ft in specs:
        if ft.dtype == "bit":
            out[ft.name] = from_wire(arrays[ft.name], ft)
            continue
        sign = from_wire(arrays[ft.name], ft, dtype="bit")
        out[ft.name] = (np.asarray(glob[ft.name], np.float32)
                        + np.float32(scales[k]) * sign).astype(np.float32)
        k += 1
    return out


def feedback_residual(local: Mapping[str, np.ndarray], glob: Mapping[str, np.ndarray],
                      specs: Sequence[FleetTensor], sent: Mapping[str, np.ndarray],
                      residual: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """Error feedback for the 1-bit uplink (EF-signSGD, Karimireddy et al. 2019): the part of
    (update + residual) that the sent `scale * sign` did not carry, kept on the device and added
    to its next update. Float32, real tensors only."""
    got = decode_update(sent, glob, specs, "sign")
    out = {}
    for ft in specs:
        if ft.dtype == "bit":
            continue
        want = np.asarray(local[ft.name], np.float64) - np.asarray(glob[ft.name], np.float64)
        if residual is not None and ft.name in residual:
            want += np.asarray(residual[ft.name], np.float64)
        out[ft.name] = (want - (got[ft.name].astype(np.float64)
                                - np.asarray(glob[ft.name], np.float64))).astype(np.float32)
    return out


def wire_nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    return int(sum(np.asarray(a).nbytes for a in arrays.values()))


# --------------------------------------------------------------------------------------------------
# aggregation

class RefusedUpdate(Exception):
    """A device's reply the server does not aggregate (the message says why)."""


@dataclass(frozen=True)
class Update:
    device: int                # partition id
    examples: int              # its training examples: the FedAvg weight
    tensors: dict              # fleet tensor name -> float32 values (bits +-1)


def aggregate(glob: Mapping[str, np.ndarray], updates: Sequence[Update],
              specs: Sequence[FleetTensor], *, server_lr: float = 1.0) -> dict[str, np.ndarray]:
    """The new global fleet tensors (module docstring); `glob` is returned for no updates.
    `server_lr` scales the averaged update of the real-valued parameters (1 = FedAvg):
    `glob + server_lr * (mean - glob)`, as in FedOpt's server step (Reddi et al. 2021); BN
    statistics and momenta are plain averages."""
    ups = sorted(updates, key=lambda u: u.device)
    if not ups:
        return {ft.name: np.asarray(glob[ft.name], np.float32) for ft in specs}
    w = np.asarray([u.examples for u in ups], np.float64)
    total = float(w.sum())
    out = {}
    for ft in specs:
        acc = np.zeros(ft.shape, np.float64)
        for wi, u in zip(w, ups):
            acc += wi * np.asarray(u.tensors[ft.name], np.float64)
        if ft.rule == "vote":
            g = np.asarray(glob[ft.name], np.float32)
            out[ft.name] = np.where(acc > 0, 1, np.where(acc < 0, -1, g)).astype(np.float32)
        else:
            mean = acc / total
            if ft.kind == "param" and server_lr != 1.0:
                g64 = np.asarray(glob[ft.name], np.float64)
                mean = g64 + server_lr * (mean - g64)
            out[ft.name] = store(mean.astype(np.float32), ft.dtype).astype(np.float32)
    return out


# --------------------------------------------------------------------------------------------------
# BN calibration of the global model (bn_stats="calibrate")

def _bn_pairs(specs: Sequence[FleetTensor]) -> list[tuple[str, str]]:
    """(running_mean, its spread: running_psi (l1 BN) or running_var (l2 BN)) of each BN layer."""
    names = {ft.name for ft in specs}
    pairs = []
    for n in names:
        if n.endswith(".running_mean"):
            layer = n[:-len(".running_mean")]
            spread = [f"{layer}.{k}" for k in ("running_psi", "running_var")
                      if f"{layer}.{k}" in names]
            if len(spread) != 1:
                raise AssertionError(f"{layer}: no running_psi / running_var next to its mean")
            pairs.append((n, spread[0]))
    return sorted(pairs)


def decode_calibration(arrays: Mapping[str, np.ndarray],
                       specs: Sequence[FleetTensor]) -> dict[str, np.ndarray]:
    """A device's calibration reply (float32 per-channel statistics by name), checked:
    RefusedUpdate for a wrong tensor set, dtype or length, a NaN / Inf or a negative spread."""
    want = {ft.name for ft in specs}
    if set(arrays) != want:
        extra, missing = sorted(set(arrays) - want), sorted(want - set(arrays))
        raise RefusedUpdate(f"wrong statistics (missing {missing[:3]}, unexpected {extra[:3]})")
    out = {}
    for ft in specs:
        a = np.asarray(arrays[ft.name])
        if a.dtype != np.float32 or a.shape != (ft.size,):
            raise RefusedUpdate(f"statistic {ft.name}: {a.dtype} {a.shape}, expected float32 "
                                f"({ft.size},)")
        if not np.all(np.isfinite(a)):
            raise RefusedUpdate(f"statistic {ft.name} holds NaN or Inf values")
        if not ft.name.endswith(".running_mean") and np.any(a < 0):
            raise RefusedUpdate(f"statistic {ft.name} is negative")
        out[ft.name] = a.reshape(ft.shape)
    return out


@dataclass(frozen=True)
class Calibration:
    device: int
    examples: int              # the device's training examples: its weight
    stats: dict                # BN stat name -> float32 per-channel values (calibration_stats)


def pool_bn_stats(calibrations: Sequence[Calibration],
                  specs: Sequence[FleetTensor]) -> dict[str, np.ndarray] | None:
    """The global model's BN running statistics from the devices' (None for no device), in device
    order, weighted by examples, rounded to the storage dtype. Mean: the weighted mean of the
    means. l2 BN's variance: the pooled variance, sum w_i (var_i + (mu_i - mu)^2) (exact). l1 BN's
    psi = E|x - mu| about the *global* mean: a device only measures it about its own batches'
    means, so each device's distribution of a channel is taken as normal with mean mu_i and mean
    absolute deviation psi_i, whose E|x - mu| is psi_i exp(-d^2 / 2 s^2) + d erf(d / s sqrt 2)
    (d = mu_i - mu, s = psi_i sqrt(pi/2)) ([bnnc choice], README "Train a fleet": on non-IID
    devices the plain mean of the psi_i is too small)."""
    cals = sorted(calibrations, key=lambda c: c.device)
    if not cals:
        return None
    w = np.asarray([c.examples for c in cals], np.float64)
    w /= w.sum()
    out: dict[str, np.ndarray] = {}
    for mean_name, spread_name in _bn_pairs(specs):
        mus = [np.asarray(c.stats[mean_name], np.float64) for c in cals]
        spreads = [np.asarray(c.stats[spread_name], np.float64) for c in cals]
        mu = sum(wi * m for wi, m in zip(w, mus))
        acc = np.zeros_like(mu)
        for wi, m, sp in zip(w, mus, spreads):
            d = m - mu
            if spread_name.endswith("running_var"):
                acc += wi * (sp + d * d)
            else:
                acc += wi * _abs_dev_about(m, sp, mu)
        out[mean_name], out[spread_name] = mu, acc
    dtypes = {ft.name: ft.dtype for ft in specs}
    return {k: store(v.astype(np.float32), dtypes[k]).astype(np.float32) for k, v in out.items()}


def _abs_dev_about(mu_i: np.ndarray, psi_i: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """E|x - mu| for x normal with mean mu_i and mean absolute deviation psi_i (pool_bn_stats)."""
    d = mu_i - mu
    s = np.maximum(psi_i, 1e-30) * np.sqrt(np.pi / 2)
    erf = np.vectorize(math.erf, otypes=[np.float64])
    return np.where(psi_i > 0, psi_i * np.exp(-d * d / (2 * s * s)) + d * erf(d / (s * np.sqrt(2))),
                    np.abs(d))


# --------------------------------------------------------------------------------------------------
# data partitions

def partition(labels: np.ndarray, devices: int, scheme: str, *, alpha: float = 0.5, seed: int = 0,
              min_examples: int = 1) -> list[np.ndarray]:
    """Training-example indices of each device (sorted), deterministic in `seed`. `iid`: a random
    permutation cut into equal parts. `dirichlet`: per class, proportions drawn from Dir(alpha)
    over the devices (Hsu et al. 2019; small alpha = few classes per device), redrawn (up to 100
    times) until every device holds at least `min_examples`."""
    labels = np.asarray(labels)
    n = len(labels)
    if devices < 1:
        raise ConfigError("--devices must be at least 1")
    if n < devices * min_examples:
        raise DataError(f"{n} training examples cannot give {devices} devices {min_examples} each",
                        hint="use fewer devices, a smaller batch or more examples")
    rng = np.random.default_rng([seed, 0x464C5420])
    if scheme == "iid":
        return [np.sort(p) for p in np.array_split(rng.permutation(n), devices)]
    if scheme != "dirichlet":
        raise ConfigError(f"partition {scheme!r}: use one of {', '.join(PARTITIONS)}")
    if not alpha > 0:
        raise ConfigError(f"--alpha must be > 0, got {alpha}")
    for _ in range(100):
        parts: list[list[np.ndarray]] = [[] for _ in range(devices)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            p = rng.dirichlet(np.full(devices, alpha))
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
            for d, chunk in enumerate(np.split(idx, cuts)):
                parts[d].append(chunk)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in out) >= min_examples:
            return out
    raise DataError(f"Dirichlet(alpha={alpha}) left a device with fewer than {min_examples} "
                    f"examples in 100 draws", hint="raise --alpha or use fewer devices")
