"""The metrics' text: cumulative histogram buckets, one sample per line, every series named."""

from dspark.serving.metrics import BUCKETS, Histogram, ServerMetrics, render


def test_histogram_buckets_are_cumulative():
    histogram = Histogram()
    for value in (0.004, 0.01, 0.3, 100.0):
        histogram.observe(value)
    counts = dict(zip(BUCKETS, histogram.counts))
    assert counts[0.005] == 1 and counts[0.01] == 2 and counts[0.25] == 2 and counts[0.5] == 3 and counts[60.0] == 3
    assert histogram.count == 4 and abs(histogram.sum - 100.314) < 1e-9


def test_render_writes_every_series():
    text = render(ServerMetrics(), model="m", running=2, waiting=5, reached=[4, 3], accepted_at=[3, 1],
                  prefix_queries=9, prefix_hits=4)
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert 'dspark:num_requests_running{model_name="m"} 2' in lines
    assert 'dspark:num_requests_waiting{model_name="m"} 5' in lines
    assert 'dspark:spec_decode_num_accepted_tokens_per_pos{model_name="m",position="1"} 1' in lines
    assert 'dspark:time_to_first_token_seconds_bucket{model_name="m",le="+Inf"} 0' in lines
    assert 'dspark:prefix_cache_queries_total{model_name="m"} 9' in lines
    assert 'dspark:prefix_cache_hits_total{model_name="m"} 4' in lines
    assert all(len(line.rsplit(" ", 1)) == 2 for line in lines)
    assert text.count("# TYPE") == 15
