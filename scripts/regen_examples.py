"""Regenerate examples/generated/: the C that `bnnc compile` writes for a zoo model, checked in so
that every codegen change shows up as a diff in review.

    python scripts/regen_examples.py [--check]

Each example is one `bnnc compile` command (`EXAMPLES`); its output directory is compiled into a
temporary directory and every file it writes is copied to examples/generated/<name>/ (the model's
.c/.h, the trainer, the Makefile, the manifest, plan.json, report.txt) but the model file and its
initial state (`LEFT_OUT`: megabytes of weights, not codegen) and bnnc's bookkeeping of OUT/
(.bnnc-owned.json, .bnnc.lock). --check compares instead of
writing and exits 1 naming the stale files; tests/test_examples.py runs the same comparison.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
from pathlib import Path

from bnnc.cli import main as bnnc_main

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "examples" / "generated"
COMMAND = "python scripts/regen_examples.py"
# name -> `bnnc compile` arguments (the output directory is added)
EXAMPLES = {"mlp": ["compile", "mlp", "--target", "host"]}
LEFT_OUT = ("model.onnx", "init_state.npz", ".bnnc-owned.json", ".bnnc.lock")


def generate(name: str) -> dict[str, bytes]:
    """The kept files of example `name`, freshly compiled: file name -> bytes."""
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        out = Path(tmp) / name
        if bnnc_main([*EXAMPLES[name], "-o", str(out)]) != 0:
            raise RuntimeError(f"bnnc {' '.join(EXAMPLES[name])} failed")
        return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name not in LEFT_OUT}


def stale(root: Path = OUT) -> list[str]:
    """The example files under `root` that differ from a fresh compile, are missing or are no
    longer written."""
    bad = []
    for name in EXAMPLES:
        fresh = generate(name)
        have = {p.name for p in (root / name).iterdir()} if (root / name).is_dir() else set()
        bad += [f"{name}/{f}" for f in sorted(have - set(fresh))]
        bad += [f"{name}/{f}" for f, data in fresh.items()
                if f not in have or (root / name / f).read_bytes() != data]
    return bad


def write(root: Path = OUT) -> None:
    """Replace examples/generated/<name>/ with a fresh compile of every example."""
    for name in EXAMPLES:
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        fresh = generate(name)
        for p in d.iterdir():
            if p.name not in fresh:
                p.unlink()
        for f, data in fresh.items():
            (d / f).write_bytes(data)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare only; exit 1 when stale")
    args = ap.parse_args(argv)
    if args.check:
        bad = stale()
        for f in bad:
            print(f"stale: examples/generated/{f}")
        return 1 if bad else 0
    write()
    print(f"wrote {OUT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
