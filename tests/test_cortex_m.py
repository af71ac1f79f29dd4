"""Cortex-M bare-metal targets: the budget check before any C is written, the emitted startup /
linker script / semihosting trainer, and end to end under qemu-system-arm (training that matches the
host trainer, checkpoints, the `bnnc check` trace, instruction counts, the linker's own budget
check, the call-graph stack bound, M4 single precision).

The pure tests need nothing but Python; the others need arm-none-eabi-gcc and qemu-system-arm and
skip without them (scripts/setup.sh installs both)."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from bnnc.cli import main
from bnnc.compiler import baremetal as bm
from bnnc.compiler.budget import budget_report, check_budget, code_estimate_nbytes
from bnnc.compiler.codegen import emit_c
from bnnc.compiler.config import make_config
from bnnc.compiler.errors import BudgetError, DataError, TargetError
from bnnc.compiler.pipeline import compile_to_c
from bnnc.compiler.planner import plan_schedule
from bnnc.compiler.schedule import build_schedule
from bnnc.compiler.target import load_target
from mnist_like import write_mnist_like
from bnnc.runtime import baremetal, packed
from bnnc.runtime.model_source import load_graph, model_bytes
from bnnc.runtime.outdir import write_run_inputs
from bnnc.runtime.state_blob import read_state_blob, state_values_f32
from bnnc.compiler.contract import read_manifest
from bnnc.runtime.programs import LocalRunner, build_trainer

KIB = 1024
BATCH = 32
arm = pytest.mark.skipif(not (shutil.which("arm-none-eabi-gcc")
                              and shutil.which("qemu-system-arm")),
                         reason="needs gcc-arm-none-eabi, libnewlib-arm-none-eabi, qemu-system-arm")


def _m7(ram=256 * KIB):
    return dataclasses.replace(load_target("cortex-m7"), ram=ram)


def _plan(model, algorithm, optimizer, batch=BATCH, width=None, align=8):
    cfg = make_config(algorithm, batch=batch, optimizer=optimizer)
    s = build_schedule(load_graph(model, width=width), cfg)
    live, plan = plan_schedule(s, align=align)
    return s, live, plan


def _samples(n: int, seed: int):
    """A learnable MNIST look-alike: class k lights up row band k of a 28x28 image (u8 pixels)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    px = rng.integers(0, 60, (n, 28, 28))
    for i, k in enumerate(y):
        px[i, 2 * k + 4: 2 * k + 7, 4:24] = 255
    x = ((2 * px.reshape(n, -1).astype(np.float64) - 255) / 255).astype(np.float32)
    return x, y


# --------------------------------------------------------------------------------------------------
# pure: targets, budget, formatting, stack bound

def test_cortex_targets_describe_real_parts():
    m7, m4 = load_target("cortex-m7"), load_target("cortex-m4")
    assert (m7.kind, m7.ram, m7.flash) == ("baremetal", 512 * KIB, 2048 * KIB)
    assert (m4.kind, m4.ram, m4.flash) == ("baremetal", 256 * KIB, 1024 * KIB)
    assert "-mfpu=fpv5-d16" in m7.cflags and "-mfpu=fpv4-sp-d16" in m4.cflags
    for t, board in ((m7, "mps2-an500"), (m4, "mps2-an386")):
        assert "-ffp-contract=off" in t.cflags and "-mfloat-abi=hard" in t.cflags
        assert t.emulator[:3] == ("qemu-system-arm", "-M", board)
        assert 0 < t.stack < t.ram and "qemu-system-arm" in t.packages


def test_budget_fits_tfc_proposed_bop_in_256k_and_itemizes_by_role():
    s, live, plan = _plan("tfc", "proposed", "bop")
    rep = check_budget(s, plan, _m7(), liveness=live)
    assert rep.fits and rep.ram_nbytes <= 256 * KIB
    ram = {c.what: c.nbytes for c in rep.ram}
    # the batch input is the largest arena tensor: B x 784 float32 (hand count)
    assert ram["input batch (arena, at its peak)"] == BATCH * 784 * 4
    # Bop: 1-bit weights + one bf16 momentum per weight, TFC has 59,008 weights (zoo table)
    assert ram["optimizer state (state)"] >= 59008 * 2
    assert ram["stack reserve"] == 16 * KIB
    assert list(rep.ram) == sorted(rep.ram, key=lambda c: (-c.nbytes, c.what))
    flash = {c.what: c.nbytes for c in rep.flash}
    assert flash["start-state blob (reserved)"] >= plan.state_nbytes + 40
    assert "RAM:" in rep.format() and "flash:" in rep.format()


def test_budget_refuses_standard_at_the_same_batch_with_the_ways_out(tmp_path):
    graph = load_graph("tfc")
    cfg = make_config("standard", batch=BATCH, optimizer="bop")
    with pytest.raises(BudgetError) as err:
        compile_to_c(graph, cfg, _m7(), tmp_path / "out")
    msg, hint = err.value.message, err.value.hint
    assert "does not fit cortex-m7" in msg and "262,144 B" in msg and "(--ram)" in msg
    assert "optimizer state (state)" in msg and "gradients (arena" in msg
    # the way out is computed with a real plan and says that it fits
    assert re.search(r"--algorithm proposed: RAM [\d,]+ B, flash [\d,]+ B \(fits\)", hint), hint
    assert "--ram" in hint
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.c"))


def test_budget_suggests_the_largest_batch_that_fits():
    s, live, plan = _plan("tfc", "proposed", "bop", batch=64)
    with pytest.raises(BudgetError) as err:
        check_budget(s, plan, _m7(), graph=load_graph("tfc"), liveness=live)
    m = re.search(r"--batch (\d+) \(the largest that fits\): RAM ([\d,]+) B", err.value.hint)
    assert m, err.value.hint
    best = int(m.group(1))
    assert 32 <= best < 64 and int(m.group(2).replace(",", "")) <= 256 * KIB
    s2, live2, plan2 = _plan("tfc", "proposed", "bop", batch=best + 1)
    assert not budget_report(s2, plan2, _m7(), liveness=live2).fits


def test_budget_refuses_a_flash_budget_below_the_start_state(tmp_path):
    s, live, plan = _plan("tfc", "proposed", "bop")
    tgt = dataclasses.replace(_m7(), flash=64 * KIB)
    with pytest.raises(BudgetError, match=r"flash: needs [\d,]+ B, the budget is 65,536 B") as err:
        check_budget(s, plan, tgt, liveness=live)
    assert "start-state blob (reserved)" in err.value.message


def test_baremetal_output_is_deterministic_and_carries_the_budget(tmp_path):
    graph, cfg = load_graph("tfc", width=0.25), make_config("proposed", batch=8, optimizer="bop")
    for d in ("a", "b"):
        compile_to_c(graph, cfg, _m7(), tmp_path / d, command="bnnc test")
    for name in (*bm.TEMPLATES, bm.BUDGET):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    ld = (tmp_path / "a" / bm.LINKER).read_text()
    assert "FLASH_BUDGET = DEFINED(__bnnc_flash_budget) ? __bnnc_flash_budget : 2097152;" in ld
    assert "RAM_BUDGET = DEFINED(__bnnc_ram_budget) ? __bnnc_ram_budget : 262144;" in ld
    assert json.loads((tmp_path / "a" / bm.BUDGET).read_text())["ram"] == 256 * KIB
    trainer = (tmp_path / "a" / bm.TRAINER).read_text()
    assert "double" not in trainer.replace("no doubles", "")


def test_fmt_f32_reads_back_as_the_same_float32(tmp_path):
    """The bare-metal number formatter compiled for the host: every float32 printed with 9
    significant digits must parse back (Python's float()) to the same bits; inf/NaN print null."""
    cc = shutil.which("cc") or pytest.skip("needs a host C compiler")
    graph, cfg = load_graph("tfc", width=0.25), make_config("proposed", batch=8, optimizer="bop")
    compile_to_c(graph, cfg, _m7(), tmp_path / "out")
    (tmp_path / "h.c").write_text(
        '#include <stdio.h>\n#include "baremetal_fmt.h"\n'
        "int main(void) { uint32_t b; float v; char s[BNNC_FMT_F32_MAX];\n"
        "  while (fread(&b, 4, 1, stdin) == 1) {\n"
        "    memcpy(&v, &b, 4); bnnc_fmt_f32(s, v); puts(s);\n  }\n"
        "  return 0; }\n")
    subprocess.run([cc, "-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", "-pedantic", "-I",
                    str(tmp_path / "out"), str(tmp_path / "h.c"), "-o", str(tmp_path / "h")],
                   check=True)
    rng = np.random.default_rng(0)
    special = [0, 0x80000000, 1, 0x007FFFFF, 0x00800000, 0x7F7FFFFF, 0x3F800000, 0x4E6E6B28,
               0x3DCCCCCD, 0x7F800000, 0xFF800000, 0x7FC00000]
    bits = np.concatenate([np.array(special, np.uint32),
                           rng.integers(0, 2 ** 32, 20000, dtype=np.uint64).astype(np.uint32)])
    lines = subprocess.run([str(tmp_path / "h")], input=bits.tobytes(), capture_output=True,
                           check=True).stdout.decode().split("\n")[:-1]
    assert lines[:9] == ["0", "-0", "1.40129846e-45", "1.17549421e-38", "1.17549435e-38",
                         "3.40282347e+38", "1", "1e+9", "0.100000001"]
    for b, text in zip(bits, lines, strict=True):
        v = np.uint32(b).view(np.float32)
        if not np.isfinite(v):
            assert text == "null"
            continue
        back = np.float32(json.loads(text))
        assert back.view(np.uint32) == b or (v == 0 and back == 0), (hex(b), text)


def test_stack_bound_follows_the_deepest_chain_across_files():
    a = ('node: { title: "Reset_Handler" label: "Reset_Handler\\na.c:1:1\\n16 bytes (static)" }\n'
         'edge: { sourcename: "Reset_Handler" targetname: "main" }\n'
         'node: { title: "main" label: "main\\na.c:2:1\\n100 bytes (static)" }\n'
         'edge: { sourcename: "main" targetname: "a.c:helper" }\n'
         'edge: { sourcename: "main" targetname: "step" }\n'
         'node: { title: "a.c:helper" label: "helper\\na.c:3:1\\n8 bytes (static)" }\n')
    b = ('node: { title: "step" label: "step\\nb.c:1:1\\n40 bytes (static)" }\n'
         'edge: { sourcename: "step" targetname: "b.c:kernel.constprop.0" }\n'
         'node: { title: "b.c:kernel.constprop.0" label: "kernel.constprop\\nb.c:2:1\\n'
         '4096 bytes (static)" }\n'
         'edge: { sourcename: "b.c:kernel.constprop.0" targetname: "memset" }\n')
    n, chain = baremetal.stack_from_callgraph([a, b])
    assert n == 16 + 100 + 40 + 4096 + baremetal.LIB_STACK_NBYTES
    assert chain == ("Reset_Handler", "main", "step", "kernel.constprop", "memset")
    with pytest.raises(BudgetError, match="recursion"):
        cycle = 'edge: { sourcename: "a.c:helper" targetname: "main" }'
        baremetal.stack_from_callgraph([a + cycle])
    with pytest.raises(BudgetError, match="dynamic"):
        baremetal.stack_from_callgraph([a.replace("8 bytes (static)", "8 bytes (dynamic)")])


def test_runtime_refuses_other_targets_and_unsafe_arguments(tmp_path):
    compile_to_c(load_graph("tfc", width=0.25), make_config("proposed", batch=8),
                 load_target("host"), tmp_path / "host")
    with pytest.raises(TargetError, match="not for a microcontroller"):
        baremetal.build_elf(tmp_path / "host")
    elf = baremetal.Elf(tmp_path / "x.elf", False, 0, 0, 0, 0, 0x1000, 0, 0, ())
    with pytest.raises(DataError, match="spaces"):
        baremetal.qemu_argv(load_target("cortex-m7"), elf, ["--train", "my data.bnnd"])


# --------------------------------------------------------------------------------------------------
# toolchain: build, run, check, count

@pytest.fixture(scope="module")
def tfc_m7(tmp_path_factory):
    """TFC, proposed algorithm, Bop, batch 32, compiled for a Cortex-M7 with 256 KiB of RAM."""
    root = tmp_path_factory.mktemp("m7")
    out = root / "out"
    # threshold 4: the default 32 flips no weight before step 33, and the runs below are 24 steps
    graph = load_graph("tfc")
    cfg = make_config("proposed", batch=BATCH, optimizer="bop", bop_threshold=4.0)
    compile_to_c(graph, cfg, _m7(), out, command="bnnc compile tfc --target cortex-m7 --ram 256K")
    write_run_inputs(out, graph, cfg, model_bytes("tfc"))
    x, y = _samples(768, 1)                # 24 steps per epoch
    packed.pack(root / "train.bnnd", x, y, 10)
    xt, yt = _samples(96, 2)
    packed.pack(root / "test.bnnd", xt, yt, 10)
    return root, out, graph, cfg


@arm
def test_elf_fits_256k_and_the_sizes_match_the_budget(tfc_m7):
    root, out, graph, cfg = tfc_m7
    elf = baremetal.build_elf(out)
    assert elf.ram_nbytes <= 256 * KIB, elf            # arm-none-eabi-size: data + bss + stack
    s, live, plan = _plan("tfc", "proposed", "bop")
    rep = budget_report(s, plan, _m7(), liveness=live)
    # RAM is exact but for the C library's data (estimated 128 B, newlib-nano's is ~100 B)
    assert 0 <= rep.ram_nbytes - elf.ram_nbytes <= 64, (rep.ram_nbytes, elf)
    est = sum(c.nbytes for c in rep.flash if c.what.startswith(("code", "tensor", "constants")))
    assert est >= code_estimate_nbytes(s) and 0.8 * elf.text <= est <= 1.4 * elf.text, est
    assert elf.blob_addr == 2048 * KIB - elf.blob_reserve
    assert elf.stack_chain[:2] == ("Reset_Handler", "main") and elf.stack_nbytes <= 16 * KIB
    # the Makefile section builds the same program
    subprocess.run(["make", "-s", "-f", bm.MAKEFILE, "trainer.elf"], cwd=out, check=True)
    sizes = subprocess.run(["arm-none-eabi-size", "-B", str(out / "trainer.elf")],
                           capture_output=True, text=True, check=True).stdout.splitlines()[1]
    assert [int(v) for v in sizes.split()[:3]] == [elf.text, elf.data, elf.bss]


@arm
def test_m7_trains_from_the_model_state_and_matches_the_host_trainer(tfc_m7, tmp_path):
    root, out, graph, cfg = tfc_m7
    blob = baremetal.start_state_blob(out)
    events = []
    res = baremetal.run(out, train=root / "train.bnnd", test=root / "test.bnnd", start_blob=blob,
                        steps=24, log_every=1, checkpoint=True, stack=True,
                        on_event=events.append, timeout=300)
    assert res.returncode == 0, (res.stderr, res.events)
    assert [e["event"] for e in events][:2] == ["start", "step"] and events[-1]["event"] == "done"
    losses = [e["loss"] for e in events if e["event"] == "step"]
    assert len(losses) == 24 and np.mean(losses[-4:]) < 0.6 * np.mean(losses[:4]), losses
    epoch = next(e for e in events if e["event"] == "epoch")
    assert epoch["steps"] == 24 and epoch["complete"] and 0.0 <= epoch["test_acc"] <= 1.0
    # the measured stack stays inside the reserve and under the call-graph bound
    elf = baremetal.build_elf(out)
    assert 0 < res.stack_bytes <= elf.stack_nbytes <= 16 * KIB
    # the checkpoint streamed from the state region is a valid blob of this model at step 24
    (tmp_path / "state.bin").write_bytes(res.checkpoint)
    state = read_state_blob(tmp_path / "state.bin", read_manifest(out))
    assert state.step == 24 and np.isfinite(state.tensors["fc1.W.m"]).all()

    # the host's standalone trainer of the same model, state and data sees the same batches: same
    # losses (the kernels are the same C with -ffp-contract=off; only libm's expf/logf differ);
    # 8 of the M7's 24 steps, so the lr schedule decays to step 24 there too
    host = tmp_path / "host"
    compile_to_c(graph, cfg, load_target("host"), host)
    (tmp_path / "start.bin").write_bytes(blob)
    start = read_state_blob(tmp_path / "start.bin", read_manifest(out)).tensors
    (tmp_path / "init.f32").write_bytes(state_values_f32(read_manifest(host), start))
    r = LocalRunner(load_target("host")).run(
        build_trainer(host), ["--train", str(root / "train.bnnd"), "--init",
                              str(tmp_path / "init.f32"), "--steps", "8", "--lr-horizon", "24",
                              "--log-every", "1"])
    host_losses = [e["loss"] for e in r.events if e["event"] == "step"]
    np.testing.assert_allclose(losses[:8], host_losses, rtol=1e-5)


@arm
def test_resume_from_a_checkpoint_continues_the_step_count(tfc_m7):
    root, out, _, _ = tfc_m7
    start = baremetal.start_state_blob(out)
    first = baremetal.run(out, train=root / "train.bnnd", start_blob=start, steps=3,
                          checkpoint=True, timeout=300)
    again = baremetal.run(out, train=root / "train.bnnd", start_blob=first.checkpoint, steps=5,
                          log_every=1, timeout=300)
    assert again.returncode == 0
    assert [e["step"] for e in again.events if e["event"] == "step"] == [4, 5]
    # a blob of another model is refused by set_state on the device, not silently used
    bad = bytearray(first.checkpoint)
    bad[8] ^= 1                                         # the model hash
    refused = baremetal.run(out, train=root / "train.bnnd", start_blob=bytes(bad), steps=4,
                            timeout=300)
    assert refused.returncode == 1 and "start state in flash refused" in refused.error()


@arm
def test_check_passes_for_tfc_on_cortex_m7(capsys):
    rc = main(["check", "tfc", "--target", "cortex-m7", "--ram", "256K", "--batch", str(BATCH),
               "--optimizer", "bop", "--steps", "2"])
    text = capsys.readouterr().out
    assert rc == 0, text[-3000:]
    assert text.rstrip().endswith("PASS") and "0 failing" in text


@arm
def test_instruction_counts_per_step_are_deterministic(tfc_m7):
    root, out, _, _ = tfc_m7
    blob = baremetal.start_state_blob(out)
    a = baremetal.count_step_instructions(out, train=root / "train.bnnd", steps=2,
                                          start_blob=blob)
    b = baremetal.run(out, train=root / "train.bnnd", start_blob=blob, steps=2, count=True)
    assert a == b and a.instructions > a.instructions_zero > 0
    assert 1e6 < a.per_step < 1e9


@arm
def test_the_linker_enforces_the_budget_when_the_check_is_bypassed(tmp_path):
    """emit_c alone (no pipeline budget check) with a RAM budget below the plan: the link fails."""
    s, _, plan = _plan("tfc", "proposed", "bop")
    emit_c(s, plan, _m7(ram=192 * KIB), tmp_path)
    with pytest.raises(BudgetError, match="RAM budget exceeded"):
        baremetal.build_elf(tmp_path)


@arm
def test_cortex_m4_trains_in_single_precision(tmp_path, capsys):
    out = tmp_path / "m4"
    assert main(["compile", "tfc", "--width", "0.25", "--target", "cortex-m4", "--batch", "16",
                 "--optimizer", "bop", "-o", str(out)]) == 0
    x, y = _samples(64, 3)
    packed.pack(tmp_path / "train.bnnd", x, y, 10)
    start = baremetal.start_state_blob(out)
    res = baremetal.run(out, train=tmp_path / "train.bnnd", start_blob=start, steps=4, log_every=1,
                        timeout=300)
    assert res.returncode == 0 and len([e for e in res.events if e["event"] == "step"]) == 4
    assert "mps2-an386" in res.argv


@arm
def test_m4_kernels_use_no_doubles(tmp_path):
    s, _, plan = _plan("tfc", "proposed", "bop", batch=8, width=0.25)
    m4 = load_target("cortex-m4")
    emit_c(s, plan, m4, tmp_path)
    obj = tmp_path / "tfc.o"
    subprocess.run([m4.cc, *m4.cflags, "-c", str(tmp_path / "tfc.c"), "-o", str(obj)], check=True)
    undefined = subprocess.run(["arm-none-eabi-nm", "-u", str(obj)], capture_output=True,
                               text=True, check=True).stdout.split()
    doubles = [u for u in undefined if u.startswith("__aeabi_d") or u in ("pow", "exp", "log")]
    assert doubles == []


@arm
def test_bnnc_run_emulate_through_the_cli(tmp_path, capsys):
    """`bnnc run OUT --emulate` on a Cortex-M7 build: epochs printed, state.bin and
    final_state.npz written; `--count` prints instructions per step."""
    write_mnist_like(tmp_path / "data", 96, 32, seed=1)
    out = tmp_path / "m7"
    assert main(["compile", "tfc", "--width", "0.25", "--target", "cortex-m7", "--ram", "128K",
                 "--batch", "16", "--optimizer", "bop", "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["run", str(out), "--emulate", "--data", "mnist", "--data-dir",
                 str(tmp_path / "data"), "--epochs", "2", "--log-every", "3"]) == 0
    text = capsys.readouterr().out
    assert "RAM" in text and "of 131,072 B" in text and "epoch 2/2" in text
    assert read_state_blob(out / "state.bin", read_manifest(out)).step == 12
    assert (out / "final_state.npz").is_file()
    assert main(["run", str(out), "--emulate", "--count", "--data", "mnist", "--data-dir",
                 str(tmp_path / "data"), "--steps", "2"]) == 0
    assert "instructions per training step" in capsys.readouterr().out
