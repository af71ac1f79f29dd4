"""Memory safety of the emitted C: every zoo model x both algorithms under AddressSanitizer and
UndefinedBehaviorSanitizer, and the plain trainer under valgrind memcheck.

Each zoo model is compiled small (widths and image sizes below; every layer kind of the full model
is still there: conv, pool, residual adds, real stem and classifier) at batch 2 with guard canaries
(`--guard`), and its standalone trainer is built with -fsanitize=address,undefined
-fno-sanitize-recover=all. Sanitizers see accesses outside the static arrays and undefined
behaviour; the canaries see a kernel writing into a neighbouring tensor inside the arena, which
no sanitizer can. The trainer then trains a few steps on a packed random data set with a test set
(predict), checkpoints every step (get_state) and resumes from the checkpoint (set_state); any
report fails the test. -O0: the builds test correctness, and -O0 compiles the 16 programs several
times faster than the target's -O3 (the sanitizers instrument every access at any level).
"""

from __future__ import annotations

import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from bnnc.compiler.config import make_config
from bnnc.compiler.frontend import load_model
from bnnc.compiler.pipeline import compile_to_c
from bnnc.compiler.planner import DEFAULT_GUARD_BYTES
from bnnc.compiler.target import load_target
from bnnc.compiler.zoo import ZOO, build_zoo_model
from bnnc.runtime import packed
from bnnc.runtime.programs import LocalRunner, RunResult, build_trainer

SANITIZE = ["-O0", "-fsanitize=address,undefined", "-fno-omit-frame-pointer",
            "-fno-sanitize-recover=all"]
ALGORITHMS = ("standard", "proposed")
# the smallest variants that keep every layer (a channel count never drops below 1)
SMALL = {"mlp": dict(width=0.0625), "tfc": dict(width=0.125), "sfc": dict(width=0.0625),
         "lfc": dict(width=0.03125), "cnv": dict(width=0.0625), "binarynet": dict(width=0.0625),
         "resnete18": dict(width=0.0625, image_size=16, num_classes=10),
         "birealnet18": dict(width=0.0625, image_size=16, num_classes=10)}
REPORTS = ("AddressSanitizer", "runtime error:", "LeakSanitizer", "guard:")

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no host C compiler")


def test_every_zoo_model_is_covered():
    assert set(SMALL) == set(ZOO), "add the new zoo model to SMALL"


def _dataset(path: Path, shape: tuple[int, ...], seed: int) -> Path:
    rng = np.random.default_rng(seed)
    x = ((2 * rng.integers(0, 256, (8, *shape)) - 255) / 255).astype(np.float32)
    packed.pack(path, x, rng.integers(0, 10, 8), 10)
    return path


def _build(model: str, alg: str, root: Path) -> tuple[Path, Path]:
    graph = load_model(build_zoo_model(model, **SMALL[model]))
    out = root / f"{model}_{alg}"
    c = compile_to_c(graph, make_config(alg, batch=2), load_target("host"), out,
                     guard_bytes=DEFAULT_GUARD_BYTES)
    shape = c.schedule.tensors["input"].shape[1:]
    data = _dataset(root / f"{model}_{alg}.bnnd", shape, seed=len(model))
    return build_trainer(out, load_target("host"), extra_cflags=SANITIZE), data


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    """All sanitized trainers, built two at a time (the compiler runs outside the GIL)."""
    root = tmp_path_factory.mktemp("sanitize")
    pool = ThreadPoolExecutor(max_workers=2)
    futures = {(m, a): pool.submit(_build, m, a, root) for m in SMALL for a in ALGORITHMS}
    yield futures
    pool.shutdown(wait=True)


def _assert_clean(res: RunResult, what: str) -> None:
    reports = [r for r in REPORTS if r in res.stderr or r in str(res.events)]
    assert res.returncode == 0 and not reports, \
        f"{what}: exit {res.returncode}, {reports}\n{res.stderr[-3000:]}\n{res.events[-3:]}"
    assert res.events and res.events[-1]["event"] == "done", (what, res.events)


@pytest.fixture
def sanitizer_env(monkeypatch):
    monkeypatch.setenv("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0:exitcode=86")
    monkeypatch.setenv("UBSAN_OPTIONS", "print_stacktrace=1:exitcode=87")


@pytest.mark.parametrize("alg", ALGORITHMS)
@pytest.mark.parametrize("model", list(SMALL))
def test_trainer_is_clean_under_asan_and_ubsan(programs, model, alg, tmp_path, sanitizer_env):
    exe, data = programs[(model, alg)].result()
    run = LocalRunner(load_target("host")).run
    ckpt = tmp_path / "ckpt.bin"
    common = ["--train", str(data), "--test", str(data), "--checkpoint", str(ckpt)]
    _assert_clean(run(exe, [*common, "--steps", "3", "--every", "1", "--log-every", "1"],
                      timeout=300), f"{model} {alg}")
    res = run(exe, [*common, "--steps", "5", "--resume", "--final", str(tmp_path / "f.bin")],
              timeout=300)
    _assert_clean(res, f"{model} {alg} --resume")
    assert res.events[0]["step"] == 3 and res.events[-1]["step"] == 5


def test_the_harness_sees_sanitizer_reports(tmp_path, sanitizer_env):
    """The flags and the report check above fail on a real bug: one write past a static array
    (what an arena overrun at its end would be) and one signed overflow."""
    src = tmp_path / "bug.c"
    src.write_text("#include <stdio.h>\n#include <stdlib.h>\n#include <string.h>\n"
                   "static unsigned char arena[64];\n"
                   "int main(int argc, char **argv) {\n"
                   "    int n = atoi(argv[1]), big = 2147483647;\n"
                   "    (void)argc;\n"
                   "    if (n == 0) memset(arena, 1, sizeof arena + 1u);\n"
                   "    else printf(\"%d\\n\", big + n);\n"
                   "    puts(\"{\\\"event\\\": \\\"done\\\"}\");\n"
                   "    return arena[3];\n}\n")
    exe = tmp_path / "bug"
    subprocess.run(["cc", "-std=c99", *SANITIZE, str(src), "-o", str(exe)], check=True)
    run = LocalRunner(load_target("host")).run
    for arg, report in (("0", "AddressSanitizer"), ("1", "runtime error:")):
        res = run(exe, [arg], timeout=60)
        assert report in res.stderr
        with pytest.raises(AssertionError):
            _assert_clean(res, "bug.c")


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_plain_trainer_is_clean_under_valgrind(tmp_path):
    """The MLP's trainer as `bnnc run` builds it (target flags, -O3), unguarded, under memcheck
    (uninitialised reads, bad frees and stdio misuse; the -O3 build takes most of the time)."""
    graph = load_model(build_zoo_model("mlp", **SMALL["mlp"]))
    c = compile_to_c(graph, make_config("proposed", batch=2), load_target("host"), tmp_path / "o")
    data = _dataset(tmp_path / "d.bnnd", c.schedule.tensors["input"].shape[1:], seed=1)
    exe = build_trainer(tmp_path / "o", load_target("host"))
    res = LocalRunner(load_target("host")).run(
        exe, ["--train", str(data), "--test", str(data), "--steps", "2", "--checkpoint",
              str(tmp_path / "ck.bin")], timeout=600,
        extra_prefix=["valgrind", "-q", "--error-exitcode=99", "--leak-check=no"])
    assert res.returncode == 0 and "==" not in res.stderr, res.stderr[-3000:]
    assert res.events[-1] == {"event": "done", "step": 2}


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_valgrind_harness_sees_a_heap_overrun(tmp_path):
    src = tmp_path / "bug.c"
    src.write_text("#include <stdlib.h>\n"
                   "int main(void) { char *p = malloc(8); int r; p[8] = 1; r = p[0]; free(p);"
                   " return r & 0; }\n")
    subprocess.run(["cc", "-O0", str(src), "-o", str(tmp_path / "bug")], check=True)
    res = LocalRunner(load_target("host")).run(
        tmp_path / "bug", [], timeout=120,
        extra_prefix=["valgrind", "-q", "--error-exitcode=99", "--leak-check=no"])
    assert res.returncode == 99 and "Invalid write of size 1" in res.stderr
