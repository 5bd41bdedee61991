"""Run the code of a documentation page the way a reader would: every block, in order, in one namespace.

Conventions for the pages under ``docs/tutorials/`` (summarised for writers in
``docs/installation.md``, "Building this documentation"):

* A fenced block whose info string is exactly ``python`` is executed. All runnable blocks of a
  page share one module namespace, in page order, as if pasted into one session.
* A ``python`` block is *not* executed when its info string has a ``title="..."`` (a file shown
  for reading, e.g. what a package would contain) or when the line before the fence is
  ``<!-- skip -->``. Keep these rare; say in the page why the block does not run.
* A block of another language with ``title="NAME"`` (```` ```yaml title="phrases.yaml" ````) is
  written to ``NAME`` in the page's working directory before the following blocks run, the way
  a reader would save it.
* Only fences that start at the beginning of a line count; indented blocks are display only.

The page's code runs in a fresh temporary working directory. Components it registers
(``@register_drafter`` …) are unregistered afterwards, so a page cannot leak into other tests.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path

FENCE = re.compile(r"^(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)\s*(?P<attrs>.*)$")
TITLE = re.compile(r'title="(?P<title>[^"]+)"')
SKIP_MARK = "<!-- skip -->"


@dataclass
class Block:
    """One fenced code block of a Markdown page."""

    lang: str
    attrs: str
    code: str
    line: int  # 1-based line number of the block's first code line in the page
    skip_marked: bool

    @property
    def title(self) -> str | None:
        """The ``title="..."`` of the info string, if any."""
        match = TITLE.search(self.attrs)
        return match.group("title") if match else None

    @property
    def runs(self) -> bool:
        """Whether the block is executed."""
        return self.lang == "python" and self.title is None and not self.skip_marked


def read_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of ``path``, in order (unterminated fences are an error)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i, previous = [], 0, ""
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            if lines[i].strip():
                previous = lines[i].strip()
            i += 1
            continue
        fence = match.group("fence")
        end = i + 1
        while end < len(lines):
            closing = lines[end].rstrip()
            if closing and set(closing) == {fence[0]} and len(closing) >= len(fence):
                break
            end += 1
        else:
            raise ValueError(f"{path}:{i + 1}: code block is never closed")
        blocks.append(Block(lang=match.group("lang"), attrs=match.group("attrs"),
                            code="\n".join(lines[i + 1:end]) + "\n", line=i + 2,
                            skip_marked=previous == SKIP_MARK))
        previous = ""
        i = end + 1
    return blocks


@contextlib.contextmanager
def _isolated_registries():
    """Restore the component registries on exit (pages register their own drafters)."""
    from dspark.cache import CACHES
    from dspark.drafters import DRAFTERS
    from dspark.samplers import SAMPLERS
    from dspark.verifiers import VERIFIERS

    registries = (CACHES, DRAFTERS, SAMPLERS, VERIFIERS)
    for registry in registries:
        registry.names()  # import the built-ins first, so they are part of the snapshot
    saved = [dict(registry._classes) for registry in registries]
    try:
        yield
    finally:
        for registry, classes in zip(registries, saved):
            registry._classes.clear()
            registry._classes.update(classes)


def run_page(path: Path, workdir: Path) -> types.ModuleType:
    """Execute the page's runnable blocks in one module namespace, inside ``workdir``.

    Tracebacks point at the page's own line numbers. Returns the namespace (a module).
    """
    name = "docs_page_" + re.sub(r"\W", "_", path.stem)
    module = types.ModuleType(name)
    module.__file__ = str(path)
    sys.modules[name] = module  # dataclasses and typing look classes' modules up here
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        with _isolated_registries():
            for block in read_blocks(path):
                if block.runs:
                    code = "\n" * (block.line - 1) + block.code  # keep the page's line numbers
                    exec(compile(code, str(path), "exec", dont_inherit=True), module.__dict__)
                elif block.lang != "python" and block.title is not None:
                    (workdir / block.title).write_text(block.code, encoding="utf-8")
    finally:
        os.chdir(cwd)
        sys.modules.pop(name, None)
    return module
