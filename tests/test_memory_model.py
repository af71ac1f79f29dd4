"""The paper's spreadsheet (ALGORITHM.md §4) from layer dims written here by hand from ALGORITHM.md
§5, against the published values; then the same numbers through graphs (tests/graphs.py, zoo)."""

from __future__ import annotations

import pytest

from bnnc.compiler.errors import ConfigError
from bnnc.compiler.memory_model import SheetDims, SheetLayer, dims_from_graph, spreadsheet

L = SheetLayer

# (N_W, output channels, per-sample input elements) of every weight layer
MLP = SheetDims((L(784 * 256, 256, 784), L(256 * 256, 256, 256), L(256 * 256, 256, 256),
                 L(256 * 256, 256, 256), L(256 * 10, 10, 256)), 10)
# 'valid' 3x3 convs: 32 -> 30 -> 28, pool 14 -> 12 -> 10, pool 5 -> 3 -> 1
CNV = SheetDims((L(3 * 64 * 9, 64, 3 * 32 * 32), L(64 * 64 * 9, 64, 64 * 30 * 30),
                 L(64 * 128 * 9, 128, 64 * 14 * 14), L(128 * 128 * 9, 128, 128 * 12 * 12),
                 L(128 * 256 * 9, 256, 128 * 5 * 5), L(256 * 256 * 9, 256, 256 * 3 * 3),
                 L(256 * 512, 512, 256), L(512 * 512, 512, 512), L(512 * 10, 10, 512)), 10)
# 'same' convs at 32, 16, 8; pools after conv2, conv4, conv6
BINARYNET = SheetDims((L(3 * 128 * 9, 128, 3 * 32 * 32), L(128 * 128 * 9, 128, 128 * 32 * 32),
                       L(128 * 256 * 9, 256, 128 * 16 * 16), L(256 * 256 * 9, 256, 256 * 16 * 16),
                       L(256 * 512 * 9, 512, 256 * 8 * 8), L(512 * 512 * 9, 512, 512 * 8 * 8),
                       L(8192 * 1024, 1024, 8192), L(1024 * 1024, 1024, 1024),
                       L(1024 * 10, 10, 1024)), 10)


def test_weight_counts_match_algorithm_md():
    assert sum(x.n_weights for x in MLP.layers) == 399_872
    assert sum(x.n_weights for x in CNV.layers) == 1_542_848
    assert sum(x.n_weights for x in BINARYNET.layers) == 14_022_016


@pytest.mark.parametrize("dims,std,prop", [(MLP, 7.40, 2.56), (CNV, 105.05, 24.61),
                                           (BINARYNET, 425.31, 118.21)])
def test_published_values_at_batch_100(dims, std, prop):
    assert round(spreadsheet(dims, 100, "standard", "adam")["total"], 2) == std
    assert round(spreadsheet(dims, 100, "proposed", "adam")["total"], 2) == prop


def test_mlp_classes_by_hand():
    # MLP standard, B = 100, in bits: model 32 * (399872 + 1034); optimizer 96 * 399872;
    # activations 32 * 100 * (784 + 3*256 + 256 + 10) + 64 * 100 * 784
    sheet = spreadsheet(MLP, 100, "standard", "adam")
    mib = 8 * 2 ** 20
    assert sheet["model"] == 32 * 400_906 / mib
    assert sheet["optimizer"] == 96 * 399_872 / mib
    assert sheet["activation"] == (32 * 181_800 + 64 * 78_400) / mib
    parts = sheet["model"] + sheet["optimizer"] + sheet["activation"]
    assert sheet["total"] == pytest.approx(parts)


def test_batch_sweep_and_bop():
    def ratio(b):
        return (spreadsheet(BINARYNET, b, "standard")["total"]
                / spreadsheet(BINARYNET, b, "proposed")["total"])
    assert round(ratio(10), 2) == 2.75 and round(ratio(1000), 2) == 5.23
    assert round(spreadsheet(MLP, 100, "proposed", "bop")["total"], 2) == 1.03
    # SGD keeps one moment: exactly one Adam moment less
    drop = spreadsheet(MLP, 100, "standard", "adam")["total"] - spreadsheet(MLP, 100, "standard",
                                                                            "sgd")["total"]
    assert drop == pytest.approx(32 * 399_872 / 8 / 2 ** 20)


def test_bad_arguments():
    with pytest.raises(ConfigError, match="unknown algorithm 'fast'"):
        spreadsheet(MLP, 100, "fast")
    with pytest.raises(ConfigError, match="unknown optimizer 'lion'"):
        spreadsheet(MLP, 100, "proposed", "lion")
    with pytest.raises(ConfigError, match="batch size must be a positive integer"):
        spreadsheet(MLP, 0)


def test_dims_from_hand_built_graphs():
    graphs = pytest.importorskip("graphs")   # tests/graphs.py: IR graphs built without ONNX
    assert dims_from_graph(graphs.mlp()) == MLP
    assert dims_from_graph(graphs.cnv(1)) == CNV
    assert dims_from_graph(graphs.binarynet(1)) == BINARYNET


@pytest.mark.parametrize("name,want", [("mlp", MLP), ("cnv", CNV), ("binarynet", BINARYNET)])
def test_dims_from_zoo(name, want):
    zoo = pytest.importorskip("bnnc.compiler.zoo")
    frontend = pytest.importorskip("bnnc.compiler.frontend")
    graph = frontend.load_model(zoo.build_zoo_model(name))
    assert dims_from_graph(graph) == want


def test_cli_memory_table(capsys):
    pytest.importorskip("bnnc.compiler.schedule")
    from bnnc.cli import main
    assert main(["memory", "mlp", "--batch", "100,10"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in lines if line[:1].isdigit()}
    assert rows["100"][1:4] == ["7.40", "2.56", "2.89x"]
    # B = 10: the spreadsheet by hand, in bits: standard 32 * 400906 + 96 * 399872 +
    # 10 * (32 * 1818 + 64 * 784); proposed 16 * 400906 + 33 * 399872 + 10 * (1818 + 21 * 784)
    std = (32 * 400_906 + 96 * 399_872 + 10 * (32 * 1818 + 64 * 784)) / 8 / 2 ** 20
    prop = (16 * 400_906 + 33 * 399_872 + 10 * (1818 + 21 * 784)) / 8 / 2 ** 20
    assert rows["10"][1:3] == [f"{std:.2f}", f"{prop:.2f}"]
    for row in rows.values():
        bnnc_std, bnnc_prop = float(row[4]), float(row[5])
        # the printed ratio is of the unrounded totals
        assert bnnc_prop < bnnc_std
        assert float(row[6].rstrip("x")) == pytest.approx(bnnc_std / bnnc_prop, abs=0.02)
        assert all(0.98 <= float(e) <= 1.0 for e in row[7:9])
    assert main(["memory", "mlp", "--batch", "10,x"]) == 2
    assert "give comma-separated positive integers" in capsys.readouterr().err


def test_cli_memory_no_fuse(capsys):
    """`bnnc memory --no-fuse`: the proposed plan without the memory fusions is larger (the
    conv outputs exist whole); the standard column does not change."""
    from bnnc.cli import main

    def row(*extra):
        assert main(["memory", "cnv", "--width", "0.25", "--batch", "20", *extra]) == 0
        (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("20 ")]
        return line.split()

    fused, separate = row(), row("--no-fuse")
    assert fused[4] == separate[4]
    assert float(separate[5]) > float(fused[5])
