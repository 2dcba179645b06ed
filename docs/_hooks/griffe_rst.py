"""Griffe extension: the reStructuredText in metanet's docstrings, read as Markdown.

The docstrings are written for readers of the source, in the Sphinx habits of the field
(PyTorch Geometric's ``.. math::`` blocks, ``:class:`` roles). mkdocstrings renders
Markdown, so before it does:

* ``.. math::`` and its indented body become a ``$$`` display block (MathJax via
  ``pymdownx.arithmatex``); a body with ``&`` or ``\\`` is wrapped in ``aligned``, as
  Sphinx does;
* ``:math:`x``` becomes ``$x$``;
* ``:class:`~a.b.C```, ``:func:``, ``:meth:``, ``:mod:``, ``:attr:``, ``:exc:``,
  ``:data:``, ``:obj:`` become inline code (``C`` for a ``~`` target, else the target);
* a simple table (``====  ====`` borders) becomes a pipe table, continuation lines (an
  empty first column) joined to the row above;
* a paragraph that ends in ``::`` (an RST literal block follows) ends in ``:``;
* an ``Args:`` entry that documents several parameters at once (``alpha, beta: ...``)
  becomes one entry per parameter, each with the shared text, so the Google-style
  parser matches every name to the signature.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Object

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|exc|data|obj):`(~?)([^`]+)`")
MATH_ROLE = re.compile(r":math:`([^`]+)`")
ARGS = re.compile(r"^(\s*)(Args|Arguments|Parameters):\s*$")
SHARED_ENTRY = re.compile(r"^(\s+)([A-Za-z_]\w*(?:\s*,\s*[A-Za-z_]\w*)+)\s*(\([^)]*\))?\s*:(.*)$")


def _role(m: re.Match) -> str:
    target = m.group(2).strip()
    if m.group(1):  # ~a.b.C shows C
        target = target.rsplit(".", 1)[-1]
    return f"`{target}`"


def _math_blocks(lines: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if not stripped.startswith(".. math::"):
            out.append(line)
            i += 1
            continue
        indent = line[: len(line) - len(line.lstrip())]
        body = [stripped[len(".. math::") :].strip()]
        i += 1
        while i < len(lines) and (
            not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(indent)
        ):
            body.append(lines[i].strip())
            i += 1
        tex = "\n".join(b for b in body if b)
        if "&" in tex or "\\\\" in tex:
            tex = f"\\begin{{aligned}}\n{tex}\n\\end{{aligned}}"
        if out and out[-1].strip():
            out.append("")
        out += [f"{indent}$$", *(f"{indent}{t}" for t in tex.splitlines()), f"{indent}$$", ""]
    return out


BORDER = re.compile(r"^=+(?: +=+)+ *$")


def _simple_tables(lines: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(lines):
        if not BORDER.match(lines[i]):
            out.append(lines[i])
            i += 1
            continue
        spans = [m.span() for m in re.finditer(r"=+", lines[i])]
        rows: list[list[str]] = []
        borders = 1
        i += 1
        while i < len(lines) and borders < 3:
            line = lines[i]
            i += 1
            if BORDER.match(line):
                borders += 1
                continue
            cells = [
                line[a : (spans[k + 1][0] if k + 1 < len(spans) else len(line))].strip()
                for k, (a, _) in enumerate(spans)
            ]
            if rows and not cells[0]:  # a continuation line
                rows[-1] = [f"{r} {c}".strip() for r, c in zip(rows[-1], cells)]
            else:
                rows.append(cells)
        if rows:
            out += ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(spans)]
            out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows[1:]]
    return out


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _shared_args(lines: list[str]) -> list[str]:
    out: list[str] = []
    section: int | None = None  # the indent of the Args: header we are in
    i = 0
    while i < len(lines):
        line = lines[i]
        header = ARGS.match(line)
        if header:
            section = len(header.group(1))
        elif line.strip() and section is not None and _indent(line) <= section:
            section = None
        entry = SHARED_ENTRY.match(line) if section is not None else None
        if entry is None:
            out.append(line)
            i += 1
            continue
        indent, names, kind, text = entry.groups()
        rest = []
        i += 1
        while i < len(lines) and lines[i].strip() and _indent(lines[i]) > len(indent):
            rest.append(lines[i])
            i += 1
        for name in (n.strip() for n in names.split(",")):
            out += [f"{indent}{name}{' ' + kind if kind else ''}:{text}", *rest]
    return out


def to_markdown(text: str) -> str:
    """``text`` with the RST pieces above turned into Markdown."""
    text = MATH_ROLE.sub(lambda m: f"${m.group(1)}$", text)
    text = ROLE.sub(_role, text)
    lines = _math_blocks(_shared_args(_simple_tables(text.splitlines())))
    lines = [re.sub(r"(\S)::$", r"\1:", line) for line in lines]
    return "\n".join(lines)


class RstToMarkdown(Extension):
    def on_instance(self, *, obj: Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = to_markdown(obj.docstring.value)
