import numpy as np

from memprobe.resource_use import stage_cost


def test_stage_cost_sees_a_stage_peak_after_a_larger_earlier_one():
    big = np.ones(400 * 2**20 // 8)  # an earlier, larger peak of this process
    del big
    with stage_cost() as cost:
        block = np.ones(150 * 2**20 // 8)
        block[::4096] += 1
        del block
    assert cost["seconds"] > 0
    if not cost["peak_is_lifetime"]:  # Linux: the counter was reset, so the peak is this stage's
        assert 120 < cost["peak_rss_mb"] - cost["rss_before_mb"] < 300
