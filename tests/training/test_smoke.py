"""A few steps of `dspark train` on a tiny corpus: the loss falls, a checkpoint is written, resume continues."""

import pytest
import torch

from dspark.data.corpus import Document
from dspark.data.tokenizer import train_tokenizer
from dspark.training import load_train_config, train
from dspark.training.modules import distillation_kl
from dspark.training.data import RandomBlocks
from dspark.training.recipes import read_logged, training_logs

TINY_MODEL = {"model_type": "qwen3", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "max_position_embeddings": 128,
              "tie_word_embeddings": True}


def tiny_corpus():
    code = "def add(a, b):\n    return a + b\n\n" * 40
    prose = "The function adds two numbers and returns the sum. " * 40
    return [Document(f"m{i}.py", "code", split, code) for i, split in enumerate(["train"] * 6 + ["validation", "test"])] + \
           [Document(f"d{i}", "prose", split, prose) for i, split in enumerate(["train"] * 6 + ["validation", "test"])]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    train_tokenizer([d.text for d in tiny_corpus()], vocab_size=512).save_pretrained(path)
    return path


def config(tmp_path, tokenizer_dir, **overrides):
    base = [f"model={TINY_MODEL}".replace("'", ""), f"tokenizer={tokenizer_dir}", "seq_len=32", "batch_size=4",
            "precision=32-true", "val_every=4", "log_every=1", f"run_dir={tmp_path / 'run'}",
            f"output_dir={tmp_path / 'out'}", "optim.warmup_steps=2", "optim.lr=5e-3", "save_dtype=float32"]
    return load_train_config(None, base + [f"{k}={v}" for k, v in overrides.items()])


def logged(run_dir, key):
    return read_logged(training_logs(run_dir), key)


def test_train_lowers_loss_checkpoints_and_resumes(tmp_path, tokenizer_dir):
    report = train(config(tmp_path, tokenizer_dir, max_steps=4, plot=tmp_path / "loss.png"), documents=tiny_corpus())
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "tokenizer.json").is_file()
    assert set(report["test"]) == {"test/code_loss", "test/code_bpb", "test/prose_loss", "test/prose_bpb"}

    train(config(tmp_path, tokenizer_dir, max_steps=12, plot=tmp_path / "loss.png"), documents=tiny_corpus())  # resumes
    assert (tmp_path / "loss.png").stat().st_size > 1000
    losses = logged(tmp_path / "run", "train/loss")
    steps = [s for s, _ in losses]
    assert steps == sorted(steps) and steps[-1] == 11 and steps.count(0) == 1  # no restart from step 0
    assert losses[-1][1] < losses[0][1] - 0.5  # nats per token

    from dspark.models import load_model

    model = load_model(tmp_path / "out")  # the export loads through the Hugging Face checkpoint path
    assert model.vocab_size == 512 or model.vocab_size > 0


def test_distillation_steps_lower_the_kl(tmp_path, tokenizer_dir):
    teacher_cfg = config(tmp_path / "t", tokenizer_dir, max_steps=8)
    train(teacher_cfg, documents=tiny_corpus())
    cfg = config(tmp_path / "d", tokenizer_dir, max_steps=8, kind="draft", teacher=str(tmp_path / "t" / "out"))
    report = train(cfg, documents=tiny_corpus())
    kl = logged(tmp_path / "d" / "run", "train/kl")
    assert kl[-1][1] < kl[0][1]
    assert "test/code_top1_agreement" in report["test"]


def test_trust_remote_code_reaches_the_teacher_and_its_tokenizer(tmp_path, tokenizer_dir):
    """A teacher whose checkpoint ships its own model and tokenizer classes loads only when the
    training config's ``trust_remote_code`` asks (as ``target.trust_remote_code`` does at inference);
    the teacher's load took no such setting, and such teachers could not be used at all."""
    import shutil

    from transformers import AutoTokenizer

    from dspark.models import random_hf_model
    from helpers import needs_custom_code

    teacher = tmp_path / "teacher"
    shutil.copytree(tokenizer_dir, teacher)
    vocab_size = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    random_hf_model({**TINY_MODEL, "vocab_size": vocab_size}, seed=0).save_pretrained(teacher)
    needs_custom_code(teacher, teacher)

    def run(name, **overrides):  # (tokenizer null: the teacher's own)
        cfg = config(tmp_path / name, tokenizer_dir, max_steps=2, kind="draft", teacher=teacher, **overrides)
        return train(cfg, documents=tiny_corpus())

    with pytest.raises(ValueError, match="custom code"):
        run("refused", tokenizer="null")
    with pytest.raises(ValueError, match="custom code"):  # the model's classes too, not only the tokenizer's
        run("model")
    assert run("trusted", tokenizer="null", trust_remote_code="true")["kind"] == "draft"


def test_distillation_kl_on_hand_made_distributions():
    p = torch.tensor([[0.5, 0.5, 0.0]])
    q = torch.tensor([[0.25, 0.25, 0.5]])
    expected = 0.5 * torch.log(torch.tensor(2.0)) * 2  # sum p log(p/q) = log 2
    assert torch.allclose(distillation_kl(q.log(), p.clamp_min(1e-30).log()), expected, atol=1e-6)
    assert distillation_kl(p.log().clamp_min(-1e9), p.log().clamp_min(-1e9)).abs() < 1e-6


def test_bad_training_configs():
    with pytest.raises(ValueError, match="needs `teacher`"):
        load_train_config(None, ["kind=draft", "model={model_type: qwen3}"])
    with pytest.raises(ValueError, match="needs model_type"):
        load_train_config(None, [])
    with pytest.raises(Exception, match="max_step"):
        load_train_config(None, ["max_step=3", "model={model_type: qwen3}"])
    # numbers out of range, before any work (max_steps=0 exported an untrained model over output_dir)
    for override, message in (("max_steps=0", "max_steps must be >= 1, got 0"), ("seq_len=1", "seq_len must be >= 2"),
                              ("batch_size=0", "batch_size must be >= 1"), ("val_every=0", "val_every must be >= 1"),
                              ("optim.lr=-1", "optim needs lr > 0"), ("optim.betas=[0.9,1.5]", "betas in \\[0, 1\\)"),
                              # (these failed deep inside the run, trained on NaN, or only at the export)
                              ("max_eval_blocks=0", "max_eval_blocks must be >= 1"),
                              ("max_eval_blocks=-1", "max_eval_blocks must be >= 1"),
                              ("distill_temperature=0", "distill_temperature must be a finite number > 0"),
                              ("ce_weight=-5", "ce_weight .* must be a finite number >= 0"),
                              ("save_dtype=bf16", "save_dtype: unknown dtype 'bf16'; allowed: ")):
        with pytest.raises(ValueError, match=message):
            load_train_config(None, [override, "model={model_type: qwen3}"])


def test_settings_the_kind_does_not_read_are_refused():
    """A key that only other kinds read (set away from its default) is refused before any work,
    naming it, the run's kind and the kinds that read it (it was silently ignored)."""
    target, drafter = ["model={model_type: qwen3}"], ["kind=drafter", "teacher=dspark-tiny"]
    draft = ["kind=draft", "teacher=dspark-tiny", *target]
    for args, key, kind, readers in (([*drafter, "distill_temperature=2.0"], "distill_temperature", "drafter", "draft"),
                                     ([*drafter, "model={architecture: eagle3}", "ce_weight=0.5"], "ce_weight",
                                      "drafter", "draft"),
                                     ([*target, "loss_weights={ce: 1.0}"], "loss_weights", "target", "drafter"),
                                     ([*target, "teacher=dspark-tiny"], "teacher", "target", "draft and drafter"),
                                     ([*draft, "anchors_per_sequence=4"], "anchors_per_sequence", "draft", "drafter")):
        with pytest.raises(ValueError, match=f"^{key} is read by {readers} runs only, and this is a {kind} run"):
            load_train_config(None, args)
    assert load_train_config(None, [*draft, "distill_temperature=2.0", "ce_weight=0.5"]).ce_weight == 0.5
    assert load_train_config(None, [*drafter, "anchors_per_sequence=4"]).anchors_per_sequence == 4
    # the defaults written out (as configs/train/draft.yaml does) are no setting of another kind's
    assert load_train_config(None, [*drafter, "distill_temperature=1.0", "ce_weight=0.0"]).kind == "drafter"


def test_a_resumed_run_trains_on_the_batches_an_uninterrupted_one_does(tmp_path, tokenizer_dir, monkeypatch):
    """A run that stops at step 3 and resumes from its step-2 checkpoint trains on the same batch
    at every step as a run that never stopped (it used to end its epoch early and repeat the
    first batches); resuming under another config than the run started with is refused."""
    from dspark.training.modules import LanguageModelModule

    seen, crash, step = [], [None], LanguageModelModule.training_step

    def watched(self, batch, batch_idx):
        if self.global_step == crash[0]:
            raise RuntimeError("stopped")
        seen.append((self.global_step, batch.clone()))
        return step(self, batch, batch_idx)

    monkeypatch.setattr(LanguageModelModule, "training_step", watched)
    train(config(tmp_path / "a", tokenizer_dir, max_steps=12, val_every=2), documents=tiny_corpus())
    whole = dict(seen)
    assert sorted(whole) == list(range(12))
    seen.clear()
    crash[0] = 3
    with pytest.raises(RuntimeError, match="stopped"):
        train(config(tmp_path / "b", tokenizer_dir, max_steps=12, val_every=2), documents=tiny_corpus())
    crash[0] = None
    train(config(tmp_path / "b", tokenizer_dir, max_steps=12, val_every=2), documents=tiny_corpus())
    assert sorted({s for s, _ in seen}) == list(range(12)) and [s for s, _ in seen][3:] == list(range(2, 12))
    assert all(torch.equal(batch, whole[s]) for s, batch in seen)
    with pytest.raises(ValueError, match=r"holds a run started with another config \(seed: 0 → 7\)"):
        train(config(tmp_path / "a", tokenizer_dir, max_steps=12, val_every=2, seed=7), documents=tiny_corpus())


def test_ddp_processes_train_on_distinct_blocks_and_resume_where_they_stopped(tokenizer_dir):
    """Two processes: rank r's j-th block at step s is sample (s · batch + j) · 2 + r — together
    every sample once, none twice (each process used to be given half of one process's samples,
    so every block was trained on twice); resumed at step 2, they go on with the same samples."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from dspark.training.data import CorpusDataModule

    data = CorpusDataModule(AutoTokenizer.from_pretrained(tokenizer_dir), seq_len=16, batch_size=2, num_samples=4 * 2,
                            documents=tiny_corpus())
    data.setup()

    def blocks(rank: int, step: int = 0) -> list[torch.Tensor]:
        data.trainer = SimpleNamespace(world_size=2, global_rank=rank, global_step=step)
        return [row for batch in data.train_dataloader() for row in batch]

    every = RandomBlocks(data.streams["train"], 17, 16, 0)
    for rank in (0, 1):
        assert [b.tolist() for b in blocks(rank)] == [every[i].tolist() for i in range(rank, 16, 2)]
        assert [b.tolist() for b in blocks(rank, step=2)][:4] == [every[i].tolist() for i in range(8 + rank, 16, 2)]


class _Planted:
    """Unpickling this object would run code (here: set a flag)."""
    ran = False

    def __reduce__(self):
        return (_Planted.mark, ())

    @staticmethod
    def mark():
        _Planted.ran = True
        return {}


def test_resuming_never_unpickles_objects_from_the_checkpoint(tmp_path, tokenizer_dir):
    """A run directory's last.ckpt is read as weights only (tensors and plain values): a file that
    would run code when unpickled is refused, whoever left it there, and its code never runs."""
    import pickle

    train(config(tmp_path, tokenizer_dir, max_steps=2), documents=tiny_corpus())
    torch.save({"state_dict": {}, "planted": _Planted()}, tmp_path / "run" / "checkpoints" / "last.ckpt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        train(config(tmp_path, tokenizer_dir, max_steps=4), documents=tiny_corpus())
    assert not _Planted.ran
