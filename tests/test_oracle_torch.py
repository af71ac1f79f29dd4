"""The numpy reference's standard algorithm (runtime/reference.py) against a PyTorch oracle.

The oracle (tests/torch_oracle.py) trains the same hand-built graphs (tests/graphs.py) with torch
autograd, F.batch_norm and torch.optim.Adam; one step (three for the MLP) must agree tensor by
tensor: every layer output, the loss, every d_out torch can hook, every parameter gradient, and
every state tensor after the update (parameters, Adam m and v, BN running statistics).

Tolerance per tensor: |ref - torch| <= 1e-4 |torch| + 1e-5 max|torch|. The oracle runs in float64,
so this bounds the reference's float32 rounding. The absolute term scales with the tensor's largest
entry because cancellation (BN backward, dW sums over B*H*W terms) leaves entries near 0 whose
error is relative to the summed terms, not to the entry (measured: <= 1.8e-6 max|t| for every
tensor here, worst CNV conv3.dW and its Adam moments; <= 6.2e-6 |t| relative for entries above
0.1 max|t|). Updated parameters add the Adam slack (see `_Pair`).

Exactness precondition: inputs lie on a 1/128 grid, so binary layers' pre-activations are exact in
both implementations, and `margin_violations` must find no sign / STE-mask / ReLU / max-pool
decision within 1e-5 of flipping (measured |Z_ref - Z_torch|: <= 1e-6, i.e. ~1.5e-7 |Z|, on
these graphs); otherwise a mismatch could be float noise, not a bug. Max-pool ties (many: CNV
pools ±1 values) are exact, and both sides must route the gradient to the first maximum.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import graphs
from torch_oracle import TorchOracle, _pad4, margin_violations, sign_ste

from bnnc.compiler.config import make_config
from bnnc.compiler.ir import INPUT, Graph, Layer, LayerKind, tname
from bnnc.compiler.state import state_tensors

RTOL = 1e-4
ATOL_OF_MAX = 1e-5
MARGIN = 1e-5
BATCH = {"tiny_mlp": 16, "mlp": 32, "cnv": 8, "binarynet": 8, "residual": 8}
# batch seeds that pass the exactness precondition (margin_violations) for these graphs
SEED = {"tiny_mlp": 1, "mlp": 1, "cnv": 1, "binarynet": 1, "residual": 1}
MLP_STEP_SEEDS = (16, 17, 18)


@pytest.fixture(scope="module")
def reference():
    return pytest.importorskip("bnnc.runtime.reference",
                               reason="runtime/reference.py (the numpy reference) is not there yet")


def _ordered_names(graph: Graph, want: dict[str, np.ndarray], cfg) -> list[str]:
    """Names to compare, in computation order, so the first mismatch listed is the likely cause."""
    names = [tname(lay.name, "out") for lay in graph.layers] + ["loss"]
    for lay in reversed(graph.layers):
        names += [tname(lay.name, f) for f in ("d_out", "dW", "db", "dgamma", "dbeta")]
    names += [st.name for st in state_tensors(graph, cfg)]
    return [n for n in names if n in want]


def _tolerance(t: np.ndarray) -> np.ndarray:
    return RTOL * np.abs(t) + ATOL_OF_MAX * (np.max(np.abs(t)) if t.size else 0.0)


def _adam_slack(cfg, t: int, m_prev, v_prev, g_torch, g_ref) -> np.ndarray:
    """lr * |Adam step with the reference's gradient - Adam step with torch's|, in float64 from
    torch's previous moments: how far the two updates may honestly differ given the gradients'
    difference (which the comparison has already bounded)."""
    m_prev, v_prev = np.asarray(m_prev, np.float64), np.asarray(v_prev, np.float64)

    def step(g):
        g = np.asarray(g, np.float64)
        m = cfg.beta1 * m_prev + (1 - cfg.beta1) * g
        v = cfg.beta2 * v_prev + (1 - cfg.beta2) * g * g
        return (m / (1 - cfg.beta1 ** t)) / (np.sqrt(v / (1 - cfg.beta2 ** t)) + cfg.adam_eps)

    return cfg.lr * np.abs(step(g_ref) - step(g_torch))


def _mismatches(names: list[str], got: dict, want: dict,
                slack: dict[str, np.ndarray]) -> list[str]:
    out = []
    for n in names:
        if n not in got:
            out.append(f"{n}: missing from the reference")
            continue
        r = np.asarray(got[n], np.float64)
        t = np.asarray(want[n], np.float64)
        if n == "loss":
            r = r.reshape(())
        if r.shape != t.shape:
            out.append(f"{n}: reference shape {r.shape}, torch {t.shape}")
            continue
        tol = _tolerance(t) + slack.get(n, 0.0)
        excess = np.where(np.isfinite(r), np.abs(r - t) - tol, np.inf)
        if np.any(excess > 0):
            i = np.unravel_index(int(np.argmax(excess)), t.shape) if t.ndim else ()
            out.append(f"{n}: {int(np.sum(excess > 0))}/{t.size} elements off; worst at {i}: "
                       f"reference {r[i]:.8g}, torch {t[i]:.8g}")
    return out


class _Pair:
    """The reference's state and the torch oracle, stepped side by side, compared after each step.

    Adam turns a gradient entry that is rounding noise into a step of up to ±lr (at t = 1 the step
    is g/(|g|+eps)). Such entries are common: a BN's input gradient sums to 0 over the batch, so the
    input gradient of the layer before it does too, and the BN before that has a structural-zero
    dbeta wherever its STE mask is all ones for a channel (dbeta ~ 1e-9 of either sign). So each
    updated parameter's tolerance adds `_adam_slack` (the step difference the two *verified*
    gradients explain), and where that slack exceeds the plain tolerance the oracle adopts the
    reference's parameter and moments, so the next step compares like with like.
    """

    def __init__(self, reference, graph: Graph, cfg):
        self.reference, self.graph, self.cfg = reference, graph, cfg
        self.oracle = TorchOracle(graph, cfg)
        self.state = reference.init_state(graph, cfg)
        self.moments = {p + f: np.zeros(tuple(t.shape), np.float32)
                        for p, t in self.oracle.params.items() for f in (".m", ".v")}

    def step(self, x, labels, label: str) -> None:
        graph, cfg = self.graph, self.cfg
        want = self.oracle.step(x, labels)
        outs = {lay.name: want[tname(lay.name, "out")] for lay in graph.layers}
        bad = margin_violations(graph, outs, MARGIN)
        assert not bad, f"{label}: ill-posed test input (change the batch seed): {bad}"

        state, inter = self.reference.train_step(graph, cfg, self.state, x, labels)
        assert state.step == self.state.step + 1, \
            f"{label}: step counter {self.state.step} -> {state.step}"
        names = {st.name for st in state_tensors(graph, cfg)}
        assert set(state.tensors) == names, \
            f"{label}: state names differ from compiler.state: {sorted(set(state.tensors) ^ names)}"
        got = {**inter, **state.tensors}
        slack = {}
        for p in self.oracle.params:
            layer, f = p.rsplit(".", 1)
            g = tname(layer, "d" + f)
            if np.shape(got.get(g)) == want[g].shape:
                slack[p] = _adam_slack(cfg, state.step, self.moments[p + ".m"],
                                       self.moments[p + ".v"], want[g], got[g])
        bad = _mismatches(_ordered_names(graph, want, cfg), got, want, slack)
        assert not bad, f"{label}: {len(bad)} tensor(s) disagree with torch:\n  " + "\n  ".join(bad)

        for p, sl in slack.items():
            noisy = sl > _tolerance(want[p])
            if noisy.any():
                self.oracle.adopt(p, state.tensors, noisy)
                for f in (".m", ".v"):
                    want[p + f][noisy] = state.tensors[p + f][noisy]
        self.moments = {n: want[n] for n in self.moments}
        self.state = state


# -- the oracle's own rules, checked against hand-derived values (no reference needed) -------------

def test_sign_ste_forward_and_backward():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5], requires_grad=True)
    y = sign_ste(x)
    (y * 3.0).sum().backward()
    assert y.tolist() == [-1, -1, -1, 1, 1, 1, 1]                 # sign(0) = +1
    assert x.grad.tolist() == [0, 3, 3, 3, 3, 3, 0]               # 1[|x| <= 1], boundary included


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_maxpool_tie_goes_to_first(channels_last, dtype):
    """The convention the oracle relies on: equal values -> the first in row-major window order."""
    x = torch.tensor([[[[1.0, 1.0, -1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]]], dtype=dtype)
    x = x.repeat(1, 4, 1, 1)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    y, idx = torch.nn.functional.max_pool2d(x, 2, 2, return_indices=True)
    y.sum().backward()
    assert idx[0, 0].tolist() == [[0, 3]]
    assert x.grad[0, 0].tolist() == [[1, 0, 0, 1], [0, 0, 0, 0]]


def test_pad_order():
    assert _pad4((1, 2, 3, 4)) == (2, 4, 1, 3)       # IR (top, left, bottom, right) -> F.pad


def test_running_var_is_bnnc_biased_accumulation():
    """Wb = [[1, 1], [1, -1]] maps the batch to y0 = (0, 4, 0), y1 = (0, 0, 2): means (4/3, 2/3),
    biased variances (32/9, 8/9) (unbiased would be 16/3, 4/3). Adam moves W by ~1e-3, not its sign,
    so the second step sees the same batch statistics."""
    w = np.array([[0.5, 0.5], [0.5, -0.5]], np.float32)
    bn = {"gamma": np.ones(2, np.float32), "beta": np.zeros(2, np.float32),
          "mean": np.array([0.0, 1.0], np.float32), "var": np.array([1.0, 0.5], np.float32)}
    graph = Graph("bnvar", (2,), (
        Layer("fc1", LayerKind.DENSE, (INPUT,), (2,), {"binary": True}, {"W": w}),
        Layer("bn1", LayerKind.BATCHNORM, ("fc1",), (2,), {"eps": 1e-4, "momentum": 0.9}, bn)))
    graph.verify()
    oracle = TorchOracle(graph, make_config("standard", batch=3))
    x = np.array([[0, 0], [2, 2], [1, -1]], np.float32)
    mean, var = np.array([4 / 3, 2 / 3]), np.array([32 / 9, 8 / 9])
    rm, rv = bn["mean"].astype(np.float64), bn["var"].astype(np.float64)
    for _ in range(2):
        got = oracle.step(x, np.array([0, 1, 0], np.int32))
        rm, rv = 0.9 * rm + 0.1 * mean, 0.9 * rv + 0.1 * var
        np.testing.assert_allclose(got["bn1.running_mean"], rm, rtol=1e-6)
        np.testing.assert_allclose(got["bn1.running_var"], rv, rtol=1e-6)


def test_affine_broadcast_and_asymmetric_conv_pads():
    """Per-channel AFFINE then a 1x1 identity conv padded on top only: a zero row, then x*s+b."""
    graph = Graph("pads", (2, 2, 2), (
        Layer("affine0", LayerKind.AFFINE, (INPUT,), (2, 2, 2), {},
              {"scale": np.array([2.0, 3.0], np.float32),
               "bias": np.array([1.0, -1.0], np.float32)}),
        Layer("conv1", LayerKind.CONV, ("affine0",), (2, 3, 2),
              {"binary": False, "strides": (1, 1), "pads": (1, 0, 0, 0)},
              {"W": np.eye(2, dtype=np.float32).reshape(2, 2, 1, 1)}),
        Layer("gap2", LayerKind.GLOBAL_AVGPOOL, ("conv1",), (2, 1, 1))))
    graph.verify()
    oracle = TorchOracle(graph, make_config("standard", batch=1))
    outs, _ = oracle.forward(torch.ones(1, 2, 2, 2, dtype=torch.float64))
    assert outs["conv1"][0].tolist() == [[[0, 0], [3, 3], [3, 3]], [[0, 0], [2, 2], [2, 2]]]
    assert outs["gap2"].flatten().tolist() == pytest.approx([2.0, 4 / 3], rel=1e-7)


@pytest.mark.parametrize("name", list(graphs.FACTORIES))
def test_graphs_verify_and_torch_runs(name):
    graph = graphs.FACTORIES[name]()
    graph.verify()
    cfg = make_config("standard", batch=BATCH[name])
    x, labels = graphs.sample_batch(graph, BATCH[name], seed=1)
    want = TorchOracle(graph, cfg).step(x, labels)
    # an untrained 10-class net: loss near ln 10, finite everywhere
    assert 1.0 < want["loss"] < 6.0 and all(np.all(np.isfinite(v)) for v in want.values())
    for lay in graph.layers:
        assert want[tname(lay.name, "out")].shape == (BATCH[name],) + lay.shape, lay.name
    # weight STE mask has zeros to get wrong; real layers are never masked
    for lay in graph.layers:
        if lay.kind in (LayerKind.DENSE, LayerKind.CONV):
            dw, big = want[tname(lay.name, "dW")], np.abs(lay.params["W"]) > 1
            assert big.any(), lay.name
            assert np.all(dw[big] == 0) == lay.binary, lay.name


def test_full_size_weight_counts():
    """ALGORITHM.md §5: MLP 399,872, CNV 1,542,848, BinaryNet 14,022,016 weights."""
    def weights(g):
        return sum(lay.params["W"].size for lay in g.layers if "W" in lay.params)
    assert weights(graphs.mlp()) == 399_872
    assert weights(graphs.cnv(1)) == 1_542_848
    assert weights(graphs.binarynet(1)) == 14_022_016


# -- the reference against the oracle --------------------------------------------------------------

@pytest.mark.parametrize("name", list(graphs.FACTORIES))
def test_init_state_loads_the_graph(reference, name):
    graph = graphs.FACTORIES[name]()
    cfg = make_config("standard", batch=BATCH[name])
    state = reference.init_state(graph, cfg)
    assert state.step == 0
    specs = state_tensors(graph, cfg)
    assert set(state.tensors) == {st.name for st in specs}
    src = {"running_mean": "mean", "running_var": "var"}
    for st in specs:
        got = state.tensors[st.name]
        assert got.dtype == np.float32 and got.shape == st.shape, st.name
        if st.kind == "opt":
            assert not got.any(), f"{st.name} starts non-zero"
        else:
            want = graph.layer(st.layer).params[src.get(st.field, st.field)]
            assert np.array_equal(got, want), f"{st.name} is not the graph's {st.field}"


@pytest.mark.parametrize("name", list(graphs.FACTORIES))
def test_one_step_matches_torch(reference, name):
    graph = graphs.FACTORIES[name]()
    pair = _Pair(reference, graph, make_config("standard", batch=BATCH[name]))
    pair.step(*graphs.sample_batch(graph, BATCH[name], seed=SEED[name]), name)


def test_mlp_three_steps_match_torch(reference):
    """State carried across steps (Adam moments and bias correction, BN running statistics)."""
    graph = graphs.mlp()
    pair = _Pair(reference, graph, make_config("standard", batch=BATCH["mlp"]))
    for step, seed in enumerate(MLP_STEP_SEEDS, start=1):
        pair.step(*graphs.sample_batch(graph, BATCH["mlp"], seed=seed), f"step {step}")


def test_train_step_leaves_its_input_state_alone(reference):
    graph = graphs.tiny_mlp()
    cfg = make_config("standard", batch=BATCH["tiny_mlp"])
    state = reference.init_state(graph, cfg)
    before = {k: v.copy() for k, v in state.tensors.items()}
    reference.train_step(graph, cfg, state, *graphs.sample_batch(graph, BATCH["tiny_mlp"], seed=1))
    assert state.step == 0
    changed = [k for k, v in before.items() if not np.array_equal(v, state.tensors[k])]
    assert not changed, f"train_step modified its input state in place: {changed}"
