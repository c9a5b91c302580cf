"""MkDocs hooks (``hooks:`` in mkdocs.yml): the benchmark charts in the site, without a copy in docs/.

The guides embed charts that the benchmark scripts write into ``benchmarks/results/``, by
the relative path that also works where the Markdown is read as files (GitHub, an editor):
``../benchmarks/results/NAME.png``.  MkDocs serves only what lies under ``docs/``, so the
charts are added to the site as ``results/NAME.png`` and those links pointed there.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
LINK = "](../benchmarks/results/"


def on_files(files, config):
    for chart in sorted(RESULTS.glob("*.png")):
        files.append(File.generated(config, f"results/{chart.name}", abs_src_path=str(chart)))
    return files


def on_page_markdown(markdown, page, config, files):
    # Pages at the top of docs/ only: "../" leads from there to the repository root.
    if "/" in page.file.src_uri:
        return markdown
    return markdown.replace(LINK, "](results/")
