"""The stdlib corpus: deterministic, split by path hash, both domains present."""

from pathlib import Path

import pytest

from dspark.data.corpus import build_corpus, code_files, corpus_manifest, docstrings, split_of


def test_split_is_a_stable_function_of_the_path():
    assert split_of("json/decoder.py") == split_of("json/decoder.py")
    splits = [split_of(f"pkg/module_{i}.py") for i in range(2000)]
    share = {s: splits.count(s) / len(splits) for s in ("train", "validation", "test")}
    assert 0.03 < share["test"] < 0.07 and 0.03 < share["validation"] < 0.07
    assert split_of("x.py", validation_percent=0, test_percent=0) == "train"


def make_stdlib(tmp_path: Path) -> Path:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "test").mkdir()
    (tmp_path / "encodings").mkdir()
    (tmp_path / "pydoc_data").mkdir()
    doc = "A long docstring. " * 20
    (tmp_path / "pkg" / "mod.py").write_text(f'"""{doc}"""\n\ndef f(x):\n    """{doc}"""\n    return x\n')
    (tmp_path / "test" / "test_mod.py").write_text("assert True\n")
    (tmp_path / "encodings" / "cp999.py").write_text("table = {}\n")
    (tmp_path / "pydoc_data" / "topics.py").write_text("topics = {'b': 'Topic B text.', 'a': 'Topic A text.'}\n")
    return tmp_path


def test_build_corpus_on_a_fake_stdlib(tmp_path):
    root = make_stdlib(tmp_path)
    assert [p.relative_to(root).as_posix() for p in code_files(root)] == ["pkg/mod.py"]
    docs = build_corpus(root)
    assert [(d.key, d.domain) for d in docs] == [
        ("pkg/mod.py", "code"), ("pkg/mod.py::<module>", "prose"), ("pkg/mod.py::f", "prose"),
        ("pydoc_data/topics.py::a", "prose"), ("pydoc_data/topics.py::b", "prose")]
    assert docs[1].split == docs[0].split  # docstrings follow their file's split
    manifest = corpus_manifest(docs)
    assert manifest["sha256"] == corpus_manifest(build_corpus(root))["sha256"]
    assert manifest["counts"]["code"][docs[0].split]["documents"] == 1


def test_docstrings_skip_short_ones_and_bad_source():
    source = 'def f():\n    """short"""\n\nclass C:\n    def g(self):\n        """' + "long " * 50 + '"""\n'
    assert [name for name, _ in docstrings(source, 100)] == ["C.g"]
    assert docstrings("def (:", 10) == []


def test_bad_data_build_settings_are_refused_before_the_corpus_is_built():
    """corpus.validation_percent=150 built a corpus with no train split (and a tokenizer trained on
    nothing); a bad vocab_size was refused only after the corpus was built."""
    from dspark.data.build import load_data_config
    from dspark.data.regenerate import load_regenerate_config

    for override, message in (("corpus.validation_percent=150", r"validation_percent \+ corpus.test_percent must be "
                                                                r"below 100 .* got 150 \+ 5"),
                              ("corpus.test_percent=-1", "corpus.test_percent must be >= 0, got -1"),
                              ("vocab_size=0", r"vocab_size must be in \[512, 65536\], got 0"),
                              ("prompts_per_domain=0", "prompts_per_domain must be >= 1, got 0")):
        with pytest.raises(ValueError, match=message):
            load_data_config(None, [override])
    with pytest.raises(ValueError, match="below 100"):  # (regenerate cuts the corpus the same way)
        load_regenerate_config(None, ["corpus.test_percent=95"])
