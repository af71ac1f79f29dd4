"""Image folders streamed (issue 15): packing throughput of a folder of small PNGs and the peak RSS
of the packing process and of the standalone trainer, at two dataset sizes side by side.

Writes MNIST's training images as PNG files, one subfolder per digit (`--root`, default
/tmp/bnnc-mnist-png; kept for reruns), then for N = `--small` and all 60,000 images:
- `bnnc data pack FOLDER --model tfc` (a fresh process under /usr/bin/time -v): examples/s and
  the process's peak RSS;
- the TFC host trainer of `bnnc compile tfc --batch 100` reading that packed file for `--steps`
  steps plus a test pass (`--test` = the same file): its peak RSS.
Streaming means neither RSS grows with N (the packing process holds one chunk of 256 decoded
images; the trainer one example row and one batch).

    nice -n 10 python benchmarks/pack_folder.py [--root DIR] [--small 6000] [--steps 50]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from bnnc.runtime.datasets import load_raw


def cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def write_pngs(root: Path, n: int) -> None:
    done = root / ".complete"
    if done.is_file() and int(done.read_text()) == n:
        return
    shutil.rmtree(root, ignore_errors=True)
    d = load_raw("mnist")
    for k in range(10):
        (root / str(k)).mkdir(parents=True)
    for i in range(n):
        Image.fromarray(d.x_train[i, 0]).save(root / str(int(d.y_train[i])) / f"{i:05d}.png")
    done.write_text(str(n))


def subset(root: Path, n: int, dest: Path) -> Path:
    """The first n images of `root` (by index) as symlinks in `dest`."""
    shutil.rmtree(dest, ignore_errors=True)
    for k in range(10):
        (dest / str(k)).mkdir(parents=True)
    for k in range(10):
        for f in (root / str(k)).iterdir():
            if int(f.stem) < n:
                (dest / str(k) / f.name).symlink_to(f)
    return dest


def timed(cmd: list[str]) -> tuple[float, int, str]:
    """(seconds, peak RSS KiB, stdout) of a fresh process."""
    t0 = time.perf_counter()
    res = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if res.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{res.stdout}\n{res.stderr}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr).group(1))
    return dt, rss, res.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("/tmp/bnnc-mnist-png"))
    ap.add_argument("--small", type=int, default=6000)
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    t0 = time.perf_counter()
    write_pngs(args.root, 60000)
    print(f"PNG folder {args.root}: 60,000 images ({time.perf_counter() - t0:.0f} s to write "
          "or check)", flush=True)
    with tempfile.TemporaryDirectory(prefix="bnnc-pack-") as tmp:
        tmp = Path(tmp)
        out = tmp / "tfc"
        subprocess.run(["bnnc", "compile", "tfc", "--batch", "100", "-o", str(out)], check=True,
                       capture_output=True)
        subprocess.run(["make", "-s", "-C", str(out), "trainer"], check=True, capture_output=True)
        rows = []
        for n in (args.small, 60000):
            folder = args.root if n == 60000 else subset(args.root, n, tmp / f"sub{n}")
            packed = tmp / f"p{n}.bnnd"
            dt, rss_pack, _ = timed(["bnnc", "data", "pack", str(folder), "--model", "tfc",
                                     "-o", str(packed)])
            _, rss_train, _ = timed([str(out / "trainer"), "--train", str(packed), "--test",
                                     str(packed), "--steps", str(args.steps), "--no-clock"])
            rows.append((n, dt, n / dt, rss_pack, rss_train, packed.stat().st_size))
    print(f"\n{cpu()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; TFC, B=100, "
          f"{args.steps} steps + one test pass over the packed file")
    print("| images | pack s | examples/s | pack peak RSS | trainer peak RSS | packed file |")
    print("|---|---|---|---|---|---|")
    for n, dt, eps, rp, rt, size in rows:
        print(f"| {n:,} | {dt:.1f} | {eps:,.0f} | {rp / 1024:.1f} MiB | {rt / 1024:.1f} MiB | "
              f"{size / 2**20:.1f} MiB |")


if __name__ == "__main__":
    main()
