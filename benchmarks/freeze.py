"""Partial training of a pretrained BNN (issue 14, items 4 and 6), measured side by side in one run.

1. Domain shift (host, the emitted C through cffi): a TFC-class model (default: the zoo's TFC,
   784-64-64-64-10, all layers binary; `--model FILE` takes an ONNX/QONNX file) pretrained on
   MNIST by full training for `--pretrain-epochs` epochs (0: use the file's weights as they are;
   the Brevitas files in /work/shared/models are untrained), then adapted for `--epochs` epochs to
   inverted digits (pixels 255 - p) and to Fashion-MNIST (its ten classes on the same ten
   outputs), once per freeze set: full training, the last k weight layers (`--train
   fc4`, `--train fc3,fc4`), trainable suffixes (`--train-from fc3`, `--train-from fc2`) and BN
   only (`--train bn`, TinyTL style). Per row: test accuracy before (step 0, the pretrained model)
   and after, and the bytes of the same configuration compiled for cortex-m4: the planned arena,
   the state in RAM, the frozen parameters (read in place from flash), and the RAM and flash of
   the linked ELF (arm-none-eabi-size; the budget's estimate when the toolchain is missing).
2. Cortex-M4 within 64 KiB of RAM: `bnnc compile MODEL --target cortex-m4 --ram 64K --batch B
   --fit` (the deepest trainable suffix that fits, `compiler.budget.fit_budget`), fine-tuned on
   the inverted digits under qemu-system-arm (mps2-an386) for `--m4-steps` steps from the
   pretrained state; accuracy before/after (numpy reference on the checkpoint the board wrote), and RAM and
   flash of that ELF against full training of the same model at the same batch (linked against
   the board's whole memory, since it does not fit 64 KiB).

Training config: bnnc's defaults (proposed algorithm: l1 BN, binary dW, PO2 gradients, Adam,
bf16 state), batch `--batch`, seed 0 (`--bn l2` to compare; a file's trained BN gamma is kept
under l1 too, compiler/README "Trained state under --bn l1"). Inputs: the model's preprocessing
contract (compiler/preprocess.py): what the file records in its ONNX metadata (zoo models:
`2p/255 - 1`; Brevitas files from scripts/brevitas_mnist.py: `p/255`), else bnnc's default with
one notice, as `bnnc compile` takes it. A freeze set starts from the pretrained parameters and BN
statistics (a frozen binary W as its signs), moments 0.

    python benchmarks/freeze.py [--model tfc|FILE] [--pretrain-epochs 2] [--epochs 1]
                                [--batch 32] [--bn l1] [--frozen-bn running|batch]
                                [--m4-steps 2000] [--skip-shift] [--skip-m4]
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console

from bnnc.compiler.budget import budget_report, fit_budget
from bnnc.compiler.config import FROZEN_BN, make_config, resolve_frozen
from bnnc.compiler.contract import read_manifest
from bnnc.compiler.pipeline import compile_to_c
from bnnc.compiler.preprocess import Preprocess
from bnnc.compiler.state import state_tensors
from bnnc.compiler.target import load_target
from bnnc.runtime import baremetal, packed
from bnnc.runtime import reference as ref
from bnnc.runtime.datasets import fit_pixels, load_raw
from bnnc.runtime.host import HostProgram
from bnnc.runtime.model_source import load_graph, model_bytes, model_preprocess
from bnnc.runtime.outdir import write_run_inputs
from bnnc.runtime.state_blob import read_state_blob
from bnnc.runtime.train_loop import HostBackend, evaluate, fit

KIB = 1024


def transfer(graph, cfg, pre: dict) -> dict:
    """The start state of `cfg` (a freeze set) from pretrained tensors `pre` of the same model:
    parameters and BN statistics carried over (a frozen binary W as its signs), moments 0."""
    out = {}
    for st in state_tensors(graph, cfg):
        v = np.zeros(st.shape, np.float32) if st.kind == "opt" else pre[st.name]
        out[st.name] = np.where(v >= 0, 1, -1).astype(np.int8) if st.dtype == "bit" else v
    return out


def pretrain(graph, args, tmp: Path, quiet: Console, src, conv: Preprocess) -> dict:
    """Full training on MNIST for --pretrain-epochs epochs (host C); the final state tensors."""
    cfg = make_config("proposed", batch=args.batch, bn=args.bn, frozen_bn=args.frozen_bn)
    init = ref.init_state(graph, cfg).tensors
    if args.pretrain_epochs == 0:
        return init
    mn = load_raw("mnist")
    x = fit_pixels(graph, mn.x_train, "mnist", conv)
    out = tmp / "pretrain"
    compile_to_c(graph, cfg, load_target("host"), out, command="benchmarks/freeze.py",
                 preprocess=conv)
    backend = HostBackend(HostProgram(out, debug=False), init, seed=cfg.seed)
    t0 = time.perf_counter()
    fit(backend, x, mn.y_train, src[0], src[1], epochs=args.pretrain_epochs, steps=None,
        seed=1, console=quiet)
    print(f"pretrained: full training on MNIST, {args.pretrain_epochs} epoch(s), batch "
          f"{args.batch} ({time.perf_counter() - t0:.0f} s): MNIST test accuracy "
          f"{100 * evaluate(backend, *src):.2f} %")
    return backend.state()


def modes(graph) -> list[tuple[str, dict]]:
    """(label, resolve_frozen kwargs): full, last-k weight layers, suffixes, BN only."""
    w = [lay.name for lay in graph.layers if lay.kind.value == "dense"]
    return [("full training", {}),
            (f"last-1: --train {w[-1]}", dict(train=w[-1])),
            (f"last-2: --train {w[-2]},{w[-1]}", dict(train=f"{w[-2]},{w[-1]}")),
            (f"--train-from {w[-2]}", dict(train_from=w[-2])),
            (f"--train-from {w[-3]}", dict(train_from=w[-3])),
            ("BN only: --train bn", dict(train="bn"))]


def tasks(graph, conv: Preprocess):
    """(name, x_train, y_train, x_test, y_test) of each target domain, shaped for the model and
    mapped through its preprocessing `conv`."""
    mn, fa = load_raw("mnist"), load_raw("fashion-mnist")
    out = []
    for name, raw, f in (("inverted MNIST", mn, lambda p: 255 - p), ("Fashion-MNIST", fa, None)):
        xs = [fit_pixels(graph, f(x) if f else x, name, conv)
              for x in (raw.x_train, raw.x_test)]
        out.append((name, xs[0], raw.y_train, xs[1], raw.y_test))
    src = [fit_pixels(graph, mn.x_test, "mnist", conv)]
    return out, (src[0], mn.y_test)


def m4_bytes(graph, cfg, work: Path, ram: int) -> dict:
    """Arena, state in RAM, frozen (flash) bytes of the plan; RAM/flash of the linked ELF."""
    tgt = dataclasses.replace(load_target("cortex-m4"), ram=ram)
    c = compile_to_c(graph, cfg, tgt, work, command="benchmarks/freeze.py")
    rep = budget_report(c.schedule, c.plan, tgt, liveness=c.liveness)
    row = dict(arena=c.plan.arena_nbytes, state=c.plan.frozen_offset, frozen=c.plan.frozen_nbytes,
               ram=rep.ram_nbytes, flash=rep.flash_nbytes, measured=False)
    if shutil.which("arm-none-eabi-gcc"):
        elf = baremetal.build_elf(work)
        row.update(ram=elf.ram_nbytes, flash=elf.flash_nbytes, measured=True)
    return row


def shift_table(graph, args, tmp: Path, quiet: Console, pre: dict, conv: Preprocess) -> None:
    targets, (xs, ys) = tasks(graph, conv)
    base = make_config("proposed", batch=args.batch, bn=args.bn, frozen_bn=args.frozen_bn)
    t0 = time.perf_counter()
    rows = []
    bytes_of: dict[str, dict] = {}
    for label, spec in modes(graph):
        cfg = dataclasses.replace(base, frozen=resolve_frozen(graph, bn=base.bn, **spec))
        out = tmp / f"host{len(bytes_of)}"
        compile_to_c(graph, cfg, load_target("host"), out, command="benchmarks/freeze.py")
        prog = HostProgram(out, debug=False)
        bytes_of[label] = m4_bytes(graph, cfg, tmp / f"m4_{len(bytes_of)}", 4096 * KIB)
        init = transfer(graph, cfg, pre)
        for name, xtr, ytr, xte, yte in targets:
            backend = HostBackend(prog, init, seed=cfg.seed)
            before = evaluate(backend, xte, yte)
            source = evaluate(backend, xs, ys)
            res = fit(backend, xtr, ytr, xte, yte, epochs=args.epochs, steps=None, seed=0,
                      console=quiet)
            rows.append((name, label, source, before, res[-1].test_acc,
                         sum(int(np.prod(st.shape)) for st in state_tensors(graph, cfg)
                             if st.kind == "param")))
    took = time.perf_counter() - t0
    print(f"\n## Domain shift: {graph.name}, pretrained on MNIST (MNIST test accuracy "
          f"{100 * rows[0][2]:.2f} %), {args.epochs} epoch(s) on the target, batch "
          f"{args.batch}, proposed, --bn {args.bn}, --frozen-bn {args.frozen_bn}, Adam "
          f"({took:.0f} s)\n")
    b0 = bytes_of[modes(graph)[0][0]]
    src = "linked ELF" if b0["measured"] else "budget estimate"
    print(f"| task | freeze set | trained params | test acc before | after | arena B | state "
          f"(RAM) B | frozen (flash) B | cortex-m4 RAM B ({src}) | flash B | RAM vs full |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, label, _, before, after, trained in rows:
        b = bytes_of[label]
        print(f"| {name} | {label} | {trained:,} | {100 * before:.2f} % | {100 * after:.2f} % | "
              f"{b['arena']:,} | {b['state']:,} | {b['frozen']:,} | {b['ram']:,} | "
              f"{b['flash']:,} | {b['ram'] / b0['ram']:.2f}x |")


def m4_run(graph, args, tmp: Path, pre: dict, conv: Preprocess) -> None:
    if not (shutil.which("arm-none-eabi-gcc") and shutil.which("qemu-system-arm")):
        print("\n(cortex-m4 run skipped: needs gcc-arm-none-eabi and qemu-system-arm)")
        return
    targets, _ = tasks(graph, conv)
    name, xtr, ytr, xte, yte = targets[0]
    cfg0 = make_config("proposed", batch=args.batch, bn=args.bn, frozen_bn=args.frozen_bn)
    tgt = dataclasses.replace(load_target("cortex-m4"), ram=64 * KIB)
    chosen = fit_budget(graph, cfg0, tgt)
    print(f"\n## Cortex-M4 (QEMU mps2-an386), 64 KiB RAM: `bnnc compile MODEL --target cortex-m4 "
          f"--ram 64K --batch {args.batch} --bn {args.bn} --fit`\n")
    print("```\n" + chosen.format() + "\n```")
    if chosen.config is None:
        print("nothing fits")
        return
    cfg = chosen.config
    out = tmp / "m4fit"
    compile_to_c(graph, cfg, tgt, out, command="benchmarks/freeze.py (--fit)", preprocess=conv)
    write_run_inputs(out, graph, cfg, model_bytes(args.model))
    elf = baremetal.build_elf(out)
    full = m4_bytes(graph, dataclasses.replace(cfg, frozen=()), tmp / "m4full", 4096 * KIB)
    n = args.m4_steps * cfg.batch
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(xtr))[:n]
    packed.pack(tmp / "train.bnnd", xtr[idx].reshape(n, -1), ytr[idx], 10)
    blob = baremetal.start_state_blob(out, transfer(graph, cfg, pre))
    t0 = time.perf_counter()
    res = baremetal.run(out, train=tmp / "train.bnnd", start_blob=blob, steps=args.m4_steps,
                        checkpoint=True, timeout=36000)
    took = time.perf_counter() - t0
    if res.returncode != 0:
        print(f"the cortex-m4 run failed: {res.error()}")
        return
    m = read_manifest(out)
    (tmp / "start.bin").write_bytes(blob)
    (tmp / "end.bin").write_bytes(res.checkpoint)
    before = ref.TrainState(read_state_blob(tmp / "start.bin", m).tensors)
    after = ref.TrainState(read_state_blob(tmp / "end.bin", m).tensors)
    acc = [ref.evaluate(graph, cfg, s, xte, yte) for s in (before, after)]
    row = chosen.rows[chosen.chosen]
    print(f"\nchosen --train-from {row.train_from}, batch {cfg.batch}: {row.trained:,} parameters "
          f"trained; {args.m4_steps} steps on {name} ({n} examples) in {took:.0f} s of QEMU: "
          f"{name} test accuracy {100 * acc[0]:.2f} % -> {100 * acc[1]:.2f} %\n")
    print("| cortex-m4, batch %d | RAM B (arm-none-eabi-size) | flash B | state in RAM B | "
          "frozen in flash B |" % cfg.batch)
    print("|---|---|---|---|---|")
    print(f"| --train-from {row.train_from} (fits 64 KiB) | {elf.ram_nbytes:,} | "
          f"{elf.flash_nbytes:,} | {m.state_nbytes - m.frozen_nbytes:,} | {m.frozen_nbytes:,} |")
    print(f"| full training | {full['ram']:,} | {full['flash']:,} | {full['state']:,} | 0 |")
    print(f"| ratio | {full['ram'] / elf.ram_nbytes:.2f}x less | "
          f"{full['flash'] / elf.flash_nbytes:.2f}x less | | |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tfc", help="a zoo name or an ONNX/QONNX file")
    ap.add_argument("--pretrain-epochs", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--bn", choices=("l1", "l2"), default="l1")
    ap.add_argument("--frozen-bn", choices=FROZEN_BN, default="batch",
                    help="frozen prefix BNs: inference mode (running) or batch statistics")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--m4-steps", type=int, default=2000)
    ap.add_argument("--skip-shift", action="store_true")
    ap.add_argument("--skip-m4", action="store_true")
    args = ap.parse_args(argv)
    graph = load_graph(args.model)
    conv = model_preprocess(model_bytes(args.model), args.model, None)
    print(f"# benchmarks/freeze.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"model {args.model}: layers {', '.join(lay.name for lay in graph.layers)}; input "
          f"{conv.describe()}")
    quiet = Console(quiet=True)
    with tempfile.TemporaryDirectory(prefix="bnnc-freeze-") as t:
        _, src = tasks(graph, conv)
        pre = pretrain(graph, args, Path(t), quiet, src, conv)
        if not args.skip_shift:
            shift_table(graph, args, Path(t), quiet, pre, conv)
        if not args.skip_m4:
            m4_run(graph, args, Path(t), pre, conv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
