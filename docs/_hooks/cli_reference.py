"""MkDocs hook: the CLI reference, rendered from ``metanet.cli.build_parser()`` at build time.

A page that holds the marker ``<!-- metanet cli reference -->`` gets, in its place, the
help of ``metanet`` and of every subcommand (nested ones too), each under its own
heading, as argparse prints it at 100 columns. Nothing is copied by hand, so the
reference cannot drift from the parser.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator

MARKER = "<!-- metanet cli reference -->"


def _commands(
    parser: argparse.ArgumentParser, words: tuple[str, ...]
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """``(command words, parser)`` for ``parser`` and every subparser below it, in the
    order ``--help`` lists them."""
    yield words, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*words, name))


def render() -> str:
    """The reference as Markdown: one section per command, its help in a text block."""
    from metanet.cli import build_parser

    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps at the terminal's width: fix it
    try:
        sections = []
        for words, parser in _commands(build_parser(), ("metanet",)):
            help_text = parser.format_help().rstrip()
            sections.append(f"## `{' '.join(words)}`\n\n```text\n{help_text}\n```\n")
    finally:
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns
    return "\n".join(sections)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, render())
