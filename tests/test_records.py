"""The batch's sampling settings: one shared record, or per-request columns."""

import pytest
import torch

from dspark.records import MixedSamplingParams, RowBias, SamplingParams, batch_params, is_on, per_row


def test_requests_that_agree_share_one_record():
    shared = SamplingParams(0.7, top_k=5)
    assert batch_params(shared, 4) is shared
    assert batch_params([SamplingParams(0.7, top_k=5), SamplingParams(0.7, 5)], 2) == shared


def test_settings_that_differ_become_columns_and_the_rest_stay_numbers():
    rows = [SamplingParams(0.0, repetition_penalty=1.3), SamplingParams(0.8, top_k=4, logit_bias=((2, 1.5), (6, -3.0))),
            SamplingParams(1.2, no_repeat_ngram_size=3), SamplingParams(0.8, no_repeat_ngram_size=2)]
    mixed = batch_params(rows, 4)
    assert isinstance(mixed, MixedSamplingParams)
    assert mixed.temperature.tolist() == [1.0, 0.8, 1.2, 0.8]  # greedy rows divide by 1, then go one-hot
    assert mixed.greedy_rows.tolist() == [True, False, False, False] and not mixed.greedy
    assert mixed.top_k.tolist() == [0, 4, 0, 0] and mixed.top_k_max == 4
    assert mixed.top_p == 1.0 and mixed.min_p == 0.0 and mixed.presence_penalty == 0.0  # shared: plain numbers
    assert mixed.repetition_penalty.tolist() == [1.3, 1.0, 1.0, 1.0]
    assert mixed.no_repeat_ngram_size.tolist() == [0, 0, 3, 2] and mixed.ngram_sizes == (2, 3)
    assert isinstance(mixed.logit_bias, RowBias)
    assert mixed.logit_bias.index.tolist() == [[0, 0], [2, 6], [0, 0], [0, 0]]
    assert mixed.logit_bias.values.tolist() == [[0.0, 0.0], [1.5, -3.0], [0.0, 0.0], [0.0, 0.0]]
    assert mixed.penalized
    # equality and hashing go by the requests' settings (graphs are keyed on them)
    again = batch_params(list(rows), 4)
    assert again == mixed and hash(again) == hash(mixed) and again != batch_params(rows[::-1], 4)


def test_all_greedy_requests_with_different_penalties_stay_greedy():
    mixed = batch_params([SamplingParams(0.0), SamplingParams(0.0, presence_penalty=0.5)], 2)
    assert mixed.greedy and mixed.greedy_rows is None and mixed.temperature == 0.0
    assert mixed.presence_penalty.tolist() == [0.0, 0.5]


def test_per_row_broadcasts_columns_over_a_rows_logits():
    logits = torch.zeros(3, 4, 5, dtype=torch.float64)
    assert per_row(0.5, logits) == 0.5
    column = per_row(torch.tensor([1.0, 2.0, 3.0]), logits)
    assert column.shape == (3, 1, 1) and column.dtype == torch.float64
    assert per_row(torch.tensor([1, 2, 3]), logits).dtype == torch.long
    assert is_on(torch.tensor([1.0, 1.2]), 1.0) and is_on(1.2, 1.0) and not is_on(1.0, 1.0)


def test_bad_batches_of_settings_are_refused():
    with pytest.raises(ValueError, match="one per request"):
        batch_params([SamplingParams(), SamplingParams(1.0)], 3)
    with pytest.raises(ValueError, match="one per request"):
        batch_params([SamplingParams(), {"temperature": 1.0}], 2)
    with pytest.raises(ValueError, match="top_p"):
        batch_params([SamplingParams(), SamplingParams(1.0, top_p=0.0)], 2)


def test_compiled_engines_hold_every_setting_that_is_on_in_a_column():
    """``columns=True`` (engine.compile): a new value is a new tensor value, not a new Python number
    for compiled code to specialise on; settings that are off stay numbers (no work)."""
    columns = batch_params(SamplingParams(0.8, top_p=0.9, top_k=5, logit_bias=((3, 1.0),)), 2, columns=True)
    assert columns.temperature.tolist() == [0.8, 0.8] and columns.top_p.tolist() == [0.9, 0.9]
    assert columns.top_k.tolist() == [5, 5] and columns.top_k_max == 8
    assert columns.logit_bias.index.tolist() == [[3], [3]] and columns.min_p == 0.0 and columns.presence_penalty == 0.0
    assert batch_params(SamplingParams(0.0), 2, columns=True) == SamplingParams(0.0)  # greedy, nothing on
    greedy_penalised = batch_params(SamplingParams(0.0, repetition_penalty=1.2), 2, columns=True)
    assert greedy_penalised.greedy and greedy_penalised.repetition_penalty.tolist() == [1.2, 1.2]
