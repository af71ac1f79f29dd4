"""The kernel registry: every kernel a training step can call, its operand dtypes, in-place rules.

`KERNELS: dict[str, KernelSpec]` is read by the schedule (which kernel to call, which dtypes are
legal, which outputs may overwrite which inputs) and, later, by codegen (one template per kernel; a
kernel is the granularity of one C function, specialized per operand dtype where one admits more).

Invariants (checked by `check_registry()` at import and by `check_step()` for every scheduled step):
- operands are positional; optional operands only trail the required ones, so a step lists its
  required operands first and may omit any suffix of the optional ones;
- `inplace` pairs `(output index, input index)` are DECLARED here, per kernel, never guessed
  downstream: a pair means the kernel streams element-wise (or row-wise after per-channel reductions
  that finish before the first write) in ascending element order, and the output has as many
  elements as the input with an element size no larger than the input's. Writing output element i
  then never clobbers an input element still to be read, so the output may start at the input's
  address when the input dies at that step (the liveness pass decides that).

Operand dtype conventions (compiler/schedule.py documents the storage layouts):
- activations are F32; the activation-gradient path is F32 or F16 (`GRADS`); PO2 codes are one u8
  per element with an I32 per-tensor bias; BIT tensors are packed into 64-bit words;
- weights are stored in the state dtype (`STATE`: F32/BF16/F16), or as BIT for Bop's latent-free
  binary weights (`WEIGHTS`);
- every kernel accumulates in float32 (or exactly in integers for XNOR-popcount and PO2 sums).
"""

from __future__ import annotations

from dataclasses import dataclass

from .schedule_ir import DType

F32, F16, BF16, BIT = DType.F32, DType.F16, DType.BF16, DType.BIT
PO2, U8, I32 = DType.PO2, DType.U8, DType.I32
STATE = (F32, BF16, F16)            # real-valued trainable / optimizer / BN-statistic storage
WEIGHTS = STATE + (BIT,)            # + Bop's packed binary weights
GRADS = (F32, F16)                  # activation-gradient path
SAVED_X = (F32, F16, BIT)           # a weight layer's input as kept for its dW
ACT = (F32, BIT)                    # activations that may be packed (sign outputs and their pools)


@dataclass(frozen=True)
class Operand:
    name: str
    dtypes: tuple[DType, ...]
    optional: bool = False


@dataclass(frozen=True)
class KernelSpec:
    name: str
    phase: str                           # "forward" | "loss" | "backward" | "update"
    description: str
    inputs: tuple[Operand, ...]
    outputs: tuple[Operand, ...]
    inplace: tuple[tuple[int, int], ...] = ()   # (output index, input index)


def _ops(*specs) -> tuple[Operand, ...]:
    """`("x", F32)`, `("w", WEIGHTS)`, `("b?", STATE)` (trailing `?` = optional) -> Operands."""
    out = []
    for name, dt in specs:
        dts = dt if isinstance(dt, tuple) else (dt,)
        out.append(Operand(name.rstrip("?"), dts, name.endswith("?")))
    return tuple(out)


def _k(name, phase, description, inputs, outputs, inplace=()) -> KernelSpec:
    return KernelSpec(name, phase, description, _ops(*inputs), _ops(*outputs), tuple(inplace))


_SPECS: tuple[KernelSpec, ...] = (
    # ---- forward: weight layers
    _k("pack_sign_w", "forward", "sign(W) of latent weights packed in the XNOR kernel's bit layout",
       [("w", STATE)], [("wb", BIT)]),
    _k("dense_fwd_xnor", "forward", "Y = X Wb by XNOR-popcount over packed rows (+ b)",
       [("x", BIT), ("wb", BIT), ("b?", STATE)], [("y", F32)]),
    _k("dense_fwd_signw", "forward", "Y = X sign(W), real X, signs read from W on the fly (+ b)",
       [("x", F32), ("w", WEIGHTS), ("b?", STATE)], [("y", F32)]),
    _k("dense_fwd_f32", "forward", "Y = X W (+ b), real layer",
       [("x", F32), ("w", STATE), ("b?", STATE)], [("y", F32)]),
    _k("conv_fwd_xnor", "forward",
       "Y = X * Wb: XNOR-popcount over NHWC-packed channels per tap, padded taps add 0 (+ b)",
       [("x", BIT), ("wb", BIT), ("b?", STATE)], [("y", F32)]),
    _k("conv_fwd_signw", "forward", "Y = X * sign(W), real NCHW X, signs read from W (+ b)",
       [("x", F32), ("w", WEIGHTS), ("b?", STATE)], [("y", F32)]),
    _k("conv_fwd_f32", "forward", "Y = X * W (+ b), real layer, NCHW",
       [("x", F32), ("w", STATE), ("b?", STATE)], [("y", F32)]),
    _k("cast_f16", "forward", "round a real weight layer's input to f16 (RNE) for its backward",
       [("x", F32)], [("y", F16)], [(0, 0)]),
    # ---- forward: batch norm (training statistics; running statistics updated in the same pass)
    _k("bn_l2_fwd", "forward",
       "l2 BN: xh = (y - mu) * inv_std, out = gamma xh + beta; running mean/var updated",
       [("x", F32), ("gamma", STATE), ("beta", STATE), ("running_mean", STATE),
        ("running_var", STATE)],
       [("y", F32), ("running_mean", STATE), ("running_var", STATE), ("xh?", F32),
        ("inv_std?", F32)], [(0, 0)]),
    _k("bn_l1_fwd", "forward",
       "l1 BN: psi = mean|y - mu|, out = (y - mu)/psi + beta; sign bits of xh; running stats",
       [("x", F32), ("beta", STATE), ("running_mean", STATE), ("running_psi", STATE)],
       [("y", F32), ("running_mean", STATE), ("running_psi", STATE), ("mu", F32), ("psi", F32),
        ("s?", BIT)], [(0, 0)]),
    # ---- forward: activations, pooling, structure
    _k("sign_fwd_f32", "forward", "y = sign(x) (sign(0) = +1) as f32; optional 1-bit mask |x| <= 1",
       [("x", F32)], [("y", F32), ("mask?", BIT)], [(0, 0)]),
    _k("sign_fwd_pack", "forward", "y = sign(x) packed to bits; optional 1-bit STE mask |x| <= 1",
       [("x", F32)], [("y", BIT), ("mask?", BIT)]),
    _k("relu_fwd", "forward", "y = max(x, 0); optional 1-bit mask x > 0",
       [("x", F32)], [("y", F32), ("mask?", BIT)], [(0, 0)]),
    _k("maxpool_fwd_widx", "forward",
       "max pool (first max wins); optional argmax as the in-window index (row-major kh*kw)",
       [("x", ACT)], [("y", ACT), ("argmax?", (I32, U8))]),
    _k("maxpool_fwd_mask", "forward",
       "max pool of non-overlapping windows (first max wins); optional 1-bit argmax mask (input)",
       [("x", ACT)], [("y", ACT), ("argmax?", BIT)]),
    _k("avgpool_fwd", "forward", "average pool (count_include_pad as the layer says)",
       [("x", F32)], [("y", F32)]),
    _k("gap_fwd", "forward", "global average pool over H*W", [("x", F32)], [("y", F32)]),
    _k("add_fwd", "forward", "y = a + b (residual)", [("a", F32), ("b", F32)], [("y", F32)],
       [(0, 0), (0, 1)]),
    _k("affine_fwd", "forward", "y = x * scale + bias, constants per channel or per tensor",
       [("x", F32)], [("y", F32)], [(0, 0)]),
    _k("input_quant_fwd", "forward", "k-bit uniform quantizer on the network input (no gradient)",
       [("x", F32)], [("y", F32)], [(0, 0)]),
    # ---- loss
    _k("softmax_xent", "loss",
       "probabilities, mean softmax cross-entropy, and G = (p - onehot(labels)) / B",
       [("logits", F32), ("labels", I32)], [("loss", F32), ("probs", F32), ("d_logits", GRADS)],
       [(2, 0)]),
    # ---- backward: weight layers
    _k("po2_quantize", "backward",
       "per-tensor 5-bit power-of-two quantization: u8 codes (bit 4 sign, bits 0-3 e+8) + int bias",
       [("g", GRADS)], [("q", PO2), ("bias", I32)], [(0, 0)]),
    _k("bias_grad", "backward", "db = sum of dY over batch (and positions)", [("dy", GRADS)],
       [("db", F32)]),
    _k("dense_dw_f32", "backward", "dW = X^T dY (times 1[|W| <= 1] when W is given: binary STE)",
       [("x", SAVED_X), ("dy", GRADS), ("w?", STATE)], [("dw", F32)]),
    _k("dense_dw_po2", "backward", "dW = X^T Q with PO2 Q (times 1[|W| <= 1] when W is given)",
       [("x", SAVED_X), ("q", PO2), ("bias", I32), ("w?", STATE)], [("dw", F32)]),
    _k("dense_dw_bin", "backward",
       "sign bits of X^T G (sign(0) = +1); the update applies scale 1/sqrt(N_W) and mask |W| <= 1",
       [("x", SAVED_X), ("g", GRADS + (PO2,))], [("dw", BIT)]),
    _k("dense_dx_f32", "backward", "dX = dY W^T (sign(W) for binary layers)",
       [("dy", GRADS), ("w", WEIGHTS)], [("dx", GRADS)]),
    _k("dense_dx_po2", "backward", "dX = Q sign(W)^T with PO2 Q: sums of signed powers of two",
       [("q", PO2), ("bias", I32), ("w", WEIGHTS)], [("dx", GRADS)]),
    _k("conv_dw_f32", "backward", "dW = correlation of X and dY over n,h,w (* 1[|W| <= 1] if W)",
       [("x", SAVED_X), ("dy", GRADS), ("w?", STATE)], [("dw", F32)]),
    _k("conv_dw_po2", "backward", "dW = correlation of X and PO2 Q over n,h,w (* 1[|W| <= 1] if W)",
       [("x", SAVED_X), ("q", PO2), ("bias", I32), ("w?", STATE)], [("dw", F32)]),
    _k("conv_dw_bin", "backward",
       "sign bits of the X/G correlation (sign(0) = +1); scale and mask applied by the update",
       [("x", SAVED_X), ("g", GRADS + (PO2,))], [("dw", BIT)]),
    _k("conv_dx_f32", "backward", "dX = full correlation of dY with rotated W (sign(W) if binary)",
       [("dy", GRADS), ("w", WEIGHTS)], [("dx", GRADS)]),
    _k("conv_dx_po2", "backward", "dX = full correlation of PO2 Q with rotated sign(W)",
       [("q", PO2), ("bias", I32), ("w", WEIGHTS)], [("dx", GRADS)]),
    # ---- backward: batch norm, activations, pooling, structure
    _k("bn_l2_bwd", "backward",
       "dgamma = sum G xh, dbeta = sum G, dY = inv_std (gG - mean(gG) - xh mean(gG xh)), g = gamma",
       [("d_out", GRADS), ("xh", F32), ("inv_std", F32), ("gamma", STATE)],
       [("dgamma", F32), ("dbeta", F32), ("d_in?", GRADS)], [(2, 0)]),
    _k("bn_l1_bwd", "backward",
       "dbeta = sum G; H = f16(G)/psi; dY = H - mean(H) - s mean(H s)",
       [("d_out", GRADS), ("s", BIT), ("psi", F32)], [("dbeta", F32), ("d_in?", GRADS)], [(1, 0)]),
    _k("sign_bwd_ste", "backward", "d_in = d_out 1[|x| <= 1], reading the saved pre-activation x",
       [("d_out", GRADS), ("x", F32)], [("d_in", GRADS)], [(0, 0)]),
    _k("sign_bwd_mask", "backward", "d_in = d_out * mask (1-bit STE mask)",
       [("d_out", GRADS), ("mask", BIT)], [("d_in", GRADS)], [(0, 0)]),
    _k("relu_bwd_out", "backward", "d_in = d_out 1[y > 0], reading the saved output y",
       [("d_out", GRADS), ("y", F32)], [("d_in", GRADS)], [(0, 0)]),
    _k("relu_bwd_mask", "backward", "d_in = d_out * mask (1-bit x > 0)",
       [("d_out", GRADS), ("mask", BIT)], [("d_in", GRADS)], [(0, 0)]),
    _k("maxpool_bwd_widx", "backward", "scatter-add d_out to each window's argmax (in-window idx)",
       [("d_out", GRADS), ("argmax", (I32, U8))], [("d_in", GRADS)]),
    _k("maxpool_bwd_mask", "backward", "d_in = upsampled d_out * 1-bit argmax mask",
       [("d_out", GRADS), ("argmax", BIT)], [("d_in", GRADS)]),
    _k("avgpool_bwd", "backward", "spread d_out over each window / its count", [("d_out", GRADS)],
       [("d_in", GRADS)]),
    _k("gap_bwd", "backward", "d_in = d_out / (H*W) broadcast", [("d_out", GRADS)],
       [("d_in", GRADS)]),
    _k("affine_bwd", "backward", "d_in = d_out * scale", [("d_out", GRADS)], [("d_in", GRADS)],
       [(0, 0)]),
    _k("grad_add", "backward", "y = a + b: sums gradient contributions of a fanned-out tensor",
       [("a", GRADS), ("b", GRADS)], [("y", GRADS)], [(0, 0), (0, 1)]),
    # ---- update (one kernel call per parameter tensor; state stored back with stochastic rounding
    # for 16-bit dtypes, keyed by (seed, step, tensor id, element))
    _k("adam_update", "update",
       "Adam with bias correction; a BIT gradient is decoded as +-scale * 1[|W| <= 1]",
       [("p", STATE), ("g", (F32, BIT)), ("m", STATE), ("v", STATE)],
       [("p", STATE), ("m", STATE), ("v", STATE)], [(0, 0), (1, 2), (2, 3)]),
    _k("sgd_update", "update", "SGD with momentum: m = mu m + g; p -= lr m",
       [("p", STATE), ("g", (F32, BIT)), ("m", STATE)], [("p", STATE), ("m", STATE)],
       [(0, 0), (1, 2)]),
    _k("bop_update", "update",
       "Bop, scaled momentum: m = (1-gamma) m + g / mean|g|; flip w where |m| > threshold and "
       "sign(m) == sign(w)",
       [("p", BIT), ("g", (F32, BIT)), ("m", STATE)], [("p", BIT), ("m", STATE)], [(0, 0), (1, 2)]),
)

KERNELS: dict[str, KernelSpec] = {k.name: k for k in _SPECS}


def _arity(ops: tuple[Operand, ...]) -> tuple[int, int]:
    return sum(not o.optional for o in ops), len(ops)


def check_registry() -> None:
    """Raise AssertionError if a spec breaks the registry's invariants (a bnnc bug)."""
    assert len(KERNELS) == len(_SPECS), "duplicate kernel name"
    for k in _SPECS:
        assert k.phase in ("forward", "loss", "backward", "update"), k.name
        for ops in (k.inputs, k.outputs):
            opt = [o.optional for o in ops]
            assert opt == sorted(opt), f"{k.name}: optional operands must trail"
        for oi, ii in k.inplace:
            assert 0 <= oi < len(k.outputs) and 0 <= ii < len(k.inputs), f"{k.name}: {oi, ii}"


def check_step(kernel: str, in_dtypes: tuple[DType, ...], out_dtypes: tuple[DType, ...]) -> None:
    """Raise AssertionError if a call of `kernel` with these operand dtypes breaks its spec."""
    spec = KERNELS.get(kernel)
    assert spec is not None, f"unknown kernel {kernel}"
    for what, ops, dts in (("input", spec.inputs, in_dtypes), ("output", spec.outputs, out_dtypes)):
        lo, hi = _arity(ops)
        assert lo <= len(dts) <= hi, f"{kernel}: {len(dts)} {what}s, expected {lo}..{hi}"
        for op, dt in zip(ops, dts):
            assert dt in op.dtypes, f"{kernel}: {what} {op.name} is {dt.value}, expected " \
                                    f"{'/'.join(d.value for d in op.dtypes)}"


check_registry()
