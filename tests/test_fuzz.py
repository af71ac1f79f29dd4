"""Hostile inputs for the importer and the compile pipeline (the engine is scripts/fuzz.py).

The property (see scripts/fuzz.py): for any file, `load_model` and then, per algorithm,
`build_schedule` + `plan_schedule` either succeed with every verifier passing, or raise a
`BnncError` whose message is one printable line naming the file / model / layer. Each example runs
in a forked child with a wall-clock and an address-space limit, so a hang or a huge allocation
fails the test instead of stalling it. A few examples also emit their C and have the host compiler
check it (`emit_c`). Hypothesis runs derandomized (same examples on every run): this is the CI
budget; `python scripts/fuzz.py --examples 20000 --seconds 2700` (add `--emit-c` to compile the C
too) is the long local mode. The corpus in tests/fuzz_corpus replays every bug found so far with
its exact expected outcome (README.md there).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bnnc.cli import main as cli_main
from bnnc.compiler import frontend, ir
from bnnc.compiler.config import make_config
from bnnc.compiler.errors import ModelError
from bnnc.compiler.frontend import INTERNAL_ERROR, load_model, printable, sanitize_name
from bnnc.compiler.planner import plan_schedule
from bnnc.compiler.schedule import build_schedule

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "tests" / "fuzz_corpus"
TIMEOUT_S = 30.0       # per example; the slowest base model takes well under 1 s


def _load_fuzz():
    spec = importlib.util.spec_from_file_location("bnnc_fuzz", REPO / "scripts" / "fuzz.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


fuzz = _load_fuzz()
BASES = fuzz.base_models()
BASE_NAMES = sorted(BASES)
SMALL = [b for b in BASE_NAMES if b.startswith("small:")]
FUZZ_SETTINGS = dict(derandomize=True, database=None, deadline=None,
                     suppress_health_check=list(HealthCheck))


def _assert_passes(out, what: str) -> None:
    assert not out.failed, f"{what}: {out.label}: {out.message}"


# ---------------------------------------------------------------------------------------------
# the harness itself can fail


def test_every_base_model_imports_and_plans():
    assert len(SMALL) == 5 and "zoo:tfc" in BASES and "zoo:cnv" in BASES
    for name in BASE_NAMES:
        out = fuzz.run_isolated(BASES[name], timeout_s=TIMEOUT_S)
        # small:nhwc has no binary layer: standard plans it, the proposed algorithm refuses
        expected = "rejected:proposed:ConfigError" if name == "small:nhwc" else "ok"
        assert out.label == expected, (name, out)


def test_harness_reports_a_leaked_exception(monkeypatch):
    def boom(path):
        raise KeyError("leaked")

    monkeypatch.setattr(fuzz, "load_model", boom)
    out = fuzz.check_bytes(BASES["small:mlp"])
    assert (out.kind, out.cls) == ("crash", "KeyError")


def test_internal_errors_are_bnnc_errors_marked_as_bugs(monkeypatch, tmp_path):
    def broken(self):
        raise IndexError("an importer bug")

    monkeypatch.setattr(frontend._Importer, "_run", broken)
    path = tmp_path / "m.onnx"
    path.write_bytes(BASES["small:mlp"])
    with pytest.raises(ModelError, match=re.escape(INTERNAL_ERROR)) as e:
        load_model(path)
    assert "m.onnx" in e.value.message and isinstance(e.value.__cause__, IndexError)
    out = fuzz.check_bytes(BASES["small:mlp"])
    assert (out.kind, out.cls) == ("crash", "IndexError")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_harness_catches_hangs_signals_and_memory(monkeypatch):
    monkeypatch.setattr(fuzz, "check_bytes", lambda data, filename, **kw: time.sleep(60))
    t0 = time.monotonic()
    assert fuzz.run_isolated(b"", timeout_s=0.5).kind == "timeout"
    assert time.monotonic() - t0 < 30
    monkeypatch.setattr(fuzz, "check_bytes",
                        lambda data, filename, **kw: os.kill(os.getpid(), signal.SIGKILL))
    out = fuzz.run_isolated(b"")
    assert (out.kind, out.cls) == ("signal", "SIGKILL")
    # 2 GiB more than the parent is over the child's limit (parent + 1 GiB)
    monkeypatch.setattr(fuzz, "check_bytes",
                        lambda data, filename, **kw: np.ones(2**31, np.uint8).sum())
    out = fuzz.run_isolated(b"")
    assert (out.kind, out.cls) == ("crash", "MemoryError")


def test_message_check_rejects_multiline_long_and_placeless_messages():
    assert fuzz.message_problem(ModelError("f.onnx: a\nb"), ("f.onnx",))
    assert fuzz.message_problem(ModelError("f.onnx: " + "x" * 5000), ("f.onnx",))
    assert fuzz.message_problem(ModelError("something failed"), ("f.onnx",))
    assert fuzz.message_problem(ModelError("f.onnx: ok", hint="a\x00"), ("f.onnx",))
    assert fuzz.message_problem(ModelError("f.onnx: bad node", hint="do this"), ("f.onnx",)) \
        is None


def test_printable_escapes_and_cuts_names():
    assert printable("a\nb\x00\x1b[31m") == "a\\nb\\x00\\x1b[31m"
    assert printable(b"\xff/x") == "\ufffd/x"
    assert printable("é日本") == "é日本"
    cut = printable("x" * 1000)
    assert len(cut) == 80 and cut.endswith("...")


def test_schedule_rejects_a_bias_of_the_wrong_length():
    """Graph.verify() does not check a bias's length; the schedule must, before C reads past it."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3)).astype(np.float32)
    for b_len, ok in ((3, True), (5, False)):
        fc = ir.Layer("fc1", ir.LayerKind.DENSE, (ir.INPUT,), (3,), {"binary": False},
                      {"W": w, "b": np.zeros(b_len, np.float32)})
        g = ir.Graph("m", (4,), (fc,))
        g.verify()
        cfg = make_config("standard", batch=2)
        if ok:
            build_schedule(g, cfg)
        else:
            with pytest.raises(ModelError, match=r"layer 'fc1'.*b \[5\] for 3 output channels"):
                build_schedule(g, cfg)


# ---------------------------------------------------------------------------------------------
# properties


@settings(max_examples=60, **FUZZ_SETTINGS)
@given(base=st.sampled_from(BASE_NAMES), mutator=st.sampled_from(sorted(fuzz.BYTE_MUTATORS)),
       rng=st.randoms(use_true_random=False))
def test_mutated_bytes_are_imported_or_rejected_cleanly(base, mutator, rng):
    data = fuzz.mutate(rng, BASES[base], mutator)
    _assert_passes(fuzz.run_isolated(data, timeout_s=TIMEOUT_S), f"{base} {mutator}")


@settings(max_examples=160, **FUZZ_SETTINGS)
@given(base=st.sampled_from(BASE_NAMES), mutator=st.sampled_from(sorted(fuzz.MODEL_MUTATORS)),
       rng=st.randoms(use_true_random=False))
def test_mutated_models_are_imported_or_rejected_cleanly(base, mutator, rng):
    data = fuzz.mutate(rng, BASES[base], mutator)
    _assert_passes(fuzz.run_isolated(data, timeout_s=TIMEOUT_S), f"{base} {mutator}")


# ---------------------------------------------------------------------------------------------
# the emitted C compiles (scripts/fuzz.py --emit-c; a few examples here, thousands in the long run)


def test_harness_reports_generated_c_that_does_not_compile(monkeypatch):
    real = fuzz.emit_c_sources

    def broken(sched, plan, target, out_dir):
        em = real(sched, plan, target, out_dir)
        with open(em.source, "a") as f:
            f.write("\nint broken = ;\n")
        return em

    monkeypatch.setattr(fuzz, "emit_c_sources", broken)
    out = fuzz.check_bytes(BASES["small:mlp"], emit_c=True)
    assert out.label == "bad-c:c-standard:cc" and "error" in out.message, out


@pytest.mark.parametrize("base", ["small:qonnx", "small:nhwc", "zoo:cnv"])
def test_base_models_emit_c_that_compiles(base):
    """Residual, GAP and QONNX quantizers; ReLU and a real-only graph (standard); conv/pool."""
    out = fuzz.run_isolated(BASES[base], timeout_s=120, emit_c=True)
    expected = "rejected:proposed:ConfigError" if base == "small:nhwc" else "ok"
    assert out.label == expected, out


# mutators whose results often still plan (the C of hostile names, odd values, extra attributes)
_C_MUTATORS = ["names", "init_values", "scalar_values", "attr_many", "attr", "insert_node"]


@settings(max_examples=6, **FUZZ_SETTINGS)
@given(base=st.sampled_from(SMALL + ["zoo:cnv"]), mutator=st.sampled_from(_C_MUTATORS),
       rng=st.randoms(use_true_random=False))
def test_mutated_models_that_plan_emit_c_that_compiles(base, mutator, rng):
    data = fuzz.mutate(rng, BASES[base], mutator)
    _assert_passes(fuzz.run_isolated(data, timeout_s=120, emit_c=True), f"{base} {mutator}")


def _layers(g):
    return [(lay.name, lay.kind, lay.inputs, lay.shape, dict(lay.attrs),
             {k: v.tobytes() for k, v in lay.params.items()}) for lay in g.layers]


_NAME_TEXT = st.one_of(st.sampled_from(fuzz.HOSTILE_NAMES), st.text(max_size=40))


@settings(max_examples=30, **FUZZ_SETTINGS)
@given(base=st.sampled_from(SMALL + ["zoo:cnv"]), graph_name=_NAME_TEXT,
       names=st.lists(_NAME_TEXT, min_size=1, max_size=8))
def test_identifiers_never_come_from_onnx_names(base, graph_name, names):
    """Renaming every node and tensor (hostile text, kept unique) changes nothing bnnc names:
    layer names, graph name rules, schedule tensor names."""
    plain = onnx.load_model_from_string(BASES[base])
    m = onnx.load_model_from_string(BASES[base])
    tensors = sorted({s for n in m.graph.node for s in (*n.input, *n.output) if s}
                     | {i.name for i in m.graph.input} | {t.name for t in m.graph.initializer})
    for k, t in enumerate(tensors):
        fuzz._rename_tensor(m, t, f"{names[k % len(names)]}#{k}")
    for k, n in enumerate(m.graph.node):
        n.name = names[(k + 1) % len(names)]
    m.graph.name = graph_name
    g0, g1 = load_model(plain, name="m"), load_model(m)
    assert re.fullmatch(r"[a-z][a-z0-9_]*", g1.name) and g1.name == sanitize_name(graph_name)
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*", lay.name) for lay in g1.layers)
    assert _layers(g1) == _layers(g0)
    cfg = make_config("standard", batch=2)
    t0 = list(build_schedule(g0, cfg).tensors)
    t1 = list(build_schedule(g1, cfg).tensors)
    assert t1 == t0 and all(fuzz.TENSOR_NAME.match(t) for t in t1)


@settings(max_examples=200, **FUZZ_SETTINGS)
@given(st.text())
def test_sanitize_name_always_gives_a_c_identifier(text):
    assert re.fullmatch(r"[a-z][a-z0-9_]*", sanitize_name(text))


def test_generated_c_holds_no_onnx_names(tmp_path):
    """The C side trusts that bnnc's identifiers are its own: no ONNX name reaches a .c/.h."""
    codegen = pytest.importorskip("bnnc.compiler.codegen")
    m = onnx.load(str(CORPUS / "names_hostile.onnx"))
    raw = {n.name for n in m.graph.node} | {m.graph.name} | \
        {s for n in m.graph.node for s in (*n.input, *n.output)}
    hostile = sorted(r for r in raw if not re.fullmatch(r"[A-Za-z0-9_]*", r))
    assert len(hostile) >= 10
    g = load_model(m)
    assert g.name == "graph_name"
    for alg in fuzz.ALGORITHMS:
        sched = build_schedule(g, make_config(alg, batch=2))
        _, plan = plan_schedule(sched)
        out = tmp_path / alg
        codegen.emit_c(sched, plan, codegen.load_target("host"), out)
        sources = [p for p in out.iterdir() if p.suffix in (".c", ".h")]
        assert len(sources) >= 2
        for p in sources:
            text = p.read_text(encoding="utf-8", errors="replace")
            leaked = [h for h in hostile if h in text]
            assert not leaked, f"{p.name} contains ONNX names {leaked}"
            assert not re.search(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u202e]", text)


# ---------------------------------------------------------------------------------------------
# regression corpus


def _corpus_rows() -> list[tuple[str, str, str]]:
    rows = []
    for line in (CORPUS / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 4:
            rows.append(tuple(c.strip("`") for c in cells[:3]))
    return rows


CORPUS_ROWS = _corpus_rows()


def test_corpus_readme_lists_every_file():
    listed = {r[0] for r in CORPUS_ROWS}
    present = {p.name for p in CORPUS.iterdir() if p.name != "README.md"}
    assert listed == present and len(listed) == len(CORPUS_ROWS) >= 60


@pytest.mark.parametrize("fname,outcome,text", CORPUS_ROWS, ids=[r[0] for r in CORPUS_ROWS])
def test_corpus_case(fname, outcome, text):
    out = fuzz.run_isolated((CORPUS / fname).read_bytes(), timeout_s=TIMEOUT_S, filename=fname)
    assert out.label == outcome, out
    assert text.replace("\\\\", "\\") in out.message, out.message


# ---------------------------------------------------------------------------------------------
# the CLI: one error line, exit 2, never a traceback


@pytest.mark.parametrize("fname,outcome,text", CORPUS_ROWS, ids=[r[0] for r in CORPUS_ROWS])
def test_cli_info_on_corpus(fname, outcome, text, capsys):
    rc = cli_main(["info", str(CORPUS / fname)])
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err + cap.out
    if outcome.startswith("rejected:load"):
        lines = cap.err.splitlines()
        assert rc == 2 and cap.out == ""
        assert lines[0].startswith("error: ") and all(ln.startswith("hint: ") for ln in lines[1:])
        assert len(lines) <= 2
    else:
        assert rc == 0 and cap.err == ""
        assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", cap.out), "raw control characters"


def _bnnc() -> list[str]:
    exe = shutil.which("bnnc")
    return [exe] if exe else [sys.executable, "-c", "from bnnc.cli import run; run()"]


@pytest.mark.parametrize("fname", ["garbage.bin", "op_type_unprintable.onnx",
                                   "bomb_constant_of_shape.onnx", "names_hostile.onnx"])
def test_bnnc_info_subprocess(fname):
    r = subprocess.run(_bnnc() + ["info", str(CORPUS / fname)], capture_output=True, text=True,
                       timeout=120, stdin=subprocess.DEVNULL)
    assert "Traceback" not in r.stderr + r.stdout
    if fname == "names_hostile.onnx":
        assert r.returncode == 0, r.stderr
        assert "\\x00" in r.stdout and "\x00" not in r.stdout
    else:
        lines = r.stderr.splitlines()
        assert r.returncode == 2 and len(lines) in (1, 2) and lines[0].startswith("error: ")
