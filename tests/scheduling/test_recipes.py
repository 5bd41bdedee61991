"""``dspark calibrate`` and ``dspark profile`` end to end on tiny random models."""

import json
from pathlib import Path

import pytest
import torch

import dspark
from dspark.cli import main
from dspark.records import batch_params
from dspark.scheduling import ThroughputProfile
from dspark.scheduling.recipes import calibrate

TINY = ("{model_type: llama, vocab_size: 258, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
        "num_attention_heads: 2, num_key_value_heads: 1, head_dim: 16, max_position_embeddings: 512, seed: 0}")
COMMON = [f"target.random={TINY}", "target.tokenizer=bytes", "target.device=cpu", "drafter.path=null",
          "drafter.rank=8", "drafter.num_speculative_tokens=3"]
# the drafters whose confidences dspark calibrate fits (randomly initialised, γ = 3)
# the batch settings a calibration map is chosen by: sampled (False) or greedy (True)
MODES = {False: dspark.SamplingParams(1.0), True: dspark.SamplingParams(0.0)}
SETUPS = {"dspark": COMMON,
          "eagle3": [f"target.random={TINY}", "target.tokenizer=bytes", "target.device=cpu", "drafter.path=null",
                     "drafter.num_speculative_tokens=3"],
          "draft_model": [f"target.random={TINY}", "target.tokenizer=bytes", "target.device=cpu", "drafter.path=null",
                          f"drafter.random={TINY.replace('seed: 0', 'seed: 1')}", "drafter.num_speculative_tokens=3"],
          "early_exit": [f"target.random={TINY}", "target.tokenizer=bytes", "target.device=cpu", "drafter.exit_layer=1",
                         "drafter.num_speculative_tokens=3"]}


@pytest.mark.parametrize("config", sorted(SETUPS))
def test_calibrate_records_fits_and_the_drafter_applies_the_temperatures(tmp_path, config):
    setup = SETUPS[config]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"line {i}: def f(x): return x + {i}"}) + "\n" for i in range(6)))
    # (a plot path without an extension: matplotlib writes PNG under name.png, which the report names)
    output, plot = tmp_path / "calibration.json", tmp_path / ("reliability" if config == "dspark" else "reliability.png")
    report = calibrate(config, setup, prompts=str(prompts), num_prompts=6, max_new_tokens=12, batch_size=3,
                       output=str(output), plot=str(plot))
    assert report["request_rounds"] >= 12 and len(report["temperatures"]) == 3 and report["drafter"] == config
    # each drafter's own method: STS for DSpark's trained confidence head, Platt for a top probability
    assert report["method"] == {"dspark": "sts", "eagle3": "platt", "draft_model": "platt", "early_exit": "platt"}[config]
    assert report["map"] == "sampled"
    assert (report["method"] == "platt") or report["biases"] == [0.0, 0.0, 0.0]
    assert [row["position"] for row in report["after"]] == [1, 2, 3]
    assert report["plot"] == (f"{plot}.png" if config == "dspark" else str(plot))
    assert Path(report["plot"]).stat().st_size > 1000
    saved = json.loads(output.read_text())
    assert saved["temperatures"] == report["temperatures"] and saved["biases"] == report["biases"]
    raw = dspark.build_pipeline(config, overrides=[*setup, "drafter.calibration=null"])
    scaled = dspark.build_pipeline(config, overrides=[*setup, f"drafter.calibration={output}"])
    temperatures, biases = (torch.tensor(report[key], dtype=torch.float64) for key in ("temperatures", "biases"))
    assert torch.equal(scaled.drafter.calibration.sampled[0], temperatures)
    assert torch.equal(scaled.drafter.calibration.sampled[1], biases)
    seen = {}
    for name, pipe in (("raw", raw), ("scaled", scaled)):
        original = pipe.drafter.propose
        pipe.drafter.propose = lambda state, u, o=original, n=name: seen.setdefault(n, o(state, u))
        pipe.generate([[5, 6, 7]], max_new_tokens=3, ignore_eos=True)
    assert torch.equal(seen["raw"].tokens, seen["scaled"].tokens)  # the drafts themselves are untouched
    expected = torch.sigmoid(torch.logit(seen["raw"].confidence.double()) / temperatures + biases)
    assert torch.allclose(seen["scaled"].confidence.double(), expected, atol=1e-6)


def test_greedy_and_sampling_maps_share_one_file(tmp_path):
    """Calibrating at temperature 0 writes the file's greedy map beside its sampling map; the
    drafter applies each in its own mode (a file without a greedy map applies its map to both)."""
    setup = SETUPS["eagle3"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"x = {i} * y  # {i}"}) + "\n" for i in range(4)))
    output = tmp_path / "calibration.json"
    sampled = calibrate("eagle3", setup, prompts=str(prompts), num_prompts=4, max_new_tokens=12, batch_size=2,
                        output=str(output), temperature=1.0, method="sts")
    assert sampled["biases"] == [0.0, 0.0, 0.0]
    both_modes = dspark.build_pipeline("eagle3", overrides=[*setup, f"drafter.calibration={output}"]).drafter.calibration
    assert both_modes.greedy is both_modes.sampled
    greedy = calibrate("eagle3", setup, prompts=str(prompts), num_prompts=4, max_new_tokens=12, batch_size=2,
                       output=str(output), temperature=0.0)
    assert greedy["map"] == "greedy" and greedy["method"] == "platt"
    saved = json.loads(output.read_text())
    assert saved["temperatures"] == sampled["temperatures"] and saved["greedy"]["biases"] == greedy["biases"]
    calibration = dspark.build_pipeline("eagle3", overrides=[*setup, f"drafter.calibration={output}"]).drafter.calibration
    c = torch.tensor([[0.2, 0.5, 0.9]])
    for mode, report in ((False, sampled), (True, greedy)):
        expected = torch.sigmoid(torch.logit(c.double()) / torch.tensor(report["temperatures"])
                                 + torch.tensor(report["biases"]))
        assert torch.allclose(calibration.apply(c, 0, 3, MODES[mode]).double(), expected, atol=1e-6)
        assert torch.allclose(calibration.apply(c[:, 1:], 1, 3, MODES[mode]).double(), expected[:, 1:], atol=1e-6)
    # recalibrating the sampling map keeps the greedy one
    calibrate("eagle3", setup, prompts=str(prompts), num_prompts=4, max_new_tokens=12, batch_size=2,
              output=str(output), temperature=1.0, seed=5)
    assert json.loads(output.read_text())["greedy"] == saved["greedy"]
    # the maps of one file cover the same positions: a greedy fit at γ = 3 beside a 2-position sampling map is
    # refused; a sampling fit over a file with no greedy map replaces its map whatever it covered
    short = tmp_path / "short.json"
    short.write_text(json.dumps({"temperatures": [1.0, 1.0]}))
    with pytest.raises(ValueError, match="its sampling map covers 2 draft positions, fewer than the 3 fitted now"):
        calibrate("eagle3", setup, prompts=str(prompts), num_prompts=4, output=str(short), temperature=0.0)
    calibrate("eagle3", setup, prompts=str(prompts), num_prompts=4, max_new_tokens=12, output=str(short))
    assert len(json.loads(short.read_text())["temperatures"]) == 3
    # a greedy map alone leaves sampled confidences raw
    only_greedy = tmp_path / "greedy_only.json"
    only_greedy.write_text(json.dumps({"greedy": {"temperatures": [2.0, 2.0, 2.0]}}))
    calibration = dspark.build_pipeline("eagle3", overrides=[*setup, f"drafter.calibration={only_greedy}"]
                                        ).drafter.calibration
    assert torch.equal(calibration.apply(c, 0, 3, MODES[False]), c)
    assert torch.allclose(calibration.apply(c, 0, 3, MODES[True]).double(), torch.sigmoid(torch.logit(c.double()) / 2))
    # greedy and sampled requests in one batch: each row by its own map
    rows = torch.tensor([[0.2, 0.5, 0.9], [0.3, 0.6, 0.8]])
    mixed = batch_params([dspark.SamplingParams(1.0), dspark.SamplingParams(0.0)], 2)
    assert torch.equal(calibration.apply(rows, 0, 3, mixed),
                       torch.stack([calibration.apply(rows[:1], 0, 3, MODES[False])[0],
                                    calibration.apply(rows[1:], 0, 3, MODES[True])[0]]))


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
    random_draft = [s for s in SETUPS["draft_model"] if s != "drafter.path=null"]  # path left at the shipped model's
    with pytest.raises(ValueError, match=r"no checkpoint directory .* or drafter.random"):
        calibrate("draft_model", random_draft, num_prompts=1)
    with pytest.raises(ValueError, match=r"or early_exit, which drafts with the target's layers\): name the file"):
        calibrate("early_exit", SETUPS["early_exit"], num_prompts=1)
    shipped = Path(dspark.__file__).parent / "assets" / "dspark-tiny" / "eagle3" / "calibration.json"
    before = shipped.read_bytes()
    with pytest.raises(ValueError, match=r"is a checkpoint shipped with dspark: .* output= \(--output FILE\)"):
        calibrate("eagle3", ["target.device=cpu"], num_prompts=1)  # (refused before anything is decoded)
    assert shipped.read_bytes() == before
    with pytest.raises(ValueError, match="method must be one of sts, platt, got 'isotonic'"):
        calibrate("eagle3", SETUPS["eagle3"], num_prompts=1, output=str(tmp_path / "c.json"), method="isotonic")
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        calibrate("eagle3", SETUPS["eagle3"], num_prompts=1, output=str(tmp_path / "c.json"), batch_size=0)
    for name in ("num_prompts", "max_new_tokens"):  # (num_prompts=0 failed in torch.cat after decoding nothing)
        with pytest.raises(ValueError, match=f"{name} must be an integer >= 1, got 0"):
            calibrate("eagle3", SETUPS["eagle3"], output=str(tmp_path / "c.json"), **{"num_prompts": 1, name: 0})
    with pytest.raises(FileNotFoundError, match=r"prompt set '\S*nowhere.jsonl' is neither a shipped one \(code, prose"):
        calibrate("eagle3", SETUPS["eagle3"], prompts=str(tmp_path / "nowhere.jsonl"), output=str(tmp_path / "c.json"))
    with pytest.raises(ValueError, match="temperature must be a number >= 0"):
        calibrate("eagle3", SETUPS["eagle3"], num_prompts=1, output=str(tmp_path / "c.json"), temperature=-1.0)
    other = tmp_path / "dspark_calibration.json"  # a map of another drafter's is not added to (nor replaced)
    other.write_text('{"temperatures": [1.0, 1.0, 1.0], "drafter": "dspark"}')
    with pytest.raises(ValueError, match="fitted for drafter 'dspark', not for this 'eagle3' drafter"):
        calibrate("eagle3", SETUPS["eagle3"], num_prompts=1, output=str(other), temperature=0.0)
    short_greedy = "its greedy map covers 1 draft positions, fewer than the 3 fitted now"
    for content, message, when_fitting in (
            ('{"temperatures": [1.0, 1.0, 1.0], "biases": [0.0, 1.0]}', "expected 3 finite biases", None),
            ('{"greedy": [1.0, 1.0, 1.0]}', "no 'temperatures'", None),
            ('{"temperatures": [1.0, 1.0, 1.0], "greedy": 3}', "'greedy' must be an object", None),
            ('{"greedy": {"temperatures": [1.0]}}', "at least 3 positive temperatures .* in 'greedy'", short_greedy),
            ('not json', "cannot read confidence temperatures", None)):
        bad.write_text(content)
        with pytest.raises(ValueError, match=message):
            dspark.build_pipeline("eagle3", overrides=[*SETUPS["eagle3"], f"drafter.calibration={bad}"])
        with pytest.raises(ValueError, match=when_fitting or message):  # refused before recording, not overwritten
            calibrate("eagle3", SETUPS["eagle3"], num_prompts=1, output=str(bad))
        assert bad.read_text() == content


def test_a_missing_or_short_prompt_set_is_refused_before_calibrate_loads_the_models(tmp_path, monkeypatch):
    import dspark.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("the target loaded before the check"))
    output = str(tmp_path / "c.json")
    with pytest.raises(FileNotFoundError, match=r"prompt set '\S*nowhere.jsonl' is neither a shipped one"):
        calibrate("eagle3", SETUPS["eagle3"], prompts=str(tmp_path / "nowhere.jsonl"), output=output)
    with pytest.raises(ValueError, match="num_prompts is 500 but prompt set 'calibration' has 120 prompts"):
        calibrate("eagle3", SETUPS["eagle3"], num_prompts=500, output=output)


def test_an_output_path_that_cannot_be_written_is_refused_before_the_models_load(tmp_path, monkeypatch):
    """calibrate's --output and --plot and profile's --output: a directory, or a path under a file,
    failed with a traceback (or matplotlib wrote DIR.png) once everything had been decoded or measured."""
    import dspark.pipeline as pipeline
    from dspark.scheduling.recipes import profile

    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("the target loaded before the check"))
    taken = tmp_path / "taken"
    taken.write_text("")
    good = str(tmp_path / "c.json")
    for path, problem in ((tmp_path, "is a directory: name a file"), (taken / "c.json", "is a file, not a directory")):
        with pytest.raises(ValueError, match=f"output '{path}' .*{problem}"):
            calibrate("eagle3", SETUPS["eagle3"], num_prompts=1, output=str(path))
        with pytest.raises(ValueError, match=f"plot '{path}' .*{problem}"):
            calibrate("eagle3", SETUPS["eagle3"], num_prompts=1, output=good, plot=str(path))
        with pytest.raises(ValueError, match=f"output '{path}' .*{problem}"):
            profile("ar", output=str(path))


def test_profile_creates_the_output_s_directory_and_refuses_a_context_past_the_model_s_positions(tmp_path):
    from dspark.scheduling.recipes import profile

    output = tmp_path / "new" / "sps.json"  # (a missing directory failed after measuring)
    profile("ar", [f"target.random={TINY}", "target.tokenizer=bytes", "target.device=cpu"], token_counts=[1, 2],
            context_length=8, repeats=1, output=str(output))
    assert ThroughputProfile.load(output).token_counts == [1, 2]

    with pytest.raises(ValueError, match=r"context_length must be below the target's max_position_embeddings \(512\).*"
                                         "got 512"):  # (it measured positions the model never serves)
        profile("ar", [f"target.random={TINY}", "target.tokenizer=bytes", "target.device=cpu"], token_counts=[1],
                context_length=512, repeats=1, output=str(output))


def test_bad_profile_inputs_are_refused_before_the_target_loads(tmp_path, capsys, monkeypatch):
    import dspark.pipeline as pipeline
    from dspark.scheduling.recipes import profile

    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("the target loaded before the check"))
    for counts in ([0, 4], [4, 2], [], [1, 1], [1.5]):
        with pytest.raises(ValueError, match=r"token_counts must be increasing integers >= 1 \(tokens in one forward\)"):
            profile("ar", token_counts=counts, output=str(tmp_path / "p.json"))
    for name, value in (("context_length", -1), ("repeats", 0)):
        with pytest.raises(ValueError, match=f"{name} must be an integer >= "):
            profile("ar", **{name: value}, output=str(tmp_path / "p.json"))
    for bad in ("1,a", "", "1,,2"):  # a usage error, like any other bad flag: exit status 2, "error:" named
        with pytest.raises(SystemExit) as exited:
            main(["profile", "--config", "ar", "--tokens", bad, "--output", str(tmp_path / "p.json")])
        assert exited.value.code == 2
        assert (f"dspark profile: error: argument --tokens: takes increasing integers >= 1 separated by commas, "
                f"e.g. 1,2,4,8; got {bad!r}") in capsys.readouterr().err
    assert main(["profile", "--config", "ar", "--tokens", "0,4", "--output", str(tmp_path / "p.json")]) == 2
    assert "token_counts must be increasing integers >= 1" in capsys.readouterr().err


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
