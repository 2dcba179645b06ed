"""Check that the main job printed README's table: every cell but the times.

The main job (``python examples/align_and_merge.py``) is deterministic, so the table a
run prints must equal the one README shows, to the printed digit, except the time column
(wall time depends on the machine and its load). README's table is the one whose header
row equals the printed header.

    python .ci/readme_table.py MAIN_JOB_OUTPUT README.md    # exit 1 and the differences
"""

from __future__ import annotations

import sys
from pathlib import Path

TIME_COLUMN = "time (s)"


def _tables(text: str) -> list[list[list[str]]]:
    """Every markdown table in ``text``: rows of stripped cells, the ``|---|`` rule dropped."""
    tables: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in [*text.splitlines(), ""]:
        line = line.strip()
        if line.startswith("|") and line.endswith("|"):
            cells = [c.strip() for c in line[1:-1].split("|")]
            if not all(set(c) <= set("-: ") for c in cells):
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    return tables


def compare(output: str, readme: str) -> list[str]:
    """The differences between the table in ``output`` and README's, as readable lines
    (empty: they agree)."""
    printed = _tables(output)
    if not printed:
        return ["the main job printed no table"]
    table = printed[0]
    header = table[0]
    shown = next((t for t in _tables(readme) if t[0] == header), None)
    if shown is None:
        return [f"README has no table with the printed header {' | '.join(header)}"]
    keep = [i for i, name in enumerate(header) if name != TIME_COLUMN]
    problems = []
    if len(shown) != len(table):
        problems.append(
            f"README's table has {len(shown) - 1} rows, the job printed {len(table) - 1}"
        )
    for want, got in zip(shown[1:], table[1:]):
        if [want[i] for i in keep] != [got[i] for i in keep]:
            problems.append(f"README: | {' | '.join(want)} |\n   job: | {' | '.join(got)} |")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    problems = compare(Path(argv[0]).read_text(), Path(argv[1]).read_text())
    if problems:
        print("the main job's table differs from README's (times aside):", file=sys.stderr)
        for p in problems:
            print(p, file=sys.stderr)
        return 1
    print("the main job printed README's table (times aside)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
