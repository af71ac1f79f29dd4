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
(torchvision's ToTensor convention), not bnnc's default `2x/255 - 1`.

Export: `brevitas.export.export_qonnx(model, example_input, path)` in eval mode, batch 1; then the
file records its input convention in its ONNX metadata as bnnc reads it (`bnnc.preprocess` =
`unit`, compiler/preprocess.py), so `bnnc compile/eval/run/export` feed it u/255 without a
`--preprocess` flag. The file is written to a temporary name and renamed when complete. The
script prints the test accuracy of the PyTorch model and of onnxruntime on the exported file
(scripts/ort_eval.py: QONNX's BipolarQuant written as the standard ONNX it stands for).

`train_and_export(path, arch=..., epochs=..., steps=..., seed=...)` is what the test fixture
(tests/test_pretrained.py) and benchmarks/pretrained_brevitas.py call.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from bnnc.compiler.preprocess import METADATA_KEY as PREPROCESS_KEY
from bnnc.compiler.preprocess import Preprocess
from bnnc.runtime.datasets import load_raw, preprocess_pixels

sys.path.insert(0, str(Path(__file__).resolve().parent))     # the sibling scripts/ort_eval.py
from ort_eval import ort_logits  # noqa: E402

ARCHS = {"tfc": (64, 64, 64), "tfc_bnhead": (64, 64, 64), "tiny": (32,)}
INPUT_CONVENTION = Preprocess("unit")     # ToTensor: the model reads u/255, in [0, 1]


def mnist01(limit: int | None = None, root=None):
    """MNIST as float32 (N, 1, 28, 28) in [0, 1] and int64 labels, from bnnc's data directory
    (or `root`, laid out as `bnnc data fetch` does): the pixels through bnnc's table for the
    model's convention (`INPUT_CONVENTION`), so the model trains on what bnnc will feed it."""
    raw = load_raw("mnist", root, limit=limit)
    return (preprocess_pixels(raw.x_train, INPUT_CONVENTION), raw.y_train,
            preprocess_pixels(raw.x_test, INPUT_CONVENTION), raw.y_test)


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
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.onnx")
    try:
        export_qonnx(model, torch.from_numpy(x_te[:1]), str(tmp))
        record_preprocess(tmp, INPUT_CONVENTION)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    ort_acc = float(np.mean(ort_logits(path, x_te).argmax(1) == y_te))
    return {"torch_acc": torch_acc, "ort_acc": ort_acc, "steps": done,
            "seconds": time.perf_counter() - t0}


def record_preprocess(path: Path, pre: Preprocess) -> None:
    """Write `pre` into the ONNX file's metadata under the key bnnc reads (`bnnc.preprocess`),
    keeping any other metadata entry."""
    import onnx
    from onnx import helper
    m = onnx.load(str(path))
    props = {p.key: p.value for p in m.metadata_props}
    props[PREPROCESS_KEY] = pre.spec()
    helper.set_model_props(m, props)
    onnx.save(m, str(path))


def _torch_acc(model, x, y) -> float:
    import torch
    was = model.training
    model.eval()
    with torch.no_grad():
        pred = np.concatenate([model(torch.from_numpy(x[i:i + 1000])).argmax(1).numpy()
                               for i in range(0, len(y), 1000)])
    model.train(was)
    return float(np.mean(pred == y))


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
