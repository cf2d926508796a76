"""Parsing both versions (flor calls in them are recognised by :mod:`flor_ray.analysis.calls`).

``ast`` is used for analysis (it is an order of magnitude faster than libcst's
parser); libcst is used only on the target, where formatting must survive.
"""

from __future__ import annotations

import ast

import libcst as cst

from flor_ray.errors import PropagationError


def parse_ast(code: str, which: str) -> ast.Module:
    if not isinstance(code, str):
        raise PropagationError(f"{which} must be a str of Python code, got {type(code).__name__}")
    try:
        return ast.parse(code)
    except SyntaxError as exc:
        raise PropagationError(
            f"cannot parse the {which} file: syntax error at line {exc.lineno}: {exc.msg}; "
            f"fix the {which} version before propagating"
        ) from exc


def parse_cst(code: str, which: str) -> cst.Module:
    try:
        return cst.parse_module(code)
    except cst.ParserSyntaxError as exc:
        raise PropagationError(
            f"cannot parse the {which} file with libcst: syntax error at line {exc.raw_line}: "
            f"{exc.message}"
        ) from exc
