"""Shared by the drafter-training tests: the training config of a tiny drafter run (on the tiny
corpus of ``helpers``; the tiny target and tokenizer come from the ``assets`` fixture in ``conftest.py``)."""


def drafter_config(root, run, *extra):
    return [f"teacher={root / 'target'}", f"tokenizer={root / 'tok'}", "kind=drafter",
            "model={gamma: 3, head: markov, num_layers: 1, rank: 8, target_layers: [0, 2]}", "seq_len=48",
            "batch_size=4", "anchors_per_sequence=4", "precision=32-true", "val_every=6", "log_every=1",
            "optim.warmup_steps=2", "optim.lr=3e-3", "save_dtype=float32", f"run_dir={run / 'run'}",
            f"output_dir={run / 'out'}", *extra]
