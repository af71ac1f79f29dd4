"""Score an ONNX or QONNX model file in onnxruntime on a bnnc dataset, with the input preprocessing
the file records: a check of bnnc's numbers by a runtime that shares no code with bnnc's kernels.

    python scripts/ort_eval.py tfc.onnx --data mnist            # a Brevitas export (QONNX)
    python scripts/ort_eval.py tfc_finetuned.onnx --data mnist  # a `bnnc export`
    python scripts/ort_eval.py tfc.onnx --data mnist --compare step0.npy   # vs `bnnc eval --predictions`
    python scripts/ort_eval.py model.onnx --data mnist --preprocess unit

The examples of the split are read, fitted and mapped to model inputs exactly as `bnnc eval` does
(runtime/datasets.py `open_data` with `--fit auto`, and the model's preprocessing table,
compiler/preprocess.py): `--preprocess` when given, else the file's ONNX metadata `bnnc.preprocess` (Brevitas files
written by scripts/brevitas_mnist.py record `unit`, `bnnc export` records what the program was
compiled with), else bnnc's default `symmetric`. Prints the top-1 accuracy (the first
maximum wins, as in bnnc) and, with `--compare FILE.npy` (what `bnnc eval --predictions` wrote),
how many examples onnxruntime predicts differently.

QONNX's `BipolarQuant` (a custom op onnxruntime does not have) is rewritten as the standard ONNX it
stands for (`ort_runnable`); nothing else in the file changes. A graph whose input has a fixed
batch of 1 (Brevitas' export) is run one example at a time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from bnnc.compiler.preprocess import DEFAULT, from_model, parse_preprocess
from bnnc.runtime.datasets import DataRequest, open_data


def ort_runnable(model):
    """The QONNX model with each `BipolarQuant(x, s)` (a QONNX custom op onnxruntime does not
    have) spelled in standard ONNX as QONNX defines it: `Where(x >= 0, s, -s)`. Nothing else
    changes."""
    import onnx
    from onnx import helper
    m = onnx.ModelProto()
    m.CopyFrom(model)
    nodes = []
    zero = helper.make_tensor("bq.zero", onnx.TensorProto.FLOAT, [], [0.0])
    m.graph.initializer.append(zero)
    for i, n in enumerate(m.graph.node):
        if n.op_type != "BipolarQuant":
            nodes.append(n)
            continue
        x, scale = n.input
        ge, neg = f"bq{i}.ge", f"bq{i}.neg"
        nodes += [helper.make_node("GreaterOrEqual", [x, "bq.zero"], [ge]),
                  helper.make_node("Neg", [scale], [neg]),
                  helper.make_node("Where", [ge, scale, neg], [n.output[0]])]
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    keep = [o for o in m.opset_import if o.domain in ("", "ai.onnx")]
    del m.opset_import[:]
    m.opset_import.extend(keep)
    return m


def ort_logits(path: Path, x: np.ndarray, *, batch: int = 1000) -> np.ndarray:
    """The file's outputs under onnxruntime (`ort_runnable`) for model inputs `x` (float32, N x
    the per-sample input shape), in batches of `batch`, or one at a time when the graph's input
    batch is fixed at 1 (Brevitas hard-codes it in its Reshape)."""
    import onnx
    import onnxruntime as ort
    model = onnx.load(str(path))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3          # Brevitas lists its initializers as graph inputs too
    sess = ort.InferenceSession(ort_runnable(model).SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    if inp.shape and inp.shape[0] == 1:
        batch = 1
    x = np.asarray(x, np.float32)
    return np.concatenate([sess.run(None, {inp.name: x[i:i + batch]})[0]
                           for i in range(0, len(x), batch)])


def model_io(model) -> tuple[tuple[int, ...], int]:
    """(per-sample input shape, number of classes) of an onnx.ModelProto's first input/output."""
    def dims(vi):
        return [d.dim_value if d.HasField("dim_value") else None
                for d in vi.type.tensor_type.shape.dim]
    init = {t.name for t in model.graph.initializer}
    inp = next(i for i in model.graph.input if i.name not in init)
    shape, out = dims(inp)[1:], dims(model.graph.output[0])
    if None in shape or not out or out[-1] is None:
        raise SystemExit(f"error: the model's input {shape} or output {out} has a symbolic size "
                         "other than the batch")
    return tuple(shape), int(out[-1])


def main(argv=None) -> int:
    import onnx
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--data", default="mnist", help="a bnnc --data spec [default: mnist]")
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--split", choices=("test", "train"), default="test")
    ap.add_argument("--preprocess", default=None, metavar="SPEC",
                    help="[default: the file's metadata, else symmetric]")
    ap.add_argument("--compare", type=Path, default=None, metavar="FILE.npy",
                    help="count the examples whose predicted class differs from this file's "
                         "(`bnnc eval --predictions FILE.npy`)")
    a = ap.parse_args(argv)
    model = onnx.load(str(a.model))
    recorded = from_model(model)
    if a.preprocess is not None:
        pre, how = parse_preprocess(a.preprocess), "--preprocess"
    elif recorded is not None:
        pre, how = recorded, "the file's metadata"
    else:
        pre, how = DEFAULT, "bnnc's default; the file records none"
    shape, classes = model_io(model)
    data = open_data(DataRequest(a.data, a.data_dir), shape, classes)
    x, y = data.arrays(a.split, pre)
    other = None if a.compare is None else np.load(a.compare)
    if other is not None and other.shape != y.shape:
        raise SystemExit(f"error: {a.compare} holds {other.shape} predictions, the split has "
                         f"{len(y)} examples")
    pred = ort_logits(a.model, x).argmax(1)
    print(f"onnxruntime on {a.model}: {data.name} {a.split}, {len(y)} examples, inputs "
          f"{pre.describe()} ({how})")
    print(f"accuracy {100 * float(np.mean(pred == y)):.2f} %")
    if other is not None:
        print(f"{int(np.sum(pred != other)):,} of {len(y):,} predictions differ from {a.compare}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
