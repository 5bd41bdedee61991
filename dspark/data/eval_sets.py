"""Evaluation and calibration prompt sets, cut deterministically from held-out documents.

* code: the opening lines of a function (its ``def`` line onwards), 100–300 tokens, with the
  rest of the function as the reference continuation;
* prose: the opening of a paragraph, cut at a word boundary after ~100–200 tokens.

Each record: ``{"id", "domain", "split", "source", "prompt", "num_tokens", "reference"}``.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

from dspark.data.corpus import Document


def function_openings(doc: Document, tokenizer, min_tokens: int, max_tokens: int) -> list[dict]:
    """Prompts made of a function's first lines (``min_tokens``..``max_tokens`` tokens), rest as reference."""
    try:
        tree = ast.parse(doc.text)
    except SyntaxError:
        return []
    lines = doc.text.splitlines(keepends=True)
    records = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.end_lineno is None:
            continue
        start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
        body = lines[start: node.end_lineno]
        prompt, cut = "", None
        for i, line in enumerate(body):
            candidate = prompt + line
            n = len(tokenizer(candidate)["input_ids"])
            if n > max_tokens:
                break
            prompt, cut = candidate, i + 1
            if n >= min_tokens:
                break
        if cut is None or cut >= len(body) - 2:  # too long a first line, or nothing left to continue
            continue
        n = len(tokenizer(prompt)["input_ids"])
        if n < min_tokens:
            continue
        records.append(dict(domain="code", split=doc.split, source=f"{doc.key}:{start + 1}", prompt=prompt,
                            num_tokens=n, reference="".join(body[cut:])))
    return records


def paragraph_openings(doc: Document, tokenizer, min_tokens: int, max_tokens: int) -> list[dict]:
    """Prompts that start at a paragraph and run on (across paragraph breaks if needed) to
    ``min_tokens``..``max_tokens`` tokens, cut before a space; at least 20 tokens must follow."""
    records = []
    offset = 0
    for index, paragraph in enumerate(doc.text.split("\n\n")):
        start, offset = offset, offset + len(paragraph) + 2
        if not paragraph.strip() or paragraph.startswith((" ", "\t")):  # skip indented blocks (examples)
            continue
        rest = doc.text[start:]
        spans = tokenizer(rest, return_offsets_mapping=True)["offset_mapping"]
        # the first token end at or after min_tokens that falls just before a space
        cut = next((end for _, end in spans[min_tokens - 1: max_tokens] if rest[end: end + 1] == " "), None)
        if cut is None:
            continue
        prompt, reference = rest[:cut], rest[cut:]
        n = len(tokenizer(prompt)["input_ids"])
        if min_tokens <= n <= max_tokens and len(tokenizer(reference)["input_ids"]) >= 20:
            records.append(dict(domain="prose", split=doc.split, source=f"{doc.key}#{index}", prompt=prompt,
                                num_tokens=n, reference=reference))
    return records


def spread(records: list[dict], count: int, per_source_file: int = 8) -> list[dict]:
    """Up to ``count`` records, at most ``per_source_file`` from any one file, spread over the files."""
    by_file: dict[str, list[dict]] = {}
    for record in records:
        by_file.setdefault(record["source"].split("::")[0].split(":")[0].split("#")[0], []).append(record)
    picked, round_ = [], 0
    while len(picked) < count and round_ < per_source_file:
        for name in sorted(by_file):
            if round_ < len(by_file[name]) and len(picked) < count:
                picked.append(by_file[name][round_])
        round_ += 1
    return picked


def build_eval_sets(documents: list[Document], tokenizer, *, per_domain: int = 100, calibration: int = 120,
                    code_tokens=(100, 300), prose_tokens=(100, 200)) -> dict[str, list[dict]]:
    """``{"code": [...], "prose": [...], "calibration": [...]}`` — test split for the first two,
    validation split (both domains, alternating) for calibration."""
    def cut(split: str, domain: str) -> list[dict]:
        found = []
        for doc in documents:
            if doc.split != split or doc.domain != domain:
                continue
            if domain == "code":
                found += function_openings(doc, tokenizer, *code_tokens)
            else:
                found += paragraph_openings(doc, tokenizer, *prose_tokens)
        return found

    sets = {"code": spread(cut("test", "code"), per_domain),
            "prose": spread(cut("test", "prose"), per_domain, per_source_file=12)}
    code_cal = spread(cut("validation", "code"), calibration // 2)
    prose_cal = spread(cut("validation", "prose"), calibration - len(code_cal))
    sets["calibration"] = [r for pair in zip(code_cal, prose_cal) for r in pair] + code_cal[len(prose_cal):] + prose_cal[len(code_cal):]
    for name, records in sets.items():
        for i, record in enumerate(records):
            record["id"] = f"{name}-{i:03d}"
    return sets


REFERENCE_CHARS = 1000  # the reference continuation is kept for reading, not scoring: cap its size


def write_jsonl(records: list[dict], path: str | Path) -> None:
    """One JSON object per line (UTF-8); references are cut to ``REFERENCE_CHARS`` characters."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            row = {k: record[k] for k in ("id", "domain", "split", "source", "prompt", "num_tokens", "reference")}
            row["reference"] = row["reference"][:REFERENCE_CHARS]
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a JSONL prompt file; each needs a ``prompt`` string (error names the line)."""
    records = []
    with Path(path).open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ValueError(f"{path}:{number}: each line needs a string field 'prompt'")
            records.append(record)
    return records
