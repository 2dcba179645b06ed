"""Check that the main job printed README's table, within the band README states.

The main job (``python examples/align_and_merge.py``) prints, per model and method, the
mean ± std over all pairs of its networks. The networks a CPU trains depend on its
kernels (AVX2 and AVX-512 round sums differently), so the means move a little from one
machine to another; README states how far it accepts, in a sentence of the form

    CI accepts a run whose every mean lies within ±0.04 of README's barrier and ±0.03
    of its midpoint accuracy

and the check passes when:

* the printed table has README's rows (model, method) in README's order;
* every printed mean lies within that band of README's mean (the ± std, and the time
  column, which depends on the machine and its load, are not compared);
* the claims hold in the printed means: for every model, weight matching has a lower
  barrier than naive interpolation, and STE (where it ran) a lower one than weight
  matching.

    python .ci/readme_table.py MAIN_JOB_OUTPUT README.md    # exit 1 and the differences
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

BAND = re.compile(
    r"within\s+±(?P<barrier>[0-9.]+)\s+of\s+README's\s+barrier\s+and\s+"
    r"±(?P<acc>[0-9.]+)\s+of\s+its\s+midpoint\s+accuracy"
)
COLUMNS = {"barrier": "barrier", "midpoint acc.": "acc"}


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


def _mean(cell: str) -> float | None:
    """``"0.435 ± 0.168"`` -> 0.435 (None when the cell is not a number)."""
    try:
        return float(cell.split("±")[0])
    except ValueError:
        return None


def band(readme: str) -> dict[str, float] | None:
    """The band README states, per compared column, or None when it states none."""
    m = BAND.search(" ".join(readme.split()))
    if m is None:
        return None
    return {col: float(m.group(key)) for col, key in COLUMNS.items()}


def compare(output: str, readme: str) -> list[str]:
    """What fails in the table in ``output`` against README's, as readable lines (empty:
    it passes)."""
    printed = _tables(output)
    if not printed:
        return ["the main job printed no table"]
    table = printed[0]
    header = table[0]
    shown = next((t for t in _tables(readme) if t[0] == header), None)
    if shown is None:
        return [f"README has no table with the printed header {' | '.join(header)}"]
    tolerance = band(readme)
    if tolerance is None:
        return ["README states no band (within ±B of README's barrier and ±A of its ...)"]
    problems = []
    if [r[:2] for r in shown[1:]] != [r[:2] for r in table[1:]]:
        problems.append(
            "rows differ: README has "
            + ", ".join(" / ".join(r[:2]) for r in shown[1:])
            + "; the job printed "
            + ", ".join(" / ".join(r[:2]) for r in table[1:])
        )
        return problems
    means: dict[tuple[str, str], float] = {}
    for want, got in zip(shown[1:], table[1:]):
        for col, tol in tolerance.items():
            i = header.index(col)
            w, g = _mean(want[i]), _mean(got[i])
            if g is None or w is None:
                problems.append(f"{' / '.join(got[:2])}: {col} {got[i]!r} is not a mean")
            elif abs(g - w) > tol + 1e-9:
                problems.append(
                    f"{' / '.join(got[:2])}: {col} {g:.3f}, README {w:.3f} (band ±{tol})"
                )
            if col == "barrier" and g is not None:
                means[(got[0], got[1])] = g
    for model in dict.fromkeys(k[0] for k in means):
        naive, wm = means.get((model, "naive")), means.get((model, "weight matching"))
        ste = means.get((model, "STE"))
        if naive is not None and wm is not None and not wm < naive:
            problems.append(f"{model}: weight matching's barrier {wm:.3f} is not below naive's")
        if wm is not None and ste is not None and not ste < wm:
            problems.append(f"{model}: STE's barrier {ste:.3f} is not below weight matching's")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    readme = Path(argv[1]).read_text()
    problems = compare(Path(argv[0]).read_text(), readme)
    if problems:
        print("the main job's table is outside README's band:", file=sys.stderr)
        for p in problems:
            print(p, file=sys.stderr)
        return 1
    b = band(readme)
    print(f"the main job printed README's table within its band (±{b['barrier']} barrier, "
          f"±{b['midpoint acc.']} midpoint accuracy) and its claims hold")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
