"""Build and run the bare-metal trainer of a `bnnc compile --target cortex-m7|cortex-m4` directory
under qemu-system-arm: training runs, instruction counts and the `bnnc check` trace.

Input: an output directory of a "baremetal" target (`<model>.c` plus the files of
compiler/baremetal.py), packed datasets (runtime/packed.py) and optionally a start state.
Output: `build_elf` -> `Elf` (the program, cached by content hash, with its section sizes and its
worst-case stack from the compiler's call graph); `run` -> `BaremetalRun` (the trainer's JSON
events, exit status, final checkpoint); `count_step_instructions` -> `StepCount`; `check_trace` ->
the `--check-out` bytes of the debug build. `bnnc run OUT --emulate` drives these through
runtime/run.py.

Invariants:
- the ELF is built with compiler/baremetal.build_command (what baremetal.mk spells) and named by the
  sha256 of everything that decides its bytes, published by an atomic rename;
- a build whose deepest call chain needs more stack than the target reserves is refused (BudgetError
  naming the chain): -fcallgraph-info gives every function's frame; library functions without one
  (newlib, libgcc) are charged LIB_STACK_NBYTES each;
- QEMU always runs under `timeout` with stdin from /dev/null, in a private working directory where
  the dataset files appear under fixed names (semihosting opens paths relative to it and the guest
  splits its command line at spaces, so no user path reaches the guest);
- the start state travels as the model's own state blob, loaded by QEMU's generic loader at the
  flash address the linker script reserved (`__bnnc_blob`); the trainer's set_state checks its model
  hash and CRC. The blob is encoded by the same `<model>.c` built for the host (load_state_f32 +
  get_state), so the bytes are the ones the device would produce itself.

Data: streamed from the packed file through semihosting (not embedded in flash): the same files,
format and batch order as the Linux trainer, any dataset size, and flash spent on the program only.
Instruction counts: difference of a run of N steps and one of 0 steps (both `--quiet`, same start
state and data), so start-up, .bss zeroing and the dataset header read cancel; what remains per step
is loading the batch (semihosting calls count as one instruction each: the host does the I/O) and
the training step itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ..compiler import baremetal as bm
from ..compiler.contract import Manifest, read_manifest
from ..compiler.errors import BnncWarning, BudgetError, DataError, TargetError
from ..compiler.target import Target
from .host import HostProgram, cache_dir, file_sha256
from .insncount import StepCount, count_instructions, elf_functions
from .outdir import load_init_state, read_compiled
from .packed import TEST_FILE, TRAIN_FILE
from .programs import RunResult, emulator_argv, parse_events, target_of

LIB_STACK_NBYTES = 512      # stack charged for a library function the call graph cannot see into
BLOB_FILE, CHECKPOINT_FILE = "start_state.bin", "state.bin"
CHECK_IN, CHECK_OUT = "check.in", "check.out"


# --------------------------------------------------------------------------------------------------
# building

@dataclass(frozen=True)
class Elf:
    path: Path
    debug: bool
    text: int                   # arm-none-eabi-size: code + constants (+ vector table)
    data: int                   # initialized RAM (its load image is in flash too)
    bss: int                    # zeroed RAM: arena, state, trainer buffers
    stack_reserve: int          # the linker script's reserve at the top of RAM
    blob_addr: int              # __bnnc_blob: where the start state is loaded
    blob_reserve: int
    stack_nbytes: int           # deepest call chain (call graph), library calls charged
    stack_chain: tuple[str, ...]

    @property
    def ram_nbytes(self) -> int:
        return self.data + self.bss + self.stack_reserve

    @property
    def flash_nbytes(self) -> int:
        return self.text + self.data + self.blob_reserve


def _tool(target: Target, name: str) -> str:
    """arm-none-eabi-<name> next to the target's compiler."""
    prefix = target.cc[:-3] if target.cc.endswith("gcc") else ""
    tool = f"{prefix}{name}"
    target.require(tool)
    return tool


def compiled_program(out_dir: Path, target: Target | str | None) -> tuple[Manifest, Target]:
    """The manifest of a bare-metal output directory and its target with the RAM/flash budget it
    was compiled with; TargetError when it is not one or lacks a file."""
    m = read_manifest(out_dir)
    tgt = target_of(out_dir, target)
    if tgt.kind != "baremetal":
        raise TargetError(f"{out_dir} was compiled for {tgt.name} ({tgt.kind}), not for a "
                          "microcontroller", hint="compile with --target cortex-m7 or cortex-m4")
    if m.source.startswith("src/"):
        raise TargetError(f"{out_dir} is a firmware library (bnnc compile --emit library), not a "
                          "program `bnnc run` can start",
                          hint=f"build its example with CMake ({out_dir}/README.md), or compile "
                               "without --emit library for the standalone trainer")
    missing = [f for f in (*bm.TEMPLATES, bm.BUDGET, m.source, m.header)
               if not (out_dir / f).is_file()]
    if missing:
        raise TargetError(f"{out_dir} lacks {', '.join(missing)}",
                          hint=f"compile again with --target {tgt.name}")
    return m, bm.compiled_target(out_dir, tgt)


def stack_from_callgraph(ci_texts: Sequence[str], roots: Sequence[str] = ("Reset_Handler",)
                         ) -> tuple[int, tuple[str, ...]]:
    """Deepest stack use from GCC -fcallgraph-info=su files: (bytes, the chain of function names).

    Every defined function's frame is in its node label ("N bytes (static)"); a callee defined in
    another file appears there as an external node with the same title. External functions never
    defined (newlib, libgcc) cost LIB_STACK_NBYTES. Dynamic frames and recursion raise BudgetError:
    a bound cannot be given."""
    frames: dict[str, int] = {}
    labels: dict[str, str] = {}
    edges: dict[str, list[str]] = {}
    node = re.compile(r'node: \{ title: "([^"]+)" label: "([^"]*)"')
    edge = re.compile(r'edge: \{ sourcename: "([^"]+)" targetname: "([^"]+)"')
    for text in ci_texts:
        for title, label in node.findall(text):
            labels.setdefault(title, label.split("\\n")[0])
            m = re.search(r"\\n(\d+) bytes \(([a-z,]+)\)", label)
            if m:
                if m.group(2) != "static":
                    raise BudgetError(f"function {labels[title]} has a {m.group(2)} stack frame; "
                                      "the stack of the bare-metal program cannot be bounded")
                frames[title] = int(m.group(1))
        for src, dst in edge.findall(text):
            edges.setdefault(src, []).append(dst)
    memo: dict[str, tuple[int, tuple[str, ...]]] = {}

    def deepest(fn: str, path: tuple[str, ...]) -> tuple[int, tuple[str, ...]]:
        if fn in path:
            raise BudgetError(f"recursion through {labels.get(fn, fn)}: the stack of the "
                              "bare-metal program cannot be bounded")
        if fn not in memo:
            if fn not in frames:
                memo[fn] = (LIB_STACK_NBYTES, (labels.get(fn, fn),))
            else:
                sub = [deepest(c, path + (fn,)) for c in sorted(set(edges.get(fn, ())))]
                n, chain = max(sub, default=(0, ()))
                memo[fn] = (frames[fn] + n, (labels[fn],) + chain)
        return memo[fn]

    return max((deepest(r, ()) for r in roots), default=(0, ()))


def _sizes(target: Target, elf: Path) -> tuple[int, int, int, int]:
    """(text, data, bss, __bnnc_blob) from arm-none-eabi-size and -nm."""
    out = subprocess.run([_tool(target, "size"), "-B", str(elf)], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    text, data, bss = (int(v) for v in out[1].split()[:3])
    syms = subprocess.run([_tool(target, "nm"), str(elf)], capture_output=True, text=True,
                          check=True).stdout
    m = re.search(r"^([0-9a-fA-F]+) \w __bnnc_blob$", syms, re.M)
    assert m is not None, "the linker script defines __bnnc_blob"
    return text, data, bss, int(m.group(1), 16)


def _cache_where(cache: Path | None) -> Path:
    where = Path(cache) if cache is not None else cache_dir().parent / "programs"
    try:
        where.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TargetError(f"build cache {where} is not a usable directory "
                          f"({err.strerror or err})",
                          hint="remove it, or set BNNC_CACHE_DIR to a writable directory") from None
    return where


def build_elf(out_dir: str | Path, target: Target | str | None = None, *, debug: bool = False,
              cache: Path | None = None) -> Elf:
    """trainer.elf (debug: -DBNNC_DEBUG_DUMP on the whole board memory) of a compiled directory,
    cached by content hash; TargetError when the toolchain is missing or the build fails,
    BudgetError when the link exceeds the budget or the stack reserve is too small."""
    out_dir = Path(out_dir)
    m, tgt = compiled_program(out_dir, target)
    tgt.require()
    model = m.model
    h = hashlib.sha256()
    names = sorted({*bm.sources(model), *bm.headers(model), bm.LINKER})
    for name in names:
        h.update(name.encode() + b"\0" + hashlib.sha256((out_dir / name).read_bytes()).digest())
    cmd_key = bm.build_command(Path("OUT"), model, tgt, Path("ELF"), debug=debug)
    h.update("\0".join([*cmd_key, str(LIB_STACK_NBYTES)]).encode())     # the sidecar holds the bound
    where = _cache_where(cache)
    exe = where / f"{model}-{tgt.name}{'-debug' if debug else ''}-{h.hexdigest()[:20]}.elf"
    info = exe.with_suffix(".json")
    if exe.exists() or info.exists():
        try:
            doc = json.loads(info.read_text())
            if doc.get("sha256") != file_sha256(exe):
                raise ValueError("hash mismatch")
            return Elf(exe, debug, **{k: doc[k] for k in ("text", "data", "bss", "stack_reserve",
                                                          "blob_addr", "blob_reserve",
                                                          "stack_nbytes")},
                       stack_chain=tuple(doc["stack_chain"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            warnings.warn(BnncWarning(f"build cache entry {exe} is damaged; rebuilding it"))
    with tempfile.TemporaryDirectory(prefix=".bnnc-elf-", dir=where) as tmp:
        tmp_elf = Path(tmp) / "trainer.elf"
        cmd = bm.build_command(out_dir, model, tgt, tmp_elf, debug=debug)
        # call-graph stack info for the stack check: analysis output only, same code
        cmd += ["-fcallgraph-info=su", "-dumpdir", f"{tmp}/"]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as err:
            raise TargetError(f"running {tgt.cc!r} failed: {err}") from err
        if res.returncode != 0:
            budget = re.findall(r"bnnc: ([^\n]*budget[^\n]*)", res.stderr)
            if budget:
                raise BudgetError(f"{out_dir}: the linker refused the program: {budget[0]}",
                                  hint="compile again with a smaller --batch, --optimizer bop or "
                                       "a larger --ram/--flash")
            raise TargetError(f"building the {tgt.name} trainer failed:\n"
                              f"{res.stderr.strip()[-4000:]}")
        stack, chain = stack_from_callgraph([p.read_text() for p in sorted(Path(tmp).glob("*.ci"))])
        text, data, bss, blob_addr = _sizes(tgt, tmp_elf)
        elf = Elf(exe, debug, text, data, bss, tgt.stack, blob_addr,
                  bm.blob_reserve(m.blob_nbytes),
                  stack, chain)
        if stack > tgt.stack:
            raise BudgetError(
                f"{out_dir}: the deepest call chain needs {stack:,} B of stack "
                f"({' -> '.join(chain)}), the {tgt.name} reserve is {tgt.stack:,} B",
                hint=f"raise `stack` in targets/{tgt.name}.toml (RAM then holds less arena)")
        doc = {k: getattr(elf, k) for k in ("text", "data", "bss", "stack_reserve", "blob_addr",
                                             "blob_reserve", "stack_nbytes")}
        doc["stack_chain"] = list(chain)
        doc["sha256"] = file_sha256(tmp_elf)
        tmp_info = Path(tmp) / "info.json"
        tmp_info.write_text(json.dumps(doc, indent=1) + "\n")
        os.replace(tmp_elf, exe)
        os.replace(tmp_info, info)      # the hash comes last: a reader checks the ELF against it
    return elf


# --------------------------------------------------------------------------------------------------
# the start state

def start_state_blob(out_dir: str | Path, tensors=None, *, step: int = 0,
                     seed: int | None = None, cache: Path | None = None) -> bytes:
    """The state blob of `tensors` (name -> float32 values; default OUT/init_state.npz, the
    compiled model's own weights), encoded by `<model>.c` built for the host."""
    out_dir = Path(out_dir)
    manifest, graph, cfg = read_compiled(out_dir)
    if tensors is None:
        tensors = load_init_state(out_dir, graph, cfg)
    hp = HostProgram(out_dir, target="host", debug=False, cache=cache)
    hp.load_state(tensors, step=step, seed=cfg.seed if seed is None else seed)
    return hp.get_state()


# --------------------------------------------------------------------------------------------------
# running

@dataclass
class BaremetalRun(RunResult):
    checkpoint: bytes | None = None     # the state blob the trainer wrote last (--checkpoint)
    argv: list[str] = field(default_factory=list)

    @property
    def stack_bytes(self) -> int | None:
        done = [e for e in self.events if e.get("event") == "done"]
        return done[-1].get("stack_bytes") if done else None


def _qemu_value(text: str) -> str:
    """A value inside a QEMU option list: commas doubled."""
    return text.replace(",", ",,")


def qemu_argv(target: Target, elf: Elf, args: Sequence[str], *, blob: bool = False) -> list[str]:
    """qemu-system-arm command line (without `timeout`): the board, the semihosting command line
    (`trainer` + args, none containing a space), the start state at __bnnc_blob, the ELF."""
    bad = [a for a in args if not a or " " in a]
    if bad:
        raise DataError(f"bare-metal trainer arguments cannot be empty or contain spaces: {bad}")
    argv = [*emulator_argv(target), "-semihosting-config",
            ",".join(f"arg={_qemu_value(a)}" for a in ("trainer", *args))]
    if blob:
        argv += ["-device", f"loader,file={BLOB_FILE},addr=0x{elf.blob_addr:x},force-raw=on"]
    return argv + ["-kernel", str(elf.path)]


def _run_dir(files: dict[str, Path | bytes | None]) -> tempfile.TemporaryDirectory:
    """A private working directory holding `files` under their fixed names (symlinks or bytes)."""
    tmp = tempfile.TemporaryDirectory(prefix="bnnc-qemu-")
    for name, src in files.items():
        if src is None:
            continue
        dest = Path(tmp.name) / name
        if isinstance(src, (bytes, bytearray)):
            dest.write_bytes(src)
        else:
            src = Path(src)
            if not src.is_file():
                tmp.cleanup()
                raise DataError(f"{src} does not exist")
            dest.symlink_to(src.resolve())
    return tmp


def _execute(argv: list[str], cwd: str, timeout: float,
             on_event: Callable[[dict], None] | None) -> tuple[int, list[dict], str]:
    full = ["timeout", "-k", "5", f"{timeout:g}", *argv]
    try:
        proc = subprocess.Popen(full, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    except OSError as err:
        raise TargetError(f"cannot start {argv[0]!r}: {err}") from err
    with proc:
        events = parse_events(iter(proc.stdout.readline, ""), on_event)
        stderr = proc.stderr.read()
        rc = proc.wait()
    if rc in (124, 137):
        raise TargetError(f"the emulated trainer did not finish in {timeout:g} s",
                          hint="give a larger --timeout, or fewer --steps")
    return rc, events, stderr


def run(out_dir: str | Path, target: Target | str | None = None, *, train: str | Path,
        test: str | Path | None = None, start_blob: bytes | None = None,
        steps: int | None = None, epochs: int | None = None, limit: int | None = None,
        seed: int | None = None, log_every: int = 0, checkpoint: bool = False, every: int = 0,
        lr_horizon: int | None = None, stack: bool = False, count: bool = False, on_event: Callable[[dict], None] | None = None,
        timeout: float = 600.0, cache: Path | None = None):
    """Train under qemu-system-arm on packed datasets (`train`, optional `test`): --steps/--epochs
    are absolute targets as in the Linux trainer. `start_blob` (a state blob, e.g. from
    start_state_blob or a checkpoint) is loaded into flash; without it the program initializes
    from its seed. `checkpoint`: the trainer writes its state blob at every epoch end (and every
    `every` steps); the last one is returned. `count=True` measures instructions per step instead
    (count_step_instructions) and returns its StepCount. `lr_horizon`: the step the lr schedule
    decays to (default: the target; 0 = constant lr)."""
    out_dir = Path(out_dir)
    m, tgt = compiled_program(out_dir, target)
    if count:
        return count_step_instructions(out_dir, tgt, train=train, steps=steps or 4,
                                       start_blob=start_blob, timeout=timeout, cache=cache)
    if steps is not None and epochs is not None:
        raise DataError("give steps or epochs, not both")
    elf = build_elf(out_dir, tgt, cache=cache)
    args = ["--train", TRAIN_FILE]
    args += ["--test", TEST_FILE] if test is not None else []
    args += ["--blob"] if start_blob is not None else []
    for flag, v in (("--steps", steps), ("--epochs", epochs), ("--limit", limit),
                    ("--seed", seed), ("--log-every", log_every or None),
                    ("--every", every or None), ("--lr-horizon", lr_horizon)):
        if v is not None:
            args += [flag, str(int(v))]
    args += ["--checkpoint", CHECKPOINT_FILE] if checkpoint else []
    args += ["--stack"] if stack else []
    argv = qemu_argv(tgt, elf, args, blob=start_blob is not None)
    with _run_dir({TRAIN_FILE: Path(train), TEST_FILE: Path(test) if test else None,
                   BLOB_FILE: start_blob}) as where:
        rc, events, stderr = _execute(argv, where, timeout, on_event)
        ck = Path(where) / CHECKPOINT_FILE
        blob = ck.read_bytes() if checkpoint and ck.is_file() else None
    return BaremetalRun(rc, events, stderr, checkpoint=blob, argv=argv)


def evaluate(out_dir: str | Path, target: Target | str | None = None, *, test: str | Path,
             start_blob: bytes | None = None, on_event: Callable[[dict], None] | None = None,
             timeout: float = 600.0, cache: Path | None = None) -> BaremetalRun:
    """The trainer's `--eval` mode under qemu-system-arm: the predictions and losses of the packed
    set `test` under `start_blob` (loaded into flash; default: the program's own initialisation),
    as "pred" events (runtime/eval.py reads them)."""
    out_dir = Path(out_dir)
    _, tgt = compiled_program(out_dir, target)
    elf = build_elf(out_dir, tgt, cache=cache)
    args = ["--eval", "--test", TEST_FILE] + (["--blob"] if start_blob is not None else [])
    argv = qemu_argv(tgt, elf, args, blob=start_blob is not None)
    with _run_dir({TEST_FILE: Path(test), BLOB_FILE: start_blob}) as where:
        rc, events, stderr = _execute(argv, where, timeout, on_event)
    return BaremetalRun(rc, events, stderr, argv=argv)


def count_step_instructions(out_dir: str | Path, target: Target | str | None = None, *,
                            train: str | Path, steps: int = 4, start_blob: bytes | None = None,
                            timeout: float = 600.0, cache: Path | None = None) -> StepCount:
    """Guest instructions per training step (bnnc's QEMU plugin, runtime/insncount.py): a run of
    `steps` steps minus a run of 0 steps, both --quiet, divided by `steps`; per function of the
    ELF's symbol table too (StepCount.per_function)."""
    out_dir = Path(out_dir)
    _, tgt = compiled_program(out_dir, target)
    if steps < 1:
        raise DataError(f"count instructions over at least one step, not {steps}")
    elf = build_elf(out_dir, tgt, cache=cache)
    functions = elf_functions(_tool(tgt, "nm"), elf.path)
    counts, per_fn = [], ({}, {})
    with _run_dir({TRAIN_FILE: Path(train), BLOB_FILE: start_blob}) as where:
        for n, fns in zip((0, steps), per_fn):
            args = ["--train", TRAIN_FILE, "--steps", str(n), "--quiet"]
            args += ["--blob"] if start_blob is not None else []
            argv = qemu_argv(tgt, elf, args, blob=start_blob is not None)
            insns, proc = count_instructions(argv[:1], argv[1:], timeout=timeout, cwd=where,
                                             functions=functions, per_function=fns)
            if proc.returncode != 0:
                raise DataError(f"the counting run ({n} steps) failed (exit {proc.returncode}): "
                                f"{(proc.stdout + proc.stderr).strip()[-800:]}")
            counts.append(insns)
    zero, run_ = per_fn
    return StepCount(steps, counts[1], counts[0],
                     {k: (run_.get(k, 0), zero.get(k, 0)) for k in sorted({*zero, *run_})})


def check_trace(out_dir: str | Path, target: Target | str | None, trace_in: bytes, *,
                timeout: float = 600.0, cache: Path | None = None) -> bytes:
    """Run the debug build on a `--check-in` trace (templates/trainer/skeleton.c.j2 documents the format)
    and return its `--check-out` bytes."""
    out_dir = Path(out_dir)
    _, tgt = compiled_program(out_dir, target)
    elf = build_elf(out_dir, tgt, debug=True, cache=cache)
    argv = qemu_argv(tgt, elf, ["--check-in", CHECK_IN, "--check-out", CHECK_OUT])
    with _run_dir({CHECK_IN: trace_in}) as where:
        rc, events, stderr = _execute(argv, where, timeout, None)
        result = Path(where) / CHECK_OUT
        if rc != 0 or not result.is_file():
            msgs = [e.get("message", "") for e in events if e.get("event") == "error"]
            raise TargetError(f"the {tgt.name} check trace failed (exit {rc}): "
                              f"{msgs[-1] if msgs else stderr.strip()[-800:] or 'no output'}")
        return result.read_bytes()
