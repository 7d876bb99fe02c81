"""The figures the README and benchmarks/README.md quote are the committed results' (benchmarks/figures.py)."""

from __future__ import annotations

import pytest

from benchmark_scripts import load_benchmark

figures = load_benchmark("figures")


def test_every_quoted_table_matches_its_json(capsys):
    assert figures.main(["--check"]) == 0, capsys.readouterr().err
    quoted = "".join(page.read_text() for page in figures.PAGES)
    assert {m["name"] for m in figures.BLOCK.finditer(quoted)} == set(figures.FIGURES)  # each is quoted somewhere


def test_a_table_edited_by_hand_is_caught():
    page = figures.PAGES[0].read_text()
    edited = page.replace("| 0.42 |", "| 0.41 |", 1)  # the finder's median gap, as if typed in
    assert edited != page and figures.render(edited) == page
    with pytest.raises(KeyError):
        figures.render("<!-- figures: nonexistent -->\n<!-- /figures -->")
