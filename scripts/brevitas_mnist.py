"""Train a binary MLP with Brevitas on MNIST and export it to QONNX: a model trained *outside* bnnc.

    python scripts/brevitas_mnist.py -o tfc.onnx --epochs 5       # TFC 1w1a (about 2-3 minutes)
    python scripts/brevitas_mnist.py -o tiny.onnx --arch tiny --steps 300

Architectures (Brevitas' own `brevitas_examples.bnn_pynq` FC, 1-bit weights, activations and
input): `tfc` = 784-64-64-64-10 (FINN's TFC), `tfc_bnhead` = the same with a per-class BatchNorm1d
in place of TensorNorm (the head's BN feeds the softmax), `tiny` = 784-32-10. Each hidden layer is
QuantLinear (no bias) -> BatchNorm1d -> 1-bit QuantIdentity; the head ends in Brevitas' TensorNorm.
Training: Adam (lr 1e-2, cosine schedule), cross-entropy, latent weights clipped to [-1, 1] after
every step (as bnn_pynq trains), seeded (torch.manual_seed and the batch order), on MNIST from
bnnc's data directory (`bnnc data fetch mnist`). The model reads pixels in **[0, 1]**
(torchvision's ToTensor convention), not bnnc's `2x/255 - 1`: whoever feeds it bnnc's pixels
rescales them, `(x + 1) / 2`.

Export: `brevitas.export.export_qonnx(model, example_input, path)` in eval mode, batch 1. The
script prints the test accuracy of the PyTorch model and of onnxruntime on the exported file
(`ort_runnable`: QONNX's BipolarQuant written as the standard ONNX it stands for).

`train_and_export(path, arch=..., epochs=..., steps=..., seed=...)` is what the test fixture
(tests/test_pretrained.py) and benchmarks/pretrained_brevitas.py call.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ARCHS = {"tfc": (64, 64, 64), "tfc_bnhead": (64, 64, 64), "tiny": (32,)}


def mnist01(limit: int | None = None, root=None):
    """MNIST as float32 (N, 1, 28, 28) in [0, 1] and int64 labels, from bnnc's data directory
    (or `root`, laid out as `bnnc data fetch` does)."""
    from bnnc.runtime.datasets import load_raw
    raw = load_raw("mnist", root, limit=limit)
    return (raw.x_train.astype(np.float32) / 255, raw.y_train,
            raw.x_test.astype(np.float32) / 255, raw.y_test)


def build(arch: str):
    import torch
    from brevitas_examples.bnn_pynq.models.FC import FC
    net = FC(num_classes=10, weight_bit_width=1, act_bit_width=1, in_bit_width=1, in_channels=1,
             out_features=ARCHS[arch])
    if arch == "tfc_bnhead":       # a per-class BatchNorm1d instead of TensorNorm before the logits
        net.features[-1] = torch.nn.BatchNorm1d(10)
    return net


def train_and_export(path: Path, *, arch: str = "tfc", epochs: int = 3, steps: int | None = None,
                     seed: int = 0, lr: float = 1e-2, batch: int = 100, limit: int | None = None,
                     root=None, log=print) -> dict:
    """Train, export to `path` (QONNX), return {"torch_acc", "ort_acc", "steps", "seconds"} on
    the MNIST test set (onnxruntime runs the exported file one sample at a time in batches of 1)."""
    import torch
    from brevitas.export import export_qonnx

    torch.manual_seed(seed)
    torch.set_num_threads(1)
    x_tr, y_tr, x_te, y_te = mnist01(limit, root)
    model = build(arch)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched_steps = steps if steps is not None else epochs * (len(y_tr) // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, sched_steps)
    rng = np.random.default_rng(seed)
    done, t0 = 0, time.perf_counter()
    while done < sched_steps:
        model.train()
        order = rng.permutation(len(y_tr))
        for i in range(0, len(order) - batch + 1, batch):
            idx = order[i:i + batch]
            out = model(torch.from_numpy(x_tr[idx]))
            loss = torch.nn.functional.cross_entropy(out, torch.from_numpy(y_tr[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            model.clip_weights(-1, 1)
            done += 1
            if done >= sched_steps:
                break
        acc = _torch_acc(model, x_te, y_te)
        log(f"  step {done}: loss {loss.item():.3f}, test {100 * acc:.2f} %")
    model.eval()
    torch_acc = _torch_acc(model, x_te, y_te)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    export_qonnx(model, torch.from_numpy(x_te[:1]), str(path))
    ort_acc = float(np.mean(ort_logits(path, x_te).argmax(1) == y_te))
    return {"torch_acc": torch_acc, "ort_acc": ort_acc, "steps": done,
            "seconds": time.perf_counter() - t0}


def _torch_acc(model, x, y) -> float:
    import torch
    was = model.training
    model.eval()
    with torch.no_grad():
        pred = np.concatenate([model(torch.from_numpy(x[i:i + 1000])).argmax(1).numpy()
                               for i in range(0, len(y), 1000)])
    model.train(was)
    return float(np.mean(pred == y))


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


def ort_logits(path: Path, x01: np.ndarray) -> np.ndarray:
    """The exported file's outputs under onnxruntime (`ort_runnable`) for [0, 1] inputs
    (N, 1, 28, 28). Brevitas hard-codes batch 1 in its Reshape, so samples run one at a time."""
    import onnx
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3          # Brevitas lists its initializers as graph inputs too
    sess = ort.InferenceSession(ort_runnable(onnx.load(str(path))).SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x01[i:i + 1].astype(np.float32)})[0]
                           for i in range(len(x01))])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--arch", choices=sorted(ARCHS), default="tfc")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None, help="stop after this many steps")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    r = train_and_export(a.output, arch=a.arch, epochs=a.epochs, steps=a.steps, seed=a.seed,
                         lr=a.lr)
    print(f"{a.output}: {r['steps']} steps in {r['seconds']:.0f} s; test accuracy PyTorch "
          f"{100 * r['torch_acc']:.2f} %, onnxruntime on the export {100 * r['ort_acc']:.2f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
