"""Rules that decide, before drafting, whether a round drafts: idle backoff and the measured fallback."""

import pytest

from dspark.scheduling.skipping import IdleBackoff, MeasuredFallback


def test_idle_backoff_doubles_and_resets():
    backoff, pattern = IdleBackoff(limit=4), []
    for widest in [0, 0, 0, 0, 2, 0]:  # what each drafted round verified
        while not backoff.wants_drafts():
            pattern.append("skip")
        pattern.append(f"draft:{widest}")
        backoff.observe(widest)
    assert pattern == ["draft:0", "skip", "draft:0", "skip", "skip", "draft:0", "skip", "skip", "skip", "skip",
                       "draft:0", "skip", "skip", "skip", "skip", "draft:2", "draft:0"]
    backoff.reset()
    assert backoff.wants_drafts()
    backoff.observe(0, offered=0)  # nothing was offered: no evidence either way
    assert backoff.wants_drafts()
    never = IdleBackoff(limit=0)
    never.observe(0)
    assert never.wants_drafts()

def run_rounds(fallback: MeasuredFallback, rounds: int, seconds: dict, tokens: dict, batch_size: int = 4) -> str:
    """Drive the fallback with a fixed cost per kind of round: 'D' drafted, 'p' plain, in order."""
    pattern = ""
    for _ in range(rounds):
        drafted = fallback.wants_drafts(batch_size)
        fallback.timed(batch_size, drafted, seconds[drafted], tokens[drafted])
        pattern += "D" if drafted else "p"
    return pattern


def test_measured_fallback_tries_both_then_probes_the_slower_kind_ever_less_often():
    fallback = MeasuredFallback(window=4, probe_limit=8)
    # drafted rounds take 3 s for 2 tokens per request (0.67/s), plain 1 s for 1 (1/s): plain wins.
    # Drafting twice, plain twice (samples of each), then plain with a drafted probe after 1, 2, 4,
    # 8, 8, … plain rounds
    pattern = run_rounds(fallback, 40, seconds={True: 3.0, False: 1.0}, tokens={True: 2.0, False: 1.0})
    assert pattern == "DDppp" + "D" + "pp" + "D" + "pppp" + "D" + "pppppppp" + "D" + "pppppppp" + "D" + "pppppppp"
    assert fallback.rates(4) == (pytest.approx(2 / 3), 1.0)
    assert fallback.rates(8) == (None, None)  # another batch size knows nothing yet


def test_measured_fallback_drafts_when_drafting_pays_and_notices_a_change():
    fallback = MeasuredFallback(window=2, probe_limit=4)
    fast = run_rounds(fallback, 20, seconds={True: 1.5, False: 1.0}, tokens={True: 3.0, False: 1.0})
    # after two samples of each, draft; probe plain after 1, 2, 4, 4 drafted rounds
    assert fast == "DDpp" + "D" + "p" + "DD" + "p" + "DDDD" + "p" + "DDDD" + "p" + "D"
    # drafting stops paying (acceptance drops): once the window holds only slow drafted rounds, the
    # fallback runs plain rounds, probing drafting after 1, 2, 4 of them
    slow = run_rounds(fallback, 12, seconds={True: 1.5, False: 1.0}, tokens={True: 1.0, False: 1.0})
    assert slow == "DD" + "p" + "D" + "pp" + "D" + "pppp" + "D"
    assert fallback.rates(4) == (pytest.approx(1 / 1.5), 1.0)


def test_a_new_batch_size_starts_from_the_nearest_settled_one():
    fallback = MeasuredFallback(window=4, probe_limit=8)
    slow_drafts = dict(seconds={True: 3.0, False: 1.0}, tokens={True: 2.0, False: 1.0})
    run_rounds(fallback, 40, **slow_drafts, batch_size=4)
    assert (fallback.arms[4].faster, fallback.arms[4].interval) == (False, 8)
    # batch 6 measures both kinds, then keeps batch 4's lead and probe interval: no probes after
    # 1, 2, 4 rounds again
    assert run_rounds(fallback, 14, **slow_drafts, batch_size=6) == "DDpp" + "pppppppp" + "D" + "p"
    # a prior is overturned by the batch size's own rates: drafting pays at batch 32
    fast_drafts = dict(seconds={True: 1.5, False: 1.0}, tokens={True: 3.0, False: 1.0})
    assert run_rounds(fallback, 8, **fast_drafts, batch_size=32) == "DDpp" + "D" + "p" + "DD"
    assert fallback.arms[32].faster is True
    fallback._arms(20)  # nearer 32 (ratio 1.6) than 6 (3.3)
    assert fallback.arms[20].faster is True
    # the nearest by ratio, the smaller on a tie: 4 is as near 2 as 8
    fallback = MeasuredFallback(window=4, probe_limit=8)
    run_rounds(fallback, 12, **fast_drafts, batch_size=2)
    run_rounds(fallback, 40, **slow_drafts, batch_size=8)
    fallback._arms(4)
    assert fallback.arms[4].faster is True and fallback.arms[4].interval == fallback.arms[2].interval


def test_measured_rates_are_ratios_of_sums_without_outliers():
    fallback = MeasuredFallback(window=6)
    # prompt lookup: a round without a match emits 1 token, a matched one 5 (both ~1.2 s); most
    # rounds find nothing, so a median would call drafting slower than plain (1 token per second)
    for tokens in [1, 1, 5, 1, 1, 5]:
        fallback.timed(1, True, 1.2, tokens)
    fallback.timed(1, False, 1.0, 1.0)
    fallback.timed(1, False, 100.0, 1.0)  # a compilation: left out
    fallback.timed(1, False, 1.0, 1.0)
    drafted, plain = fallback.rates(1)
    assert drafted == pytest.approx(14 / (6 * 1.2)) and plain == pytest.approx(1.0)
    assert fallback.wants_drafts(1)


def test_the_lead_changes_only_by_more_than_the_margin():
    fallback = MeasuredFallback(window=2, probe_limit=4)
    run_rounds(fallback, 10, seconds={True: 1.0, False: 1.0}, tokens={True: 1.2, False: 1.0})
    assert fallback.arms[4].faster is True
    # plain becomes 3% faster than drafting: within the margin, drafting keeps the lead
    run_rounds(fallback, 10, seconds={True: 1.0, False: 1.0}, tokens={True: 1.0, False: 1.03})
    assert fallback.arms[4].faster is True
    run_rounds(fallback, 10, seconds={True: 1.0, False: 1.0}, tokens={True: 1.0, False: 1.1})
    assert fallback.arms[4].faster is False


def test_bad_fallback_settings_are_refused():
    with pytest.raises(ValueError, match="window must be >= 2, got 1"):
        MeasuredFallback(window=1)
    with pytest.raises(ValueError, match="probe_limit must be >= 1, got 0"):
        MeasuredFallback(probe_limit=0)
