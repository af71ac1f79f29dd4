"""Batch normalization (ONNX BatchNormalization and folded affine idioms): l2 and l1 BN, training statistics."""

from __future__ import annotations

from .base import KernelFamily, LayerSpec, OpFamily, Phase, kernel  # noqa: F401

# ---- ONNX import ------------------------------------------------------------------------------
ONNX: dict = {}

# ---- training schedule ------------------------------------------------------------------------
FORWARD: dict = {}
BACKWARD: dict = {}

# ---- kernels: contract (dtypes, in-place) + C lowering -----------------------------------------
KERNELS: tuple = ()

# ---- numpy reference --------------------------------------------------------------------------
REFERENCE_FORWARD: dict = {}
REFERENCE_BACKWARD: dict = {}

# ---- export -----------------------------------------------------------------------------------
EXPORT: dict = {}

FAMILY = OpFamily(
    name="batchnorm", doc=__doc__, layers=(), onnx=ONNX, kernels=KERNELS, forward=FORWARD,
    backward=BACKWARD, reference_forward=REFERENCE_FORWARD, reference_backward=REFERENCE_BACKWARD,
    export=EXPORT)
