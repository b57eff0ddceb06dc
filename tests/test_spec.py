"""SPEC.md's signatures are the code's: every indented ``gptkernels...(...)`` block names a public
callable whose parameters (names, kinds, defaults) are exactly those written; every public
function of ``gptkernels.__all__`` has such a block. Cheap: parsing plus ``inspect.signature``."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest
import torch

import gptkernels

SPEC = Path(__file__).resolve().parent.parent / "SPEC.md"
_START = re.compile(r"^ {4}(?:[\w, ]+=\s*)?(gptkernels(?:\.\w+)+)\(")


def spec_signatures(text: str) -> dict[str, str]:
    """``{dotted name: parameter text}`` of the indented signature blocks (a block may span lines:
    it runs to the parenthesis that closes the call)."""
    lines, found, i = text.splitlines(), {}, 0
    while i < len(lines):
        m = _START.match(lines[i])
        if not m:
            i += 1
            continue
        buf, depth = lines[i][m.end():], 1
        params = []
        while True:
            for ch in buf:
                depth += ch == "("
                depth -= ch == ")"
                if depth == 0:
                    break
                params.append(ch)
            if depth == 0:
                break
            params.append(" ")
            i += 1
            buf = lines[i]
        name = m.group(1)
        assert name not in found, f"SPEC.md: {name} has two signature blocks"
        found[name] = "".join(params)
        i += 1
    return found


def resolve(dotted: str):
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def _default(node: ast.expr):
    text = ast.unparse(node)
    if text.startswith("torch."):
        return getattr(torch, text.split(".", 1)[1])
    return ast.literal_eval(node)


def written(params: str) -> list[tuple[str, str, object]]:
    """``[(name, kind, default)]`` of a signature as SPEC.md writes it."""
    args = ast.parse(f"def f({params}): pass").body[0].args
    out, empty = [], inspect.Parameter.empty
    positional = args.posonlyargs + args.args
    pos_defaults = [empty] * (len(positional) - len(args.defaults)) + [_default(d) for d in args.defaults]
    for a, d in zip(positional, pos_defaults):
        out.append((a.arg, "POSITIONAL_OR_KEYWORD", d))
    for a, d in zip(args.kwonlyargs, args.kw_defaults):
        out.append((a.arg, "KEYWORD_ONLY", empty if d is None else _default(d)))
    return out


def actual(obj) -> list[tuple[str, str, object]]:
    sig = inspect.signature(obj)
    return [(p.name, p.kind.name, p.default) for p in sig.parameters.values()]


def _canonical(params):
    # keyword-only parameters may be written in any order; positional ones may not
    pos = [p for p in params if p[1] != "KEYWORD_ONLY"]
    kw = sorted((p for p in params if p[1] == "KEYWORD_ONLY"), key=lambda p: p[0])
    return pos + kw


SIGNATURES = spec_signatures(SPEC.read_text())


def test_spec_has_the_signature_blocks():
    # the parser found the blocks (a reformatting that hides them from it must fail here)
    for name in ("gptkernels.flash_attn", "gptkernels.paged_decode", "gptkernels.generate",
                 "gptkernels.models.from_pretrained", "gptkernels.hf.patch"):
        assert name in SIGNATURES, f"SPEC.md has no indented signature block for {name}"


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_spec_signature_matches_code(name):
    obj = resolve(name)
    spec, code = _canonical(written(SIGNATURES[name])), _canonical(actual(obj))
    assert spec == code, (f"SPEC.md's signature of {name} drifted from the code:\n  SPEC: {spec}\n"
                          f"  code: {code}")


def test_every_public_function_is_in_spec():
    public = [n for n in gptkernels.__all__
              if callable(getattr(gptkernels, n)) and not (inspect.isclass(getattr(gptkernels, n))
                                                          and issubclass(getattr(gptkernels, n), Exception))]
    missing = [n for n in public if f"gptkernels.{n}" not in SIGNATURES]
    assert not missing, f"public callables without a signature block in SPEC.md: {missing}"


def test_drift_is_caught():
    # the comparison itself can fail: a renamed, added or re-defaulted parameter differs
    code = _canonical(actual(gptkernels.paged_append))
    good = SIGNATURES["gptkernels.paged_append"]
    assert _canonical(written(good)) == code
    for bad in (good.replace("slot_mapping", "slots"), good + ", extra=None",
                good.replace("k_scale=None", "k_scale=1.0"), good.replace("*, ", "")):
        assert _canonical(written(bad)) != code, bad
