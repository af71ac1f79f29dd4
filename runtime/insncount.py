"""Exact, deterministic instruction counts of programs run under QEMU (qemu-aarch64, qemu-system-arm).

Input: an emulator argv prefix (the target's), a program and its arguments. Output: the number of
guest instructions executed, from bnnc's own TCG plugin (runtime/qemu_plugin/insncount.c), built
here with the host C compiler on first use and cached by content hash.

Per-step counts are measured by difference (a run of N steps minus a run of 0 steps, divided by N),
which cancels start-up, data loading setup and exit. qemu-user counts depend on the environment
(glibc walks envp), so programs run with a fixed minimal environment; system mode is deterministic.

Per function: `elf_functions(nm, elf)` reads the function symbols of an ELF (address ranges from
the symbol table: `nm -S`, the Thumb bit cleared), `count_instructions(..., functions=...)` has
the plugin attribute every executed instruction to the range holding its address, and
`StepCount.functions` holds the per-step difference per function (exclusive counts: a callee's
instructions are its own; a kernel the compiler inlined into its caller counts as the caller's;
"?" is code outside every symbol).
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
    """Instructions of a run of `steps` training steps and of the same run with 0 steps; with
    `functions`, the same two counts per function (name -> (steps run, 0-step run))."""
    steps: int
    instructions: int
    instructions_zero: int
    functions: dict[str, tuple[int, int]] | None = None

    @property
    def per_step(self) -> float:
        return (self.instructions - self.instructions_zero) / self.steps

    def per_function(self) -> list[tuple[str, float]]:
        """(function, instructions per step), most first; functions whose count does not change
        with the steps (start-up, exit) are left out. Empty without per-function counts."""
        rows = [(name, (n1 - n0) / self.steps)
                for name, (n1, n0) in (self.functions or {}).items() if n1 != n0]
        return sorted(rows, key=lambda r: (-r[1], r[0]))


Functions = Sequence[tuple[int, int, str]]      # (start, end exclusive, name), sorted, disjoint


def elf_functions(nm: str, elf: str | Path) -> list[tuple[int, int, str]]:
    """The function symbols of `elf` as sorted, disjoint address ranges, from `nm -S` (the
    target's nm, e.g. arm-none-eabi-nm). Thumb function addresses lose their low bit; aliases
    (several names, one address: __aeabi_fadd = __addsf3) keep the first name in nm's order, and
    a range overlapping the previous one is cut at its start."""
    try:
        res = subprocess.run([nm, "-S", "--defined-only", str(elf)], capture_output=True,
                             text=True)
    except FileNotFoundError as err:
        raise TargetError(f"{nm!r} is not installed") from err
    if res.returncode != 0:
        raise TargetError(f"{nm} {elf} failed: {res.stderr.strip()[-400:]}")
    found: dict[int, tuple[int, str]] = {}
    for line in res.stdout.splitlines():
        parts = line.split()
        if len(parts) != 4 or parts[2] not in ("t", "T", "w", "W"):
            continue
        lo, size = int(parts[0], 16) & ~1, int(parts[1], 16)
        if size > 0 and lo not in found:
            found[lo] = (lo + size, parts[3])
    out: list[tuple[int, int, str]] = []
    for lo in sorted(found):
        hi, name = found[lo]
        if out and lo < out[-1][1]:
            out[-1] = (out[-1][0], lo, out[-1][2])
        out.append((lo, hi, name))
    return [r for r in out if r[1] > r[0]]


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
                       stdout_path: Path | None = None, functions: Functions | None = None,
                       per_function: dict[str, int] | None = None
                       ) -> tuple[int, subprocess.CompletedProcess]:
    """Run `emulator + ['-plugin', lib] + program_args` and return (instructions, process).

    `emulator` is the target's argv prefix, e.g. ['qemu-aarch64', '-cpu', 'cortex-a72'] or the
    qemu-system-arm board command (the program then comes as `-kernel ELF` inside program_args).
    With `functions` (elf_functions) the plugin also counts per function, into `per_function`
    (name -> instructions; "?" for code outside every range)."""
    if not emulator:
        raise TargetError("instruction counts need an emulated target (QEMU); the host runs "
                          "programs natively", hint="use --target rpi4 / cortex-m7")
    lib = build_plugin()
    with tempfile.TemporaryDirectory(prefix="bnnc-insns-") as tmp:
        out = Path(tmp) / "insns.txt"
        plugin = f"{lib},out={out}"
        if functions is not None:
            syms = Path(tmp) / "functions.txt"
            syms.write_text("".join(f"{lo:x} {hi:x} {name}\n" for lo, hi, name in functions))
            plugin += f",syms={syms}"
        argv = [emulator[0], "-plugin", plugin, *emulator[1:], *program_args]
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
        text = out.read_text() if out.exists() else ""
        m = re.search(r"insns: (\d+)", text)
        if m is None:
            raise TargetError(f"the instruction-count plugin wrote nothing (exit "
                              f"{proc.returncode}): {proc.stderr.strip()[-800:]}")
        if per_function is not None:
            for n, name in re.findall(r"^fn (\d+) (\S+)$", text, re.M):
                per_function[name] = per_function.get(name, 0) + int(n)
        return int(m.group(1)), proc
