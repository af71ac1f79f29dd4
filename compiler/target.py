"""Target descriptions: targets/<name>.toml -> `Target` (schema in targets/README.md).

A target says how to build and run the emitted C for one kind of machine: the compiler and flags,
the arena alignment the planner must use, SIMD features the kernel templates may use, how to emulate
it (QEMU) and which Debian packages provide the toolchain (for the error when one is missing), and
for microcontrollers the RAM/flash budget. Adding a target = adding a file; nothing here names one.
"""

from __future__ import annotations

import re
import shutil
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import TargetError

TARGETS = Path(__file__).resolve().parent.parent / "targets"
KINDS = ("host", "linux", "baremetal")
SIMD_FEATURES = ("neon",)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_UNITS = {"": 1, "K": 1024, "KI": 1024, "KIB": 1024, "M": 1 << 20, "MI": 1 << 20, "MIB": 1 << 20}


@dataclass(frozen=True)
class Target:
    name: str
    cc: str
    cflags: tuple[str, ...]           # every build of the generated C (library and programs)
    shared_flags: tuple[str, ...]     # added for the host's shared library (cffi)
    align: int                        # arena alignment the planner must use
    description: str = ""
    kind: str = "host"                # host | linux (a Linux program) | baremetal (no OS)
    ldflags: tuple[str, ...] = ()     # added when linking a program (e.g. -static)
    simd: tuple[str, ...] = ()        # kernel variants the templates may select ("neon")
    arch: str = ""                    # `uname -m` of a device that runs it ("" = this machine)
    emulator: tuple[str, ...] = ()    # argv prefix that runs a program of this target here
    packages: tuple[str, ...] = ()    # Debian packages providing cc and the emulator
    ram: int = 0                      # baremetal: RAM budget in bytes (0 = no budget)
    flash: int = 0                    # baremetal: flash budget in bytes
    stack: int = 0                    # baremetal: stack reserved in RAM
    extra: dict = field(default_factory=dict, compare=False, hash=False)   # kind-specific fields

    @property
    def native(self) -> bool:
        return self.kind == "host"

    @property
    def pointer_bytes(self) -> int:
        """sizeof(size_t) of the target: 4 on bare-metal Cortex-M, 8 on the host and the 64-bit
        Linux targets (aarch64)."""
        return 4 if self.kind == "baremetal" else 8

    @property
    def overlays(self) -> tuple[str, ...]:
        """The template overlays (templates/targets/<name>/) of this target, most specific first:
        its SIMD features; the small tiles of bare-metal targets, or for host and Linux targets
        x86-64's run-time AVX2/popcnt choice (compiled on x86-64 only); then the GCC/Clang generic
        vectors every target's compiler has. The portable C below them all stays the reference
        and the -DBNNC_NO_SIMD build."""
        return (*self.simd, "cortex-m" if self.kind == "baremetal" else "x86", "gnu")

    def require(self, *tools: str) -> None:
        """TargetError naming the Debian packages when cc (or another tool) is not on PATH."""
        for tool in tools or (self.cc,):
            if shutil.which(tool) is None:
                pk = " ".join(self.packages) or "a C compiler"
                raise TargetError(f"{tool!r} (needed by target {self.name!r}) is not installed",
                                  hint=f"apt-get install --no-install-recommends {pk}")


def parse_size(value, where: str) -> int:
    """'256K', '2M', '512KiB' or an int -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    s = str(value).strip().upper().replace(" ", "")
    num = s.rstrip("KMIB")
    unit = s[len(num):]
    if not num.isdigit() or unit not in _UNITS:
        raise TargetError(f"{where}: {value!r} is not a size (examples: 262144, 256K, 2M)")
    return int(num) * _UNITS[unit]


def _strs(doc: dict, key: str, path: Path) -> tuple[str, ...]:
    v = doc.get(key, [])
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise TargetError(f"{path}: {key} must be a list of strings")
    return tuple(v)


def known_targets() -> list[str]:
    return sorted(p.stem for p in TARGETS.glob("*.toml"))


def load_target(name: str) -> Target:
    """targets/<name>.toml (or a path to a .toml) -> Target; TargetError names file and field."""
    path = Path(name) if name.endswith(".toml") else TARGETS / f"{name}.toml"
    if not _NAME.match(path.stem):
        # the name is printed into generated C and Makefiles: keep it a plain word
        raise TargetError(f"target name {path.stem!r} must be letters, digits, '.', '_' or '-'",
                          hint="rename the .toml file")
    if not path.is_file():
        raise TargetError(f"unknown target {name!r} (no {path})",
                          hint=f"known targets: {', '.join(known_targets())}")
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise TargetError(f"{path}: not valid TOML: {err}") from err
    missing = [k for k in ("cc", "cflags", "align") if k not in doc]
    if missing:
        raise TargetError(f"{path}: missing field(s) {', '.join(missing)}")
    align = doc["align"]
    if not isinstance(align, int) or align < 8 or align & (align - 1):
        raise TargetError(f"{path}: align = {align!r} must be a power of two >= 8")
    kind = doc.get("kind", "host")
    if kind not in KINDS:
        raise TargetError(f"{path}: kind = {kind!r} must be one of {', '.join(KINDS)}")
    simd = _strs(doc, "simd", path)
    bad = [s for s in simd if s not in SIMD_FEATURES]
    if bad:
        raise TargetError(f"{path}: simd feature(s) {', '.join(bad)} unknown "
                          f"(known: {', '.join(SIMD_FEATURES)})")
    emu = doc.get("emulator", {})
    if not isinstance(emu, dict):
        raise TargetError(f"{path}: [emulator] must be a table")
    emulator = (*((str(emu["cmd"]),) if "cmd" in emu else ()), *_strs(emu, "args", path))
    known = {"cc", "cflags", "align", "kind", "simd", "emulator", "description", "shared_flags",
             "ldflags", "arch", "packages", "ram", "flash", "stack"}
    return Target(name=path.stem, cc=str(doc["cc"]), cflags=_strs(doc, "cflags", path),
                  shared_flags=_strs(doc, "shared_flags", path), align=align,
                  description=str(doc.get("description", "")), kind=kind,
                  ldflags=_strs(doc, "ldflags", path), simd=simd, arch=str(doc.get("arch", "")),
                  emulator=emulator, packages=_strs(doc, "packages", path),
                  ram=parse_size(doc.get("ram", 0), f"{path}: ram"),
                  flash=parse_size(doc.get("flash", 0), f"{path}: flash"),
                  stack=parse_size(doc.get("stack", 0), f"{path}: stack"),
                  extra={k: v for k, v in doc.items() if k not in known})
