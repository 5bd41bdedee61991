"""The tutorials' code runs: every ```python block of each page, in order, in one namespace per page.

The pages assert what is deterministic (greedy speculative output equals autoregressive output,
seeded sampling repeats …); see ``markdown_blocks.py`` for the block conventions.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from markdown_blocks import read_blocks, run_page

DOCS = Path(__file__).resolve().parents[2] / "docs"
TUTORIALS = sorted((DOCS / "tutorials").glob("*.md"))
RUNNABLE_PAGES = TUTORIALS + [DOCS / "embedded-models.md"]


@pytest.mark.parametrize("page", RUNNABLE_PAGES, ids=[p.name for p in RUNNABLE_PAGES])
def test_page_runs(page: Path, tmp_path: Path):
    run_page(page, tmp_path)


def test_tutorials_exist_and_have_code():
    names = {p.name for p in TUTORIALS}
    assert {"generate.md", "custom-drafter.md", "hf-checkpoint.md", "bench.md"} <= names
    for page in TUTORIALS:
        blocks = read_blocks(page)
        runnable = [b for b in blocks if b.runs]
        assert runnable, f"{page.name} has no runnable python block"
        assert any("assert " in b.code for b in runnable), f"{page.name} checks nothing (add asserts)"
        skipped = [b for b in blocks if b.lang == "python" and not b.runs]
        assert len(skipped) <= 2, f"{page.name} skips {len(skipped)} python blocks: keep skips rare"
