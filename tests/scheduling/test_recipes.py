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


def test_calibrate_records_fits_and_the_drafter_applies_the_temperatures(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"line {i}: def f(x): return x + {i}"}) + "\n" for i in range(6)))
    output, plot = tmp_path / "calibration.json", tmp_path / "reliability.png"
    report = calibrate("dspark", COMMON, prompts=str(prompts), num_prompts=6, max_new_tokens=12, batch_size=3,
                       output=str(output), plot=str(plot))
    assert report["request_rounds"] >= 12 and len(report["temperatures"]) == 3
    assert [row["position"] for row in report["after"]] == [1, 2, 3]
    assert plot.stat().st_size > 1000
    saved = json.loads(output.read_text())
    assert saved["temperatures"] == report["temperatures"]
    raw = dspark.build_pipeline("dspark", overrides=[*COMMON, "drafter.calibration=null"])
    scaled = dspark.build_pipeline("dspark", overrides=[*COMMON, f"drafter.calibration={output}"])
    assert torch.equal(scaled.drafter.temperatures, torch.tensor(report["temperatures"], dtype=torch.float64))
    seen = {}
    for name, pipe in (("raw", raw), ("scaled", scaled)):
        original = pipe.drafter.propose
        pipe.drafter.propose = lambda state, u, o=original, n=name: seen.setdefault(n, o(state, u))
        pipe.generate([[5, 6, 7]], max_new_tokens=3, ignore_eos=True)
    expected = torch.sigmoid(torch.logit(seen["raw"].confidence.double()) / torch.tensor(report["temperatures"]))
    assert torch.allclose(seen["scaled"].confidence.double(), expected, atol=1e-6)


def test_bad_calibration_inputs(tmp_path):
    bad = tmp_path / "calibration.json"
    bad.write_text('{"temperatures": [1.0, -2.0, 1.0]}')
    with pytest.raises(ValueError, match="expected 3 positive temperatures"):
        dspark.build_pipeline("dspark", overrides=[*COMMON, f"drafter.calibration={bad}"])
    with pytest.raises(ValueError, match="needs the dspark drafter"):
        calibrate("ngram", [f"target.random={TINY}", "target.tokenizer=bytes", "target.device=cpu"], num_prompts=1)


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
