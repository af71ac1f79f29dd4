"""A model trained outside bnnc (Brevitas, exported to QONNX): step-0 accuracy in bnnc against
onnxruntime on the source file, then one epoch of fine-tuning with bnnc's defaults, side by side
for each algorithm in one run.

    python benchmarks/pretrained_brevitas.py [--model FILE.onnx] [--algorithms standard,proposed]
                                             [--epochs 1] [--seeds 0,1,2] [--limit N]
                                             [--set lr=1e-4,state_dtype=f32]

Without --model the model is trained first (scripts/brevitas_mnist.py: TFC 1w1a, 5 epochs) and
cached in $BNNC_CACHE_DIR (or ~/.cache/bnnc)/brevitas/. For each algorithm (`bnnc compile` defaults
otherwise: batch 100, Adam, the algorithm's techniques): the emitted C for the host (cffi, the
training loop of `bnnc run`) starts from the file's trained state (`reference.init_state`), its
step-0 test accuracy and the number of test images whose top-1 differs from onnxruntime's are
printed, then each --seeds entry (batch order) fine-tunes for --epochs on the MNIST training set
and the test accuracy after it is printed.

Preprocessing: the model's contract (compiler/preprocess.py). The Brevitas file records its input
convention in its ONNX metadata (`bnnc.preprocess` = unit, u/255 in [0, 1], written by
scripts/brevitas_mnist.py), and the pixels of both the C and onnxruntime, for training and
testing, go through bnnc's table for it (`runtime/datasets.training_data`), as `bnnc compile`,
`run` and `eval` do. A file that records none (written by the script before it recorded it) is
taken as the script's convention.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

from bnnc.compiler.config import make_config
from bnnc.compiler.frontend import load_model
from bnnc.compiler.pipeline import compile_to_c
from bnnc.compiler.preprocess import from_model
from bnnc.compiler.target import load_target
from bnnc.runtime import reference as ref
from bnnc.runtime.datasets import training_data
from bnnc.runtime.host import HostProgram
from bnnc.runtime.train_loop import HostBackend, fit

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))  # not a package
import brevitas_mnist as bm  # noqa: E402


def default_model(bm) -> Path:
    base = Path(os.environ.get("BNNC_CACHE_DIR") or Path.home() / ".cache" / "bnnc")
    path = base / "brevitas" / "tfc_1w1a_mnist_5ep_seed0.onnx"
    if not path.is_file():
        print(f"training the Brevitas TFC into {path} (scripts/brevitas_mnist.py, 5 epochs)")
        r = bm.train_and_export(path, arch="tfc", epochs=5, seed=0)
        print(f"  PyTorch test accuracy {100 * r['torch_acc']:.2f} %, onnxruntime "
              f"{100 * r['ort_acc']:.2f} %")
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--algorithms", default="standard,proposed")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--seeds", default="0,1,2", help="batch orders of the fine-tuning runs")
    ap.add_argument("--limit", type=int, default=None, help="first N train/test images only")
    ap.add_argument("--set", dest="overrides", default="", metavar="K=V,...",
                    help="training options over the algorithm's defaults, e.g. lr=1e-4,bn=l2 "
                         "(compiler/config.py TrainConfig fields)")
    a = ap.parse_args(argv)
    path = a.model or default_model(bm)
    graph = load_model(path)
    # files written by scripts/brevitas_mnist.py before it recorded its convention: that convention
    pre = from_model(onnx.load(str(path))) or bm.INPUT_CONVENTION
    _, x_tr, y_tr, x_te, y_te = training_data(graph, "mnist", limit=a.limit, pre=pre)
    x_te, y_te = x_te[:a.limit], y_te[:a.limit]
    ort_pred = bm.ort_logits(path, x_te).argmax(1)
    ort_acc = float(np.mean(ort_pred == y_te))
    print(f"model {path} ({graph.name}), MNIST test {len(y_te)} images, inputs {pre.describe()}"
          + (f", options {a.overrides}" if a.overrides else ""))
    print(f"onnxruntime on the source file: {100 * ort_acc:.2f} %")
    rows = []
    overrides = dict(_parse(kv) for kv in a.overrides.split(",") if kv)
    for alg in a.algorithms.split(","):
        cfg = make_config(alg, **overrides)
        with tempfile.TemporaryDirectory(prefix="bnnc-pretrained-") as tmp:
            compile_to_c(graph, cfg, load_target("host"), Path(tmp), command="pretrained_brevitas",
                         preprocess=pre)
            prog = HostProgram(tmp, debug=False)
            init = ref.init_state(graph, cfg).tensors
            backend = HostBackend(prog, init, seed=cfg.seed)
            pred = _predict(backend, x_te)
            acc0 = float(np.mean(pred == y_te))
            differ = int(np.sum(pred != ort_pred))
            print(f"{alg}: step 0 {100 * acc0:.2f} % ({differ} of {len(y_te)} predictions differ "
                  f"from onnxruntime's, {100 * (acc0 - ort_acc):+.2f} pp)")
            after = []
            for seed in (int(s) for s in a.seeds.split(",")):
                backend = HostBackend(prog, init, seed=cfg.seed)
                res = fit(backend, x_tr, y_tr, x_te, y_te, epochs=a.epochs, steps=None, seed=seed)
                after.append(res[-1].test_acc)
            rows.append((alg, acc0, differ, after))
    print()
    print(f"| algorithm | onnxruntime | bnnc step 0 | differing predictions | after {a.epochs} "
          f"epoch(s), seeds {a.seeds} | min - step 0 |")
    print("|---|---|---|---|---|---|")
    for alg, acc0, differ, after in rows:
        print(f"| {alg} | {100 * ort_acc:.2f} % | {100 * acc0:.2f} % | {differ} | "
              f"{' / '.join(f'{100 * v:.2f}' for v in after)} % | "
              f"{100 * (min(after) - acc0):+.2f} pp |")
    return 0


def _parse(kv: str) -> tuple[str, object]:
    k, _, v = kv.partition("=")
    for conv in (int, float):
        try:
            return k, conv(v)
        except ValueError:
            pass
    return k, {"true": True, "false": False}.get(v.lower(), v)


def _predict(backend, x) -> np.ndarray:
    b = backend.batch
    out = []
    for i in range(0, len(x), b):
        xb = x[i:i + b]
        n = len(xb)
        if n < b:
            xb = np.concatenate([xb, np.zeros((b - n,) + xb.shape[1:], xb.dtype)])
        out.append(backend.predict(xb)[:n].argmax(1))
    return np.concatenate(out)


if __name__ == "__main__":
    sys.exit(main())
