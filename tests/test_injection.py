"""No injection: a model file cannot put code into the generated sources or reach a shell.

Every node, tensor, initializer, input/output and graph name of a model (and its doc strings,
metadata, producer and symbolic batch dimension) is replaced by C / Jinja / make / shell payloads.
`bnnc compile` must then write exactly the bytes it writes for the same model with plain names,
except the model's hash and the one place meant to name ONNX nodes: the comment above each step
function, where the node name appears reduced to identifier characters (`c_literals.c_label`), so
no payload survives. That place and the command line in the file headers (which holds the user's
file name) are also checked separately: escaped, inside comments.
The hostile output directory is then built with its own Makefile (make runs recipes through
/bin/sh) and trained a step; shell payloads would create a canary file. Last, every Python source
of bnnc is scanned (ast) for subprocess calls through a shell.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest

from bnnc.cli import main
from bnnc.compiler import codegen
from bnnc.compiler.config import make_config
from bnnc.compiler.contract import MANIFEST
from bnnc.compiler.frontend import load_model
from bnnc.compiler.planner import plan_schedule
from bnnc.compiler.schedule import build_schedule
from bnnc.compiler.target import load_target
from bnnc.compiler.zoo import build_zoo_model
from bnnc.runtime import packed
from bnnc.runtime.programs import LocalRunner

REPO = Path(__file__).resolve().parent.parent
CANARY = "/tmp/bnnc_injection_canary"       # what every shell payload tries to create


def payloads(canary: str) -> list[str]:
    return [
        '*/ #include "/etc/passwd" /*', "*/", "/*", "// x", '#include "/dev/zero"', "#define main",
        "{{ 7*7 }}", "{% include 'model.c.j2' %}", "{# c #}", "{{ self.__init__ }}",
        f"$(touch {canary})", f"`touch {canary}`", f"; touch {canary} #", f"$$(touch {canary})",
        '"', "'", "\\", "\\\n", "a\nb", "\r\n", "\t", "\x00", "\x1b[2J", "??/", "??=",
        '"); system("id"); ("', "%n%s%x", "é", "日本語", "\u202e", "\u2028", "\ufeff",
        "@echo pwned", "\n\ttouch " + canary, "x" * 3000, "", " ",
    ]


def _hostile(model: onnx.ModelProto, canary: str) -> onnx.ModelProto:
    """`model` with every name (kept unique) and free-text field replaced by payloads."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    p = payloads(canary)
    tensors = sorted({s for n in g.node for s in (*n.input, *n.output) if s}
                     | {v.name for v in (*g.input, *g.output, *g.initializer)})
    new = {t: f"{p[k % len(p)]}#{k}" for k, t in enumerate(tensors)}
    for n in g.node:
        n.input[:] = [new.get(s, s) for s in n.input]
        n.output[:] = [new[s] for s in n.output]
    for coll in (g.input, g.output, g.value_info, g.initializer):
        for v in coll:
            v.name = new.get(v.name, v.name)
    for k, n in enumerate(g.node):
        n.name = p[(k + 3) % len(p)]
        n.doc_string = p[(k + 5) % len(p)]
    g.doc_string = p[10]                    # g.name: see the test (it names the C files)
    m.doc_string, m.producer_name, m.producer_version, m.domain = p[0], p[11], p[4], p[12]
    m.ClearField("metadata_props")
    onnx.helper.set_model_props(m, {pp: pp for pp in p[:12]})
    dim = g.input[0].type.tensor_type.shape.dim[0]
    dim.dim_param = p[10]
    return m


def _normalized(out: Path, *, skip=("model.onnx",)) -> dict[str, bytes]:
    """Every file of `out`, with the model's hashes (the only model-dependent bytes) blanked."""
    man = json.loads((out / MANIFEST).read_text())
    sha, mhash = man["model_sha256"], man["model_hash"]
    files = {}
    for p in sorted(out.iterdir()):
        if p.name in skip:
            continue
        data = p.read_bytes()
        if p.suffix == ".npz":
            # its __model_hash__ member binds it to the compiled model (compressed: compare the
            # arrays, the hash blanked)
            with np.load(p) as z:
                data = b"".join(k.encode() + (b"<hash>" if k == "__model_hash__" else
                                              z[k].tobytes()) for k in z.files)
        for s in (sha, f"{mhash:016X}", str(mhash), f"{mhash:#x}"):
            data = data.replace(s.encode(), b"<hash>")
        files[p.name] = data
    return files


CASES = [("tfc", "onnx", {}), ("cnv", "onnx", {}), ("cnv", "qonnx", {}),
         ("resnete18", "onnx", {"image_size": 16, "num_classes": 10})]


@pytest.mark.parametrize("model,fmt,kw", CASES, ids=[f"{m}-{f}" for m, f, _ in CASES])
@pytest.mark.parametrize("alg", ["standard", "proposed"])
def test_onnx_names_change_no_byte_of_the_output(model, fmt, kw, alg, tmp_path):
    plain = build_zoo_model(model, fmt=fmt, width=0.0625, **kw)
    hostile = _hostile(plain, CANARY)
    dirs = {}
    for label, m in (("plain", plain), ("hostile", hostile)):
        src = tmp_path / label / "model.onnx"        # the same file name: it is in the headers
        src.parent.mkdir()
        src.write_bytes(m.SerializeToString())
        dirs[label] = tmp_path / label / "out"
        assert main(["compile", str(src), "--algorithm", alg, "--batch", "2", "-o",
                     str(dirs[label])]) == 0
    a, b = _normalized(dirs["plain"]), _normalized(dirs["hostile"])
    assert {"trainer.c", "Makefile", "bnnc_manifest.json", "plan.json"} <= set(a)
    assert a.keys() == b.keys()
    for name in a:
        pa, pb = (_node_names(x[name]) for x in (a, b))
        assert pa == pb, f"{name} depends on the ONNX names beyond the step comments' node names"
    # the step comments do name the nodes, each reduced to identifier characters
    named = _NODE_LINE.findall(b[next(n for n in b if n.endswith(".c") and n != "trainer.c")])
    assert named and all(re.fullmatch(rb"[A-Za-z0-9_]{1,60}", n) for n in named), named[:5]
    # and the hostile directory holds none of the payloads (the file's own copy aside)
    _assert_no_payloads(b)
    # a hostile graph name: the model (and file) name is bnnc's sanitized identifier
    hostile.graph.name = payloads(CANARY)[6]
    src = tmp_path / "named.onnx"
    src.write_bytes(hostile.SerializeToString())
    assert main(["compile", str(src), "--algorithm", alg, "--batch", "2", "-o",
                 str(tmp_path / "named")]) == 0
    files = _normalized(tmp_path / "named")
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*\.[ch]", f) for f in files
               if f.endswith((".c", ".h")) and f != "trainer.c")
    _assert_no_payloads(files)


_NODE_LINE = re.compile(rb'^ \* ONNX node "([A-Za-z0-9_]*)" \*/$', re.M)


def _node_names(data: bytes) -> bytes:
    """`data` with the node name of every step comment blanked (only identifier characters match:
    a raw name would stay and differ)."""
    return _NODE_LINE.sub(b' * ONNX node "<name>" */', data)


def _assert_no_payloads(files: dict[str, bytes]) -> None:
    for name, data in files.items():
        if not name.endswith(".npz"):
            assert not re.search(rb"[^\x20-\x7e\n\t]", data), f"{name}: a non-ASCII byte"
        for pl in payloads(CANARY):
            # shorter ASCII ones occur in any C file, 2-byte UTF-8 ones in compressed data
            if len(pl.encode()) >= 6 or not pl.isascii() and not name.endswith(".npz"):
                assert pl.encode() not in data, (name, pl)


# ---------------------------------------------------------------------------------------------
# the places that quote user text, in comments


_TOKEN = re.compile(r'/\*.*?\*/|//[^\n]*|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'', re.S)


def _split_c(text: str) -> tuple[str, list[str]]:
    """(code with every comment replaced by a space, the comments): a C lexer's view, strings
    included so a "/*" inside a literal does not open a comment."""
    comments: list[str] = []

    def sub(m):
        if m.group().startswith(("/*", "//")):
            comments.append(m.group())
            return " "
        return m.group()
    return _TOKEN.sub(sub, text), comments


def test_split_c_is_a_lexer():
    code, comments = _split_c('int a; /* x "*/ char *s = "/* no */"; // y\n')
    assert comments == ['/* x "*/', "// y"] and '"/* no */"' in code


@pytest.fixture(scope="module")
def quoted(tmp_path_factory):
    """tfc compiled from a file whose *name* holds payloads, with emit_c quoting hostile ONNX
    node names above the step functions; and the same with plain text, for comparison."""
    root = tmp_path_factory.mktemp("quoted")
    canary = str(root / "canary")
    graph = load_model(build_zoo_model("tfc", width=0.125))
    sched = build_schedule(graph, make_config("proposed", batch=2))
    _, plan = plan_schedule(sched)
    fname = "x */ $(touch C) `touch C` {{ 7*7 }} {% x %} \"q\" \\ é\n#include <x>.onnx"
    fname = fname.replace("C", canary)
    p = payloads(canary)
    layers = dict.fromkeys(s.layer for s in sched.steps if s.layer)
    names = {layer: p[k % len(p)] for k, layer in enumerate(layers)}
    out = {}
    for label, cmd, onnx_names in (("plain", "bnnc compile model.onnx", None),
                                   ("hostile", f"bnnc compile {fname}", names)):
        out[label] = root / label
        codegen.emit_c(sched, plan, load_target("host"), out[label], command=cmd,
                       model_sha256=graph.source_sha256, onnx_names=onnx_names)
    return out, canary, names


def test_quoted_text_is_escaped_inside_comments(quoted):
    out, _, names = quoted
    for f in ("tfc.c", "tfc.h", "trainer.c"):
        plain, plain_comments = _split_c((out["plain"] / f).read_text())
        text = (out["hostile"] / f).read_text(encoding="utf-8")
        code, comments = _split_c(text)
        assert code == plain, f"{f}: quoted text leaked out of a comment"
        assert len(comments) == len(plain_comments)
        assert not re.search(r"[^\x20-\x7e\n]", text), f
        # the command line is quoted, escaped: its "*/" may not close the comment early
        assert "x * / $(touch" in text
    lines = (out["hostile"] / "tfc.c").read_text().splitlines()
    # payload 0 reduced to identifier characters by hand
    assert ' * ONNX node "____include___etc_passwd____" */' in lines
    steps = [ln for ln in lines if ln.startswith("/* step ")]
    assert sum(ln.startswith(' * ONNX node "') for ln in lines) == \
        sum(1 for ln in steps if names.get(ln.split()[4], "") != "")


def test_makefile_quotes_nothing_a_shell_or_make_would_run(quoted):
    out, _, _ = quoted
    mk = (out["hostile"] / "Makefile").read_text()
    assert not re.search(r"[^\x20-\x7e\n\t]", mk)
    plain = (out["plain"] / "Makefile").read_text()
    # only the comment lines differ: every recipe, variable and rule is byte-identical
    diff = [(a, b) for a, b in zip(plain.splitlines(), mk.splitlines()) if a != b]
    assert len(plain.splitlines()) == len(mk.splitlines()) and diff
    assert all(a.startswith("# ") and b.startswith("# ") and not b.endswith("\\")
               for a, b in diff), diff


@pytest.mark.skipif(shutil.which("make") is None or shutil.which("cc") is None,
                    reason="needs make and a C compiler")
def test_hostile_output_builds_and_trains_without_running_payloads(quoted, tmp_path):
    out, canary, _ = quoted
    d = out["hostile"]
    flags = "-std=c99 -O0 -Wall -Wextra -Werror -pedantic -fno-strict-aliasing"
    r = subprocess.run(["make", "-C", str(d), "all", f"CFLAGS={flags}"], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rng = np.random.default_rng(0)
    x = ((2 * rng.integers(0, 256, (4, 1, 28, 28)) - 255) / 255).astype(np.float32)
    packed.pack(tmp_path / "d.bnnd", x, rng.integers(0, 10, 4), 10)
    res = LocalRunner(load_target("host")).run(d / "trainer", ["--train", str(tmp_path / "d.bnnd"),
                                                               "--steps", "1"], timeout=120)
    assert res.returncode == 0 and res.events[-1] == {"event": "done", "step": 1}
    assert not Path(canary).exists() and not Path(CANARY).exists()


# ---------------------------------------------------------------------------------------------
# no shell anywhere in bnnc


_SHELL_FUNCS = {("os", "system"), ("os", "popen"), ("os", "execl"), ("os", "execlp"),
                ("os", "spawnl"), ("os", "spawnlp"), ("pty", "spawn"), ("commands", "getoutput"),
                ("subprocess", "getoutput"), ("subprocess", "getstatusoutput"),
                ("asyncio", "create_subprocess_shell")}
_SUBPROCESS = {"run", "Popen", "call", "check_call", "check_output"}


def shell_calls(source: str, filename: str = "<src>") -> list[str]:
    """Calls that hand a string to a shell: os.system & co., subprocess.* with shell= anything
    but a literal False, or with a command that is a string rather than an argv list."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = (f.value.id, f.attr) if isinstance(f, ast.Attribute) and \
            isinstance(f.value, ast.Name) else (None, getattr(f, "id", None))
        where = f"{filename}:{node.lineno}"
        if name in _SHELL_FUNCS or name[1] in {"system", "popen", "getoutput"} and name[0] is None:
            found.append(f"{where}: {name[0]}.{name[1]}")
        if name[0] == "subprocess" and name[1] in _SUBPROCESS or \
                name[0] is None and name[1] in _SUBPROCESS - {"call"}:
            for kw in node.keywords:
                if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant)
                                              and kw.value.value is False):
                    found.append(f"{where}: shell={ast.unparse(kw.value)}")
            if node.args and isinstance(node.args[0], (ast.Constant, ast.JoinedStr, ast.BinOp)):
                found.append(f"{where}: command is a string, not an argv list")
    return found


def test_shell_scan_finds_shell_calls():
    src = ("import os, subprocess\nfrom subprocess import run\n"
           "os.system('make')\nsubprocess.run(cmd, shell=True)\nrun(['a'], shell=flag)\n"
           "subprocess.check_output(f'cc {x}')\nos.popen('ls')\n"
           "subprocess.run(['cc', x], shell=False)\nsubprocess.Popen(argv)\n")
    assert [s.split(": ", 1)[1] for s in shell_calls(src)] == [
        "os.system", "shell=True", "shell=flag", "command is a string, not an argv list",
        "os.popen"]


def test_bnnc_never_runs_a_shell():
    files = sorted(p for d in ("compiler", "runtime", "cli", "scripts", "benchmarks")
                   for p in (REPO / d).rglob("*.py"))
    assert len(files) > 30
    found = [s for p in files for s in shell_calls(p.read_text(), str(p.relative_to(REPO)))]
    assert not found, found
    # and the program builder documents and keeps the rule
    assert "shell=True" in (REPO / "runtime" / "programs.py").read_text()
