"""The reference of every setting (`section.key=default  meaning`), generated from the config dataclasses.

The meaning of a field is the comment written next to it in src/deqlm/config.py (DESIGN: every field has a
default and a comment), read back from the source here, so the list in `python -m deqlm.train --help` cannot
drift from the code and is written once. A field without a trailing comment takes the comment lines right
above it. A setting typed with a `Literal` of deqlm.choices shows its choices before the meaning, read from
the annotation, so the help lists exactly what the config accepts. Imports nothing heavy: the help answers
before torch is loaded.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import textwrap
import tokenize
import typing
from typing import Any

from deqlm.choices import values
from deqlm.config import ExperimentConfig

TOP_LEVEL = "experiment"  # heading of ExperimentConfig's own fields (name, pair, note, ...)


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> its comment in the class's source ({} when the source is not available)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                if tok.type == tokenize.COMMENT}
    alone = {n for n in comments if lines[n - 1].lstrip().startswith("#")}
    class_node = ast.parse(source).body[0]
    assert isinstance(class_node, ast.ClassDef)
    meanings = {}
    for node in class_node.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        end = node.end_lineno or node.lineno
        if end in comments and end not in alone:
            meanings[node.target.id] = comments[end]
            continue
        above, n = [], node.lineno - 1
        while n in alone:
            above.insert(0, comments[n])
            n -= 1
        meanings[node.target.id] = " ".join(above)
    return meanings


def _as_override(value: Any) -> str:
    """A default written as it would be typed after `key=` on the command line."""
    if isinstance(value, str):
        return value if value else "''"
    return json.dumps(value)


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _meaning(comment: str, annotation: Any) -> str:
    """The field's comment, led by its choices ("{a | b} ...") when the field is typed with a Literal."""
    choices = values(annotation)
    if not choices:
        return comment
    return f"{{{' | '.join(choices)}}} {comment}".rstrip()


def _within(f: dataclasses.Field) -> str:
    """The field's allowed interval as the help shows it ("" for a field without one)."""
    interval = f.metadata.get("range")
    return f" (in {interval})" if interval else ""


def _rows(cls: type, prefix: str) -> list[tuple[str, str]]:
    meanings, hints = field_comments(cls), typing.get_type_hints(cls)
    return [(f"{prefix}{f.name}={_as_override(_default(f))}",
             _meaning(meanings.get(f.name, ""), hints[f.name]) + _within(f))
            for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(_default(f))]


def sections() -> list[tuple[str, str, list[tuple[str, str]]]]:
    """(section, one-line description, [(key=default, meaning)]) for the top level and each sub-config."""
    out = [(TOP_LEVEL, "what the run is called and what it reproduces", _rows(ExperimentConfig, ""))]
    for f in dataclasses.fields(ExperimentConfig):
        sub = _default(f)
        if dataclasses.is_dataclass(sub):
            doc = (inspect.getdoc(type(sub)) or "").splitlines()
            out.append((f.name, doc[0] if doc else "", _rows(type(sub), f"{f.name}.")))
    return out


def render(key_width: int = 34, line_width: int = 110) -> str:
    """Every section and setting, aligned, long meanings wrapped: the settings part of the trainer's help."""
    hang = " " * (key_width + 2)
    blocks = []
    for name, about, rows in sections():
        lines = [f"{name}: {about}"]
        for key, meaning in rows:
            head = f"  {key}".ljust(len(hang)) if len(key) < key_width else f"  {key} "
            lines.append(textwrap.fill(meaning, line_width, initial_indent=head, subsequent_indent=hang)
                         if meaning else head.rstrip())
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
