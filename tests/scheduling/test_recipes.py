"""``dspark calibrate`` and ``dspark profile`` end to end on tiny random models."""

import json

import pytest
import torch

import dspark
from dspark.cli import main
from dspark.scheduling import ThroughputProfile
from dspark.scheduling.recipes import calibrate

TINY = ("{model_type: llama, vocab_size: 258, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
        "num_attention_heads: 2, num_key_value_heads: 1, head_dim: 16, max_position_embeddings: 512, seed: 0}")
COMMON = [f"target.random={TINY}", "target.tokenizer=bytes", "target.device=cpu", "drafter.path=null",
          "drafter.rank=8", "drafter.num_speculative_tokens=3"]
# the drafters whose confidences dspark calibrate fits (randomly initialised, γ = 3)
SETUPS = {"dspark": COMMON,
          "eagle3": [f"target.random={TINY}", "target.tokenizer=bytes", "target.device=cpu", "drafter.path=null",
                     "drafter.num_speculative_tokens=3"]}


@pytest.mark.parametrize("config", sorted(SETUPS))
def test_calibrate_records_fits_and_the_drafter_applies_the_temperatures(tmp_path, config):
    setup = SETUPS[config]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"line {i}: def f(x): return x + {i}"}) + "\n" for i in range(6)))
    output, plot = tmp_path / "calibration.json", tmp_path / "reliability.png"
    report = calibrate(config, setup, prompts=str(prompts), num_prompts=6, max_new_tokens=12, batch_size=3,
                       output=str(output), plot=str(plot))
    assert report["request_rounds"] >= 12 and len(report["temperatures"]) == 3 and report["drafter"] == config
    assert [row["position"] for row in report["after"]] == [1, 2, 3]
    assert plot.stat().st_size > 1000
    saved = json.loads(output.read_text())
    assert saved["temperatures"] == report["temperatures"]
    raw = dspark.build_pipeline(config, overrides=[*setup, "drafter.calibration=null"])
    scaled = dspark.build_pipeline(config, overrides=[*setup, f"drafter.calibration={output}"])
    assert torch.equal(scaled.drafter.temperatures, torch.tensor(report["temperatures"], dtype=torch.float64))
    seen = {}
    for name, pipe in (("raw", raw), ("scaled", scaled)):
        original = pipe.drafter.propose
        pipe.drafter.propose = lambda state, u, o=original, n=name: seen.setdefault(n, o(state, u))
        pipe.generate([[5, 6, 7]], max_new_tokens=3, ignore_eos=True)
    assert torch.equal(seen["raw"].tokens, seen["scaled"].tokens)  # the drafts themselves are untouched
    expected = torch.sigmoid(torch.logit(seen["raw"].confidence.double()) / torch.tensor(report["temperatures"]))
    assert torch.allclose(seen["scaled"].confidence.double(), expected, atol=1e-6)


def test_eagle3_stops_early_on_the_calibrated_survival(tmp_path):
    """``min_survival`` compares the calibrated survival ``a_k``: with a threshold between the raw
    and the calibrated first confidence, the raw drafter offers nothing and the calibrated one
    offers ``x_1``."""
    setup = SETUPS["eagle3"]
    seen = {}

    def first_proposal(name, overrides):
        pipe = dspark.build_pipeline("eagle3", overrides=[*setup, *overrides])
        original = pipe.drafter.propose
        pipe.drafter.propose = lambda state, u: seen.setdefault(name, original(state, u))
        pipe.generate([[5, 6, 7]], max_new_tokens=2, ignore_eos=True)
        return seen[name]

    c_1 = first_proposal("probe", ["drafter.calibration=null"]).confidence.double()[0, 0]
    warm = tmp_path / "calibration.json"  # T_1 = 4 pulls c_1 towards one half; more than γ: the first γ are used
    warm.write_text(json.dumps({"temperatures": [4.0, 1.0, 1.0, 1.0]}))
    calibrated_c_1 = torch.sigmoid(torch.logit(c_1) / 4)
    assert abs(float(calibrated_c_1 - c_1)) > 1e-3
    threshold = float((c_1 + calibrated_c_1) / 2)
    raw = first_proposal("raw", ["drafter.calibration=null", f"drafter.min_survival={threshold}"])
    scaled = first_proposal("scaled", [f"drafter.calibration={warm}", f"drafter.min_survival={threshold}"])
    if c_1 < calibrated_c_1:  # raw below the threshold: nothing offered raw, x_1 calibrated
        assert int(raw.num_tokens[0]) == 0 and int(scaled.num_tokens[0]) >= 1
    else:
        assert int(raw.num_tokens[0]) >= 1 and int(scaled.num_tokens[0]) == 0
    assert float(scaled.confidence[0, 0]) == pytest.approx(float(calibrated_c_1), abs=1e-5)


def test_bad_calibration_inputs(tmp_path):
    bad = tmp_path / "calibration.json"
    bad.write_text('{"temperatures": [1.0, -2.0, 1.0]}')
    for config, setup in SETUPS.items():
        with pytest.raises(ValueError, match="expected at least 3 positive temperatures"):
            dspark.build_pipeline(config, overrides=[*setup, f"drafter.calibration={bad}"])
    short = tmp_path / "short.json"
    short.write_text('{"temperatures": [1.0, 2.0]}')
    with pytest.raises(ValueError, match=r"expected at least 3 positive temperatures .* got \[1.0, 2.0\]"):
        dspark.build_pipeline("eagle3", overrides=[*SETUPS["eagle3"], f"drafter.calibration={short}"])
    with pytest.raises(ValueError, match=r"needs a drafter whose proposals carry confidences .* got 'ngram'"):
        calibrate("ngram", [f"target.random={TINY}", "target.tokenizer=bytes", "target.device=cpu"], num_prompts=1)
    with pytest.raises(ValueError, match="drafter.path: null.*output="):
        calibrate("eagle3", SETUPS["eagle3"], num_prompts=1)


def test_profile_command_writes_a_cost_table_the_scheduler_loads(tmp_path, capsys):
    output = tmp_path / "sps.json"
    assert main(["profile", "--config", "ar", "--tokens", "1,2,4", "--context-length", "32", "--output", str(output),
                 f"target.random={TINY}", "target.tokenizer=bytes", "target.device=cpu"]) == 0
    table = ThroughputProfile.load(output)
    assert table.token_counts == [1, 2, 4] and table.dtype == "float32"
    assert "| 4 |" in capsys.readouterr().out
    pipe = dspark.build_pipeline("dspark", overrides=[*COMMON, "scheduler.name=dspark", f"scheduler.profile={output}"])
    assert pipe.engine.scheduler.profile == table
    with pytest.raises(ValueError, match=r"another set-up: dtype 'float32' \(this run: 'float64'\)"):
        dspark.build_pipeline("dspark", overrides=[*COMMON, "scheduler.name=dspark", f"scheduler.profile={output}",
                                                   "target.dtype=float64"])
