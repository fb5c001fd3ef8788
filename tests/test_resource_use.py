import mmap

import numpy as np

from memprobe.resource_use import stage_cost

MiB = 2**20


def _touch_fresh_pages(size: int) -> None:
    """Fault in `size` bytes of new anonymous memory, then unmap it.

    An anonymous mmap, not np.ones: after a long test session malloc can serve a large array from
    heap memory that is already resident, and the RSS would not move at all."""
    region = mmap.mmap(-1, size)
    pages = np.frombuffer(region, dtype=np.uint8)
    pages[::4096] = 1
    del pages
    region.close()


def test_stage_cost_sees_a_stage_peak_after_a_larger_earlier_one():
    _touch_fresh_pages(400 * MiB)  # an earlier, larger peak of this process
    with stage_cost() as cost:
        _touch_fresh_pages(150 * MiB)
    assert cost["seconds"] > 0
    if not cost["peak_is_lifetime"]:  # Linux: the counter was reset, so the peak is this stage's
        assert 120 < cost["peak_rss_mb"] - cost["rss_before_mb"] < 300
