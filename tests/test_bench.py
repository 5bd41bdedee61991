"""dspark bench end to end on tiny random models (seconds), and its report."""

import json

import pytest
import torch

from dspark.bench import load_bench_config, run_bench

TINY = ("{model_type: llama, vocab_size: 258, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, "
        "num_attention_heads: 2, num_key_value_heads: 1, head_dim: 16, max_position_embeddings: 512, seed: 0}")
DRAFT = TINY.replace("seed: 0", "seed: 1")


def smoke_config(tmp_path, prompts_file):
    common = [f"target.random={TINY}", "target.tokenizer=bytes", "target.device=cpu"]
    return load_bench_config(None, [
        "pipelines=[{label: none, overrides: [drafter=none], speculative: false},"
        " {label: ngram, overrides: [drafter.name=ngram]},"
        f" {{label: draft_model, overrides: [drafter.name=draft_model, 'drafter.random={DRAFT}']}}]",
        f"domains=[{prompts_file}]", "num_prompts=2", "temperatures=[0.0, 1.0]", "batch_sizes=[1, 2]", "gammas=[2]",
        "max_new_tokens=6", "repeats=1", "warmup=0", f"output_dir={tmp_path / 'out'}",
        "common_overrides=[" + ", ".join(f"'{c}'" for c in common) + "]"])


def test_bench_smoke_writes_every_metric(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "def add(a, b):"}\n{"prompt": "The quick brown fox"}\n')
    report = run_bench(smoke_config(tmp_path, prompts), progress=False)
    data = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert data["greedy_mismatches"] == [] and report["greedy_mismatches"] == []
    assert {"cpu", "torch_threads", "torch", "transformers"} <= set(data["environment"])
    variants = {r["variant"] for r in data["rows"]}
    assert {"none", "ngram g=2", "draft_model g=2", "hf plain", "hf assisted g=2", "hf prompt lookup g=2"} <= variants
    for row in data["rows"]:
        assert row["tokens_per_s"] > 0 and row["repeats"] == 1
        if row["kind"] == "dspark":
            for key in ("tau", "acceptance_by_position", "drafted_per_round", "verified_per_round", "accepted_per_round",
                        "draft_ms_per_round", "verify_ms_per_round", "other_ms_per_round", "speedup_vs_none",
                        "ratio_vs_peer"):
                assert key in row, key
            assert row["ratio_vs_peer"] is not None or row["batch_size"] > 1
    assert all(r["batch_size"] == 1 for r in data["rows"] if r["family"] in ("hf_assisted", "hf_prompt_lookup"))
    markdown = (tmp_path / "out" / "bench.md").read_text()
    assert markdown.count("\n| ") >= len(data["rows"])
    # the metrics are defined in the output too, from their one definition (dspark.stats.METRICS)
    from dspark.stats import METRICS, metrics_markdown

    assert "## Metrics" in markdown and metrics_markdown() in markdown
    assert data["metrics"] == {name: definition for name, definition, _ in METRICS}
    assert {"τ (tokens per target forward)", "conditional acceptance at position k", "tokens/s"} <= set(data["metrics"])
    for png in ("acceptance_by_position.png", "speedup_by_batch.png", "throughput_frontier.png", "verification_budget.png"):
        assert (tmp_path / "out" / png).stat().st_size > 1000


def test_bench_with_a_repetition_penalty_matches_transformers(tmp_path):
    """The penalty reaches every variant, the peers included: greedy outputs agree with
    transformers' (whose repetition penalty is ours), though the penalty changes them."""
    from dspark.bench.runner import build_variants, load_prompts

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "def add(a, b):"}\n{"prompt": "The quick brown fox"}\n')
    cfg = smoke_config(tmp_path, prompts)
    cfg.temperatures, cfg.batch_sizes, cfg.max_new_tokens, cfg.repetition_penalty = [0.0], [1], 12, 1.6
    cfg.no_repeat_ngram_size = 3
    report = run_bench(cfg, progress=False)
    assert report["greedy_mismatches"] == [] and report["config"]["repetition_penalty"] == 1.6
    assert "penalties: repetition_penalty 1.6" in (tmp_path / "out" / "bench.md").read_text()
    outputs = {}
    for penalty in (1.0, 1.6):
        cfg.repetition_penalty, cfg.peers.plain, cfg.peers.assisted, cfg.peers.prompt_lookup = penalty, False, False, False
        variants, tokenizer = build_variants(cfg)
        none = next(v for v in variants if v.label == "none")
        outputs[penalty] = none.run(load_prompts(str(prompts), tokenizer, 2), 0.0, 1, 12).outputs
    assert outputs[1.0] != outputs[1.6]


def test_the_early_exit_peer_is_transformers_assistant_early_exit(tmp_path):
    """``early_exit`` pipelines meet ``generate(assistant_early_exit=...)`` at the first one's exit
    layer: the same greedy tokens (checked against transformers' plain generate), and the ratio
    over it in the row of the pipeline labelled ``early_exit``."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "def add(a, b):"}\n{"prompt": "The quick brown fox"}\n')
    two_layers = TINY.replace("num_hidden_layers: 1", "num_hidden_layers: 2")
    common = [f"target.random={two_layers}", "target.tokenizer=bytes", "target.device=cpu"]
    cfg = load_bench_config(None, [
        "pipelines=[{label: none, overrides: [drafter=none], speculative: false},"
        " {label: early_exit, overrides: [drafter.name=early_exit, drafter.exit_layer=1]}]",
        f"domains=[{prompts}]", "num_prompts=2", "temperatures=[0.0]", "batch_sizes=[1]", "gammas=[2, 3]",
        "max_new_tokens=8", "repeats=1", "warmup=0", f"output_dir={tmp_path / 'out'}", "peers.assisted=false",
        "peers.prompt_lookup=false", "common_overrides=[" + ", ".join(f"'{c}'" for c in common) + "]"])
    report = run_bench(cfg, progress=False)
    assert report["greedy_mismatches"] == []
    rows = {r["variant"]: r for r in json.loads((tmp_path / "out" / "bench.json").read_text())["rows"]}
    assert {"hf plain", "hf early exit g=2", "hf early exit g=3"} <= set(rows)
    assert [rows[f"early_exit g={g}"]["peer"] for g in (2, 3)] == ["hf early exit g=2", "hf early exit g=3"]


def test_bad_bench_configs():
    with pytest.raises(ValueError, match=r"repetition_penalty must be a number in \[1e-06, 1e\+06\]"):
        load_bench_config(None, ["repetition_penalty=0"])
    with pytest.raises(ValueError, match="no presence_penalty or frequency_penalty: turn the peers off"):
        load_bench_config(None, ["presence_penalty=0.5"])
    with pytest.raises(ValueError, match="no presence_penalty or frequency_penalty: turn the peers off"):
        load_bench_config(None, ["presence_penalty=0.5", "peers.plain=false", "peers.assisted=false",
                                 "peers.prompt_lookup=false"])  # (the early-exit peer is on)
    assert load_bench_config(None, ["presence_penalty=0.5", "peers.plain=false", "peers.assisted=false",
                                    "peers.prompt_lookup=false", "peers.early_exit=false"]).presence_penalty == 0.5
    with pytest.raises(ValueError, match="batch_sizes must be a non-empty list of integers >= 1"):
        load_bench_config(None, ["batch_sizes=[0]"])
    with pytest.raises(ValueError, match="pipeline labels must be unique"):
        load_bench_config(None, ["pipelines=[{label: a}, {label: a}]"])
    with pytest.raises(Exception, match="repeat"):
        load_bench_config(None, ["repeat=3"])
    # (a repeated value shared one cell's rows: a median over two variants, a speedup over another cell's none)
    for key, value in (("gammas", "[4,4]"), ("temperatures", "[0.0,0.0]"), ("domains", "[code,code]"),
                       ("batch_sizes", "[1,1]")):
        with pytest.raises(ValueError, match=f"{key} lists a value twice"):
            load_bench_config(None, [f"{key}={value}"])
    with pytest.raises(ValueError, match="labelled `none` is the baseline .* must be plain decoding"):
        load_bench_config(None, ["pipelines=[{label: none, config: ngram}]"])
    # composed before any model loads: a misspelt override in any pipeline, and a `none` that drafts
    with pytest.raises(ValueError, match="pipeline 'ngram': unknown key drafter.max_m for NgramConfig; allowed keys"):
        load_bench_config(None, ["pipelines=[{label: none, config: ar, speculative: false},"
                                 " {label: ngram, config: ngram, overrides: [drafter.max_m=2]}]"])
    with pytest.raises(ValueError, match="labelled `none` .* must be plain decoding \\(drafter=none\\), got drafter 'ngram'"):
        load_bench_config(None, ["pipelines=[{label: none, config: ngram, speculative: false}]"])
    with pytest.raises(ValueError, match="batch size 16 needs at least as many prompts: num_prompts is 8"):
        load_bench_config(None, ["batch_sizes=[1,16]", "num_prompts=8"])
    with pytest.raises(ValueError, match=r"num_prompts \(10\) must be a multiple of every batch size: at batch size 4 "
                                         "the last batch would run 2 requests"):
        load_bench_config(None, ["batch_sizes=[1,4]", "num_prompts=10"])
    for threads in (0, -2):  # (0 was taken as the default; -2 a traceback from torch once the models had loaded)
        with pytest.raises(ValueError, match=rf"threads must be an integer >= 1 \(null = torch's default\), got {threads}"):
            load_bench_config(None, [f"threads={threads}"])
    assert load_bench_config(None, ["threads=1"]).threads == 1 and load_bench_config(None).threads is None
    with pytest.raises(ValueError, match=r"temperature must be a number >= 0 \(0 = greedy; otherwise finite and at least"):
        load_bench_config(None, ["temperatures=[0.0,1e-9]"])


def test_greedy_check_uses_transformers_else_the_none_pipeline():
    from dspark.bench.runner import CellResult, greedy_mismatches

    def cell(label, kind, family, outputs, temperature=0.0, batch=1):
        result = CellResult("code", temperature, batch, label, kind, family, None)
        result.outputs = outputs
        return result

    none = cell("none", "dspark", "none", [[1, 2, 3], [4, 5]])
    good = cell("dspark g=7", "dspark", "dspark", [[1, 2, 3], [4, 5]])
    bad = cell("dflash g=7", "dspark", "dflash", [[1, 2, 9], [4, 5]])
    sampled = cell("dflash g=7", "dspark", "dflash", [[7, 7, 7], [7, 7]], temperature=1.0)
    assert greedy_mismatches([none, good, bad, sampled]) == [
        dict(domain="code", batch_size=1, variant="dflash g=7", reference="none", reference_batch_size=1, prompt=0,
             first_difference=2)]
    hf = cell("hf plain", "hf", "hf_plain", [[1, 2, 3], [4, 6]])  # transformers is the reference when present
    assert [(m["variant"], m["prompt"], m["first_difference"]) for m in greedy_mismatches([none, good, hf])] == [
        ("none", 1, 1), ("dspark g=7", 1, 1)]
    # in a batch of 4 the reference is none in the same batch, not batch 1's outputs (nor transformers')
    none_4 = cell("none", "dspark", "none", [[1, 2, 4], [4, 5]], batch=4)
    good_4 = cell("dspark g=7", "dspark", "dspark", [[1, 2, 4], [4, 5]], batch=4)
    bad_4 = cell("dflash g=7", "dspark", "dflash", [[1, 2, 4], [4, 7]], batch=4)
    assert greedy_mismatches([none, good, hf, none_4, good_4, bad_4])[2:] == [
        dict(domain="code", batch_size=4, variant="dflash g=7", reference="none", reference_batch_size=4, prompt=1,
             first_difference=1)]
    assert greedy_mismatches([good_4, bad_4]) == []  # (no reference at that batch size: nothing compared)


def test_a_bench_without_a_greedy_comparison_says_so(tmp_path):
    """No temperature-0 cell with a reference: nothing was compared, and the report does not claim a match."""
    from dspark.bench.report import write_report
    from dspark.bench.runner import CellResult, greedy_mismatches

    cfg = load_bench_config(None, ["batch_sizes=[8]", "temperatures=[0.0]", f"output_dir={tmp_path}"])
    results = []
    for label, kind, family, outputs in (("hf plain", "hf", "hf_plain", [[1, 2, 3]]), ("ngram g=4", "dspark", "ngram", [[1, 9, 9]])):
        result = CellResult("code", 0.0, 8, label, kind, family, None, tokens_per_s=[100.0])
        result.outputs = outputs
        results.append(result)
    write_report(cfg, results, greedy_mismatches(results))
    text = (tmp_path / "bench.md").read_text()
    assert text.split("\n")[4].startswith("greedy outputs not checked (no temperature-0 cell")


def test_the_transformers_peer_runs_with_the_bench_s_settings_alone():
    """A checkpoint's generation_config (an instruct model's repetition_penalty, say) reached the
    transformers peer alone — dspark does not read it — so the two decoded different things and
    the greedy check blamed dspark. The peer sets it aside while it runs, and gives it back."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from helpers import ragged_prompts, tiny_hf_model

    from dspark.bench.runner import dspark_variant, hf_model_of, hf_variant
    from dspark.pipeline import build_pipeline

    model = tiny_hf_model("llama")
    model.generation_config.repetition_penalty = 1.3
    pipe = build_pipeline(None, target_model=model, overrides=["target.tokenizer=null", "target.device=cpu", "drafter=none"])
    prompts = ragged_prompts(101, (5, 4))
    ours = dspark_variant("none", "none", None, pipe, 0).run(prompts, 0.0, 1, 20)
    peer = hf_model_of(pipe.target)
    theirs = hf_variant("hf plain", "hf_plain", None, peer, 0, 0).run(prompts, 0.0, 1, 20)
    assert ours.outputs == theirs.outputs
    assert peer.generation_config.repetition_penalty == 1.3


def test_variants_whose_phase_clock_synchronises_time_their_phases_in_a_pass_of_their_own(tmp_path):
    """On CUDA the per-phase clock synchronises three times a round: the tokens/s passes run
    without it, and one extra pass per cell splits the rounds (its stats give the ms per round)."""
    from dspark.bench.report import summarize
    from dspark.bench.runner import RunResult, Variant, run_matrix
    from dspark.stats import GenerationStats

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    cfg = load_bench_config(None, [f"domains=[{prompts}]", "num_prompts=2", "batch_sizes=[1]", "temperatures=[0.0]",
                                   "repeats=3", "warmup=1"])
    clock = {"on": False}
    passes = []

    def run(prompts, temperature, batch, max_new_tokens):
        passes.append(clock["on"])
        seconds = 0.5 if clock["on"] else 0.1
        stats = GenerationStats(rounds=10, target_forwards=10, generated_tokens=20, accepted_tokens=10,
                                draft_time_s=0.2 if clock["on"] else 0.0, verify_time_s=0.3 if clock["on"] else 0.0)
        return RunResult(seconds, 20, [[1, 2]] * len(prompts), stats)

    variant = Variant("x g=2", "dspark", "x", 2, run, time_phases=lambda on: clock.update(on=on), phase_pass=True)
    [cell] = run_matrix(cfg, [variant], tokenizer=lambda text: {"input_ids": [ord(text)]}, progress=False)
    assert passes == [False] * 4 + [True] and clock["on"] is False
    assert cell.tokens_per_s == [200.0] * 3  # (the phase pass is not a timed pass)
    [row] = summarize([cell])
    assert row["draft_ms_per_round"] == 20.0 and row["verify_ms_per_round"] == 30.0 and row["phases_timed_apart"]


def test_a_cpu_pipeline_times_its_phases_in_the_measured_passes():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from helpers import ragged_prompts

    from dspark.bench.runner import dspark_variant
    from dspark.pipeline import build_pipeline

    pipe = build_pipeline(None, overrides=[f"target.random={TINY}", "target.tokenizer=null", "target.device=cpu",
                                           "drafter.name=ngram"])
    variant = dspark_variant("ngram g=4", "ngram", 4, pipe, 0)
    assert not variant.phase_pass and pipe.engine.config.time_phases
    stats = variant.run(ragged_prompts(258, (5, 4)), 0.0, 1, 8).stats
    assert stats.draft_time_s > 0 and stats.verify_time_s > 0


def test_a_prompt_set_smaller_than_num_prompts_is_refused(tmp_path):
    from dspark.bench.runner import load_prompts

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    with pytest.raises(ValueError, match=r"num_prompts is 3 but prompt set .* has 2 prompts"):
        load_prompts(str(prompts), lambda text: {"input_ids": [1]}, 3)
    assert len(load_prompts(str(prompts), lambda text: {"input_ids": [1]}, 2)) == 2


def test_an_in_memory_peer_is_converted_on_a_copy():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from helpers import tiny_hf_model

    from dspark.bench.runner import hf_model_of
    from dspark.pipeline import build_pipeline

    model = tiny_hf_model("llama").to(torch.float64)
    pipe = build_pipeline(None, target_model=model, overrides=["target.tokenizer=null", "target.device=cpu",
                                                                "target.dtype=float32", "drafter=none"])
    peer = hf_model_of(pipe.target)
    assert peer.dtype == torch.float32 and model.dtype == torch.float64  # the caller's model is left as it was
    assert hf_model_of(build_pipeline(None, target_model=peer, overrides=[
        "target.tokenizer=null", "target.device=cpu", "drafter=none"]).target) is peer  # (no copy when none is needed)


def test_a_missing_or_short_prompt_set_is_refused_before_any_model_loads(tmp_path):
    """A misspelt domain (or one with fewer prompts than num_prompts) failed only once every
    pipeline and peer had loaded: the config refuses it."""
    with pytest.raises(FileNotFoundError, match="prompt set 'cod' is neither a shipped one .*code.* nor a file"):
        load_bench_config(None, ["domains=[cod]"])
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    with pytest.raises(ValueError, match=r"num_prompts is 8 but prompt set .* has 2 prompts"):
        load_bench_config(None, [f"domains=[{prompts}]", "batch_sizes=[1]"])


def test_an_output_dir_that_is_a_file_is_refused_before_anything_runs(tmp_path):
    """bench.json, bench.md and the plots go into output_dir: a file there (or above it) made the
    final mkdir raise a traceback once every variant had run."""
    taken = tmp_path / "taken"
    taken.write_text("")
    for output_dir in (taken, taken / "sub"):
        with pytest.raises(ValueError, match=f"output_dir '{output_dir}' must be a directory .* '{taken}' is a file"):
            load_bench_config(None, [f"output_dir={output_dir}"])
    assert load_bench_config(None, [f"output_dir={tmp_path / 'new' / 'dir'}"]).output_dir == str(tmp_path / "new" / "dir")
