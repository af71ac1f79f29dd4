"""`bnnc compile MODEL --target <bare-metal target> --emit library`: the emitted trainer as a library
for the firmware's own project, and the firmware API both it and the standalone bare-metal trainer
train through.

Input: the Jinja environment and template context `common` of codegen.emit_c (which rendered
`<model>.c`/`.h` into OUT/src), the Target (kind "baremetal") and OUT. Output, in OUT:

    src/<model>.c, <model>.h          the model (codegen.emit_c)
    src/<model>_fw.c, <model>_fw.h    the firmware API (templates/library/fw.*.j2): samples one at
                                      a time, predict_one, two-slot checkpoints through flash callbacks
    CMakeLists.txt, cmake/            library target bnnc::<model>, install rules and CMake package
                                      (find_package(bnnc_<model>)), a toolchain file for the board
    firmware/                         the example application (main.c) with the board's glue,
                                      startup code and linker script; built when BNNC_BOARD is set
    library.properties, examples/     the Arduino-library layout (src/ is shared)
    zephyr/                           the Zephyr module (module.yml, CMakeLists.txt, Kconfig)
    README.md                         how to use each layout

Invariants: the library itself needs no vendor SDK, heap, stdio or semihosting (only the QEMU
boards' example glue uses semihosting, for its console, data file and exit status); every file is
rendered from templates with values computed here; the same inputs give the same bytes.

Board descriptions come from the target's toml (targets/README.md): `board` (the board's name),
`board_qemu` (true: the example runs under the target's [emulator]), `board_flash_origin`,
`board_ram_origin` (the memory map), `ram`/`flash` (the part's memory, which the budget check and
the linker script use) and `flash_erase` (the erase unit the checkpoint slots are rounded to).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import jinja2

from .baremetal import board, check_budgets
from .errors import TargetError
from .firmware_api import FLASH_ALIGN, SLOT_RECORD, render_fw
from .planner import align_up
from .target import Target, parse_size

FLASH_DRIVERS = ("nrf52-nvmc", "stm32f7", "stm32h7")   # templates/library/board_part.c.j2
CPU_FLAG_PREFIXES = ("-mcpu=", "-mthumb", "-mfpu=", "-mfloat-abi=")
# the target's cflags a consumer's build keeps for the library: bit-identical floats and dead-code
# removal (warnings, -std and -O are the consumer's)
LIB_FLAG_PREFIXES = ("-ffp-contract=", "-fno-strict-aliasing", "-fno-math-errno",
                     "-ffunction-sections", "-fdata-sections")


def _erase_unit(target: Target) -> int:
    where = f"targets/{target.name}.toml"
    erase = parse_size(target.extra.get("flash_erase", "4K"), f"{where}: flash_erase")
    if erase <= 0 or erase % FLASH_ALIGN:
        raise TargetError(f"{where}: flash_erase = {erase} must be a positive multiple of "
                          f"{FLASH_ALIGN}")
    return erase


def checkpoint_slot_nbytes(target: Target, blob_nbytes: int) -> int:
    """One checkpoint slot of the example firmware: the record and the state blob, rounded up
    to the flash's erase unit (`flash_erase`)."""
    return align_up(align_up(SLOT_RECORD + blob_nbytes, FLASH_ALIGN), _erase_unit(target))


def cpu_flags(target: Target) -> list[str]:
    return [f for f in target.cflags if f.startswith(CPU_FLAG_PREFIXES)]


def lib_flags(target: Target) -> list[str]:
    return [f for f in target.cflags if f.startswith(LIB_FLAG_PREFIXES)]


def board_context(target: Target, common: Mapping[str, Any]) -> dict:
    """The board of the example application: name, memory map and the checkpoint region (two
    slots at the top of the flash budget, each rounded up to the erase unit)."""
    check_budgets(target)
    ex = target.extra
    where = f"targets/{target.name}.toml"
    name = ex.get("board")
    if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
        raise TargetError(f"{where}: `board` (the board's name, letters, digits, '-') is needed "
                          "for --emit library", hint="add e.g. board = \"nucleo-f746zg\"")
    slot = checkpoint_slot_nbytes(target, common["blob_nbytes"])
    erase = _erase_unit(target)
    b = board(target)
    if 2 * slot >= target.flash:
        raise TargetError(f"two checkpoint slots of {slot:,} B do not fit in the {target.flash:,} B "
                          f"of flash of {target.name}", hint="a larger --flash, or --optimizer bop "
                                                             "(a smaller state)")
    driver = str(ex.get("flash_driver", ""))
    if not ex.get("board_qemu") and driver not in FLASH_DRIVERS:
        raise TargetError(f"{where}: flash_driver = {driver!r} must be one of "
                          f"{', '.join(FLASH_DRIVERS)} (the example's checkpoint flash)")
    sectors = ex.get("flash_sectors", [])
    if driver == "stm32f7" and not (isinstance(sectors, list) and sectors
                                    and all(isinstance(v, int) for v in sectors)):
        raise TargetError(f"{where}: flash_sectors (the sector start offsets) is needed by the "
                          "stm32f7 flash driver")
    return dict(board=name, board_qemu=bool(ex.get("board_qemu", False)),
                flash_driver=driver, flash_sectors=[f"0x{v:X}u" for v in sectors],
                flash_origin=f"0x{b.flash_origin:08X}", ram_origin=f"0x{b.ram_origin:08X}",
                vector_origin=None if b.vector_origin is None else f"0x{b.vector_origin:08X}",
                ram=target.ram, flash=target.flash, stack=target.stack, slot_nbytes=slot,
                ckpt_nbytes=2 * slot, flash_erase=erase,
                cpu_flags=" ".join(cpu_flags(target)), lib_flags=" ".join(lib_flags(target)),
                cc=target.cc, cxx=target.cc[:-3] + "g++" if target.cc.endswith("gcc") else target.cc,
                emulator=" ".join(target.emulator), sketch=_camel(common["model"]) + "Train")


def _camel(model: str) -> str:
    return "".join(p[:1].upper() + p[1:] for p in model.replace("-", "_").split("_") if p) or "Bnnc"


LAYOUT = {
    "CMakeLists.txt": "CMakeLists.txt.j2",
    "cmake/{package}Config.cmake.in": "Config.cmake.in.j2",
    "cmake/toolchain-{board}.cmake": "toolchain.cmake.j2",
    "firmware/CMakeLists.txt": "firmware.cmake.j2",
    "firmware/main.c": "main.c.j2",
    "firmware/board.h": "board.h.j2",
    "firmware/startup.c": "startup.c.j2",
    "firmware/boards/{board}/board.c": "board_{kind}.c.j2",
    "firmware/boards/{board}/link.ld": "link.ld.j2",
    "library.properties": "library.properties.j2",
    "examples/{sketch}/{sketch}.ino": "sketch.ino.j2",
    "zephyr/module.yml": "module.yml.j2",
    "zephyr/CMakeLists.txt": "zephyr.cmake.j2",
    "zephyr/Kconfig": "Kconfig.j2",
    "README.md": "README.md.j2",
}


def emit_library(env: jinja2.Environment, common: Mapping[str, Any], target: Target,
                 out: Path) -> list[Path]:
    """Render the library layout (module docstring) into `out`; `common` must hold fw_context's
    keys. Returns the files written (src/<model>.c/.h are codegen's)."""
    if target.kind != "baremetal":
        raise TargetError(f"--emit library needs a bare-metal target; {target.name} is "
                          f"{target.kind}", hint="pick --target cortex-m4, cortex-m7, stm32f746, "
                                                 "nrf52840, ...")
    out = Path(out)
    ctx = dict(common, **board_context(target, common), package=f"bnnc_{common['model']}",
               target=target.name)
    names = dict(package=ctx["package"], board=ctx["board"], sketch=ctx["sketch"],
                 kind="qemu" if ctx["board_qemu"] else "part")
    written = render_fw(env, ctx, out / "src")
    if ctx["board_qemu"]:
        sh = out / "firmware" / "boards" / ctx["board"] / "semihost.h"
        sh.parent.mkdir(parents=True, exist_ok=True)
        sh.write_text(env.get_template("baremetal/semihost.h.j2").render(**ctx))
        written.append(sh)
    for dest, template in LAYOUT.items():
        path = out / dest.format(**names)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(env.get_template(f"library/{template.format(**names)}").render(**ctx))
        written.append(path)
    return written
