"""The firmware API (templates/library/fw.*.j2 -> `<model>_fw.h` / `<model>_fw.c`): samples one at a
time into the arena, predict_one, two-slot checkpoints through flash callbacks. Both the library
layout of `--emit library` (compiler/library.py) and the standalone bare-metal trainer
(compiler/baremetal.py) render it, so they share one training loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import jinja2

from .planner import ArenaPlan, align_up
from .schedule_ir import Schedule

FLASH_ALIGN = 32            # templates/library/fw.h.j2 {PREFIX}_FLASH_ALIGN
SLOT_RECORD = 32            # {PREFIX}_SLOT_RECORD_BYTES


def fw_files(model: str) -> tuple[str, str]:
    """(header, source) of the firmware API."""
    return f"{model}_fw.h", f"{model}_fw.c"


def predict_keeps_input(schedule: Schedule, plan: ArenaPlan) -> bool:
    """True when no other arena tensor overlaps the input buffer, so predict cannot overwrite
    queued samples (conservative: any overlap in the plan counts)."""
    region, lo = plan.tensor_offsets["input"]
    if region != "arena":
        return True
    hi = lo + schedule.tensors["input"].nbytes
    for name, (reg, off) in plan.tensor_offsets.items():
        t = schedule.tensors.get(name)
        if name == "input" or reg != "arena" or t is None:
            continue
        if off < hi and lo < off + t.nbytes:
            return False
    return True


def fw_static_nbytes(batch: int, classes: int) -> int:
    """RAM the firmware API adds to the model's (fw.c.j2: the queued-sample count and
    predict_one's probabilities of a whole batch)."""
    return 4 + 4 * batch * classes


def fw_context(schedule: Schedule, plan: ArenaPlan, common: Mapping[str, Any]) -> dict:
    """What templates/library/fw.*.j2 substitute besides `common`."""
    classes = common["classes"]
    batch = schedule.config.batch
    return dict(example_elems=schedule.tensors["input"].size // batch,
                predict_keeps=int(predict_keeps_input(schedule, plan)),
                fw_static_bytes=fw_static_nbytes(batch, classes),
                slot_min=align_up(SLOT_RECORD + common["blob_nbytes"], FLASH_ALIGN))


def render_fw(env: jinja2.Environment, common: Mapping[str, Any], where: Path) -> list[Path]:
    """<model>_fw.h and <model>_fw.c into `where`."""
    header, source = fw_files(common["model"])
    out = []
    for name, template in ((header, "fw.h.j2"), (source, "fw.c.j2")):
        path = Path(where) / name
        path.write_text(env.get_template(f"library/{template}").render(**common))
        out.append(path)
    return out
