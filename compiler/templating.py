"""The Jinja side of codegen: a target's template environment and the kernel source of a program.

`target_env(target)` loads templates/ with the target's overlay chain (`Target.overlays`, most
specific first; kernel templates differ per target only through it): `overlay(path)` names the
first `targets/<overlay>/<path>` that exists, else the portable `path`, and `overlay_parent(overlay,
path)` the next one down the chain, so an overlay template `{% extends %}` the variant below it
and overrides its blocks (calling `super()` for the fallback); `overlays(path)` lists them all.
`render_kernels(env, instances)` renders each kernel instance once, in a fixed order (family, then
function name), after the numerics runtime and, for every family whose template defines a
`prelude` macro, that prelude once before the family's first kernel (a prelude text another
family already emitted -- conv and dense share the vector layer -- is not repeated); a kernel macro is taken from
the most specific overlay of kernels/<family>.c.j2 that defines one of that name (an overlay
overrides the portable macro of the same name), else from the portable template. A family whose
template sets `multiversion` (`'avx2'` or `'avx512'`) has each instance -- one `static void`
function -- split (`split_function`) and passed through kernels/multiversion.c.j2's `kernel`
macro (the x86 overlay compiles the body once per ISA and picks one at run time).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import jinja2

from .c_literals import c_param_names, c_string
from .target import Target

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"


def _env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=True, autoescape=False)
    env.filters["cstr"] = c_string
    env.filters["c_args"] = c_param_names
    return env


def _overlay_names(chain: tuple[str, ...], path: str) -> list[str]:
    """The templates that implement `path` under `chain`, most specific first, portable last."""
    return [*(f"targets/{o}/{path}" for o in chain if (TEMPLATES / "targets" / o / path).is_file()),
            path]


def target_env(target: Target) -> jinja2.Environment:
    """The template environment of one target (module docstring): the overlays of
    `target.overlays` replace portable templates' blocks and macros."""
    env = _env()
    chain = target.overlays

    def overlays(path: str) -> list[str]:
        return _overlay_names(chain, path)

    def overlay(path: str) -> str:
        return overlays(path)[0]

    def overlay_parent(name: str, path: str) -> str:
        names = _overlay_names(chain, path)
        return names[names.index(f"targets/{name}/{path}") + 1]

    env.globals.update(overlays=overlays, overlay=overlay, overlay_parent=overlay_parent)
    return env


def numerics_source() -> str:
    """The C numerics runtime every emitted program starts with (hash, stochastic rounding,
    f16/bf16, PO2 helpers), for tests that compile it alone against compiler/numerics.py."""
    return _env().get_template("kernels/numerics.c.j2").render()


def _macro(env: jinja2.Environment, family: str, name: str):
    """Macro `name` of kernel family `family`: from the most specific overlay of
    kernels/<family>.c.j2 that defines it, else from the portable template; None if none does."""
    for template in env.globals["overlays"](f"kernels/{family}.c.j2"):
        macro = getattr(env.get_template(template).module, name, None)
        if macro is not None:
            return macro
    return None


def split_function(src: str, fn: str) -> tuple[str, str, str, str] | None:
    """A rendered kernel instance `<head>static void fn(<params>)\n{<body>}<tail>` as its four
    parts, or None when `src` is not exactly one such function (then it is left as it is)."""
    start = src.find(f"static void {fn}(")
    if start < 0 or src.count("static void ") != 1:
        return None
    open_ = start + len(f"static void {fn}(")
    close = src.find(")\n{\n", open_)
    end = src.rstrip().rfind("}")
    if close < 0 or end < close:
        return None
    return src[:start], src[open_:close], src[close + 4:end].rstrip("\n"), src[end + 1:]


def render_kernels(env: jinja2.Environment, instances: Iterable) -> list[str]:
    """The C of a program's kernels (module docstring): numerics, then per family its prelude and
    its kernel instances (objects with `family`, `macro`, `fn`, `types`, `flags`), each macro
    taken from the target's overlays first."""
    out = [numerics_source()]
    seen: set[str] = set()
    preludes: set[str] = set()     # a prelude two families share (the vector layer) goes in once
    for inst in sorted(instances, key=lambda i: (i.family, i.fn)):
        prelude = _macro(env, inst.family, "prelude")
        if inst.family not in seen and prelude is not None:
            text = str(prelude())
            if text not in preludes:
                out.append(text)
            preludes.add(text)
        seen.add(inst.family)
        macro = _macro(env, inst.family, inst.macro)
        assert macro is not None, f"templates/kernels/{inst.family}.c.j2 lacks macro {inst.macro}"
        src = str(macro(inst.fn, dict(inst.types), dict(inst.flags)))
        widest = _multiversioned(env, inst.family)
        parts = split_function(src, inst.fn) if widest else None
        if parts is not None:
            head, params, body, tail = parts
            src = head + str(_mv_kernel(env)(inst.fn, params, widest=widest,
                                             caller=lambda b=body: b)) + tail
        out.append(src)
    return out


def _multiversioned(env: jinja2.Environment, family: str) -> str | None:
    """The widest ISA kernel family `family`'s template asks its kernels to be multiversioned up
    to (`{% set multiversion = 'avx2' %}` or `'avx512'`: kernels/multiversion.c.j2 clones each
    instance on x86-64), or None."""
    return getattr(env.get_template(f"kernels/{family}.c.j2").module, "multiversion", None)


def _mv_kernel(env: jinja2.Environment):
    return env.get_template(env.globals["overlay"]("kernels/multiversion.c.j2")).module.kernel
