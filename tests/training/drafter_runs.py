"""Shared by the drafter-training tests: a tiny corpus and the training config of a tiny drafter
run (the tiny target and tokenizer come from the ``assets`` fixture in ``conftest.py``)."""

from dspark.data.corpus import Document

CODE = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\n"
PROSE = "The function adds two numbers and returns their sum to the caller. "


def corpus():
    splits = ["train"] * 6 + ["validation", "test"]
    return [Document(f"m{i}.py", "code", s, CODE * 20) for i, s in enumerate(splits)] + \
           [Document(f"d{i}", "prose", s, PROSE * 20) for i, s in enumerate(splits)]


def drafter_config(root, run, *extra):
    return [f"teacher={root / 'target'}", f"tokenizer={root / 'tok'}", "kind=drafter",
            "model={gamma: 3, head: markov, num_layers: 1, rank: 8, target_layers: [0, 2]}", "seq_len=48",
            "batch_size=4", "anchors_per_sequence=4", "precision=32-true", "val_every=6", "log_every=1",
            "optim.warmup_steps=2", "optim.lr=3e-3", "save_dtype=float32", f"run_dir={run / 'run'}",
            f"output_dir={run / 'out'}", *extra]
