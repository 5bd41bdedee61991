"""``dspark calibrate`` and ``dspark profile``: the two measurements the confidence scheduler needs.

* calibrate — speculative decoding (every draft verified) over a prompt set, recording each
  request-round's confidences and how many drafts were accepted; fits Sequential Temperature
  Scaling (or sequential Platt scaling) on one half, reports ECE / Brier / AUROC per position on
  the other half before and after, saves the map (``calibration.json``: the sampling map, or the
  greedy one when recorded at temperature 0) and draws reliability diagrams.
* profile — the target's SPS(B) cost table on this machine.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


class RoundRecorder:
    """A round hook (:attr:`dspark.engine.Engine.round_hooks`) that keeps, per active request-round,
    the confidences ``[γ]``, the drafts verified and the drafts accepted."""

    def __init__(self):
        self.confidence, self.verified, self.accepted = [], [], []

    def __call__(self, proposal, result, active) -> None:
        if proposal.confidence is None:
            raise ValueError("calibration needs a drafter whose proposals carry confidences "
                             "(dspark, eagle3, draft_model)")
        self.confidence.append(proposal.confidence[active].double().cpu())
        self.verified.append(proposal.num_tokens[active].cpu())
        self.accepted.append(result.num_accepted[active].cpu())

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(confidence [N, γ], accepted [N], verified [N])``."""
        return torch.cat(self.confidence), torch.cat(self.accepted), torch.cat(self.verified)


CALIBRATION_METHODS = ("sts", "platt")


def calibrate(config, overrides=(), *, prompts: str = "calibration", num_prompts: int = 120, max_new_tokens: int = 128,
              temperature: float = 1.0, batch_size: int = 8, method: str | None = None, output: str | None = None,
              plot: str | None = None, seed: int = 0) -> dict:
    """Record, fit on the first half of the request-rounds, evaluate on the second half, save.

    ``temperature`` 0 records greedy decoding and writes the file's ``greedy`` map, anything else its
    sampling map; the other map of an existing file is kept. ``method``: ``sts`` (temperatures) or
    ``platt`` (temperatures and shifts); ``None`` takes the drafter's ``calibration_method``.

    Returns the report (the map, per-position metrics before and after, where it was saved)."""
    from dataclasses import fields

    from tqdm.auto import tqdm

    from dspark.assets import ASSETS
    from dspark.bench.runner import load_prompts, read_prompts
    from dspark.config import check_output_file, load_config
    from dspark.drafters import DRAFTERS
    from dspark.drafters.calibrated import CALIBRATION_FILE, load_calibration
    from dspark.models.loading import resolve_checkpoint
    from dspark.pipeline import build_pipeline
    from dspark.scheduling.calibration import calibration_report, fit_platt, fit_sts

    cfg = load_config(config, overrides)
    drafter_class = DRAFTERS.resolve(cfg.drafter.name, cfg.drafter.get("_target_"))
    keys = {f.name for f in fields(drafter_class.config_class)}
    if not drafter_class.provides_confidence or "calibration" not in keys:
        raise ValueError("dspark calibrate needs a drafter whose proposals carry confidences and that applies a "
                         f"calibration (dspark, eagle3, draft_model, early_exit), got {cfg.drafter.name!r}")
    method = drafter_class.calibration_method if method is None else method
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method must be one of {', '.join(CALIBRATION_METHODS)}, got {method!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    for name, value in (("batch_size", batch_size), ("num_prompts", num_prompts), ("max_new_tokens", max_new_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if output is None and (cfg.drafter.get("path") is None or cfg.drafter.get("random") is not None):
        raise ValueError("this drafter has no checkpoint directory to write calibration.json beside (one built in "
                         "memory — drafter.path: null, or drafter.random — or early_exit, which drafts with the "
                         "target's layers): name the file with output= (--output)")
    if output is None:
        directory = Path(resolve_checkpoint(cfg.drafter.path)).resolve()
        if directory.is_relative_to(ASSETS.resolve()):
            raise ValueError(f"{directory} is a checkpoint shipped with dspark: the calibration.json beside it is the "
                             "shipped map, and a fit would overwrite it inside the installed package. Write yours with "
                             "output= (--output FILE) and decode with drafter.calibration=FILE; to replace the shipped "
                             "map on purpose, name its path as the output")
        output = str(directory / CALIBRATION_FILE)
    check_output_file("output", output)
    if plot:
        check_output_file("plot", plot)
        if not Path(plot).suffix:  # (matplotlib writes PNG under name.png: the report names that file)
            plot = f"{plot}.png"
            check_output_file("plot", plot)
    existing, greedy = {}, temperature == 0
    if Path(output).is_file():  # its other map is kept; a file the drafters could not read is refused
        load_calibration(output, 1).check_drafter(cfg.drafter.name)  # (one file's maps are one drafter's)
        existing = json.loads(Path(output).read_text())
        other = existing if greedy else existing.get("greedy")
        gamma = cfg.drafter.num_speculative_tokens
        if other is not None and "temperatures" in other and len(other["temperatures"]) < gamma:
            raise ValueError(f"{output}: its {'sampling' if greedy else 'greedy'} map covers "
                             f"{len(other['temperatures'])} draft positions, fewer than the {gamma} fitted now, and "
                             "one file's maps must cover the same positions: fit at that γ, or move the file away "
                             "and fit both maps at this one")
    # every draft verified (γ every round), raw confidences: what is being calibrated
    fixed = ["scheduler.name=fixed", "drafter.calibration=null"]
    if "min_survival" in keys:
        fixed.append("drafter.min_survival=0")
    read_prompts(prompts, num_prompts)  # (a missing or short prompt set, before the models load)
    pipe = build_pipeline(config, overrides=[*overrides, *fixed])
    if not pipe.drafter.provides_confidence:  # e.g. a released DFlash drafter: no confidence head
        raise ValueError(f"dspark calibrate needs confidences, and this {cfg.drafter.name!r} drafter's checkpoint "
                         "has no confidence head")
    recorder = RoundRecorder()
    pipe.engine.round_hooks.append(recorder)
    texts = load_prompts(prompts, pipe.tokenizer, num_prompts)
    for start in tqdm(range(0, len(texts), batch_size), desc="calibrate", unit="batch"):
        pipe.generate(texts[start:start + batch_size], max_new_tokens=max_new_tokens, temperature=temperature,
                      seed=seed + start, ignore_eos=True)
    confidence, accepted, verified = recorder.tensors()
    half = confidence.shape[0] // 2
    fit = (confidence[:half], accepted[:half], verified[:half])
    if method == "sts":
        temperatures = fit_sts(*fit)
        biases = torch.zeros_like(temperatures)
    else:
        temperatures, biases = fit_platt(*fit)
    held_out = (confidence[half:], accepted[half:], verified[half:])
    report = {"temperatures": temperatures.tolist(), "biases": biases.tolist(), "method": method,
              "drafter": cfg.drafter.name, "request_rounds": int(confidence.shape[0]), "fit_rounds": half,
              "prompts": prompts, "temperature": temperature,
              "before": calibration_report(*held_out), "after": calibration_report(*held_out, temperatures, biases)}
    if greedy:  # the greedy map, beside the file's sampling map (if any)
        saved = {**existing, "greedy": report}
    else:  # the sampling map at the top level; a greedy map already there is kept
        saved = {**report, **({"greedy": existing["greedy"]} if "greedy" in existing else {})}
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(json.dumps(saved, indent=2) + "\n")
    report["saved_to"], report["map"] = output, "greedy" if greedy else "sampled"
    if plot:
        label = {"sts": "STS", "platt": "Platt"}[method]
        reliability_diagram(*held_out, temperatures, plot, biases=biases, label=label)
        report["plot"] = plot
    return report


def reliability_diagram(confidence, accepted, verified, temperatures, path, bins: int = 10, *, biases=None,
                        label: str = "STS") -> None:
    """Per position: mean predicted survival against the observed survival rate, raw and calibrated
    (``σ(logit(c_k) / T_k + b_k)``, named ``label`` in the legend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dspark.scheduling.calibration import apply_temperatures, survival_events

    gamma = confidence.shape[1]
    observed, labels = survival_events(accepted, verified, gamma)
    columns = min(gamma, 4)
    rows = -(-gamma // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.0 * rows), squeeze=False)
    for k in range(gamma):
        ax = axes[k // columns][k % columns]
        for name, c, style in (("raw", confidence.double(), "o--"),
                               (label, apply_temperatures(confidence, temperatures, biases), "s-")):
            a = c.cumprod(-1)[observed[:, k], k]
            y = labels[observed[:, k], k].double()
            which = (a * bins).long().clamp(0, bins - 1)
            counts = torch.bincount(which, minlength=bins)
            keep = counts > 0
            mean_a = torch.zeros(bins, dtype=torch.float64).index_add_(0, which, a)[keep] / counts[keep]
            mean_y = torch.zeros(bins, dtype=torch.float64).index_add_(0, which, y)[keep] / counts[keep]
            ax.plot(mean_a.tolist(), mean_y.tolist(), style, label=name, markersize=4)
        ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8)
        ax.set_title(f"survival a_{k + 1}")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        if k % columns == 0:
            ax.set_ylabel("observed rate")
        if k // columns == rows - 1:
            ax.set_xlabel("predicted")
    for k in range(gamma, rows * columns):
        axes[k // columns][k % columns].axis("off")
    axes[0][0].legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def profile(config, overrides=(), *, token_counts=(1, 2, 4, 8, 16, 32, 64, 128), context_length: int = 256,
            repeats: int = 7, output: str = "sps.json"):
    """Measure the configured target's SPS(B) and save the cost table; returns it. The arguments
    are checked before the target is loaded: ``token_counts`` increasing integers ≥ 1 (a
    forward's tokens), ``context_length`` ≥ 0 and ``repeats`` ≥ 1."""
    from dspark.config import check_output_file
    from dspark.pipeline import build_pipeline
    from dspark.scheduling.profile import profile_target

    counts = list(token_counts)
    if not counts or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in counts) or counts != sorted(
            set(counts)):
        raise ValueError(f"token_counts must be increasing integers >= 1 (tokens in one forward), got {counts}")
    for name, value, least in (("context_length", context_length, 0), ("repeats", repeats, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")

    check_output_file("output", output)

    pipe = build_pipeline(config, overrides=[*overrides, "drafter=none", "scheduler=fixed"])
    positions = getattr(pipe.target, "max_position_embeddings", None)
    if positions is not None and context_length >= positions:  # (measured positions the model never serves)
        raise ValueError(f"context_length must be below the target's max_position_embeddings ({positions}): each "
                         f"measured token sits at position context_length; got {context_length}")
    table = profile_target(pipe.target, tuple(token_counts), context_length=context_length, repeats=repeats,
                           model_name=pipe.engine.scheduler.model_name)  # the name the scheduler checks
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    table.save(output)
    return table
