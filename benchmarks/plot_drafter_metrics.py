"""Expected acceptance by block position (1 − TV(p_draft, p_target) under teacher forcing, test
split) of the shipped drafters, from their metrics.json — the training-side view of the ablation.

    python benchmarks/plot_drafter_metrics.py docs/images/drafters_expected_acceptance.png
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dspark.assets import TARGET_DRAFTERS, resolve_model  # noqa: E402


def main(path: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    print("| drafter | domain | greedy τ (teacher-forced) | expected acceptance by position |")
    print("|---|---|---|---|")
    for ax, domain in zip(axes, ("code", "prose")):
        for name in TARGET_DRAFTERS:
            try:
                test = json.loads((resolve_model(name) / "metrics.json").read_text())["test"]
            except FileNotFoundError:
                continue
            positions = sorted(int(k.rsplit("_", 1)[1]) for k in test if k.startswith(f"test/{domain}_acceptance_"))
            values = [test[f"test/{domain}_acceptance_{k}"] for k in positions]
            ax.plot(positions, values, marker="o", label=name.removeprefix("dspark-tiny-"))
            print(f"| {name} | {domain} | {test[f'test/{domain}_tau_greedy']:.3f} | "
                  + " ".join(f"{v:.2f}" for v in values) + " |")
        ax.set(title=f"{domain}: expected acceptance 1 − TV (test split)", xlabel="block position k",
               ylabel="Σ min(p_draft, p_target)", ylim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "drafters_expected_acceptance.png")
