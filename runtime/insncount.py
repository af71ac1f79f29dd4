"""Exact, deterministic instruction counts of programs run under QEMU (qemu-aarch64, qemu-system-arm).

Input: an emulator argv prefix (the target's), a program and its arguments. Output: the number of
guest instructions executed, from bnnc's own TCG plugin (runtime/qemu_plugin/insncount.c), built
here with the host C compiler on first use and cached by content hash.

Per-step counts are measured by difference (a run of N steps minus a run of 0 steps, divided by N),
which cancels start-up, data loading setup and exit. qemu-user counts depend on the environment
(glibc walks envp), so programs run with a fixed minimal environment; system mode is deterministic.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..compiler.errors import TargetError
from .host import build_cached, cache_dir

PLUGIN_SOURCE = Path(__file__).resolve().parent / "qemu_plugin" / "insncount.c"


@dataclass(frozen=True)
class StepCount:
    """Instructions of a run of `steps` training steps and of the same run with 0 steps."""
    steps: int
    instructions: int
    instructions_zero: int

    @property
    def per_step(self) -> float:
        return (self.instructions - self.instructions_zero) / self.steps


def build_plugin(cc: str = "cc", cache: Path | None = None) -> Path:
    return build_cached(
        Path(cache) if cache is not None else cache_dir().parent / "plugins", "libbnnc_insncount",
        ".so", (PLUGIN_SOURCE.read_bytes(), cc.encode()),
        lambda tmp: [cc, "-O2", "-shared", "-fPIC", "-Wall", "-Wextra", "-o", tmp,
                     str(PLUGIN_SOURCE)],
        what="building the QEMU instruction-count plugin",
        missing=TargetError(f"cannot build the QEMU plugin with {cc!r}",
                            hint="apt-get install --no-install-recommends gcc"))


def count_instructions(emulator: Sequence[str], program_args: Sequence[str], *,
                       timeout: float = 600.0, cwd: str | Path | None = None,
                       stdout_path: Path | None = None) -> tuple[int, subprocess.CompletedProcess]:
    """Run `emulator + ['-plugin', lib] + program_args` and return (instructions, process).

    `emulator` is the target's argv prefix, e.g. ['qemu-aarch64', '-cpu', 'cortex-a72'] or the
    qemu-system-arm board command (the program then comes as `-kernel ELF` inside program_args)."""
    if not emulator:
        raise TargetError("instruction counts need an emulated target (QEMU); the host runs "
                          "programs natively", hint="use --target rpi4 / cortex-m7")
    lib = build_plugin()
    with tempfile.TemporaryDirectory(prefix="bnnc-insns-") as tmp:
        out = Path(tmp) / "insns.txt"
        argv = [emulator[0], "-plugin", f"{lib},out={out}", *emulator[1:], *program_args]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        try:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=timeout, env=env, cwd=cwd)
        except FileNotFoundError as err:
            raise TargetError(f"{emulator[0]!r} is not installed",
                              hint="apt-get install --no-install-recommends qemu-user "
                                   "qemu-system-arm") from err
        if stdout_path is not None:
            Path(stdout_path).write_text(proc.stdout)
        m = re.search(r"insns: (\d+)", out.read_text() if out.exists() else "")
        if m is None:
            raise TargetError(f"the instruction-count plugin wrote nothing (exit "
                              f"{proc.returncode}): {proc.stderr.strip()[-800:]}")
        return int(m.group(1)), proc
