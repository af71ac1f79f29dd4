"""The memory report: the JSON document of a hand-built schedule (values worked out by hand), its
round trip through load_plan_json / plan_from_json / check_plan, the text tables, and the HTML
picture (well-formed, one rect per buffer, one byte scale, rendered by headless Chromium when
installed)."""

from __future__ import annotations

import dataclasses
import html.parser
import json
import shutil
import struct
import subprocess
import xml.etree.ElementTree as ET
import zlib

import pytest
from test_liveness import tiny

from bnnc.compiler.errors import PlanError
from bnnc.compiler.plan_check import check_plan
from bnnc.compiler.planner import plan_schedule
from bnnc.compiler.report import (SCHEMA_VERSION, dump_plan_json, format_report, load_plan_json,
                                  peak_breakdown, plan_from_json, plan_to_html, plan_to_json)

SVG = "{http://www.w3.org/2000/svg}"


def _doc(schedule=None, align=16):
    schedule = schedule or tiny()
    live, plan = plan_schedule(schedule, align=align)
    return plan_to_json(schedule, live, plan)


def test_document_by_hand():
    doc = _doc()
    assert doc["schema"] == "bnnc-plan" and doc["schema_version"] == SCHEMA_VERSION == 1
    # aligned buffers: fc1.out 64 [0,4], input 128 [0,5], labels 16 [0,3], loss 16 [2,2],
    # sm.out 64 [2,5], fc1.dW 128 [5,6]
    assert doc["arena"]["live_bytes"] == [208, 208, 288, 272, 256, 320, 128]
    assert doc["arena"]["lower_bound"] == 320 and doc["arena"]["nbytes"] == 320
    assert doc["state"]["nbytes"] == 128 * 3 + 16 and doc["total_nbytes"] == 720
    assert doc["peak"] == {"step": 5, "nbytes": 320,
                           "by_role": {"input": 128, "gradient": 128, "scratch": 64},
                           "buffers": ["fc1.dW", "input", "sm.out"]}
    assert doc["by_role"] == {
        "parameter": {"region": "state", "tensors": 1, "nbytes": 128},
        "optimizer state": {"region": "state", "tensors": 2, "nbytes": 256},
        "bn state": {"region": "state", "tensors": 1, "nbytes": 16},
        "input": {"region": "arena", "tensors": 1, "nbytes": 128},
        "label": {"region": "arena", "tensors": 1, "nbytes": 16},
        "saved activation": {"region": "arena", "tensors": 1, "nbytes": 64},   # the view excluded
        "gradient": {"region": "arena", "tensors": 3, "nbytes": 64 + 48 + 128},
        "scratch": {"region": "arena", "tensors": 3, "nbytes": 64 + 64 + 4},  # unused one excluded
    }
    t = {x["name"]: x for x in doc["tensors"]}
    assert t["flat.out"] == {"name": "flat.out", "role": "saved activation", "dtype": "f32",
                             "shape": [4, 4], "nbytes": 64, "region": "arena", "buffer": "fc1.out",
                             "offset": t["fc1.out"]["offset"], "first": 1, "last": 2,
                             "alias_of": "bn1.out"}
    assert t["fc1.W.v"]["region"] == "state" and t["fc1.W.v"]["offset"] == 256
    assert doc["unused"] == ["never.used"]
    assert len(doc["buffers"]) == 6 + 4 and len(doc["steps"]) == 7
    json.loads(dump_plan_json(doc))   # plain JSON types only


def test_peak_breakdown():
    live, plan = plan_schedule(tiny())
    peak = peak_breakdown(live, plan)
    assert peak["step"] == 5 and peak["nbytes"] == 320
    assert [(b["name"], b["role"], b["nbytes"]) for b in peak["buffers"]] == [
        ("fc1.dW", "gradient", 128), ("input", "input", 128), ("sm.out", "scratch", 64)]
    assert peak["buffers"][2]["tensors"] == ["sm.out", "bn1.d_out", "fc1.d_out"]


def test_round_trip_and_reverify(tmp_path):
    doc = _doc()
    (tmp_path / "plan.json").write_text(dump_plan_json(doc))
    back = load_plan_json(tmp_path)                      # a directory reads its plan.json
    assert back == json.loads(dump_plan_json(doc))
    live, plan = plan_from_json(back)
    orig_live, orig_plan = plan_schedule(tiny())
    assert plan == orig_plan
    assert live.buffers == orig_live.buffers and live.state == orig_live.state
    check_plan(live, plan)
    # a hand-edited document that breaks the plan is caught on the way back in
    back["buffers"][0]["offset"] += 16
    with pytest.raises(PlanError):
        check_plan(*plan_from_json(back))


def test_load_errors(tmp_path):
    with pytest.raises(PlanError, match="no such file"):
        load_plan_json(tmp_path)
    p = tmp_path / "x.json"
    p.write_text("{not json")
    with pytest.raises(PlanError, match="not a readable JSON plan"):
        load_plan_json(p)
    p.write_text(json.dumps({"schema": "other"}))
    with pytest.raises(PlanError, match="not a bnnc plan"):
        load_plan_json(p)
    p.write_text(json.dumps({"schema": "bnnc-plan", "schema_version": 99}))
    with pytest.raises(PlanError, match="schema version 99; this bnnc reads version 1"):
        load_plan_json(p)
    p.write_text(json.dumps({"schema": "bnnc-plan", "schema_version": 1, "model": "m"}))
    with pytest.raises(PlanError, match="lacks field"):
        load_plan_json(p)
    with pytest.raises(PlanError, match="malformed"):
        plan_from_json({"buffers": [{"name": "a"}]})


def test_determinism_ten_reruns():
    first = dump_plan_json(_doc())
    assert all(dump_plan_json(_doc()) == first for _ in range(10))


def test_text_report():
    doc = _doc()
    text = format_report(doc, tensors=True)
    assert "bnnc memory plan: tiny -- standard, batch 100, adam, f32 state, l2 BN" in text
    assert "lower bound 320 B, efficiency 1.0000" in text
    assert "peak at step 5" in text and "320 B live (3 buffers)" in text
    line = next(x for x in text.splitlines() if x.startswith("flat.out"))
    t_offset = next(t["offset"] for t in doc["tensors"] if t["name"] == "fc1.out")
    assert line.split() == ["flat.out", "saved", "activation", "f32", "4x4", "64", "arena",
                            str(t_offset), "1-2", "fc1.out"]
    assert "\ntensors\n" not in format_report(_doc(), tensors=False)


class _Counter(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.rects: list[dict] = []

    def handle_starttag(self, tag, attrs):
        if tag == "rect":
            self.rects.append(dict(attrs))
        if tag not in ("meta", "line", "rect"):
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        if tag == "rect":
            self.rects.append(dict(attrs))

    def handle_endtag(self, tag):
        if tag in ("meta", "line", "rect"):
            return
        assert self.stack and self.stack[-1] == tag, (self.stack, tag)
        self.stack.pop()


def _bigger():
    """tiny() with 4x the batch: every activation 4x, so the pictures must differ in height."""
    s = tiny()
    tensors = {n: dataclasses.replace(t, nbytes=t.nbytes * (1 if t.role.persistent else 4))
               for n, t in s.tensors.items()}
    return dataclasses.replace(s, tensors=tensors)


def test_html_structure_and_scale():
    small, big = _doc(), _doc(_bigger())
    page = plan_to_html([small, big])
    root = ET.fromstring(page.split("\n", 1)[1])          # well-formed XML after the doctype
    svgs = root.findall(f".//{SVG}svg")
    assert len(svgs) == 2
    for svg, doc in zip(svgs, (small, big)):
        bufs = [r for r in svg.iter(f"{SVG}rect") if r.get("class") == "buf"]
        assert len(bufs) == sum(b["region"] == "arena" for b in doc["buffers"]) == 6
        titles = [r.find(f"{SVG}title").text for r in bufs]
        assert any("bn1.out: saved activation, f32 [4x4]" in t and "steps 1-4" in t for t in titles)
        assert len([r for r in svg.iter(f"{SVG}rect") if r.get("class") == "state"]) == 4
    # one byte scale: the arena backgrounds' heights are in the ratio of the arena sizes
    heights = [float(next(r for r in svg.iter(f"{SVG}rect") if r.get("class") == "arena-bg")
                     .get("height")) for svg in svgs]
    ratio = big["arena"]["nbytes"] / small["arena"]["nbytes"]
    assert heights[1] / heights[0] == pytest.approx(ratio, rel=1e-3)
    assert big["arena"]["nbytes"] > small["arena"]["nbytes"]
    # the html.parser sees balanced tags, no script, no external reference
    p = _Counter()
    p.feed(page)
    assert not p.stack and len(p.rects) > 12
    assert "<script" not in page and "http://" not in page.replace("http://www.w3.org/", "")
    assert "https://" not in page


def _png_pixels(path):
    """RGB(A) rows of a non-interlaced 8-bit PNG, decoded with zlib (no imaging library needed)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, head = 8, b"", None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            head = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    w, h, depth, colour, _, _, interlace = head
    assert depth == 8 and interlace == 0 and colour in (2, 6)
    bpp = 3 if colour == 2 else 4
    raw, stride = zlib.decompress(idat), w * bpp
    rows, prev = [], bytearray(stride)
    for y in range(h):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return w, h, bpp, rows


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium not installed (CI installs it)")
def test_html_renders_in_chromium(tmp_path):
    page = tmp_path / "plan.html"
    page.write_text(plan_to_html([_doc(), _doc(_bigger())]))
    png = tmp_path / "plan.png"
    cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={png}",
           "--window-size=1200,800", page.as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    assert png.exists() and png.stat().st_size > 0
    w, h, bpp, rows = _png_pixels(png)
    assert (w, h) == (1200, 800)
    # not blank: many distinct colours, and the role colours of the drawing are among them
    colours = {row[i:i + 3] for row in rows[::4] for i in range(0, w * bpp, 4 * bpp)}
    assert len(colours) > 8
    gradient_purple = bytes.fromhex("b07aa1")
    assert any(abs(c[0] - gradient_purple[0]) + abs(c[1] - gradient_purple[1])
               + abs(c[2] - gradient_purple[2]) < 12 for c in colours)


# --- the CLI: bnnc inspect ----------------------------------------------------------------------

def _bnnc(capsys, *args):
    from bnnc.cli import main
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_inspect_json_html_and_read_back(tmp_path, capsys):
    pytest.importorskip("bnnc.compiler.schedule")
    js, page = tmp_path / "out" / "plan.json", tmp_path / "plan.html"
    js.parent.mkdir()
    code, out, err = _bnnc(capsys, "inspect", "tfc", "--batch", "50", "--json", js, "--html", page,
                           "--tensors")
    assert code == 0, err
    assert out.startswith("bnnc memory plan: tfc -- proposed, batch 50, adam")
    assert "\ntensors\n" in out and f"wrote {js}" in out
    doc = load_plan_json(js)
    assert doc["config"]["batch"] == 50 and doc["io"] == {"mode": "arena", "nbytes": 0}
    ET.fromstring(page.read_text().split("\n", 1)[1])
    # a compiled output directory is read back, re-verified and shown the same way
    code, again, err = _bnnc(capsys, "inspect", js.parent, "--tensors")
    assert code == 0, err
    assert again == out.split(f"wrote {js}")[0]
    code, _, err = _bnnc(capsys, "inspect", js.parent, "--batch", "10")
    assert code == 2 and "is a compiled plan; --batch cannot change it" in err
    assert "Traceback" not in err


def test_cli_inspect_compare_and_errors(capsys):
    pytest.importorskip("bnnc.compiler.schedule")
    code, out, err = _bnnc(capsys, "inspect", "tfc", "--compare", "standard,proposed", "--io",
                           "caller", "--optimizer", "bop")
    assert code == 0, err
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.startswith(("standard ", "proposed "))}
    assert rows["standard"][-1] == "1.00x" and float(rows["proposed"][-1].rstrip("x")) > 1.5
    for args, msg in ((["nosuchmodel"], "nosuchmodel: no such file, and not a zoo model name"),
                      (["tfc", "--compare", "standard"], "list two or more distinct algorithms"),
                      (["tfc", "--compare", "standard,proposed", "--json", "x.json"],
                       "--json writes one plan"),
                      (["tfc", "--align", "3"], "alignment 3 is not a power of two"),
                      (["tfc", "--state-dtype", "f16", "--batch", "0"], "batch size must be")):
        code, _, err = _bnnc(capsys, "inspect", *args)
        assert code == 2 and msg in err and "Traceback" not in err, (args, err)


def test_text_timeline():
    from bnnc.compiler.report import format_timeline
    lines = format_timeline(_doc(), columns=20).splitlines()
    assert lines[0].startswith("arena 320 B in 20 cells of 16 B")
    cells = {int(x.split("|")[0]): x.split("|")[1] for x in lines[1:]}
    assert len(cells) == 7 and all(len(c) == 20 for c in cells.values())
    # step 5: input 128 B, fc1.dW 128 B, sm.out 64 B fill the 320-byte arena exactly
    assert sorted(cells[5]) == sorted("i" * 8 + "G" * 8 + "x" * 4)
    # step 6: only fc1.dW
    assert sorted(cells[6]) == sorted("G" * 8 + "." * 12)
    assert lines[6].rstrip().endswith("320  dense_dw_f32")
