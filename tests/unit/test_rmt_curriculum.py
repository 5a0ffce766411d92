"""The RMT curriculum: segments per training sample as a pure function of the step."""
from __future__ import annotations

import pytest

from memtrain.model.errors import ModelConfigError
from memtrain.model.memory.rmt.model import RMTConfig, segments_for_step, tokens_for_step

SCHEDULE = [[0, 1], [100, 2], [200, 4], [300, 8]]


@pytest.mark.parametrize("step, segments", [(0, 1), (99, 1), (100, 2), (199, 2), (200, 4), (299, 4), (300, 8),
                                            (10**9, 8)])
def test_segments_for_step_follows_the_schedule(step, segments):
    assert segments_for_step(SCHEDULE, step) == segments


def test_a_schedule_may_also_shrink_and_single_entries_hold_forever():
    assert [segments_for_step([[0, 4], [10, 2]], s) for s in (0, 9, 10, 11)] == [4, 4, 2, 2]
    assert segments_for_step([[0, 3]], 12345) == 3


def test_tokens_for_step_truncates_to_whole_segments():
    cfg = RMTConfig(segment_len=16, curriculum=SCHEDULE)
    assert [tokens_for_step(cfg, s, seq_len=100) for s in (0, 100, 200, 300)] == [16, 32, 64, 100]
    assert tokens_for_step(RMTConfig(segment_len=16), 0, seq_len=100) == 100  # no curriculum: everything


@pytest.mark.parametrize("curriculum, step, error", [
    ([], 0, ValueError),
    ([[0, 1]], -1, ValueError),
    ([[1, 1]], 5, ModelConfigError),
    ([[0, 1], [0, 2]], 5, ModelConfigError),
    ([[0, 2], [5, 0]], 5, ModelConfigError),
])
def test_bad_schedules_raise(curriculum, step, error):
    with pytest.raises(error):
        segments_for_step(curriculum, step)
