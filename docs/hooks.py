"""MkDocs hooks: the pages that live outside docs/ (the README, the benchmarks' README, the
changelog) join the site, with their repository-relative links pointed at the site's pages."""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
# site page <- repository file
PAGES = {"index.md": "README.md", "benchmarks.md": "benchmarks/README.md", "changelog.md": "CHANGELOG.md"}
# a link as written in those files -> the site page it means
LINKS = {"docs/": "", "benchmarks/README.md": "benchmarks.md", "CHANGELOG.md": "changelog.md"}


def on_files(files, config):
    for page, source in PAGES.items():
        text = (ROOT / source).read_text()
        for written, meant in LINKS.items():
            text = text.replace(f"]({written}", f"]({meant}")
        files.append(File.generated(config, page, content=text))
    return files
