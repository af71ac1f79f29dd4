"""benchmarks/bench.py: the table's structure and the PyTorch network it times (never a timing).

- one `--quick` run on TFC (host and rss parts, a few steps): every row present with positive
  numbers, the ratio column = PyTorch / bnnc, the Markdown file = the JSON document rendered, the
  machine facts present; the first-step losses of the C (standard) and of PyTorch agree, which
  shows both train the same network from the same parameters; the C trainer's peak RSS covers its
  planned arena + state but not the benchmark process's own memory;
- the benchmark's float32 PyTorch network (tests/torch_oracle.py's `TorchNet` under the
  benchmark's own training step) against the oracle's float64 step over three steps: losses and
  parameters;
- --models parsing and the one-line errors of the command.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from torch_oracle import TorchOracle

from bnnc.compiler.config import make_config
from bnnc.compiler.errors import ConfigError

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bnnc_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bnnc_bench"] = mod      # dataclasses look their module up while decorating
    spec.loader.exec_module(mod)
    return mod


bench = _load_bench()


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    stem = tmp_path_factory.mktemp("bench") / "quick"
    res = subprocess.run([sys.executable, str(BENCH), "--quick", "--only", "host,rss", "--models",
                          "tfc:20", "--steps", "3", "--warmup", "1", "--rss-steps", "1",
                          "--output", str(stem)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res, json.loads(stem.with_suffix(".json").read_text()), stem.with_suffix(".md")


def _number(cell: str) -> float | None:
    cell = cell.strip()
    return None if cell == "–" else float(cell.replace(",", "").rstrip("×"))


def test_quick_run_has_every_row_with_positive_numbers(quick):
    _, doc, _ = quick
    rows = {(r["metric"], r["algorithm"]): r for r in doc["rows"]}
    assert len(rows) == len(doc["rows"]) == 6
    for a in ("standard", "proposed"):
        step, rss, plan = (rows[m, a] for m in (bench.STEP_MS, bench.PEAK_RSS, bench.PLANNED))
        for r in (step, rss, plan):
            assert (r["model"], r["batch"]) == ("tfc", 20)
            assert r["bnnc"] > 0
        for r in (step, rss):
            assert r["pytorch"] > 0
            assert r["ratio"] == pytest.approx(r["pytorch"] / r["bnnc"])
        assert plan["pytorch"] is None and plan["ratio"] is None
        m = re.fullmatch(r"arena ([0-9,]+) B \+ state ([0-9,]+) B", plan["detail"])
        planned = sum(int(g.replace(",", "")) for g in m.groups())
        assert plan["bnnc"] == pytest.approx(planned / 2**20)
        # the trainer's static arena and state are all touched; the parent's ~200+ MiB of Python
        # and PyTorch must not be charged to it (Python's vfork makes that easy to get wrong)
        assert planned / 2**20 < rss["bnnc"] < planned / 2**20 + 64
    assert doc["settings"]["steps"] == 3 and doc["settings"]["warmup"] == 1


def test_c_and_pytorch_start_from_the_same_network(quick):
    _, doc, _ = quick
    std = next(r for r in doc["rows"] if r["metric"] == bench.STEP_MS and
               r["algorithm"] == "standard")
    c, t = map(float, re.search(r"first-step loss C ([0-9.]+), PyTorch ([0-9.]+)",
                                std["detail"]).groups())
    assert c == pytest.approx(t, rel=1e-4)
    assert 1.0 < c < 5.0          # ln 10 = 2.3 for an untrained 10-class net, not 0 or NaN


def test_markdown_is_the_json_rendered(quick):
    res, doc, md_path = quick
    md = md_path.read_text()
    assert md == bench.render_markdown(doc)
    assert res.stdout.strip() == md.strip()
    table = [ln for ln in md.splitlines() if ln.startswith("| ")]
    head = [c.strip() for c in table[0].strip("|").split("|")]
    assert head == list(bench.COLUMNS) == doc["columns"]
    body = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in table[1:]]
    assert len(body) == len(doc["rows"])
    for cells, r in zip(body, doc["rows"]):
        assert cells[:4] == [r["metric"], r["model"], str(r["batch"]), r["algorithm"]]
        for cell, v in zip(cells[4:7], (r["bnnc"], r["pytorch"], r["ratio"])):
            got = _number(cell)
            assert (got is None) == (v is None)
            if v is not None:      # the cell shows the value rounded to 2+ significant digits
                assert got == pytest.approx(v, rel=0.01, abs=0.006)
        assert cells[7] == r["detail"]


def test_machine_facts_are_recorded(quick):
    _, doc, md_path = quick
    m = doc["machine"]
    for key in ("cpu", "cores", "python", "numpy", "torch", "cc", "date", "loadavg_start",
                "loadavg_end"):
        assert m[key], key
    assert m["torch"] == torch.__version__ and m["torch_threads"] == 1
    assert m["cpu"] in md_path.read_text() and m["date"] in md_path.read_text()


SHARED_TFC = Path("/work/shared/models/brevitas/tfc_1w1a_qonnx_ts_clean.onnx")


@pytest.mark.parametrize("spec, batch, dtype", [("tfc", 16, torch.float64),
                                                ("cnv@0.125", 8, torch.float64),
                                                ("binarynet@0.0625", 4, torch.float32),
                                                (str(SHARED_TFC), 16, torch.float32)])
def test_torch_network_matches_the_oracle(spec, batch, dtype):
    """Three Adam steps of bench.TorchBNN against the oracle. BinaryNet ('same' convs, max-pool
    before BN) at batch 4 puts BN outputs exactly on the STE boundary |x| = 1, and the trained
    Brevitas TFC (input scaling and TensorNorm affine layers) has BN outputs within float32
    rounding of a sign or STE decision; float32 and float64 decide those differently, so both are
    compared with the oracle run in float32."""
    if spec.endswith(".onnx"):
        if not Path(spec).is_file():
            pytest.skip(f"{spec} is not on this machine")
        from bnnc.compiler.frontend import load_model
        graph = load_model(spec)
    else:
        graph = bench.Workspace(Path("unused")).graph(bench.parse_cases(f"{spec}:{batch}")[0])
    cfg = make_config("standard", batch=batch)
    net, oracle = bench.TorchBNN(graph, cfg), TorchOracle(graph, cfg, dtype=dtype)
    x, y = bench.random_data(graph, 3 * batch, 0)
    for i in range(3):
        xb, yb = x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch]
        loss = net.step(torch.from_numpy(xb), torch.from_numpy(yb.astype(np.int64)))
        want = oracle.step(xb, yb)
        assert loss == pytest.approx(float(want["loss"]), rel=1e-5), i
    for name, p in net.params.items():
        np.testing.assert_allclose(p.detach().numpy(), want[name], rtol=0, atol=1e-5,
                                   err_msg=name)
    for name, r in net.running.items():
        # the oracle converts torch's unbiased running variance to bnnc's biased one; the
        # benchmark keeps torch's own, so compare the means only
        if name.endswith(".running_mean"):
            np.testing.assert_allclose(r.numpy(), want[name], atol=1e-5)


def test_parse_cases():
    got = bench.parse_cases("mlp:100, cnv@0.125:20,binarynet:40?")
    assert got == [bench.Case("mlp", 100), bench.Case("cnv", 20, 0.125),
                   bench.Case("binarynet", 40, 1.0, True)]
    assert [c.label for c in got] == ["mlp", "cnv@0.125", "binarynet"]
    for bad in ("mlp", "mlp:1", "nosuch:10", "cnv@2:10", "mlp:100:3", ""):
        with pytest.raises(ConfigError):
            bench.parse_cases(bad)


@pytest.mark.parametrize("argv, words", [(["--only", "gpu"], "unknown part"),
                                         (["--models", "mlp"], "NAME[@WIDTH]:BATCH")])
def test_bad_options_are_one_line_errors(argv, words, tmp_path, capsys):
    assert bench.main([*argv, "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and words in err and "hint:" in err
    assert not (tmp_path / "x.json").exists()
