"""This core's peak rates, measured: the denominators of `bnnc profile`'s fraction-of-peak columns.

Input: nothing but the machine. Output: a `Peaks` -- the multiply-accumulates per second one
thread of this core reaches in the loop of each product class bnnc's kernels fall into, and the
read bandwidth of an L2-sized and of a DRAM-sized working set.

| class | what a MAC is | the probe loop (runtime/peak_probe.c) |
|---|---|---|
| `float` | f32 multiply, then add (not fused: -ffp-contract=off) | 4x4 register block of vectors |
| `int` | u8/PO2 code x int8 or sign, summed in int32 | VNNI vpdpbusd / AVX2 vpmaddubsw |
| `bit` | +-1 x +-1 (XNOR, popcount, add) | VPOPCNTDQ / popcount per 64-bit word |

Method: runtime/peak_probe.c is built once with `-O3 -ffp-contract=off -march=native` (this machine's widest ISA:
the probe measures the core, not bnnc's build) into the build cache, then each loop runs with
a doubling repeat count until one call takes >= 20 ms of thread CPU time; the best of three such
calls is the peak. Limits: these are the rates of simple register-blocked loops fed from L1 --
a lower bound on the core's true peak (a better loop could beat it), so a kernel's fraction of
peak is an upper bound; the int peak counts VNNI's 8-bit products, which PO2 products (more
bits per code, computed as bit-plane popcounts) cannot reach one for one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cffi

from ..compiler.errors import TargetError
from .host import build_cached, cache_dir

SOURCE = Path(__file__).with_name("peak_probe.c")
CDEF = """
int64_t peak_f32(int64_t iters, double *sink);
int64_t peak_int(int64_t iters, double *sink);
int64_t peak_bit(int64_t iters, double *sink);
int64_t peak_read(const uint8_t *p, int64_t nbytes, int64_t iters, double *sink);
"""
CC, FLAGS = "cc", ("-O3", "-ffp-contract=off", "-march=native", "-shared", "-fPIC", "-std=gnu11", "-Wall", "-Werror")
MIN_SECONDS = 0.02
L2_BYTES, DRAM_BYTES = 256 << 10, 64 << 20


@dataclass(frozen=True)
class Peaks:
    """One thread's measured peak rates: MACs/s per class, bytes/s per working set."""
    mac_per_s: dict[str, float]      # "float", "int", "bit"
    read_l2: float                   # bytes/s, a 256 KiB working set
    read_dram: float                 # bytes/s, a 64 MiB working set

    def describe(self) -> str:
        g = {k: v / 1e9 for k, v in self.mac_per_s.items()}
        return (f"this core (probe, one thread): f32 mul+add {g['float']:.1f}, int8 dot "
                f"{g['int']:.1f}, 1-bit xnor-popcount {g['bit']:.1f} GMAC/s; reads "
                f"{self.read_l2 / 1e9:.1f} GB/s (256 KiB) / {self.read_dram / 1e9:.1f} GB/s "
                f"(64 MiB)")


def _library(cache: Path | None):
    lib = build_cached(
        Path(cache) if cache is not None else cache_dir(), "peak_probe", ".so",
        (SOURCE.read_bytes(), CC.encode(), "\0".join(FLAGS).encode()),
        lambda tmp: [CC, *FLAGS, str(SOURCE), "-o", tmp],
        what=f"compiling {SOURCE.name}",
        missing=TargetError(f"C compiler {CC!r} not found", hint="install gcc or clang"))
    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    return ffi, ffi.dlopen(str(lib))


def _rate(call) -> float:
    """Work per second of `call(iters) -> work`: doubling iters until one call takes MIN_SECONDS,
    then the best of three calls."""
    iters = 1
    while True:
        t0 = time.thread_time()
        work = call(iters)
        dt = time.thread_time() - t0
        if dt >= MIN_SECONDS:
            break
        iters *= 2 if dt <= 0 else max(2, min(16, int(2 * MIN_SECONDS / dt)))
    best = work / dt
    for _ in range(2):
        t0 = time.thread_time()
        work = call(iters)
        dt = time.thread_time() - t0
        best = max(best, work / dt)
    return best


@lru_cache(maxsize=1)
def measure_peaks(cache: Path | None = None) -> Peaks:
    """This core's Peaks (module doc); measured once per process, about half a second."""
    ffi, lib = _library(cache)
    sink = ffi.new("double *")
    macs = {cls: _rate(lambda n, f=fn: f(n, sink))
            for cls, fn in (("float", lib.peak_f32), ("int", lib.peak_int), ("bit", lib.peak_bit))}
    reads = {}
    for nbytes in (L2_BYTES, DRAM_BYTES):
        buf = ffi.new("uint8_t[]", nbytes)
        ffi.memmove(buf, bytes(range(256)) * (nbytes // 256), nbytes)
        reads[nbytes] = _rate(lambda n, b=buf, s=nbytes: lib.peak_read(b, s, n, sink))
    return Peaks(macs, reads[L2_BYTES], reads[DRAM_BYTES])
