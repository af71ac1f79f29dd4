"""Partial training (issue 14, items 4 and 6): --train / --train-from / --train bn, the frozen
parameters' state layout, the schedule's pruned backward, the numpy reference, `bnnc check`,
the manifest, refusal of states of another freeze set, the bare-metal flash placement and
`bnnc compile --fit`."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

from graphs import cnv, residual, sample_batch, tiny_mlp
from bnnc.cli import main
from bnnc.compiler.budget import budget_report, fit_budget
from bnnc.compiler.config import check_config_for_graph, make_config, resolve_frozen
from bnnc.compiler.contract import read_manifest
from bnnc.compiler.errors import ConfigError, DataError
from bnnc.compiler.ops import eval_mode_bns
from bnnc.compiler.ops.base import Phase
from bnnc.compiler.planner import plan_schedule
from bnnc.compiler.report import format_report, plan_to_html, plan_to_json
from bnnc.compiler.schedule import build_schedule
from bnnc.compiler.schedule_ir import DType, Role
from bnnc.compiler.state import state_tensors
from bnnc.compiler.target import load_target
from bnnc.runtime import reference as ref
from bnnc.runtime.model_source import load_graph

KIB = 1024
cc = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc) installed")
arm = pytest.mark.skipif(not (shutil.which("arm-none-eabi-gcc")
                              and shutil.which("qemu-system-arm")),
                         reason="needs gcc-arm-none-eabi, libnewlib-arm-none-eabi, qemu-system-arm")


def _cfg(graph, algorithm="proposed", batch=16, train=None, train_from=None, **kw):
    # the frozen prefix's BNs in inference mode (--frozen-bn running), the case with the most
    # machinery; tests of the default (batch statistics) say frozen_bn="batch"
    kw.setdefault("frozen_bn", "running")
    cfg = make_config(algorithm, batch=batch, **kw)
    frozen = resolve_frozen(graph, train=train, train_from=train_from, bn=cfg.bn)
    return dataclasses.replace(cfg, frozen=frozen)


# --------------------------------------------------------------------------------------------------
# the freeze set

def test_train_options_resolve_to_frozen_parameters():
    g = load_graph("tfc")
    assert resolve_frozen(g) == ()
    assert resolve_frozen(g, train_from="fc3", bn="l1") == ("fc1.W", "bn1.beta", "fc2.W",
                                                             "bn2.beta")
    # l2 BN has a gamma to freeze as well
    assert "bn1.gamma" in resolve_frozen(g, train_from="fc3", bn="l2")
    # TinyTL: every W frozen, BN trained (binary layers have no bias)
    assert resolve_frozen(g, train="bn", bn="l1") == ("fc1.W", "fc2.W", "fc3.W", "fc4.W")
    # a list, and the union with --train-from
    assert resolve_frozen(g, train="fc1,bn4", bn="l1") == ("bn1.beta", "fc2.W", "bn2.beta",
                                                            "fc3.W", "bn3.beta", "fc4.W")
    assert resolve_frozen(g, train="fc1", train_from="fc4", bn="l1") == (
        "bn1.beta", "fc2.W", "bn2.beta", "fc3.W", "bn3.beta")
    # a real layer's bias trains under --train bn
    r = residual()
    frozen = resolve_frozen(r, train="bn", bn="l1")
    assert "fc3.W" in frozen and "fc3.b" not in frozen and "bn0.beta" not in frozen


def test_bad_freeze_sets_are_one_clear_error():
    g = load_graph("tfc")
    with pytest.raises(ConfigError, match=r"no layer 'fc9'; its layers: flatten1, fc1, bn1, "):
        resolve_frozen(g, train="fc1,fc9")
    with pytest.raises(ConfigError, match="no layer 'conv1'"):
        resolve_frozen(g, train_from="conv1")
    with pytest.raises(ConfigError, match="'sign1' has no parameters to train"):
        resolve_frozen(g, train="sign1")
    with pytest.raises(ConfigError, match="--train is empty"):
        resolve_frozen(g, train=" , ")
    # a model without batch norms or biases has nothing for 'bn' to train
    nobn = dataclasses.replace(g, layers=tuple(
        lay for lay in g.layers if lay.kind.value not in ("batchnorm",)))
    nobn = dataclasses.replace(nobn, layers=tuple(
        dataclasses.replace(lay, inputs=tuple("fc%d" % int(i[2:]) if i.startswith("bn") else i
                                              for i in lay.inputs)) for lay in nobn.layers))
    with pytest.raises(ConfigError, match="nothing to train"):
        resolve_frozen(nobn, train="bn")
    # a config naming parameters the graph lacks, or freezing everything
    with pytest.raises(ConfigError, match="'fc7.W' is not a parameter"):
        check_config_for_graph(g, make_config("proposed", frozen=("fc7.W",)))
    everything = tuple(f"{lay.name}.{f}" for lay in g.layers for f in ("W", "beta")
                       if f in lay.params)
    with pytest.raises(ConfigError, match="leaves nothing to train"):
        check_config_for_graph(g, make_config("proposed", frozen=everything))


def test_cli_bad_layer_name_exits_2_with_one_error_line(capsys):
    rc = main(["inspect", "tfc", "--batch", "8", "--train", "fc1,nope"])
    err = capsys.readouterr().err
    assert rc == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "'nope'" in lines[0] and "fc4, bn4, softmax1" in lines[0]
    assert "Traceback" not in err


# --------------------------------------------------------------------------------------------------
# state layout and schedule

def test_frozen_state_has_no_moments_and_binary_weights_as_bits():
    g = load_graph("tfc")
    full = {st.name: st for st in state_tensors(g, _cfg(g))}
    sts = state_tensors(g, _cfg(g, train_from="fc3"))
    by = {st.name: st for st in sts}
    assert by["fc1.W"].kind == "frozen" and by["fc1.W"].dtype == "bit"
    assert by["fc1.W"].optimizer is None and not by["fc1.W"].stochastic
    assert by["bn1.beta"].kind == "frozen" and by["bn1.beta"].dtype == "bf16"
    assert not any(n.startswith(("fc1.W.", "fc2.W.", "bn1.beta.", "bn2.beta.")) for n in by)
    # a frozen BN with nothing trainable upstream runs in inference mode: its running
    # statistics are constants in the frozen tail; one downstream of a trainable layer updates them
    assert by["bn1.running_mean"].kind == by["bn2.running_psi"].kind == "frozen"
    assert by["bn1.running_mean"].dtype == "bf16" and by["bn3.running_mean"].kind == "bn_stat"
    downstream = {st.name: st for st in state_tensors(g, _cfg(g, train="fc1"))}
    assert downstream["bn1.beta"].kind == "frozen"
    assert downstream["bn1.running_mean"].kind == downstream["bn4.running_psi"].kind == "bn_stat"
    assert dataclasses.replace(by["fc3.W"], tensor_id=0) == dataclasses.replace(
        full["fc3.W"], tensor_id=0) and "fc3.W.v" in by
    # frozen tensors come last; ids are positions
    kinds = [st.kind for st in sts]
    assert kinds.index("frozen") == len(sts) - 8 and set(kinds[-8:]) == {"frozen"}
    assert [st.tensor_id for st in sts] == list(range(len(sts)))


@pytest.mark.parametrize("algorithm", ["proposed", "standard"])
def test_backward_stops_at_the_first_trainable_layer(algorithm):
    g = load_graph("tfc")
    full = build_schedule(g, _cfg(g, algorithm))
    s = build_schedule(g, _cfg(g, algorithm, train_from="fc3"))
    back = [st for st in s.steps if st.phase in (Phase.BACKWARD, Phase.UPDATE)]
    # nothing of the frozen prefix runs backward, and no gradient is computed into it
    assert {st.layer for st in back} <= {"bn4", "fc4", "sign3", "bn3", "fc3", ""}
    assert not any(t in s.tensors for t in ("sign2.d_out", "fc2.dW", "fc1.dW", "bn2.dbeta",
                                            "bn1.d_out"))
    assert not any(st.kernel.name.startswith("dense_dx") and st.layer == "fc3" for st in back)
    # frozen binary weights are read as packed bits: no per-step packing of their latent W
    assert s.tensors["fc1.W"].dtype is DType.BIT and s.tensors["fc1.W"].role is Role.FROZEN
    assert not any(st.kernel.name == "pack_sign_w" and st.layer in ("fc1", "fc2")
                   for st in s.steps)
    # no saved activation that only a frozen layer's backward would read
    if algorithm == "proposed":
        assert "sign1.mask" in full.tensors and "sign1.mask" not in s.tensors
        assert "bn1.s" in full.tensors and "bn1.s" not in s.tensors
    else:
        assert "bn1.xh" in full.tensors and "bn1.xh" not in s.tensors
    _, pf = plan_schedule(full)
    _, pp = plan_schedule(s)
    assert pp.state_nbytes < pf.state_nbytes / 8 and pp.arena_nbytes <= pf.arena_nbytes
    # the frozen prefix is an inference function: its BNs read their running statistics, write
    # nothing else (no batch mean / psi / var scratch), and bn3 (trainable) uses batch statistics
    stat = "running_psi" if algorithm == "proposed" else "running_var"
    evals = [st for st in s.steps if st.kernel.name.endswith("_eval")]
    assert [(st.layer, st.outputs) for st in evals] == [("bn1", ("bn1.out",)),
                                                         ("bn2", ("bn2.out",))]
    assert f"bn1.{stat}" in evals[0].inputs
    assert not any(t in s.tensors for t in ("bn1.mu", "bn2.psi", "bn2.inv_std"))
    assert any(st.layer == "bn3" and st.kernel.name.endswith("_fwd") for st in s.steps)
    # the frozen tail: exactly the frozen tensors (l2 BN: gamma too), binary W as bits, and the
    # (now constant) running statistics of the inference-mode BNs
    frozen = [t for t in s.tensors.values() if t.role is Role.FROZEN]
    stats = {f"bn{i}.{f}" for i in (1, 2) for f in ("running_mean", stat)}
    assert {t.name for t in frozen} == set(s.config.frozen) | stats
    assert set(s.config.frozen) >= {"fc1.W", "bn2.beta"}
    assert pp.frozen_nbytes == sum(-(-t.nbytes // pp.align) * pp.align for t in frozen)
    assert s.tensors["fc1.W"].nbytes == 64 * 13 * 8        # 64 rows of 784 bits in 13 words


def test_frozen_weight_with_a_gradient_through_it_gets_dx_but_no_dw():
    g = load_graph("tfc")
    s = build_schedule(g, _cfg(g, train="fc1,bn4"))
    kernels = {(st.layer, st.kernel.name) for st in s.steps}
    assert ("fc3", "dense_dx_po2") in kernels and not any(
        layer == "fc3" and k.startswith(("dense_dw", "adam")) for layer, k in kernels)
    assert ("bn3", "bn_l1_bwd") in kernels and ("bn3", "adam_update") not in kernels
    assert "fc3.x_saved" not in s.tensors and ("fc1", "adam_update") in kernels


# --------------------------------------------------------------------------------------------------
# the numpy reference

@pytest.mark.parametrize("factory,train,train_from", [
    (tiny_mlp, None, "fc2"), (residual, "bn", None), (residual, "conv0,fc3", None),
    (lambda: cnv(16), None, "fc7")])
def test_reference_trains_only_the_unfrozen_part_and_its_gradients_are_full_trainings(
        factory, train, train_from):
    g = factory()
    full = make_config("proposed", batch=8, optimizer="adam")
    part = _cfg(g, batch=8, train=train, train_from=train_from)
    x, y = sample_batch(g, 8, seed=3)
    st_full, st_part = ref.init_state(g, full), ref.init_state(g, part)
    new, out = ref.train_step(g, part, st_part, x, y)
    _, out_full = ref.train_step(g, full, st_full, x, y)
    for name in part.frozen:
        if name in st_part.tensors:
            np.testing.assert_array_equal(new.tensors[name], st_part.tensors[name])
            grad = name.rsplit(".", 1)[0] + ".d" + name.rsplit(".", 1)[1]
            if not name.endswith("beta"):       # a frozen BN's fused backward yields dbeta
                assert grad not in out, grad
    trained = [st.name for st in state_tensors(g, part) if st.kind == "param"]
    assert trained and any(not np.array_equal(new.tensors[n], st_part.tensors[n])
                           for n in trained)
    if eval_mode_bns(g, part):
        # a frozen prefix with batch norms is an inference function: the forward differs from
        # full training's (test_frozen_prefix_bn_is_the_inference_formula checks it); with
        # --frozen-bn batch it is full training's again
        assert out["loss"] != out_full["loss"]
        part = dataclasses.replace(part, frozen_bn="batch")
        assert not eval_mode_bns(g, part)
        _, out = ref.train_step(g, part, ref.init_state(g, part), x, y)
    # one step from the same weights: a trained parameter's gradient is the one full training
    # computes (the forward and the backward down to it are the same)
    for n in trained:
        lay, f = n.rsplit(".", 1)
        np.testing.assert_array_equal(out[f"{lay}.d{f}"], out_full[f"{lay}.d{f}"])
    assert out["loss"] == out_full["loss"]


@pytest.mark.parametrize("algorithm", ["proposed", "standard"])
def test_frozen_prefix_bn_is_the_inference_formula(algorithm):
    """A frozen BN with nothing trainable upstream normalizes with its running statistics in a
    training step (formula written out here, float64) and leaves them unchanged; a frozen BN
    downstream of a trainable layer keeps batch statistics and updates its statistics."""
    g = load_graph("tfc")
    cfg = _cfg(g, algorithm, batch=5, train_from="fc3")
    assert eval_mode_bns(g, cfg) == {"bn1", "bn2"}
    x, y = sample_batch(g, 5, seed=7)
    st = ref.init_state(g, cfg)
    t = {k: v.astype(np.float64) for k, v in st.tensors.items()}
    new = st
    for step in range(3):       # the statistics stay put over several steps
        before = new
        new, out = ref.train_step(g, cfg, before, x, y)
        for bn, prev in (("bn1", "fc1"), ("bn2", "fc2")):
            z = out[f"{prev}.out"].astype(np.float64)
            if algorithm == "proposed":       # l1: (z - mean) / psi + beta
                want = (z - t[f"{bn}.running_mean"]) / t[f"{bn}.running_psi"] + t[f"{bn}.beta"]
            else:
                want = (t[f"{bn}.gamma"] * (z - t[f"{bn}.running_mean"])
                        / np.sqrt(t[f"{bn}.running_var"] + g.layer(bn).attrs["eps"])
                        + t[f"{bn}.beta"])
            np.testing.assert_allclose(out[f"{bn}.out"], want, rtol=1e-5, atol=1e-5)
            assert f"{bn}.mu" not in out
            for f in ("running_mean", "running_psi" if algorithm == "proposed" else "running_var"):
                np.testing.assert_array_equal(new.tensors[f"{bn}.{f}"], st.tensors[f"{bn}.{f}"])
        assert "bn3.mu" in out and not np.array_equal(new.tensors["bn3.running_mean"],
                                                      before.tensors["bn3.running_mean"])
    # --frozen-bn batch: the prefix BNs keep batch statistics and update their running ones
    ada = dataclasses.replace(cfg, frozen_bn="batch")
    assert eval_mode_bns(g, ada) == frozenset()
    assert {st.kind for st in state_tensors(g, ada) if ".running_" in st.name} == {"bn_stat"}
    new, out = ref.train_step(g, ada, ref.init_state(g, ada), x, y)
    assert "bn1.mu" in out and not np.array_equal(new.tensors["bn1.running_mean"],
                                                  st.tensors["bn1.running_mean"])
    # --train fc1: every BN sits downstream of a trainable layer, batch statistics everywhere
    down = _cfg(g, algorithm, batch=5, train="fc1")
    assert eval_mode_bns(g, down) == frozenset()
    new, out = ref.train_step(g, down, ref.init_state(g, down), x, y)
    assert "bn1.mu" in out and not np.array_equal(new.tensors["bn1.running_mean"],
                                                  st.tensors["bn1.running_mean"])


@cc
@pytest.mark.parametrize("factory,algorithm,optimizer,train,train_from", [
    ("tfc", "proposed", "adam", None, "fc3"),         # l1 BNs of the prefix in inference mode
    ("tfc", "standard", "adam", None, "fc3"),         # l2 BNs of the prefix in inference mode
    ("tfc", "proposed", "adam", None, "fc3+batch"),   # --frozen-bn batch: batch statistics
    ("tfc", "standard", "bop", "fc1,bn4", None),      # a gradient through frozen layers
    (residual, "proposed", "adam", "bn", None)])     # real layers' biases, convs, l1 BN
def test_bnnc_check_passes_with_frozen_layers(tmp_path, factory, algorithm, optimizer, train,
                                              train_from):
    from bnnc.runtime.check import format_report as check_report, run_check
    g = load_graph(factory) if isinstance(factory, str) else factory()
    ada = train_from is not None and train_from.endswith("+batch")
    cfg = _cfg(g, algorithm, batch=8, train=train, train_from=train_from and
               train_from.removesuffix("+batch"), optimizer=optimizer,
               frozen_bn="batch" if ada else None)
    if not any(lay.binary for lay in g.layers):
        cfg = dataclasses.replace(cfg, po2=False, binary_dw=False)
    rep = run_check(g, cfg, steps=2, work_dir=tmp_path)
    assert rep.ok, check_report(rep)
    names = {r.name for r in rep.rows}
    assert set(cfg.frozen) & names        # frozen tensors compared after the steps, unchanged
    for bn in eval_mode_bns(g, cfg):      # and the constant statistics of the prefix's BNs
        assert f"{bn}.running_mean" in names and f"{bn}.out" in names


@cc
def test_check_catches_a_perturbed_inference_mode_bn(tmp_path):
    from bnnc.runtime.check import run_check
    g = load_graph("tfc")
    cfg = _cfg(g, batch=8, train_from="fc3")
    rep = run_check(g, cfg, steps=1, work_dir=tmp_path, extra_cflags=["-DBNNC_PERTURB_BN_L1_EVAL"])
    assert not rep.ok and {"bn1.out", "bn2.out"} & {r.name for r in rep.failures}


# --------------------------------------------------------------------------------------------------
# reports, manifest, states

def test_inspect_reports_the_frozen_part(tmp_path, capsys):
    g = load_graph("tfc")
    s = build_schedule(g, _cfg(g, batch=8, train_from="fc4"))
    live, plan = plan_schedule(s)
    doc = plan_to_json(s, live, plan)
    assert doc["frozen"] == ["fc1.W", "bn1.beta", "fc2.W", "bn2.beta", "fc3.W", "bn3.beta"]
    assert doc["state"]["frozen_nbytes"] == plan.frozen_nbytes > 0
    assert doc["by_role"]["frozen parameter"]["nbytes"] == sum(
        t.nbytes for t in s.tensors.values() if t.role is Role.FROZEN)
    text = format_report(doc, tensors=False)
    assert "6 parameters frozen" in text and "frozen (not trained): fc1.W, bn1.beta" in text
    assert "frozen parameter" in plan_to_html([doc])
    rc = main(["inspect", "tfc", "--batch", "8", "--train-from", "fc4", "--frozen-bn", "running",
               "--json", str(tmp_path / "p.json")])
    assert rc == 0 and json.loads((tmp_path / "p.json").read_text())["frozen"] == doc["frozen"]
    assert main(["inspect", str(tmp_path / "p.json")]) == 0      # re-verified from the JSON
    out = capsys.readouterr().out
    assert "frozen (not trained)" in out
    assert "batch norms in inference mode (running statistics, constant): bn1, bn2, bn3" in out
    # the default (--frozen-bn batch): the prefix BNs keep batch statistics, their statistics are
    # not frozen
    assert main(["inspect", "tfc", "--batch", "8", "--train-from", "fc4"]) == 0
    assert "inference mode" not in capsys.readouterr().out
    assert main(["inspect", "tfc", "--train-from", "fc4", "--frozen-bn", "eval"]) == 2
    assert "Invalid value for '--frozen-bn'" in capsys.readouterr().err


@cc
def test_manifest_records_the_freeze_set_and_other_states_are_refused(tmp_path, capsys):
    out_full, out_part = tmp_path / "full", tmp_path / "part"
    assert main(["compile", "tfc", "--batch", "8", "-o", str(out_full)]) == 0
    assert main(["compile", "tfc", "--batch", "8", "--train-from", "fc3", "--frozen-bn", "running",
                 "-o", str(out_part)]) == 0
    m = read_manifest(out_part)
    assert m.frozen == ("fc1.W", "bn1.beta", "fc2.W", "bn2.beta") and m.frozen_nbytes > 0
    assert tuple(m.config["frozen"]) == m.frozen and read_manifest(out_full).frozen == ()
    assert m.config["frozen_bn"] == "running"
    # the default, --frozen-bn batch, is part of the program too: recorded, and the prefix
    # statistics stay updatable
    out_ada = tmp_path / "ada"
    assert main(["compile", "tfc", "--batch", "8", "--train-from", "fc3", "-o",
                 str(out_ada)]) == 0
    ma = read_manifest(out_ada)
    assert ma.config["frozen_bn"] == "batch" and 0 < ma.frozen_nbytes < m.frozen_nbytes
    capsys.readouterr()
    # the full program's initial state (npz) into the partial program, and back: refused, named
    src = out_full / "init_state.npz"
    before = src.read_bytes()
    rc = main(["export", str(out_part), "--state", str(src), "-o", str(tmp_path / "x.onnx")])
    err = capsys.readouterr().err
    assert rc == 2 and "another freeze set" in err and "this program freezes fc1.W" in err
    assert src.read_bytes() == before and not (tmp_path / "x.onnx").exists()
    rc = main(["export", str(out_full), "--state", str(out_part / "init_state.npz"), "-o",
               str(tmp_path / "y.onnx")])
    assert rc == 2 and "it freezes fc1.W" in capsys.readouterr().err


@cc
def test_checkpoint_of_another_freeze_set_is_refused_untouched(tmp_path, capsys):
    from mnist_like import write_mnist_like
    data = write_mnist_like(tmp_path / "data", 64, 16, 0)
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["compile", "tfc", "--batch", "8", "--train-from", "fc3", "-o", str(a)]) == 0
    assert main(["compile", "tfc", "--batch", "8", "--train", "bn", "-o", str(b)]) == 0
    assert main(["run", str(a), "--data", "mnist", "--data-dir", str(data), "--steps", "2"]) == 0
    ck = a / "state.bin"
    before = ck.read_bytes()
    capsys.readouterr()
    rc = main(["run", str(b), "--data", "mnist", "--data-dir", str(data), "--steps", "3",
               "--resume", str(ck)])
    err = capsys.readouterr().err
    assert rc == 2 and "another compiled model" in err and "freeze set" in err
    assert ck.read_bytes() == before and not (b / "state.bin").exists()
    # the run of `a` kept its frozen weights and trained the rest
    from bnnc.compiler.export import load_state_npz
    from bnnc.runtime.outdir import read_compiled
    _, g, cfg = read_compiled(a)
    init, final = (load_state_npz(a / f, g, cfg) for f in ("init_state.npz", "final_state.npz"))
    for n in cfg.frozen:
        np.testing.assert_array_equal(final[n], init[n])
    assert not np.array_equal(final["fc4.W"], init["fc4.W"])


@cc
def test_export_of_a_partially_trained_state_scores_like_the_reference(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from bnnc.compiler.export import export_onnx
    g = load_graph("tfc")
    cfg = _cfg(g, batch=8, train_from="fc3")
    st = ref.init_state(g, cfg)
    x, y = sample_batch(g, 8, seed=1)
    st, _ = ref.train_step(g, cfg, st, x, y)
    model = export_onnx(g, cfg, st.tensors)
    sess = ort.InferenceSession(model.SerializeToString())
    xe, _ = sample_batch(g, 32, seed=2)
    got = sess.run(None, {sess.get_inputs()[0].name: xe})[0]
    np.testing.assert_allclose(got, ref.predict(g, cfg, st, xe), atol=1e-5)


# --------------------------------------------------------------------------------------------------
# bare metal: flash, budget, --fit

def _m4(ram):
    return dataclasses.replace(load_target("cortex-m4"), ram=ram)


def test_budget_keeps_frozen_parameters_out_of_ram():
    g = load_graph("tfc")
    s = build_schedule(g, _cfg(g, batch=8, train_from="fc3"))
    live, plan = plan_schedule(s, align=8)
    rep = budget_report(s, plan, _m4(256 * KIB), liveness=live)
    ram = {c.what: c.nbytes for c in rep.ram}
    flash = {c.what: c.nbytes for c in rep.flash}
    assert not any("frozen" in w for w in ram)
    assert flash["frozen parameters (in the start-state blob, read in place)"] == \
        plan.frozen_nbytes
    state_ram = sum(n for w, n in ram.items() if "(state)" in w or w.startswith("state header"))
    assert state_ram == 16 + (plan.frozen_offset // 8 + 1) * 8


def test_fit_picks_the_deepest_suffix_and_the_largest_batch_that_fit():
    g = load_graph("tfc")
    tgt = _m4(64 * KIB)
    fit = fit_budget(g, make_config("proposed", batch=32), tgt)
    rows = fit.rows
    assert [r.train_from for r in rows] == [None, "fc2", "fc3", "fc4"]
    c = fit.config
    row = rows[fit.chosen]
    assert row.batch == c.batch and 2 <= c.batch <= 32
    assert c.frozen == resolve_frozen(g, train_from=row.train_from, bn="l1")
    # the choice fits (a real plan), every deeper suffix does not at any batch
    s = build_schedule(g, c)
    assert budget_report(s, plan_schedule(s, align=tgt.align)[1], tgt).fits
    assert fit.chosen > 0 and all(r.batch is None for r in rows[:fit.chosen])
    # the batch is the largest: one more does not fit
    s2 = build_schedule(g, dataclasses.replace(c, batch=c.batch + 1))
    assert c.batch == 32 or not budget_report(s2, plan_schedule(s2, align=tgt.align)[1],
                                              tgt).fits
    assert "<- chosen" in fit.format().splitlines()[2 + fit.chosen]
    # with room for everything, everything trains at the batch asked
    big = fit_budget(g, make_config("proposed", batch=16), _m4(1024 * KIB))
    assert big.chosen == 0 and big.config.frozen == () and big.config.batch == 16
    # a batch floor moves the choice to a shallower suffix
    floor = fit_budget(g, make_config("proposed", batch=32), tgt, min_batch=c.batch + 1)
    assert floor.chosen > fit.chosen and floor.config.batch > c.batch


def test_fit_cli_prints_the_choice_and_refuses_what_cannot_fit(tmp_path, capsys):
    rc = main(["compile", "tfc", "--target", "cortex-m4", "--ram", "64K", "--batch", "32",
               "--fit", "-o", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert rc == 0 and "<- chosen" in out and "chosen: --train-from" in out
    m = read_manifest(tmp_path / "o")
    assert m.frozen and 2 <= m.batch <= 32
    assert main(["compile", "tfc", "--target", "cortex-m4", "--ram", "16K", "--fit", "-o",
                 str(tmp_path / "p")]) == 2
    assert "no trainable suffix fits" in capsys.readouterr().err
    assert main(["compile", "tfc", "--fit", "--train", "bn", "--target", "cortex-m4", "-o",
                 str(tmp_path / "q")]) == 2
    assert main(["compile", "tfc", "--fit", "-o", str(tmp_path / "r")]) == 2
    capsys.readouterr()
    # a program that does not fit points at --fit
    assert main(["compile", "tfc", "--target", "cortex-m4", "--ram", "64K", "--batch", "32",
                 "-o", str(tmp_path / "s")]) == 2
    assert "--fit (fine-tuning" in capsys.readouterr().err


@arm
@cc
def test_m4_reads_frozen_weights_from_flash_and_trains_like_the_host(tmp_path):
    from bnnc.compiler.pipeline import compile_to_c
    from bnnc.runtime import baremetal, packed
    from bnnc.runtime.model_source import model_bytes
    from bnnc.runtime.outdir import write_run_inputs
    from bnnc.runtime.state_blob import read_state_blob, state_values_f32
    from bnnc.runtime.programs import LocalRunner, build_trainer
    g = load_graph("tfc")
    cfg = _cfg(g, batch=8, train_from="fc3")
    out = tmp_path / "m4"
    tgt = _m4(128 * KIB)
    c = compile_to_c(g, cfg, tgt, out, command="test")
    write_run_inputs(out, g, cfg, model_bytes("tfc"))
    elf = baremetal.build_elf(out)
    # RAM (arm-none-eabi-size) is the budget's, which has no frozen byte in it
    rep = budget_report(c.schedule, c.plan, tgt, liveness=c.liveness)
    assert elf.ram_nbytes <= 128 * KIB and 0 <= rep.ram_nbytes - elf.ram_nbytes <= 64
    assert c.plan.frozen_nbytes > 7000            # fc1.W alone: 784 x 64 bits
    rng = np.random.default_rng(0)
    x = rng.integers(-128, 128, (64, 784)).astype(np.float32) / 128
    y = rng.integers(0, 10, 64)
    packed.pack(tmp_path / "train.bnnd", x, y, 10)
    blob = baremetal.start_state_blob(out)
    res = baremetal.run(out, train=tmp_path / "train.bnnd", start_blob=blob, steps=4,
                        log_every=1, checkpoint=True, timeout=300)
    assert res.returncode == 0, (res.stderr, res.events)
    losses = [e["loss"] for e in res.events if e["event"] == "step"]
    (tmp_path / "ck.bin").write_bytes(res.checkpoint)
    (tmp_path / "start.bin").write_bytes(blob)
    m = read_manifest(out)
    start = read_state_blob(tmp_path / "start.bin", m).tensors
    after = read_state_blob(tmp_path / "ck.bin", m)
    assert after.step == 4
    # streamed from flash into the checkpoint, with the prefix BNs' constant statistics
    for n in cfg.frozen + ("bn1.running_mean", "bn2.running_psi"):
        np.testing.assert_array_equal(after.tensors[n], start[n])
    assert not np.array_equal(after.tensors["bn3.running_mean"], start["bn3.running_mean"])
    assert not np.array_equal(after.tensors["fc3.W"], start["fc3.W"])
    # without the start state in flash there are no frozen weights: refused, not garbage
    bare = baremetal.run(out, train=tmp_path / "train.bnnd", steps=1, timeout=300)
    assert bare.returncode != 0 and "--blob" in bare.error()
    # the host's standalone trainer (frozen weights in RAM) on the same batches: same losses
    host = tmp_path / "host"
    compile_to_c(g, cfg, load_target("host"), host)
    (tmp_path / "init.f32").write_bytes(state_values_f32(read_manifest(host), start))
    r = LocalRunner(load_target("host")).run(
        build_trainer(host), ["--train", str(tmp_path / "train.bnnd"), "--init",
                              str(tmp_path / "init.f32"), "--steps", "4", "--log-every", "1"])
    np.testing.assert_allclose(losses, [e["loss"] for e in r.events if e["event"] == "step"],
                               rtol=1e-5)
    # every weight frozen (TinyTL): the flash build has no weight to initialize, and builds
    bn_only = tmp_path / "bn"
    compile_to_c(g, _cfg(g, batch=8, train="bn"), tgt, bn_only, command="test")
    assert baremetal.build_elf(bn_only).ram_nbytes <= 128 * KIB


def test_an_input_scaling_overwrites_the_arena_copy_of_the_batch_not_the_callers():
    """Brevitas' TFC starts with an input AFFINE: in place over the arena's input copy (one
    batch-sized buffer, not two), never over the caller's buffers (io="caller")."""
    from bnnc.compiler.liveness import compute_liveness
    g = tiny_mlp()
    s = build_schedule(g, make_config("proposed", batch=8))
    first = s.steps[0]
    assert first.layer == "affine0" and ("affine0.out", "input") in first.inplace
    arena = compute_liveness(s, io="arena")
    assert arena.buffer_of["affine0.out"] == arena.buffer_of["input"]
    caller = compute_liveness(s, io="caller")
    assert caller.buffer_of["affine0.out"] != caller.buffer_of["input"]


@pytest.mark.parametrize("name", ["mlp", "convnet", "residual", "bireal", "brevitas_like",
                                  "grouped"])
@pytest.mark.parametrize("algorithm", ["standard", "proposed"])
@pytest.mark.parametrize("how", ["suffix", "bn", "first_and_last"])
def test_schedule_invariants_hold_for_every_graph_and_freeze_set(name, algorithm, how):
    """tests/test_schedule.py's invariants (state = compiler.state's, every trained parameter
    updated once after its gradient, nothing unused, SAVED/GRAD roles) under partial training,
    and no backward step of a layer the backward never reaches."""
    import test_schedule as ts
    from bnnc.compiler.ops import needs_grad
    g = ts.GRAPHS[name]()
    weights = [lay.name for lay in g.layers if "W" in lay.params]
    spec = {"suffix": dict(train_from=weights[len(weights) // 2]), "bn": dict(train="bn"),
            "first_and_last": dict(train=f"{weights[0]},{weights[-1]}")}[how]
    cfg = make_config(algorithm, batch=ts.B, frozen_bn="running")
    try:
        cfg = dataclasses.replace(cfg, frozen=resolve_frozen(g, bn=cfg.bn, **spec))
        check_config_for_graph(g, cfg)
    except ConfigError:
        pytest.skip(f"{name}: {how} leaves nothing to train")
    s = build_schedule(g, cfg)
    ts._check_invariants(s, g, cfg)
    ng = needs_grad(g, cfg)
    for st in s.steps:
        if st.phase in (Phase.BACKWARD, Phase.UPDATE) and st.layer:
            assert ng[st.layer], (st.kernel.name, st.layer)
    # frozen: the freeze set, plus the running statistics of the BNs that run in inference mode
    # (exactly those without a gradient), which write nothing but their output
    evals = {st.layer for st in s.steps if st.kernel.name.endswith("_eval")}
    assert evals == {lay.name for lay in g.layers
                     if lay.kind.value == "batchnorm" and not ng[lay.name]}
    for st in s.steps:
        if st.layer in evals:
            assert st.kernel.name.endswith("_eval") and len(st.outputs) == 1
    assert {t.name for t in s.tensors.values() if t.role is Role.FROZEN} == {
        f for f in cfg.frozen if f in s.tensors} | {
        t for t in s.tensors if t.split(".")[0] in evals and ".running_" in t}
