"""Bare-metal output: `emit_baremetal(env, common, target, out) -> [Path]`, the
files that turn the emitted `<model>.c` into a microcontroller program (Cortex-M, QEMU MPS2 boards).

Input: the Jinja environment and the template context `common` that codegen.emit_c rendered
`<model>.c`/`.h` with, a `Target` of kind "baremetal" and the output directory. Output, in `out`:
`baremetal_startup.c` (vector table, FPU enable, .data/.bss init, fault report),
`baremetal_semihost.h` (the semihosting calls: the program's only I/O), `baremetal_fmt.h` (JSON
numbers without printf or doubles), `baremetal_trainer.c` (the trainer skeleton's bare-metal
platform part: packed data streamed through semihosting, the Linux trainer's JSON lines,
checkpoints, the `bnnc check` trace in debug builds), `<model>_fw.c`/`.h` (the firmware API of
compiler/library.py, which the trainer trains through: one training loop for the library and
the standalone trainer), `baremetal.ld` (the linker script: the
target's RAM/flash/stack budget, enforced by ASSERTs), `baremetal.mk` (the Makefile section that
builds `trainer.elf`) and `baremetal.json` (that budget, for the runtime's messages).

Invariants: every file is rendered from templates/baremetal/*.j2 with values computed here (the
templates only substitute); the same inputs give byte-identical files; `build_command` is the one
compiler command line (runtime/baremetal.py runs it, baremetal.mk spells the same one), so the
program `bnnc run --emulate` measures is the one a user builds with make.

Decisions: the start state is not compiled in; the linker script reserves the top of the flash
budget for a state blob (`__bnnc_blob`) that the runner loads there (QEMU `-device loader`), so one
ELF serves any initial state or checkpoint, like a weights partition next to the firmware. A
partially trained model's frozen parameters (the state's tail) stay there: the release build reads
them in place from that flash blob (`const`, never copied to RAM), so RAM holds only the trained
part of the state; a checkpoint streams both parts, and the program refuses to train without
`--blob`. The debug build (`bnnc check`) keeps them in RAM, as it loads its state from the trace. Training
data are streamed from a packed dataset file through semihosting (no flash spent on data, the same
files and batch order as the Linux trainer). The debug build `bnnc check` runs is linked against
the whole board memory (4 MiB), since it keeps a copy of every tensor; the budget applies to the
plain build only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import jinja2

from .errors import TargetError
from .firmware_api import fw_files, render_fw
from .planner import align_up
from .target import Target, parse_size

STARTUP, SEMIHOST, FMT = "baremetal_startup.c", "baremetal_semihost.h", "baremetal_fmt.h"
TRAINER, LINKER, MAKEFILE = "baremetal_trainer.c", "baremetal.ld", "baremetal.mk"
BUDGET = "baremetal.json"  # the budget the linker script was written with (--ram/--flash applied)
TEMPLATES = {STARTUP: "startup.c.j2", SEMIHOST: "semihost.h.j2", FMT: "fmt.h.j2",
             TRAINER: "trainer.c.j2", LINKER: "link.ld.j2", MAKEFILE: "baremetal.mk.j2"}
BLOB_ALIGN = 1024          # the start-state blob's flash reservation is rounded up to this


@dataclass(frozen=True)
class Board:
    """The emulated board's memory map (targets/<name>.toml `board_*` keys). `vector_origin`:
    where the core reads its vector table at reset when that is not the start of the flash region
    (QEMU's mps3-an547 boots from its 512 KiB ITCM; the code and the state blob go to the 2 MiB
    SRAM); None = the start of flash."""
    flash_origin: int
    ram_origin: int
    flash_nbytes: int
    ram_nbytes: int
    vector_origin: int | None = None


def board(target: Target) -> Board:
    ex = target.extra
    where = f"targets/{target.name}.toml"
    try:
        vec = ex.get("board_vector_origin")
        return Board(int(ex.get("board_flash_origin", 0)),
                     int(ex.get("board_ram_origin", 0x20000000)),
                     parse_size(ex.get("board_flash", "4M"), f"{where}: board_flash"),
                     parse_size(ex.get("board_ram", "4M"), f"{where}: board_ram"),
                     None if vec is None else int(vec))
    except (TypeError, ValueError) as err:
        raise TargetError(f"{where}: board_flash_origin / board_ram_origin / board_vector_origin "
                          f"must be integers "
                          f"({err})") from err


def cpu_name(target: Target) -> str:
    """'Cortex-M7' from -mcpu=cortex-m7 (for comments and messages)."""
    for f in target.cflags:
        if f.startswith("-mcpu="):
            return f[6:].replace("cortex", "Cortex").replace("-m", "-M")
    return target.name


def blob_reserve(blob_nbytes: int) -> int:
    return align_up(blob_nbytes, BLOB_ALIGN)


def check_budgets(target: Target) -> None:
    """TargetError unless the target has RAM/flash budgets and a stack that the board can hold."""
    b = board(target)
    for what, n, limit in (("ram", target.ram, b.ram_nbytes), ("flash", target.flash,
                                                                b.flash_nbytes)):
        if n <= 0:
            raise TargetError(f"target {target.name!r} has no {what} budget",
                              hint=f"set {what} = \"256K\" in targets/{target.name}.toml or pass "
                                   f"--{what}")
        if n > limit:
            raise TargetError(f"--{what} {n} is larger than the emulated board's {limit} B "
                              f"(target {target.name})", hint=f"use at most {limit // 1024}K")
    if target.stack <= 0 or target.stack >= target.ram:
        raise TargetError(f"target {target.name!r}: stack = {target.stack} must be positive and "
                          f"below ram = {target.ram}", hint=f"e.g. stack = \"8K\" in "
                                                            f"targets/{target.name}.toml")


def sources(model: str) -> tuple[str, ...]:
    return (STARTUP, TRAINER, f"{model}.c", fw_files(model)[1])


def headers(model: str) -> tuple[str, ...]:
    return (f"{model}.h", fw_files(model)[0], SEMIHOST, FMT)


def debug_ldflags(target: Target) -> tuple[str, ...]:
    """Link options of the debug build: the budget symbols set to the whole board."""
    b = board(target)
    return (f"-Wl,--defsym=__bnnc_ram_budget={b.ram_nbytes}",
            f"-Wl,--defsym=__bnnc_flash_budget={b.flash_nbytes}")


def build_command(out_dir: Path, model: str, target: Target, output: Path, *,
                  debug: bool = False) -> list[str]:
    """The compiler command line of trainer.elf (debug: trainer_debug.elf)."""
    out_dir = Path(out_dir)
    cmd = [target.cc, *target.cflags, *(["-DBNNC_DEBUG_DUMP"] if debug else []),
           "-I", str(out_dir), "-T", str(out_dir / LINKER),
           *(str(out_dir / s) for s in sources(model)), "-o", str(output), *target.ldflags]
    return cmd + list(debug_ldflags(target)) if debug else cmd


def _context(common: Mapping[str, Any], target: Target) -> dict:
    """`common` plus what the bare-metal templates add: the board, the budget, the build line and
    the tensor-table rows of the batch input and of one state tensor."""
    b = board(target)
    tensors = common["tensors"]
    fo = common["frozen_offset"]
    state_index = next((t["index"] for t in tensors if t["region"] == "state"
                        and t["offset"] < fo), None)
    if state_index is None:
        raise TargetError(f"model {common['model']!r} has no training state to train")
    # a frozen tensor's row: the trainer streams the frozen tail from where the program reads it
    frozen_index = next((t["index"] for t in tensors if t["region"] == "state"
                         and t["offset"] >= fo), -1) if common["frozen_nbytes"] else -1
    model = common["model"]
    return dict(common, cpu=cpu_name(target), frozen_index=frozen_index,
                input_index=next(t["index"] for t in tensors if t["name"] == "input"),
                state_index=state_index, ram=target.ram, flash=target.flash, stack=target.stack,
                blob_reserve=blob_reserve(common["blob_nbytes"]),
                flash_origin=f"0x{b.flash_origin:08X}", ram_origin=f"0x{b.ram_origin:08X}",
                vector_origin=None if b.vector_origin is None else f"0x{b.vector_origin:08X}",
                board_flash=b.flash_nbytes, board_ram=b.ram_nbytes, cc=target.cc,
                cflags=" ".join(target.cflags), ldflags=" ".join(target.ldflags),
                sources=sources(model), headers=headers(model),
                debug_ldflags=debug_ldflags(target), emulator=" ".join(target.emulator))


def emit_baremetal(env: jinja2.Environment, common: Mapping[str, Any], target: Target,
                   out: Path) -> list[Path]:
    """Render templates/baremetal/*.j2 into `out` (module docstring); returns the files written."""
    check_budgets(target)
    ctx = _context(common, target)
    out = Path(out)
    written = []
    for name, template in TEMPLATES.items():
        path = out / name
        path.write_text(env.get_template(f"baremetal/{template}").render(**ctx))
        written.append(path)
    written += render_fw(env, ctx, out)
    doc = dict(target=target.name, cpu=ctx["cpu"], ram=target.ram, flash=target.flash,
               stack=target.stack, blob_reserve=ctx["blob_reserve"])
    (out / BUDGET).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    return written + [out / BUDGET]


def compiled_target(out_dir: Path, target: Target) -> Target:
    """`target` with the budget `out_dir` was compiled with (bnnc compile --ram/--flash)."""
    path = Path(out_dir) / BUDGET
    if not path.is_file():
        raise TargetError(f"{out_dir} has no {BUDGET}", hint=f"compile again with --target "
                                                            f"{target.name}")
    doc = json.loads(path.read_text())
    return replace(target, ram=int(doc["ram"]), flash=int(doc["flash"]), stack=int(doc["stack"]))
