"""Structured outputs: what the grammar's per-round host work costs, and what a grammar does to τ.

    python benchmarks/structured.py [--configs ar ngram draft_model dspark eagle3] [--prompts 8]
        [--max-new-tokens 64] [--repeats 5] [--compile] [--cut]

Two measurements on the shipped code prompts, greedy, batch 1 (one request per ``generate`` call,
as a chat client sends them), the embedded models, eager (``--compile``: ``engine.compile``, the
graphs made in a warm-up):

* **cost**: each pipeline with a grammar that allows every token (the regex ``[\\s\\S]*``: its
  matcher walks and masks every round, the tokens are those without a grammar — checked) against
  no grammar, alternating, ``--repeats`` passes; the median tokens/s of each and their ratio, and
  the time the grammar's walk takes inside the rounds (``GrammarRows.round_masks``, timed at each
  call): per round, and as a share of the constrained passes' wall time;
* **τ under a JSON schema**: each pipeline's τ and tokens/s with a small JSON schema (compact
  whitespace), its drafter guided by the grammar (``engine.guide_drafts``) and not, alternating,
  ``--repeats`` passes (median tokens/s), against plain decoding under the same schema (same
  tokens: checked); τ also without guidance and without the drafts the grammar dictates
  (``Drafter.replaceable_drafts``).

* **stray drafts cut** (``--cut``): each pipeline unguided under the JSON schema with
  ``engine.cut_stray_drafts`` on and off, alternating, ``--repeats`` passes: tokens/s, τ and the
  drafts verified per round (greedy drafts are deterministic: the cut applies to every drafter;
  same tokens: checked).

The grammar's host work is timed at each call: the verify masks' walk
(``GrammarRows.round_masks``) and, for guided drafters, the masks between draft steps
(``GrammarRows.guide``, ``DraftGuide.mask`` / ``take`` / ``rollback``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import dspark
from dspark.bench.runner import load_prompts
from dspark.stats import mean_accepted_length

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                           "args": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
                                           "returns": {"type": "string", "maxLength": 24}},
          "required": ["name", "args", "returns"]}


def decode(pipe, prompts, max_new_tokens: int, grammar, verified: list | None = None) -> tuple[float, list, float]:
    """(seconds, token ids, τ) of one request at a time (``verified``: appends the drafts verified
    per target forward)."""
    started, outputs, forwards, accepted, verified_tokens = time.perf_counter(), [], 0, 0, 0
    for prompt in prompts:
        result = pipe.generate([prompt], max_new_tokens=max_new_tokens, grammar=grammar)
        outputs.append(result.token_ids[0])
        forwards += result.stats.target_forwards
        accepted += result.stats.accepted_tokens
        verified_tokens += result.stats.verified_tokens
    if verified is not None:
        verified.append(verified_tokens / max(forwards, 1))
    return time.perf_counter() - started, outputs, mean_accepted_length(accepted, forwards)


def cut_strays(pipes: dict, prompts, max_new_tokens: int, repeats: int, schema) -> None:
    """Unguided drafting under ``schema``, ``engine.cut_stray_drafts`` on against off (alternating)."""
    print("\n| pipeline (unguided) | tokens/s: cut off → on | ratio | τ off → on | drafts verified per "
          "round off → on | same tokens |")
    print("|---|---|---|---|---|---|")
    for config, pipe in pipes.items():
        if config == "ar":
            continue
        pipe.engine.config.guide_drafts = False
        speeds, taus, verified, outputs = {True: [], False: []}, {}, {True: [], False: []}, {}
        for cut in (True, False):  # warm-up
            pipe.engine.config.cut_stray_drafts = cut
            decode(pipe, prompts[:2], 16, schema)
        for _ in range(repeats):
            for cut in (False, True):
                pipe.engine.config.cut_stray_drafts = cut
                seconds, outputs[cut], taus[cut] = decode(pipe, prompts, max_new_tokens, schema, verified[cut])
                speeds[cut].append(sum(map(len, outputs[cut])) / seconds)
        pipe.engine.config.guide_drafts, pipe.engine.config.cut_stray_drafts = True, True
        off, on = statistics.median(speeds[False]), statistics.median(speeds[True])
        print(f"| {config} | {off:.1f} → {on:.1f} | {on / off:.2f} | {taus[False]:.2f} → {taus[True]:.2f} | "
              f"{verified[False][-1]:.2f} → {verified[True][-1]:.2f} | "
              f"{'yes' if outputs[True] == outputs[False] else 'NO'} |", flush=True)


WALK = [0.0, 0]  # seconds in the grammar's host work (the verify masks' walk, the guide), rounds


def _timed_walk():
    from dspark.structured import DraftGuide, GrammarRows

    def timed(owner, name, counts_round):
        real = getattr(owner, name)

        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            out = real(*args, **kwargs)
            WALK[0] += time.perf_counter() - started
            WALK[1] += counts_round
            return out

        setattr(owner, name, wrapper)

    timed(GrammarRows, "round_masks", 1)
    for owner, name in ((GrammarRows, "guide"), (DraftGuide, "mask"), (DraftGuide, "take"), (DraftGuide, "rollback")):
        timed(owner, name, 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=["ar", "ngram", "draft_model", "dspark", "eagle3"])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="engine.compile=true (graphs made in the warm-up)")
    parser.add_argument("--cut", action="store_true", help="only: unguided drafts under the schema, strays cut or not")
    args = parser.parse_args()
    _timed_walk()
    overrides = ["target.device=cpu"] + (["engine.compile=true"] if args.compile else [])
    pipes = {c: dspark.build_pipeline(c, overrides=overrides) for c in args.configs}
    prompts = load_prompts("code", next(iter(pipes.values())).tokenizer, args.prompts)
    everything, schema = dspark.Grammar.regex(r"[\s\S]*"), dspark.Grammar.json_schema(SCHEMA, any_whitespace=False)
    if args.cut:
        print(f"code prompts: {len(prompts)}, {args.max_new_tokens} new tokens, greedy, batch 1, {args.repeats} passes"
              f"{', compiled' if args.compile else ', eager'}, JSON schema")
        return cut_strays(pipes, prompts, args.max_new_tokens, args.repeats, schema)
    print(f"code prompts: {len(prompts)}, {args.max_new_tokens} new tokens, greedy, batch 1, {args.repeats} passes"
          f"{', compiled' if args.compile else ', eager'}")
    print("| pipeline | tokens/s, no grammar | tokens/s, grammar allowing all | ratio | grammar's host work ms/round "
          "(share) | τ, no grammar | τ under the JSON schema: unguided, forced drafts off → on → guided | tokens/s "
          "under it: unguided → guided | same tokens |")
    print("|---|---|---|---|---|---|---|---|---|")
    reference = None
    for config, pipe in pipes.items():
        for grammar, guided in ((None, True), (everything, True), (schema, True), (schema, False)):  # warm-up
            pipe.engine.config.guide_drafts = guided
            decode(pipe, prompts[:2], 8 if not args.compile else 32, grammar)
        times, walked = {"none": [], "all": [], "unguided": [], "guided": []}, [0.0, 0, 0.0]
        tau_free = decode(pipe, prompts, args.max_new_tokens, None)[2]
        taus, outputs_under = {}, {}
        for _ in range(args.repeats):
            for name, grammar in (("none", None), ("all", everything), ("unguided", schema), ("guided", schema)):
                WALK[:] = [0.0, 0]
                pipe.engine.config.guide_drafts = name != "unguided"
                seconds, outputs, taus[name] = decode(pipe, prompts, args.max_new_tokens, grammar)
                times[name].append(sum(len(o) for o in outputs) / seconds)
                if name == "all":
                    walked = [walked[0] + WALK[0], walked[1] + WALK[1], walked[2] + seconds]
                if name == "none":
                    unconstrained = outputs
                elif name == "all" and outputs != unconstrained:
                    print(f"!!! {config}: the grammar that allows every token changed the output", flush=True)
                elif name in ("unguided", "guided"):
                    outputs_under[name] = outputs
        pipe.engine.config.guide_drafts = False
        drafter_class = type(pipe.drafter)
        replaceable = drafter_class.replaceable_drafts
        drafter_class.replaceable_drafts = False
        try:
            tau_unforced = decode(pipe, prompts, args.max_new_tokens, schema)[2]
        finally:
            drafter_class.replaceable_drafts = replaceable
            pipe.engine.config.guide_drafts = True
        if reference is None:
            reference = outputs_under["guided"]
        same = "yes" if outputs_under["guided"] == outputs_under["unguided"] == reference else "NO"
        none, allowed, unguided, guided = (statistics.median(times[k]) for k in ("none", "all", "unguided", "guided"))
        walk = f"{walked[0] / max(walked[1], 1) * 1e3:.2f} ({walked[0] / walked[2]:.1%})"
        print(f"| {config} | {none:.1f} | {allowed:.1f} | {allowed / none:.2f} | {walk} | {tau_free:.2f} | "
              f"{tau_unforced:.2f} → {taus['unguided']:.2f} → {taus['guided']:.2f} | "
              f"{unguided:.1f} → {guided:.1f} | {same} |", flush=True)


if __name__ == "__main__":
    main()
