"""τ (tokens per target forward) of drafter checkpoints on the shipped prompt sets, side by side.

    python benchmarks/drafter_tau.py --prompts 32 --check-greedy --plot tau.png \\
        "DSpark, corpus=dspark:dspark-tiny-dspark" "DSpark, regenerated=dspark:runs/regen/dspark/out"

Each ``LABEL=CONFIG:PATH`` builds the pipeline config ``CONFIG`` with ``drafter.path=PATH`` and
decodes the first ``--prompts`` prompts of the code and prose sets (128 new tokens, greedy and
T = 1 with seed 0, eager, every draft verified). τ does not depend on the machine's speed, so this
compares training recipes without the noise of a timed bench. Prints a Markdown table, writes the
numbers to ``--json`` and draws grouped bars to ``--plot``.
"""

from __future__ import annotations

import argparse
import json

import dspark
from dspark.bench.runner import load_prompts

CELLS = [(domain, temperature) for domain in ("code", "prose") for temperature in (0.0, 1.0)]


def measure(spec: str, num_prompts: int, max_new_tokens: int, greedy_reference: dict | None = None) -> dict[str, float]:
    """τ per ``"domain T"`` cell for one ``CONFIG:PATH``. With ``greedy_reference`` (plain decoding's
    greedy token ids per domain) the greedy outputs must equal it, prompt for prompt."""
    config, path = spec.split(":", 1)
    pipe = dspark.build_pipeline(config, overrides=[f"drafter.path={path}", "target.device=cpu",
                                                    "engine.max_batch_size=8"])
    taus = {}
    for domain, temperature in CELLS:
        prompts = load_prompts(domain, pipe.tokenizer, num_prompts)
        out = pipe.generate(prompts, max_new_tokens=max_new_tokens, temperature=temperature, seed=0)
        taus[f"{domain} T={temperature:g}"] = out.stats.mean_accepted_length
        if greedy_reference is not None and temperature == 0.0:
            differ = [i for i, (a, b) in enumerate(zip(out.token_ids, greedy_reference[domain])) if a != b]
            if differ:
                raise SystemExit(f"[drafter_tau] {spec}: greedy output differs from plain decoding on {domain} "
                                 f"prompts {differ}")
    return taus


def plain_greedy(num_prompts: int, max_new_tokens: int) -> dict[str, list[list[int]]]:
    """Plain decoding's greedy token ids per domain: the reference for ``--check-greedy``."""
    pipe = dspark.build_pipeline("ar", overrides=["target.device=cpu", "engine.max_batch_size=8"])
    return {domain: pipe.generate(load_prompts(domain, pipe.tokenizer, num_prompts),
                                  max_new_tokens=max_new_tokens).token_ids for domain in ("code", "prose")}


def plot(results: dict[str, dict[str, float]], path: str) -> None:
    """Grouped bars per cell. Labels that share the text before their first ", " (e.g. "DFlash, 2000
    steps" and "DFlash, 4000 steps") share a colour, later ones darker, so variants of a drafter pair up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    family_of = {label: label.split(", ")[0] for label in results}
    families = list(dict.fromkeys(family_of.values()))
    members = {f: [label for label in results if family_of[label] == f] for f in families}
    palette = plt.get_cmap("tab10")
    cells = list(next(iter(results.values())))
    width = 0.8 / len(results)
    fig, ax = plt.subplots(figsize=(10, 4))
    for i, (label, taus) in enumerate(results.items()):
        family = members[family_of[label]]
        shade = 0.45 + 0.55 * (family.index(label) + 1) / len(family)  # the last of a family fully opaque
        xs = [c + (i - (len(results) - 1) / 2) * width for c in range(len(cells))]
        ax.bar(xs, [taus[c] for c in cells], width, label=label, alpha=shade,
               color=palette(families.index(family_of[label]) % 10), edgecolor="white", linewidth=0.5)
    ax.set_xticks(range(len(cells)), cells)
    ax.set_ylabel("τ (tokens per target forward)")
    ax.set_ylim(1.0, None)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("drafters", nargs="*", help="LABEL=CONFIG:PATH")
    parser.add_argument("--from-json", default=None, help="redraw --plot from a saved --json instead of decoding")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    parser.add_argument("--check-greedy", action="store_true",
                        help="fail unless every greedy output equals plain decoding's, prompt for prompt")
    args = parser.parse_args()
    if args.from_json:
        if not args.plot or args.drafters:
            parser.error("--from-json redraws a saved run: give --plot and no drafters")
        plot(json.load(open(args.from_json))["tau"], args.plot)
        return
    if not args.drafters:
        parser.error("give at least one LABEL=CONFIG:PATH (or --from-json with --plot)")
    specs = [d.split("=", 1) for d in args.drafters]
    bad = [d for d, s in zip(args.drafters, specs) if len(s) != 2 or ":" not in s[1]]
    if bad:
        parser.error(f"each drafter is LABEL=CONFIG:PATH, got {bad}")
    reference = plain_greedy(args.prompts, args.max_new_tokens) if args.check_greedy else None
    results = {}
    for label, spec in specs:
        results[label] = measure(spec, args.prompts, args.max_new_tokens, reference)
        print(f"[drafter_tau] {label}: " + ", ".join(f"{c} {t:.2f}" for c, t in results[label].items()), flush=True)
    cells = list(next(iter(results.values())))
    print("| drafter | " + " | ".join(cells) + " |")
    print("|---|" + "---|" * len(cells))
    for label, taus in results.items():
        print(f"| {label} | " + " | ".join(f"{taus[c]:.2f}" for c in cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"prompts": args.prompts, "max_new_tokens": args.max_new_tokens, "tau": results}, f, indent=2)
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
