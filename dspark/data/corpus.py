"""A deterministic text corpus from the CPython standard library (every Python install has it).

Two domains:

* **code** — the ``.py`` source files of the standard library, without test suites
  (``test``/``tests``/``idle_test`` folders), the generated codec tables (``encodings``) and
  ``pydoc_data`` (which is prose);
* **prose** — English technical text: the help topics in ``pydoc_data/topics.py`` and the
  docstrings (module, class and function) of the code files.

Each document is assigned to ``train`` / ``validation`` / ``test`` by a hash of its source path,
so the split never changes when files are added elsewhere, and a file's docstrings land in the
same split as its code.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import platform
import sysconfig
from dataclasses import dataclass
from pathlib import Path

EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "encodings", "pydoc_data", "__pycache__"}
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Document:
    """One corpus document: ``key`` names its source (``path`` or ``path::qualname``)."""

    key: str
    domain: str  # "code" | "prose"
    split: str  # "train" | "validation" | "test"
    text: str


def split_of(key: str, validation_percent: int = 5, test_percent: int = 5) -> str:
    """The split of a source path, from the first 8 bytes of its SHA-256 (stable across machines)."""
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 100
    if bucket < test_percent:
        return "test"
    if bucket < test_percent + validation_percent:
        return "validation"
    return "train"


def stdlib_dir() -> Path:
    """The directory of this interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def code_files(root: Path) -> list[Path]:
    """Standard-library source files of the code domain, sorted by relative path."""
    files = [p for p in root.rglob("*.py") if not EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1])]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def docstrings(source: str, min_chars: int) -> list[tuple[str, str]]:
    """``(qualified name, cleaned docstring)`` of a module and its classes and functions."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    found = []

    def visit(node, prefix):
        doc = ast.get_docstring(node, clean=False)
        name = prefix or "<module>"
        if doc and len(doc) >= min_chars:
            found.append((name, inspect.cleandoc(doc)))
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(child, f"{prefix}.{child.name}" if prefix else child.name)

    visit(tree, "")
    return found


def _literal_assignment(path: Path, name: str) -> dict:
    """The literal value assigned to ``name`` in a Python file, read without executing it."""
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


def build_corpus(root: Path | None = None, *, validation_percent: int = 5, test_percent: int = 5,
                 min_docstring_chars: int = 200) -> list[Document]:
    """All documents of both domains, in a deterministic order (code files, then prose)."""
    root = Path(root) if root is not None else stdlib_dir()
    code, prose = [], []
    for path in code_files(root):
        rel = path.relative_to(root).as_posix()
        try:
            source = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        split = split_of(rel, validation_percent, test_percent)
        code.append(Document(rel, "code", split, source))
        for name, doc in docstrings(source, min_docstring_chars):
            prose.append(Document(f"{rel}::{name}", "prose", split, doc))
    topics_file = root / "pydoc_data" / "topics.py"
    if topics_file.is_file():
        for topic, text in sorted(_literal_assignment(topics_file, "topics").items()):
            key = f"pydoc_data/topics.py::{topic}"
            prose.append(Document(key, "prose", split_of(key, validation_percent, test_percent), text.strip()))
    return code + prose


def corpus_manifest(documents: list[Document]) -> dict:
    """CPython version, document and byte counts per domain and split, and a SHA-256 of the corpus."""
    digest = hashlib.sha256()
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for doc in documents:
        digest.update(f"{doc.key}\0{doc.domain}\0{doc.split}\0".encode())
        digest.update(doc.text.encode())
        entry = counts.setdefault(doc.domain, {}).setdefault(doc.split, {"documents": 0, "bytes": 0})
        entry["documents"] += 1
        entry["bytes"] += len(doc.text.encode())
    return {"python": platform.python_version(), "implementation": platform.python_implementation(),
            "sha256": digest.hexdigest(), "counts": counts}
