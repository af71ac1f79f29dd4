#!/usr/bin/env bash
# The main job on the built-in default model (the paper's MNIST MLP, proposed algorithm, batch 100):
# import it, plan its training memory, emit C, prove the C's gradients against the numpy reference,
# train the C on MNIST, export the trained model to ONNX and check it with onnxruntime; then the same
# for a Raspberry Pi 4 under QEMU.
# Usage: bash scripts/demo.sh [OUT_DIR] [EPOCHS]     (default: out/, 1 epoch)
set -euo pipefail
OUT=${1:-out}
EPOCHS=${2:-1}
mkdir -p "$OUT"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "1. the default model: bnnc zoo mlp"
bnnc zoo mlp -o "$OUT/mlp.onnx"
bnnc info "$OUT/mlp.onnx"

say "2. training memory, standard vs proposed (picture: $OUT/arena.html)"
bnnc inspect "$OUT/mlp.onnx" --batch 100 --compare standard,proposed --html "$OUT/arena.html"

say "3. emit the C training program for the host"
bnnc compile "$OUT/mlp.onnx" --target host --batch 100 -o "$OUT/mlp_host"
bnnc inspect "$OUT/mlp_host"

say "4. gradients of the emitted C vs the numpy reference (3 steps, every tensor)"
bnnc check "$OUT/mlp.onnx" --batch 100 --steps 3

say "5. train the emitted C on MNIST ($EPOCHS epoch(s))"
bnnc data fetch mnist
bnnc run "$OUT/mlp_host" --data mnist --epochs "$EPOCHS"

say "6. export the trained model and score it with onnxruntime"
bnnc export "$OUT/mlp_host" -o "$OUT/mlp_trained.onnx"
python - "$OUT/mlp_trained.onnx" <<'PY'
import sys
import numpy as np
import onnxruntime as ort
from bnnc.runtime.datasets import load_dataset

d = load_dataset("mnist")
s = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
p = s.run(None, {s.get_inputs()[0].name: d.x_test})[0]
print(f"onnxruntime on {sys.argv[1]}: MNIST test accuracy {100 * np.mean(p.argmax(1) == d.y_test):.2f} %")
PY

say "7. the same model for a Raspberry Pi 4 (static aarch64 trainer, NEON), run under QEMU"
bnnc compile "$OUT/mlp.onnx" --target rpi4 --batch 100 -o "$OUT/mlp_rpi4"
bnnc check "$OUT/mlp.onnx" --target rpi4 --batch 100 --steps 1
bnnc run "$OUT/mlp_rpi4" --emulate --data mnist --steps 20 --log-every 10
