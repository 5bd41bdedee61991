"""Training recipes behind ``dspark train target`` and ``dspark train draft``.

A recipe reads a structured config (``configs/train/*.yaml``), trains with Lightning (progress
bar, CSV logs, a checkpoint every validation, resume from the last one), then exports a Hugging
Face checkpoint directory (safetensors, tokenizer, generation config), evaluates it on the test
split, writes ``metrics.json`` beside it and draws the loss curves.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dspark.config import load_structured
from dspark.training.modules import OptimConfig
from dspark.training.teacher_cache import TeacherCacheConfig

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Config of a training run (keys are checked: a misspelled key is an error).

    Attributes:
        kind: ``target`` (next-token training), ``draft`` (distillation from ``teacher``) or
            ``drafter`` (a drafter network for the frozen ``teacher`` target).
        model: for ``target``/``draft``, the ``transformers`` config of the model to train
            (``model_type`` plus its keys); for ``drafter``, ``architecture`` (``dspark``, the
            default: a DSpark / DFlash block drafter with ``gamma``, ``head``, ``num_layers``,
            ``target_layers``, ``rank``, ``intermediate_size``; or ``eagle3``: an EAGLE-3 head with
            ``gamma``, ``target_layers``, ``intermediate_size``).
        tokenizer: tokenizer directory (built by ``dspark data build``); ``null`` = the teacher's
            tokenizer when there is a teacher, else the embedded one.
        teacher: for ``draft`` and ``drafter``: the teacher (target) checkpoint directory or embedded name.
        trust_remote_code: allow ``transformers`` to run code shipped with the teacher's checkpoint and the
            tokenizer (off by default, as the inference side's ``target.trust_remote_code``).
        seq_len, batch_size, max_steps: sequence length, sequences per step (per process under
            ddp: ``devices`` processes train on ``devices × batch_size`` distinct sequences a
            step), optimiser steps.
        optim: learning-rate schedule and AdamW settings.
        precision: Lightning precision (``bf16-mixed`` uses the CPU's bfloat16 units when present).
        val_every: steps between validations (and checkpoints); log_every: steps between logged
            training losses; max_eval_blocks caps evaluation.
        distill_temperature, ce_weight: distillation settings (``draft`` only; another kind refuses them).
        anchors_per_sequence, loss_weights: drafter settings (``drafter`` only; another kind refuses them): blocks drafted
            per training sequence; weights of the ``ce``, ``tv`` and ``conf`` loss terms (the paper's
            0.1 / 0.9 / 1.0) and of an optional ``kl`` term (``KL(p_t ‖ p_d)``, default 0; the DSpark
            and DFlash drafters — the EAGLE-3 head trains on the soft cross-entropy alone).
        strategy, devices, accelerator: Lightning's (``strategy=ddp devices=2`` trains on two
            processes; on CPUs they talk over gloo).
        run_dir: logs and Lightning checkpoints; output_dir: the exported checkpoint directory.
        save_dtype: dtype of the exported weights. resume: continue from ``run_dir``'s last checkpoint.
        plot: PNG of the loss curves (``null`` to skip). corpus: corpus split settings.
        train_data: a ``dspark data regenerate`` file to train on instead of the corpus's train
            split (drafters: text written by the teacher itself, as the DSpark paper trains);
            validation and test stay on the corpus.
        threads: torch CPU threads (``null`` = torch's default).
        teacher_cache: ``drafter`` only: keep the target's outputs per training sequence on disk
            and reuse them in later runs on the same data (an ablation's drafters, a resumed run,
            every validation); see :mod:`dspark.training.teacher_cache`.
    """

    kind: str = "target"
    model: dict[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None
    teacher: str | None = None
    trust_remote_code: bool = False
    seq_len: int = 512
    batch_size: int = 8
    max_steps: int = 4000
    optim: OptimConfig = field(default_factory=OptimConfig)
    precision: str = "bf16-mixed"
    val_every: int = 500
    log_every: int = 10
    max_eval_blocks: int | None = None
    distill_temperature: float = 1.0
    ce_weight: float = 0.0
    anchors_per_sequence: int = 16
    loss_weights: dict[str, float] = field(default_factory=lambda: {"ce": 0.1, "tv": 0.9, "conf": 1.0})
    strategy: str = "auto"
    devices: int = 1
    accelerator: str = "auto"
    seed: int = 0
    run_dir: str = "runs/target"
    output_dir: str = "dspark/assets/dspark-tiny/target"
    save_dtype: str = "bfloat16"
    resume: bool = True
    plot: str | None = None
    corpus: dict[str, Any] = field(default_factory=dict)
    train_data: str | None = None
    threads: int | None = None
    teacher_cache: TeacherCacheConfig = field(default_factory=TeacherCacheConfig)


#: settings that only some kinds of run read (key → those kinds); another kind refuses them changed from the default
KIND_KEYS = {"distill_temperature": ("draft",), "ce_weight": ("draft",), "anchors_per_sequence": ("drafter",),
             "loss_weights": ("drafter",), "teacher": ("draft", "drafter")}  # (a target learns from the data alone)


def load_train_config(path=None, overrides=()) -> TrainConfig:
    """Structured training config from YAML + dotlist overrides (unknown keys are errors)."""
    cfg = load_structured(TrainConfig, path, overrides)
    if cfg.kind not in ("target", "draft", "drafter"):
        raise ValueError(f"train kind must be 'target', 'draft' or 'drafter', got {cfg.kind!r}")
    for name, value, least in (("seq_len", cfg.seq_len, 2), ("batch_size", cfg.batch_size, 1),
                               ("max_steps", cfg.max_steps, 1), ("val_every", cfg.val_every, 1),
                               ("log_every", cfg.log_every, 1), ("anchors_per_sequence", cfg.anchors_per_sequence, 1),
                               ("devices", cfg.devices, 1), ("optim.warmup_steps", cfg.optim.warmup_steps, 0)):
        if value < least:  # (an untrained export at max_steps=0, say, would replace the output directory)
            raise ValueError(f"{name} must be >= {least}, got {value}")
    if cfg.max_eval_blocks is not None and cfg.max_eval_blocks < 1:
        raise ValueError(f"max_eval_blocks must be >= 1 (null: the whole held-out split), got {cfg.max_eval_blocks}")
    if not (cfg.distill_temperature > 0 and math.isfinite(cfg.distill_temperature)):
        raise ValueError(f"distill_temperature must be a finite number > 0, got {cfg.distill_temperature}")
    if not (cfg.ce_weight >= 0 and math.isfinite(cfg.ce_weight)):
        raise ValueError(f"ce_weight (of the data's cross-entropy, added to the distillation KL) must be a finite "
                         f"number >= 0, got {cfg.ce_weight}")
    defaults = TrainConfig()
    for key, kinds in KIND_KEYS.items():  # (a value other than the default: it would be silently ignored)
        if cfg.kind not in kinds and getattr(cfg, key) != getattr(defaults, key):
            raise ValueError(f"{key} is read by {' and '.join(kinds)} runs only, and this is a {cfg.kind} run: "
                             f"it would be ignored; remove it from the config")
    from dspark.models.loading import resolve_dtype

    try:  # (checked now: the export comes after the whole training)
        resolve_dtype(cfg.save_dtype)
    except ValueError as err:
        raise ValueError(f"save_dtype: {err}") from None
    optim = cfg.optim
    if not (optim.lr > 0 and 0 <= optim.min_lr_ratio <= 1 and optim.weight_decay >= 0
            and all(0 <= b < 1 for b in optim.betas)):
        raise ValueError(f"optim needs lr > 0, min_lr_ratio in [0, 1], weight_decay >= 0 and betas in [0, 1), got "
                         f"lr={optim.lr}, min_lr_ratio={optim.min_lr_ratio}, weight_decay={optim.weight_decay}, "
                         f"betas={tuple(optim.betas)}")
    if cfg.kind in ("draft", "drafter") and not cfg.teacher:
        raise ValueError(f"training a {cfg.kind} needs `teacher` (a target checkpoint directory or embedded name)")
    if cfg.kind in ("draft", "drafter"):
        positions = _teacher_positions(cfg.teacher)
        if positions is not None and cfg.seq_len > positions:
            raise ValueError(f"seq_len {cfg.seq_len} is longer than the teacher's max_position_embeddings "
                             f"({positions}): the teacher would read positions it was not trained for")
    if cfg.teacher_cache.dir is not None and cfg.kind != "drafter":
        raise ValueError(f"teacher_cache is for `drafter` runs (the frozen target's pass), not `{cfg.kind}`")
    if cfg.train_data is not None and cfg.kind == "target":
        raise ValueError("train_data (text written by a teacher) is for `draft` and `drafter` runs, not `target`")
    if cfg.kind == "drafter":
        from dspark.training.block_drafter import LOSS_WEIGHTS, check_loss_weights

        weights = check_loss_weights(cfg.loss_weights)
        if cfg.model.get("architecture") == "eagle3" and weights != LOSS_WEIGHTS:
            raise ValueError("loss_weights weigh the block drafter's loss terms; the EAGLE-3 head trains on the "
                             "soft cross-entropy to the target alone: remove loss_weights from this config")
    if cfg.kind != "drafter" and "model_type" not in cfg.model:
        raise ValueError("the training config's `model` needs model_type (e.g. qwen3) and the architecture keys")
    return cfg


def _teacher_positions(teacher) -> int | None:
    """The teacher checkpoint's ``max_position_embeddings`` from its ``config.json`` (read before any
    model is built), or ``None`` when it does not say."""
    from dspark.models.loading import resolve_checkpoint

    path = Path(str(resolve_checkpoint(teacher))) / "config.json"
    try:
        value = json.loads(path.read_text()).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) else None


def train(cfg: TrainConfig, *, documents=None) -> dict:
    """Run a recipe end to end; return the metrics it wrote to ``output_dir/metrics.json``."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger
    from transformers import AutoTokenizer

    from dspark.training.data import CorpusDataModule

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    started = time.time()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source(cfg), trust_remote_code=cfg.trust_remote_code)
    train_stream = None
    if cfg.train_data is not None:  # checked before any model is built
        from dspark.data.regenerate import load_regenerated

        train_stream = load_regenerated(cfg.train_data, target=cfg.teacher, vocab_size=len(tokenizer))
    module = _build_module(cfg, tokenizer)
    data = CorpusDataModule(tokenizer, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                            num_samples=cfg.max_steps * cfg.batch_size, seed=cfg.seed, corpus=cfg.corpus,
                            max_eval_blocks=cfg.max_eval_blocks, documents=documents, train_stream=train_stream)

    run_dir = Path(cfg.run_dir)
    checkpoints = ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True, every_n_train_steps=cfg.val_every)
    trainer = L.Trainer(max_steps=cfg.max_steps, precision=cfg.precision, accelerator=cfg.accelerator,
                        devices=cfg.devices, strategy=cfg.strategy,
                        val_check_interval=cfg.val_every, check_val_every_n_epoch=None, log_every_n_steps=cfg.log_every,
                        logger=CSVLogger(run_dir, name="logs"), callbacks=[checkpoints],
                        gradient_clip_val=1.0, enable_progress_bar=True, num_sanity_val_steps=0,
                        use_distributed_sampler=False)  # (CorpusDataModule shards training itself)
    last = run_dir / "checkpoints" / "last.ckpt"
    resuming = cfg.resume and last.is_file()
    check_resumable(cfg, run_dir) if resuming else record_run_config(cfg, run_dir)
    # our own Lightning checkpoint from this run directory, still read as weights only (tensors and
    # plain values: never unpickles objects, whoever left the file there)
    trainer.fit(module, datamodule=data, ckpt_path=str(last) if resuming else None, weights_only=True)
    train_seconds = time.time() - started

    test = trainer.test(module, datamodule=data, verbose=False)
    metrics = {k.split("/dataloader_idx")[0]: float(v) for result in test for k, v in result.items()}
    trained = module.net if cfg.kind == "drafter" else module.model
    report = {"kind": cfg.kind, "parameters": sum(p.numel() for p in trained.parameters()),
              "train_seconds": round(train_seconds, 1), "steps": cfg.max_steps,
              "tokens_seen": cfg.max_steps * cfg.batch_size * cfg.seq_len * trainer.world_size,
              "test": metrics, "config": asdict(cfg), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "cpu": platform.processor() or platform.machine()}
    cache = getattr(module, "teacher_cache", None)
    if cache is not None:  # this process's reads and writes (train, validation and test sequences)
        report["teacher_cache"] = {"dir": str(cache.directory), "read": cache.hits, "computed": cache.misses}
        print(f"[dspark] teacher cache {cache.directory}: {cache.hits} sequences read, {cache.misses} computed and "
              f"written ({cache.disk_bytes() / 1e9:.2f} GB on disk)", file=sys.stderr)
    if not trainer.is_global_zero:  # under ddp only the first process writes files
        return report
    if cfg.kind == "drafter":
        from dspark.drafters.dspark import save_block_drafter
        from dspark.drafters.eagle3 import save_eagle3
        from dspark.models.loading import resolve_dtype

        save = save_eagle3 if cfg.model.get("architecture") == "eagle3" else save_block_drafter
        from dspark.drafters.checkpoint import target_identity

        save(trained.to(resolve_dtype(cfg.save_dtype)), cfg.output_dir,
             {"target": cfg.teacher, "target_identity": target_identity(module.target)})
    else:
        export(trained, tokenizer, cfg.output_dir, cfg.save_dtype)
    set_aside_stale_calibration(cfg.output_dir)
    Path(cfg.output_dir, "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    if cfg.plot:
        plot_curves(training_logs(run_dir), cfg.plot, title=f"{cfg.kind} training")
    return report


#: the settings a resumed run may change (how long it runs, how it reports, where it exports)
RESUMABLE_CHANGES = ("max_steps", "val_every", "log_every", "plot", "output_dir", "threads", "resume",
                     "trust_remote_code")
RUN_CONFIG = "config.json"


def record_run_config(cfg: TrainConfig, run_dir: Path) -> None:
    """Write the config a run starts with into its ``run_dir`` (what a resume is checked against)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    partial = run_dir / f"{RUN_CONFIG}.{os.getpid()}.partial"
    partial.write_text(json.dumps(asdict(cfg), indent=2, default=str) + "\n")
    partial.replace(run_dir / RUN_CONFIG)


def check_resumable(cfg: TrainConfig, run_dir: Path) -> None:
    """Refuse to resume ``run_dir``'s last checkpoint under a config that differs from the one the
    run started with in more than :data:`RESUMABLE_CHANGES` (another head, loss, seed, data: the
    checkpoint would load into another model, or silently train on as the old run)."""
    recorded = run_dir / RUN_CONFIG
    if not recorded.is_file():  # (a run from before configs were recorded)
        return
    before = json.loads(recorded.read_text())
    now = json.loads(json.dumps(asdict(cfg), default=str))
    changed = sorted(k for k in set(before) | set(now) if k not in RESUMABLE_CHANGES and before.get(k) != now.get(k))
    if changed:
        detail = "; ".join(f"{k}: {before.get(k)!r} → {now.get(k)!r}" for k in changed)
        raise ValueError(f"run_dir {str(run_dir)!r} holds a run started with another config ({detail}); a resumed run "
                         f"may change only {', '.join(RESUMABLE_CHANGES)}. Use another run_dir, or resume=false to "
                         "start this one over there")


def tokenizer_source(cfg: TrainConfig) -> str:
    """The tokenizer directory of a run: ``cfg.tokenizer``, else the teacher's, else the embedded one."""
    from dspark.assets import ASSETS
    from dspark.models.loading import resolve_checkpoint

    if cfg.tokenizer is not None:
        return cfg.tokenizer
    if cfg.teacher is not None:
        return str(resolve_checkpoint(cfg.teacher))
    return str(ASSETS / "dspark-tiny" / "tokenizer")


def _build_module(cfg: TrainConfig, tokenizer):
    """The Lightning module of a recipe, with a freshly initialised model to train."""
    from dspark.training.data import token_byte_lengths
    from dspark.training.modules import DistillationModule, LanguageModelModule, build_hf_model

    if cfg.kind == "drafter":
        return _block_drafter_module(cfg, tokenizer)
    model = build_hf_model({**cfg.model, "vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,
                            "pad_token_id": tokenizer.pad_token_id, "bos_token_id": None})
    byte_lengths = token_byte_lengths(tokenizer)
    if cfg.kind == "target":
        return LanguageModelModule(model, byte_lengths, cfg.optim, cfg.max_steps)
    from transformers import AutoModelForCausalLM

    from dspark.models.loading import resolve_checkpoint

    teacher = AutoModelForCausalLM.from_pretrained(resolve_checkpoint(cfg.teacher), dtype=torch.float32,
                                                   trust_remote_code=cfg.trust_remote_code)
    if teacher.config.vocab_size != len(tokenizer):
        raise ValueError(f"teacher vocabulary {teacher.config.vocab_size} != tokenizer vocabulary {len(tokenizer)}")
    return DistillationModule(model, teacher, byte_lengths, cfg.optim, cfg.max_steps,
                              temperature=cfg.distill_temperature, ce_weight=cfg.ce_weight)


def _check_teacher_tokenizer(cfg: TrainConfig, tokenizer, vocab_size: int) -> None:
    """Refuse training text tokenized otherwise than the teacher's: more tokens than its vocabulary,
    or (``cfg.tokenizer`` set, and the teacher's checkpoint holding its own) another vocabulary."""
    from dspark.models.loading import resolve_checkpoint
    from dspark.tokenization import has_tokenizer_files, load_tokenizer

    if len(tokenizer) > vocab_size:
        raise ValueError(f"the training tokenizer has {len(tokenizer)} tokens, more than the teacher's vocabulary "
                         f"({vocab_size}): the data must be tokenized as the teacher's was (tokenizer)")
    if cfg.tokenizer is not None and has_tokenizer_files(resolve_checkpoint(cfg.teacher)):
        own = load_tokenizer(resolve_checkpoint(cfg.teacher), trust_remote_code=cfg.trust_remote_code)
        if own.get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"tokenizer {cfg.tokenizer!r} is not the teacher's ({len(tokenizer)} tokens; the "
                             f"teacher's own has {len(own)}): the drafter would learn from text the teacher never "
                             "saw tokenized that way; leave tokenizer unset to use the teacher's")


def _block_drafter_module(cfg: TrainConfig, tokenizer):
    """The drafter network (random init) for the frozen ``teacher`` target, wrapped for Lightning:
    ``model.architecture`` ``dspark`` (a block drafter; ``head: none`` is DFlash) or ``eagle3``."""
    from dspark.models import load_model

    target = load_model(cfg.teacher, dtype="float32", device="cpu", trust_remote_code=cfg.trust_remote_code)
    if not hasattr(target, "cache_shape"):  # (the transformers adapter exposes no hidden-state layout)
        raise ValueError(f"teacher {cfg.teacher!r}: a drafter trains against a target dspark runs natively "
                         "(Llama / Qwen2 / Qwen3 families), and this one runs through transformers")
    _check_teacher_tokenizer(cfg, tokenizer, target.vocab_size)
    architecture = cfg.model.get("architecture", "dspark")
    allowed = {"dspark": {"gamma", "head", "num_layers", "rank", "intermediate_size", "target_layers",
                          "context_input_norm", "confidence", "qk_norm"},
               "eagle3": {"gamma", "target_layers", "intermediate_size", "draft_vocab_size", "qk_norm",
                          "norm_before_residual"}}
    if architecture not in allowed:
        raise ValueError(f"model.architecture must be one of {', '.join(allowed)}, got {architecture!r}")
    spec = {k: v for k, v in cfg.model.items() if k != "architecture"}
    unknown = set(spec) - allowed[architecture]
    if unknown:
        raise ValueError(f"unknown {architecture} model keys {sorted(unknown)}; allowed: {', '.join(sorted(allowed[architecture]))}")
    if architecture == "eagle3":
        from dspark.drafters.eagle3 import default_eagle_layers
        from dspark.drafters.eagle_model import Eagle3Args, Eagle3Head
        from dspark.training.eagle3 import Eagle3Module

        layers = spec.pop("target_layers", None) or default_eagle_layers(target.num_layers)
        net = Eagle3Head(Eagle3Args.for_target(target, target_layers=layers, **{"gamma": 7, **spec}))
        return Eagle3Module(net, target, cfg.optim, cfg.max_steps, anchors=cfg.anchors_per_sequence,
                            teacher_cache=_teacher_cache(cfg, target, net.args.target_layers))

    from dspark.drafters.block_model import BlockDrafter, BlockDrafterArgs
    from dspark.drafters.dspark import default_target_layers
    from dspark.training.block_drafter import BlockDrafterModule

    spec = {"gamma": 7, "head": "markov", "num_layers": 1, "rank": 128, "intermediate_size": None,
            "target_layers": None, **spec}
    layers = spec.pop("target_layers") or default_target_layers(target.num_layers)
    net = BlockDrafter(BlockDrafterArgs.for_target(target, target_layers=layers, **spec))
    return BlockDrafterModule(net, target, cfg.optim, cfg.max_steps, anchors=cfg.anchors_per_sequence,
                              loss_weights=cfg.loss_weights,
                              teacher_cache=_teacher_cache(cfg, target, net.args.target_layers))


def _teacher_cache(cfg: TrainConfig, target, layers):
    """The run's :class:`~dspark.training.teacher_cache.TeacherCache` (``None`` without ``teacher_cache.dir``);
    says how much disk the run's training sequences take at most."""
    if cfg.teacher_cache.dir is None:
        return None
    from dspark.training.teacher_cache import TeacherCache

    cache = TeacherCache(cfg.teacher_cache.dir, target, layers=layers, dtype=cfg.teacher_cache.dtype,
                         precision=cfg.precision)
    sequences = cfg.max_steps * cfg.batch_size * cfg.devices
    print(f"[dspark] teacher cache {cache.directory}: target layers {list(cache.layers)}, "
          f"{cache.entry_bytes(cfg.seq_len) / 1e6:.2f} MB per sequence, up to "
          f"{sequences * cache.entry_bytes(cfg.seq_len) / 1e9:.1f} GB for {sequences} training sequences "
          "(plus the validation and test ones)", file=sys.stderr)
    return cache


def set_aside_stale_calibration(output_dir: str) -> None:
    """A ``calibration.json`` in ``output_dir`` was fitted for the weights just replaced, and
    ``drafter.calibration: auto`` would apply it to the new ones: rename it to
    ``calibration.stale.json`` (and say so) so that nothing reads it until ``dspark calibrate``
    fits the new weights."""
    from dspark.drafters.calibrated import CALIBRATION_FILE

    old = Path(output_dir, CALIBRATION_FILE)
    if old.is_file():
        stale = old.with_name("calibration.stale.json")
        old.replace(stale)
        print(f"[dspark] {old} was fitted for the previous weights: moved to {stale.name}; fit the new ones with "
              f"dspark calibrate", file=sys.stderr)


def export(model, tokenizer, output_dir: str, dtype: str) -> None:
    """Save a Hugging Face checkpoint directory: safetensors weights in ``dtype``, tokenizer, EOS."""
    from dspark.models.loading import resolve_dtype

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.to(resolve_dtype(dtype))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    model.to(torch.float32)


def training_logs(run_dir) -> list[Path]:
    """The CSV logs of a run, oldest first (a resumed run adds a ``version_N``)."""
    versions = Path(run_dir, "logs").glob("version_*/metrics.csv")
    return sorted(versions, key=lambda p: int(p.parent.name.split("_")[1]))


def read_logged(csv_paths: list[Path], key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of one logged metric across the given CSV logs."""
    import csv

    points = []
    for path in csv_paths:
        with open(path) as f:
            points += [(int(r["step"]), float(r[key])) for r in csv.DictReader(f) if r.get(key)]
    return points


def plot_curves(csv_paths: list[Path], png_path, title: str) -> None:
    """Training and validation curves from a run's Lightning CSV logs, drawn to a PNG."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = set()
    for path in csv_paths:
        with open(path) as f:
            keys |= set(csv.DictReader(f).fieldnames or [])
    series = {key: read_logged(csv_paths, key) for key in sorted(keys)
              if key.endswith("loss") or key.endswith("_kl") or key == "train/kl"}
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, points in sorted(series.items()):
        if not points:
            continue
        steps, values = zip(*points)
        marker = "*" if len(points) == 1 else "o" if key.startswith("val") else None  # test: one final point
        ax.plot(steps, values, label=key, marker=marker, markersize=12 if marker == "*" else 6,
                linestyle="none" if marker == "*" else "-", alpha=0.5 if key.startswith("train") else 1.0)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("nats per token")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
