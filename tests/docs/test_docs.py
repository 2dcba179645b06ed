"""Every code block in ``docs/`` runs from a folder outside the repo, and prints what it says.

Each page runs as a reader follows it, top to bottom, in a fresh interpreter started in
a temporary folder that holds what README's main job leaves in ``align_out/`` (the
commands on the pages use it) and nothing else importable but the installed packages;
the rules are README's (``tests/docs/test_readme.py``): python blocks whole, bash blocks line
by line, ``<!-- file: NAME -->`` blocks written where they stand, ``print(...)  # text``
claims checked, and a block that cannot run says why (``<!-- not run: reason -->``).
Blocks of any other kind are output (```` ```text ````), never code.

The site itself (links, anchors, the API and CLI references) is checked by
``mkdocs build --strict`` in ``.ci/run``; the parts of it that are code are tested here.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from tests.docs.test_readme import (
    FENCE,
    NOT_RUN,
    ROOT,
    check_claims,
    main_job_checkpoints,
    page_jobs,
    run_outside,
)

DOCS = ROOT / "docs"
PAGES = sorted(p.relative_to(ROOT).as_posix() for p in DOCS.rglob("*.md"))
RUN = [p for p in PAGES if page_jobs((ROOT / p).read_text(), p)]


@pytest.fixture(scope="module")
def main_job_out(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("main_job")
    main_job_checkpoints(folder)
    return folder / "align_out"


@pytest.mark.parametrize("page", RUN)
def test_page_runs_outside_the_repo(page, tmp_path, main_job_out):
    shutil.copytree(main_job_out, tmp_path / "align_out")
    text = (ROOT / page).read_text()
    results = run_outside(page_jobs(text, page), tmp_path)
    check_claims(results)
    shown = re.search(r"`summary\(\)` prints:\n\n```text\n(.*?)```", text, flags=re.S)
    if shown:  # the output a page shows is what its snippet printed
        summary = next(r for r in results if "print(space.summary())" in r["code"])
        assert shown.group(1).strip() == summary["stdout"].strip()


def test_every_block_is_code_that_runs_or_says_why():
    """python and bash blocks run (or give a reason); ``text`` blocks are output; any
    other block is a file a command reads. The pages hold the tour's snippets: the CLI
    lines, alignment, merging a mergekit config."""
    jobs = []
    for page in PAGES:
        text = (ROOT / page).read_text()
        for m in NOT_RUN.finditer(text):
            assert len(m.group(1).split()) >= 3, f"{page}: {m.group(0)[:200]}"
        for m in FENCE.finditer(text):
            lang = m.group(1)
            line = text[: m.start()].count("\n") + 1
            assert lang in ("python", "bash", "text", "yaml"), f"{page} line {line}: ```{lang}"
            if lang == "yaml":
                assert text[: m.start()].rstrip().endswith("-->"), f"{page} line {line}"
        jobs += page_jobs(text, page)
    codes = [j["code"] for j in jobs]
    for needed in ("metanet create", "metanet align", "metanet merge --config", "metanet train"):
        assert any(c.startswith(needed) for c in codes), needed
    assert any("weight_matching(" in c for c in codes)


def test_cli_reference_renders_every_command():
    """The CLI reference page is rendered from the parser (the hook mkdocs runs): every
    subcommand gets a section with its own usage line."""
    import argparse
    import runpy

    from metanet.cli import build_parser

    hook = runpy.run_path(str(DOCS / "_hooks" / "cli_reference.py"))
    page = (DOCS / "reference" / "cli.md").read_text()
    assert hook["MARKER"] in page
    text = hook["render"]()
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name in sub.choices:
        assert f"## `metanet {name}`" in text and f"usage: metanet {name}" in text
    assert text.count("```text") == len(sub.choices) + 1


@pytest.mark.requires("griffe")
def test_docstrings_read_as_markdown():
    """The griffe extension turns the docstrings' reStructuredText into Markdown that
    mkdocstrings renders: math blocks and roles, Sphinx roles, simple tables, and Args
    entries that document several parameters at once."""
    import runpy

    to_markdown = runpy.run_path(str(DOCS / "_hooks" / "griffe_rst.py"))["to_markdown"]
    doc = (
        "Sum :math:`x_i` of :class:`~metanet.space.WeightSpace` and :func:`f`::\n\n"
        ".. math::\n\n    a &= b \\\\\n    c &= d\n\nafter\n\n"
        "====  =====\nname  what\n====  =====\n``a``  one\n      more\n====  =====\n\n"
        "Args:\n    net: the net.\n    alpha, beta: the steps\n        of both.\n\nDone."
    )
    assert to_markdown(doc).splitlines() == [
        "Sum $x_i$ of `WeightSpace` and `f`:",
        "",
        "$$",
        "\\begin{aligned}",
        "a &= b \\\\",
        "c &= d",
        "\\end{aligned}",
        "$$",
        "",
        "after",
        "",
        "| name | what |",
        "|---|---|",
        "| ``a`` | one more |",
        "",
        "Args:",
        "    net: the net.",
        "    alpha: the steps",
        "        of both.",
        "    beta: the steps",
        "        of both.",
        "",
        "Done.",
    ]


def test_reliability_guide_names_tests_that_exist():
    """Each guarantee of the reliability guide names the tests that show it: every one
    of those names is a test function (a renamed or deleted test fails here)."""
    text = (DOCS / "guides" / "reliability.md").read_text()
    names = set(re.findall(r"`(test_\w+)`", text))
    assert len(names) >= 20
    defined = {
        m
        for p in (ROOT / "tests").rglob("test_*.py")
        for m in re.findall(r"^def (test_\w+)", p.read_text(), re.M)
    }
    assert names <= defined, sorted(names - defined)
    for path in re.findall(r"`(tests/[\w/]+\.py)`", text):
        assert (ROOT / path).exists(), path
