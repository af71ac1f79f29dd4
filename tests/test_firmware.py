"""`bnnc compile --emit library`: the firmware library (CMake project, Arduino layout, Zephyr
module) and its example firmware, built through the generated CMake project with Debian's cmake
and arm-none-eabi, run under QEMU on the Cortex-M4 and M7 boards: the losses of training through
the sample-at-a-time API equal the standalone bare-metal trainer's (same seed, same examples), and
a checkpoint saved through the flash callbacks is restored after a reset that cut the power in the
middle of the next save. The Arduino sketch compiles as C++ with -Wall -Wextra -Werror; the
real-board examples (STM32F746, STM32H743, nRF52840) build.

Tests that build need arm-none-eabi-gcc/g++, cmake and qemu-system-arm (scripts/setup.sh) and skip
without them."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from bnnc.cli import main
from bnnc.runtime import baremetal, packed
from bnnc.runtime.datasets import find_dataset_dir, load_dataset
from pyref import lowbias32

BATCH = 8
STEPS = 2          # per checkpoint round; the example does 2 rounds, the reset replays round 2
TOOLS = ("arm-none-eabi-gcc", "arm-none-eabi-g++", "cmake", "qemu-system-arm")
arm = pytest.mark.skipif(not all(shutil.which(t) for t in TOOLS),
                         reason="needs gcc-arm-none-eabi, libnewlib-arm-none-eabi, cmake, "
                                "qemu-system-arm")
QEMU = ["-display", "none", "-monitor", "none", "-serial", "none", "-chardev", "stdio,id=sh0",
        "-semihosting-config", "enable=on,target=native,chardev=sh0"]


def _compile(tmp: Path, target: str, *, library: bool, extra: tuple[str, ...] = ()) -> Path:
    out = tmp / f"{target}-{'lib' if library else 'prog'}"
    argv = ["compile", "tfc", "--target", target, "--batch", str(BATCH), "--optimizer", "bop",
            "-o", str(out)] + (["--emit", "library"] if library else []) + list(extra)
    assert main(argv) == 0
    return out


def test_library_layout(tmp_path):
    out = _compile(tmp_path, "cortex-m4", library=True)
    for f in ("CMakeLists.txt", "cmake/bnnc_tfcConfig.cmake.in", "cmake/toolchain-mps2-an386.cmake",
              "src/tfc.c", "src/tfc.h", "src/tfc_fw.c", "src/tfc_fw.h", "library.properties",
              "examples/TfcTrain/TfcTrain.ino", "zephyr/module.yml", "zephyr/CMakeLists.txt",
              "zephyr/Kconfig", "firmware/main.c", "firmware/boards/mps2-an386/board.c",
              "firmware/boards/mps2-an386/link.ld", "bnnc_manifest.json"):
        assert (out / f).is_file(), f
    lib = (out / "src/tfc.c").read_text() + (out / "src/tfc_fw.c").read_text()
    # the library itself: no semihosting, no stdio, no heap
    for banned in ("bkpt", "<stdio.h>", "malloc", "printf", "semihost"):
        assert banned not in lib, banned
    fw = (out / "src/tfc_fw.h").read_text()
    for api in ("bnnc_tfc_add_sample", "bnnc_tfc_sample_slot", "bnnc_tfc_predict_one",
                "bnnc_tfc_save", "bnnc_tfc_restore", "bnnc_tfc_flash_t"):
        assert api in fw
    assert "name=bnnc_tfc" in (out / "library.properties").read_text()
    # deterministic: a second compile writes the same bytes
    again = tmp_path / "again"
    assert main(["compile", "tfc", "--target", "cortex-m4", "--batch", str(BATCH), "--optimizer",
                 "bop", "--emit", "library", "-o", str(again)]) == 0
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for f in files:
        assert (out / f).read_bytes() == (again / f).read_bytes(), f
    # the standalone trainer trains through the same firmware API (one training loop)
    prog = _compile(tmp_path, "cortex-m4", library=False)
    trainer = (prog / "baremetal_trainer.c").read_text()
    assert "bnnc_tfc_add_sample(" in trainer and "bnnc_tfc_write_state(" in trainer
    def body(path):   # without the command line in the front matter
        return [ln for ln in path.read_text().splitlines() if "bnnc compile" not in ln]
    assert body(prog / "tfc_fw.c") == body(out / "src/tfc_fw.c")


def test_library_needs_baremetal_target(tmp_path, capsys):
    assert main(["compile", "tfc", "--target", "host", "--emit", "library",
                 "-o", str(tmp_path / "o")]) == 2
    assert "error: --emit library needs a bare-metal target" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# the standalone trainer's batch order (templates/trainer/skeleton.c.j2), written independently

_mix32 = lowbias32


def _permute(i: int, n: int, key: int) -> int:
    bits = 2
    while bits < 32 and (1 << bits) < n:
        bits += 2
    half = bits // 2
    mask = (1 << half) - 1
    while True:
        lo, hi = i & mask, i >> half
        for r in range(4):
            lo, hi = hi ^ (_mix32(lo ^ key ^ ((r * 0x9E3779B9) & 0xFFFFFFFF)) & mask), lo
        i = (hi << half) | lo
        if i < n:
            return i


def _stream_order(count: int, steps: int, seed: int = 0) -> list[int]:
    spe = count // BATCH
    order = []
    for step in range(steps):
        epoch, j = divmod(step, spe)
        key = _mix32(seed ^ _mix32(epoch + 0x632BE5AB))
        order += [_permute(j * BATCH + b, count, key) for b in range(BATCH)]
    return order


def _mnist(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first n MNIST training images (scaled to [-1, 1]) or, without MNIST on disk, the
    look-alike of tests/mnist_like.py."""
    try:
        find_dataset_dir("mnist")
        ds = load_dataset("mnist", limit=n)
        return ds.x_train.reshape(n, -1), ds.y_train
    except Exception:   # noqa: BLE001 -- no MNIST here: the look-alike
        import tempfile
        from mnist_like import write_mnist_like
        with tempfile.TemporaryDirectory() as d:
            ds = load_dataset("mnist", write_mnist_like(Path(d), n, 10, 0), limit=n)
        return ds.x_train.reshape(n, -1), ds.y_train


def _cmake_build(out: Path, board: str, *defs: str) -> Path:
    build = out / "build"
    subprocess.run(["cmake", "-S", str(out), "-B", str(build),
                    f"-DCMAKE_TOOLCHAIN_FILE={out}/cmake/toolchain-{board}.cmake", *defs],
                   check=True, capture_output=True, text=True)
    res = subprocess.run(["cmake", "--build", str(build)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    elf = build / "firmware" / "bnnc_tfc_example.elf"
    assert elf.is_file()
    return elf


@arm
@pytest.mark.parametrize("target,board,extra", [("cortex-m4", "mps2-an386", ()),
                                                ("cortex-m7", "mps2-an500", ()),
                                                # the firmware API taking u8 samples
                                                ("cortex-m4", "mps2-an386", ("--input", "u8"))],
                         ids=["m4", "m7", "m4-u8"])
def test_example_firmware_matches_trainer_and_survives_a_power_cut(tmp_path, target, board,
                                                                   extra):
    lib = _compile(tmp_path, target, library=True, extra=extra)
    prog = _compile(tmp_path, target, library=False, extra=extra)
    if extra:
        assert "const uint8_t *x" in (lib / "src" / "tfc_fw.h").read_text()
    count = 64
    x, y = _mnist(count)
    total = 3 * STEPS            # boot 1: rounds 1-2 (second save cut); boot 2: rounds 2-3
    train = tmp_path / "train.bnnd"
    packed.pack(train, x, y, 10)
    # the standalone trainer (semihosting, its own batch order) from the compiled seed
    # (at the constant lr: the library trains open-ended, with no lr horizon)
    ref = baremetal.run(prog, train=train, steps=total, log_every=1, lr_horizon=0, timeout=300)
    assert ref.returncode == 0, ref.events
    want = {e["step"]: np.float32(e["loss"]) for e in ref.events if e.get("event") == "step"}
    assert sorted(want) == list(range(1, total + 1))
    # the example firmware reads its "sensor" stream in file order: the trainer's examples, in the
    # trainer's order
    run_dir = tmp_path / f"run-{board}"
    run_dir.mkdir()
    order = _stream_order(count, total) + [0]
    packed.pack(run_dir / "samples.bnnd", x[order], y[order], 10)
    elf = _cmake_build(lib, board, f"-DBNNC_EXAMPLE_STEPS={STEPS}", "-DBNNC_EXAMPLE_ROUNDS=2")
    res = subprocess.run(["timeout", "120", "qemu-system-arm", "-M", board, *QEMU, "-kernel",
                          str(elf)], cwd=run_dir, stdin=subprocess.DEVNULL, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "fresh start"
    cut = lines.index("power cut armed: half-way through the next save")
    # the reset came mid-save: the next boot restores the checkpoint before it
    assert lines[cut + 1] == f"restored step {STEPS} generation 1", lines
    assert f"saved step {STEPS} generation 1" in lines[:cut]

    def losses(part):
        got = [re.fullmatch(r"step (\d+) loss 0x([0-9a-f]{8})", ln) for ln in part]
        return [(int(m[1]), np.frombuffer(struct.pack("<I", int(m[2], 16)), np.float32)[0])
                for m in got if m]

    boot1, boot2 = losses(lines[:cut + 1]), losses(lines[cut + 1:])
    assert [s for s, _ in boot1] == list(range(1, 2 * STEPS + 1))
    assert [s for s, _ in boot2] == list(range(STEPS + 1, total + 1))
    for s, loss in boot1 + boot2:
        assert loss == want[s], (s, loss, want[s])
    assert lines[-2] == f"saved step {total} generation 3"
    assert re.fullmatch(r"predict class \d label \d", lines[-1])


@arm
def test_arduino_sketch_compiles_as_cpp(tmp_path):
    out = _compile(tmp_path, "cortex-m4", library=True)
    # the Arduino builder's view: the core's Arduino.h (a minimal stand-in declaring what the
    # sketch uses), the library's src/ on the include path, the .ino compiled as C++
    core = tmp_path / "core"
    core.mkdir()
    (core / "Arduino.h").write_text(
        "#pragma once\n#include <stdint.h>\n"
        "struct HardwareSerial {\n"
        "  void begin(unsigned long) {}\n"
        "  void print(const char *) {}\n  void print(unsigned long) {}\n"
        "  void println(const char *) {}\n  void println(double, int) {}\n};\n"
        "extern HardwareSerial Serial;\nvoid setup();\nvoid loop();\n")
    sketch = out / "examples" / "TfcTrain" / "TfcTrain.ino"
    cpp = tmp_path / "TfcTrain.ino.cpp"
    cpp.write_text("#include <Arduino.h>\n#line 1 \"TfcTrain.ino\"\n" + sketch.read_text())
    flags = ["-mcpu=cortex-m4", "-mthumb", "-mfpu=fpv4-sp-d16", "-mfloat-abi=hard"]
    res = subprocess.run(["arm-none-eabi-g++", *flags, "-std=gnu++11", "-Wall", "-Wextra",
                          "-Werror", "-fno-exceptions", "-fno-rtti", "-I", str(core), "-I",
                          str(out / "src"), "-c", str(cpp), "-o", str(tmp_path / "sketch.o")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    # the library's C sources, as the Arduino builder compiles src/*.c
    for src in ("tfc.c", "tfc_fw.c"):
        res = subprocess.run(["arm-none-eabi-gcc", *flags, "-std=gnu11", "-Wall", "-Wextra",
                              "-Werror", "-c", str(out / "src" / src), "-o",
                              str(tmp_path / f"{src}.o")], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr


@arm
@pytest.mark.parametrize("target,board", [("stm32f746", "nucleo-f746zg"),
                                          ("stm32h743", "stm32h743"), ("nrf52840", "nrf52840")])
def test_real_board_example_builds(tmp_path, target, board):
    out = tmp_path / target
    assert main(["compile", "tfc", "--target", target, "--batch", "32", "--optimizer", "bop",
                 "--emit", "library", "-o", str(out)]) == 0
    elf = _cmake_build(out, board)
    sizes = subprocess.run(["arm-none-eabi-size", "-B", str(elf)], capture_output=True, text=True,
                           check=True).stdout.splitlines()[1].split()
    text, data, bss = (int(v) for v in sizes[:3])
    ld = (out / "firmware" / "boards" / board / "link.ld").read_text()
    ram = int(re.search(r"RAM +\(rwx\) : ORIGIN = \w+, LENGTH = (\d+)", ld)[1])
    assert data + bss <= ram
    if target != "stm32f746":
        return
    # the installable package: cmake --install, then a consumer finds it with find_package
    prefix = tmp_path / "prefix"
    subprocess.run(["cmake", "--install", str(out / "build"), "--prefix", str(prefix)], check=True,
                   capture_output=True)
    assert (prefix / "include" / "tfc_fw.h").is_file() and (prefix / "lib" / "libbnnc_tfc.a").is_file()
    app = tmp_path / "app"
    app.mkdir()
    (app / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.13)\nproject(app C)\nfind_package(bnnc_tfc REQUIRED)\n"
        "add_library(app STATIC app.c)\ntarget_link_libraries(app PRIVATE bnnc::tfc)\n")
    (app / "app.c").write_text('#include "tfc_fw.h"\nint app(void) { return bnnc_tfc_pending(); }\n')
    subprocess.run(["cmake", "-S", str(app), "-B", str(app / "build"), f"-DCMAKE_PREFIX_PATH={prefix}",
                    f"-DCMAKE_TOOLCHAIN_FILE={out}/cmake/toolchain-{board}.cmake"], check=True,
                   capture_output=True)
    res = subprocess.run(["cmake", "--build", str(app / "build")], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


# --------------------------------------------------------------------------------------------------
# the two-slot scheme on the host: the library's C (plain C99) with a RAM "flash", power cut at
# every point of a save



def _host_harness(tmp_path: Path) -> Path:
    out = _compile(tmp_path, "cortex-m4", library=True)
    main_c = tmp_path / "harness.c"
    main_c.write_text(r"""
#include <setjmp.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include "tfc.h"
#include "tfc_fw.h"

#define SLOT BNNC_TFC_SLOT_MIN_BYTES
static unsigned char flash[2 * SLOT];
static long budget = -1;                 /* bytes the next writes may program; -1: no cut */
static jmp_buf power_cut;
static unsigned char want[BNNC_TFC_STATE_BLOB_BYTES], got[BNNC_TFC_STATE_BLOB_BYTES];

static int fl_erase(void *c, uint32_t o, uint32_t n) { (void)c; memset(flash + o, 0xFF, n); return 1; }
static int fl_write(void *c, uint32_t o, const void *d, uint32_t n)
{
    const unsigned char *s = d;
    uint32_t k;
    (void)c;
    if (o % BNNC_TFC_FLASH_ALIGN || n % BNNC_TFC_FLASH_ALIGN) return 0;
    for (k = 0; k < n; k++) {
        if (budget == 0) longjmp(power_cut, 1);
        if (budget > 0) budget--;
        if ((flash[o + k] & s[k]) != s[k]) return 0;
        flash[o + k] &= s[k];
    }
    return 1;
}
static int fl_read(void *c, uint32_t o, void *d, uint32_t n) { (void)c; memcpy(d, flash + o, n); return 1; }

static void train(int steps, uint32_t seed)
{
    static float x[BNNC_TFC_EXAMPLE_ELEMS];
    int s, b, k;
    for (s = 0; s < steps; s++)
        for (b = 0; b < BNNC_TFC_BATCH; b++) {
            for (k = 0; k < BNNC_TFC_EXAMPLE_ELEMS; k++) x[k] = (float)((k * 7 + b * 13 + s + (int)seed) % 17) / 8.0f - 1.0f;
            if (bnnc_tfc_add_sample(x, (b + s) % 10, 0, 0, 0) != BNNC_OK) { puts("add_sample"); exit(1); }
        }
}

int main(void)
{
    static bnnc_tfc_flash_t f = {fl_erase, fl_write, fl_read, 0, SLOT};
    static long cut, total, kept_old, kept_new;
    float probs[BNNC_TFC_CLASSES];
    int32_t cls;
    memset(flash, 0, sizeof flash);                       /* never erased: no checkpoint */
    if (bnnc_tfc_restore(&f) != BNNC_ERR_BLOB) { puts("restore of blank flash"); return 1; }
    if (bnnc_tfc_add_sample(bnnc_tfc_sample_slot(), 10, 0, 0, 0) != BNNC_ERR_LABEL) return 1;
    bnnc_tfc_init(3);
    train(1, 0);
    if (bnnc_tfc_save(&f) != BNNC_OK || bnnc_tfc_saved_generation(&f) != 1) return 1;
    bnnc_tfc_get_state(want, sizeof want);                 /* generation 1 */
    train(1, 1);
    bnnc_tfc_get_state(got, sizeof got);
    /* a save of generation 2 cut after every 509th byte, and at the record's bytes */
    for (cut = 0;; cut += cut < SLOT - 64 ? 509 : 1) {
        static unsigned char old_flash[2 * SLOT];
        int st;
        memcpy(old_flash, flash, sizeof flash);
        budget = cut;
        if (setjmp(power_cut) == 0) {
            st = bnnc_tfc_save(&f);
            budget = -1;
            if (st != BNNC_OK) { puts("save"); return 1; }
            break;                                            /* the save completed */
        }
        budget = -1;
        total++;
        bnnc_tfc_init(99);                                    /* a different state */
        if (bnnc_tfc_restore(&f) != BNNC_OK) { printf("cut %ld: no restore\n", cut); return 1; }
        {
            unsigned char now[BNNC_TFC_STATE_BLOB_BYTES];
            bnnc_tfc_get_state(now, sizeof now);
            if (!memcmp(now, want, sizeof now)) kept_old++;
            else if (!memcmp(now, got, sizeof now)) kept_new++;
            else { printf("cut %ld: neither state\n", cut); return 1; }
        }
        memcpy(flash, old_flash, sizeof flash);
        /* the restore replaced the state: put generation 2's back for the next try */
        if (bnnc_tfc_set_state(got, sizeof got) != BNNC_OK) return 1;
    }
    if (bnnc_tfc_saved_generation(&f) != 2) return 1;
    /* the newest blob corrupted: restore falls back to the older slot */
    flash[(0 * SLOT) + 1000] ^= 0x40;      /* generation 1 lives in slot 0, 2 in slot 1 */
    flash[(1 * SLOT) + 1000] ^= 0x40;
    bnnc_tfc_init(7);
    if (bnnc_tfc_restore(&f) != BNNC_ERR_CRC) { puts("both corrupt"); return 1; }
    flash[(0 * SLOT) + 1000] ^= 0x40;
    if (bnnc_tfc_restore(&f) != BNNC_OK) return 1;
    bnnc_tfc_get_state(got, sizeof got);
    if (memcmp(got, want, sizeof got)) { puts("fallback state"); return 1; }
    /* predict_one while samples are pending */
    bnnc_tfc_add_sample(bnnc_tfc_sample_slot(), 1, 0, 0, 0);
    if (bnnc_tfc_predict_one(bnnc_tfc_sample_slot(), probs, &cls)
        != (BNNC_TFC_PREDICT_KEEPS_SAMPLES ? BNNC_OK : BNNC_ERR_BUSY)) { puts("busy"); return 1; }
    bnnc_tfc_discard();
    if (bnnc_tfc_predict_one(bnnc_tfc_sample_slot(), probs, &cls) != BNNC_OK) return 1;
    printf("cuts %ld old %ld new %ld\n", total, kept_old, kept_new);
    return 0;
}
""")
    exe = tmp_path / "harness"
    subprocess.run(["cc", "-std=c99", "-O1", "-Wall", "-Wextra", "-Werror", "-ffp-contract=off",
                    "-I", str(out / "src"), str(main_c), str(out / "src" / "tfc.c"),
                    str(out / "src" / "tfc_fw.c"), "-o", str(exe), "-lm"], check=True)
    return exe


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_two_slots_survive_a_power_cut_anywhere(tmp_path):
    res = subprocess.run([str(_host_harness(tmp_path))], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    cuts, old, new = (int(v) for v in re.fullmatch(r"cuts (\d+) old (\d+) new (\d+)\n",
                                                   res.stdout).groups())
    # every cut, up to the last byte of the record, restores the previous checkpoint exactly
    assert cuts > 200 and old == cuts and new == 0


@arm
def test_check_passes_on_cortex_m55(capsys):
    """The AN547 layout (secure state, the vector table in the ITCM, code in the SRAM) runs the
    debug build, and every tensor matches the reference. (README: both algorithms on cortex-m33
    and cortex-m55 with TFC at batch 32, by hand; one quick case here keeps CI short.)"""
    rc = main(["check", "tfc", "--target", "cortex-m55", "--algorithm", "standard", "--batch",
               "8", "--steps", "1"])
    text = capsys.readouterr().out
    assert rc == 0, text[-3000:]
    assert text.rstrip().endswith("PASS") and "0 failing" in text
