"""The checked-in generated example (examples/generated/) is what codegen writes today.

scripts/regen_examples.py compiles each example into a temporary directory; any difference from
the checked-in copy fails here, naming the command that refreshes it, so a codegen change is
reviewed as a diff of the generated C.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _load_regen():
    spec = importlib.util.spec_from_file_location("bnnc_regen_examples",
                                                  REPO / "scripts" / "regen_examples.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


regen = _load_regen()


def test_generated_examples_are_up_to_date():
    bad = regen.stale()
    assert not bad, (f"examples/generated is stale ({', '.join(bad)}); refresh it with "
                     f"`{regen.COMMAND}` and commit the diff")


def test_examples_hold_the_program_and_no_weights():
    for name in regen.EXAMPLES:
        kept = set(regen.generate(name))
        assert {f"{name}.c", f"{name}.h", "trainer.c", "Makefile", "bnnc_manifest.json"} <= kept
        assert not kept & set(regen.LEFT_OUT), kept
