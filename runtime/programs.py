"""Build and run the standalone trainer of a compiled output directory, here, under QEMU or on a device.

Input: a `bnnc compile` directory of a host or Linux target (`<model>.c`, `trainer.c`, manifest).
Output: a built program (cached by content hash) and `Runner`s that execute it and stream its
JSON-lines output: `LocalRunner` (host: natively; other Linux targets: under the target's emulator,
e.g. `qemu-aarch64 -cpu cortex-a72`) and `runtime.device.SshRunner` (a real board over ssh).

Invariants:
- a program is named by the sha256 of everything that decides its bytes (sources, compiler, flags)
  and published by an atomic rename, like runtime/host.py's libraries;
- nothing from a model file reaches a shell: every command is an argv list (no `shell=True`), and
  paths are passed as separate arguments;
- a missing cross compiler or emulator is a TargetError naming the Debian packages to install.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from ..compiler.contract import read_manifest
from ..compiler.errors import DataError, TargetError
from ..compiler.target import Target, load_target
from .host import build_cached, cache_dir, thread_flags


def target_of(out_dir: Path, target: str | Target | None = None) -> Target:
    """The target `out_dir` was compiled for (or `target`, which must match it)."""
    m = read_manifest(out_dir)
    tgt = target if isinstance(target, Target) else load_target(target or m.target)
    if tgt.name != m.target:
        raise TargetError(f"{out_dir} was compiled for target {m.target!r}, not {tgt.name!r}",
                          hint=f"compile again with --target {tgt.name}")
    return tgt


def build_trainer(out_dir: Path, target: Target | None = None, *, debug: bool = False,
                  extra_cflags: Sequence[str] = (), cache: Path | None = None) -> Path:
    """Compile OUT/trainer.c + OUT/<model>.c for the target (debug: -DBNNC_DEBUG_DUMP, the build
    `bnnc check` reads tensors from). Returns the cached executable."""
    out_dir = Path(out_dir)
    m = read_manifest(out_dir)
    tgt = target or target_of(out_dir)
    if not m.trainer:
        raise TargetError(f"{out_dir}: target {tgt.name!r} ({tgt.kind}) has no standalone Linux "
                          "trainer", hint="bare-metal targets build with `bnnc run --emulate`")
    tgt.require()
    sources = [out_dir / m.trainer, out_dir / m.source]
    flags = [*tgt.cflags, *extra_cflags, *(["-DBNNC_DEBUG_DUMP"] if debug else []),
             *thread_flags(m)]
    return build_cached(
        Path(cache) if cache is not None else cache_dir().parent / "programs",
        f"{m.model}-{tgt.name}{'-debug' if debug else ''}", "",
        (*(p.read_bytes() for p in sources), (out_dir / m.header).read_bytes(),
         tgt.cc.encode(), "\0".join(flags + list(tgt.ldflags)).encode()),
        lambda tmp: [tgt.cc, *flags, "-I", str(out_dir), *map(str, sources), "-o", tmp,
                     *tgt.ldflags],
        what=f"building the trainer for {tgt.name}",
        missing=TargetError(f"running {tgt.cc!r} failed", hint="apt-get install "
                            f"--no-install-recommends {' '.join(tgt.packages) or 'gcc'}"))


def emulator_argv(target: Target) -> list[str]:
    """The argv prefix that runs a program of `target` on this machine ([] for the host)."""
    if target.kind == "host":
        return []
    if not target.emulator:
        raise TargetError(f"target {target.name!r} names no emulator", hint="add [emulator] cmd")
    target.require(target.emulator[0])
    return list(target.emulator)


@dataclass
class RunResult:
    returncode: int
    events: list[dict]        # every JSON line the program printed, in order
    stderr: str

    def error(self) -> str | None:
        msgs = [e.get("message", "") for e in self.events if e.get("event") == "error"]
        return msgs[-1] if msgs else None


def parse_events(lines: Iterator[str], on_event: Callable[[dict], None] | None) -> list[dict]:
    events = []
    for line in lines:
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            ev = json.loads(line)
        except json.JSONDecodeError:
            continue
        events.append(ev)
        if on_event is not None:
            on_event(ev)
    return events


def stream(proc: subprocess.Popen, on_event, timeout: float | None):
    """Read a running program's JSON lines as they come; (events, stderr, returncode), returncode
    None when it was killed after `timeout` seconds (a timer kills it: reading blocks meanwhile)."""
    fired = []

    def kill() -> None:
        fired.append(True)
        proc.kill()

    timer = threading.Timer(timeout, kill) if timeout else None
    if timer:
        timer.start()
    try:
        with proc:
            events = parse_events(iter(proc.stdout.readline, ""), on_event)
            stderr = proc.stderr.read()
            rc = proc.wait()
    finally:
        if timer:
            timer.cancel()
    return events, stderr, (None if fired else rc)


class LocalRunner:
    """Runs a program of `target` on this machine: natively (host) or under its emulator."""

    def __init__(self, target: Target, *, clean_env: bool = False):
        self.target = target
        self.prefix = emulator_argv(target)
        # qemu-user instruction counts depend on the environment (glibc walks envp): env -i
        self.env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")} if clean_env else None

    def describe(self) -> str:
        return "native" if not self.prefix else shlex.join(self.prefix)

    def run(self, exe: Path, args: Sequence[str], *, on_event=None, timeout: float | None = None,
            extra_prefix: Sequence[str] = ()) -> RunResult:
        argv = [*self.prefix, *extra_prefix, str(exe), *map(str, args)]
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=self.env)
        except OSError as err:
            raise TargetError(f"cannot start {argv[0]!r}: {err}") from err
        events, stderr, rc = stream(proc, on_event, timeout)
        if rc is None:
            raise TargetError(f"{shlex.join(argv)} did not finish in {timeout} s")
        return RunResult(rc, events, stderr)


def check_result(res: RunResult, what: str) -> None:
    """DataError with the program's own message when it failed."""
    if res.returncode == 0:
        return
    msg = res.error()
    if res.returncode < 0 or res.returncode >= 128:
        tail = res.stderr.strip()[-1500:]
        msg = (msg or f"killed by signal {abs(res.returncode) % 128}") + (f"\n{tail}" if tail
                                                                          else "")
    raise DataError(f"{what} failed (exit {res.returncode}): "
                    f"{msg or res.stderr.strip()[-2000:] or 'no output'}")
