"""compiler/contract.py: the typed manifest round-trips through its JSON, and a manifest with a
missing or wrongly typed field is refused with a ManifestError naming the field."""

from __future__ import annotations

import dataclasses
import json

import pytest

from bnnc.compiler.contract import (MANIFEST, STATE_BLOB_HEADER_BYTES, Manifest, StateEntry,
                                    StepEntry, TensorEntry, read_manifest)
from bnnc.compiler.errors import ManifestError, TargetError


def _manifest() -> Manifest:
    w = TensorEntry(1, "fc1.W", "bit", (8, 4), "state", 0, 32, "bits W^T", 64, None,
                    {"hw": 1, "wc": 1})
    x = TensorEntry(0, "input", "f32", (2, 8), "arena", 0, 64, "NCHW", 0, None)
    return Manifest(bnnc_version="0.1.0", model="m", prefix="bnnc_m", model_hash=2 ** 63 + 5,
                    model_sha256="ab", target="host", target_kind="host",
                    config={"algorithm": "proposed", "lr": 0.001, "po2": True}, batch=2,
                    input_shape=(2, 8), classes=4, seed=0, arena_nbytes=64, state_nbytes=32,
                    state_elems=32, dump_nbytes=128, header="m.h", source="m.c",
                    trainer="trainer.c", tensors=(x, w),
                    state=(StateEntry("fc1.W", "bit", (8, 4), 0, 32, "parameter", 0, "bits W^T",
                                      "normal", 8),),
                    steps=(StepEntry(0, "dense_fwd_xnor", "fc1", "k_dense"),))


def test_round_trip_and_derived_fields():
    m = _manifest()
    text = m.to_json()
    assert Manifest.from_json(text) == m
    doc = json.loads(text)
    assert doc["schema"] == "bnnc-c-manifest" and doc["tensor_index"] == {"input": 0, "fc1.W": 1}
    assert list(doc) == sorted(doc) and text.endswith("}\n")
    assert m.tensor_by_name["fc1.W"].geom == {"hw": 1, "wc": 1}
    assert m.blob_nbytes == STATE_BLOB_HEADER_BYTES + 32


@pytest.mark.parametrize("edit, field", [
    (lambda d: d.pop("batch"), "field batch is missing"),
    (lambda d: d["tensors"][1].update(nbytes="32"), "field tensors[1].nbytes should be an integer"),
    (lambda d: d["state"][0].update(shape=8), "field state[0].shape should be a list"),
    (lambda d: d.update(classes=True), "field classes should be an integer, not bool"),
    (lambda d: d.update(trainer=3), "field trainer should be a string"),
    (lambda d: d["steps"][0].pop("fn"), "field steps[0].fn is missing"),
])
def test_a_bad_field_is_named(edit, field):
    doc = json.loads(_manifest().to_json())
    edit(doc)
    with pytest.raises(ManifestError, match=field.replace("[", r"\[").replace("]", r"\]")):
        Manifest.from_json(json.dumps(doc))


def test_not_a_manifest(tmp_path):
    with pytest.raises(ManifestError, match="is not JSON"):
        Manifest.from_json("{")
    with pytest.raises(ManifestError, match="not a bnnc manifest"):
        Manifest.from_json("[]")
    doc = json.loads(_manifest().to_json())
    doc["schema_version"] = 2
    with pytest.raises(ManifestError, match="schema version 2"):
        Manifest.from_json(json.dumps(doc))
    with pytest.raises(TargetError, match="not a bnnc compile output"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text(_manifest().to_json())
    assert dataclasses.asdict(read_manifest(tmp_path)) == dataclasses.asdict(_manifest())
