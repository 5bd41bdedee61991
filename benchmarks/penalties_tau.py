"""τ with repetition penalties, drafts penalised by the drafter or not, on the embedded models.

    python benchmarks/penalties_tau.py [--configs eagle3 dspark draft_model] [--prompts 16] [--max-new-tokens 96]

For each drafter config, domain (code, prose), temperature (0, 1) and repetition penalty (1.0,
1.1, 1.3), decodes the first ``--prompts`` prompts of the eval set and prints the tokens per
target forward (τ, bonus included) as a Markdown table: with the drafter penalising its own
distributions as the target's are (the built-in behaviour), and with the penalties left to the
verifier alone (the drafters' ``penalize_draft`` replaced by the identity in this process only —
what a drafter that ignores ``state.penalties`` does). Both variants are exact; τ is
deterministic for fixed seeds, so one run per cell suffices.
"""

from __future__ import annotations

import argparse

import dspark
import dspark.drafters.draft_model
import dspark.drafters.dspark
import dspark.drafters.eagle3
from dspark.bench.runner import load_prompts
from dspark.samplers.penalties import penalize_draft

DRAFTER_MODULES = (dspark.drafters.draft_model, dspark.drafters.dspark, dspark.drafters.eagle3)


def drafts_penalised(on: bool) -> None:
    """The built-in drafters penalise their drafts (``on``) or leave the penalties to the verifier."""
    for module in DRAFTER_MODULES:
        module.penalize_draft = penalize_draft if on else (lambda logits, params, penalty: logits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["eagle3", "dspark", "draft_model"])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args()

    print("| drafter | domain | T | τ, no penalty | τ, r = 1.1: drafts penalised / verifier only "
          "| τ, r = 1.3: drafts penalised / verifier only |")
    print("|---|---|---|---|---|---|")
    for name in args.configs:
        pipe = dspark.build_pipeline(f"configs/{name}.yaml", overrides=["target.device=cpu", "target.dtype=float32"])
        for domain in ("code", "prose"):
            prompts = load_prompts(domain, pipe.tokenizer, args.prompts)
            for temperature in (0.0, 1.0):
                def tau(penalty: float, on: bool = True) -> float:
                    drafts_penalised(on)
                    result = pipe.generate(prompts, max_new_tokens=args.max_new_tokens, temperature=temperature,
                                           repetition_penalty=penalty, seed=0)
                    drafts_penalised(True)
                    return result.stats.mean_accepted_length

                cells = [f"{tau(1.0):.2f}"] + [f"{tau(r):.2f} / {tau(r, on=False):.2f}" for r in (1.1, 1.3)]
                print(f"| {name} | {domain} | {temperature:g} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
