"""MkDocs hook: serve ``benchmarks/results/`` (the files the benchmarks write) with the site.

The benchmark pages link each script's current results file and show its plots; those
files live beside the scripts, outside ``docs/``, and are not copied by hand. Every file
there becomes part of the build under ``benchmarks/results/``, so a link from a page in
``docs/benchmarks/`` reads ``results/NAME.md`` and ``mkdocs build --strict`` fails on a
name that does not exist. Machine-readable logs (``*.jsonl``) stay out.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, InclusionLevel

SERVED = (".md", ".png")


def on_files(files, config):
    results = Path(config["config_file_path"]).parent / "benchmarks" / "results"
    for path in sorted(results.iterdir()):
        if path.suffix in SERVED:
            files.append(
                File.generated(
                    config,
                    f"benchmarks/results/{path.name}",
                    abs_src_path=str(path),
                    inclusion=InclusionLevel.NOT_IN_NAV,
                )
            )
    return files
