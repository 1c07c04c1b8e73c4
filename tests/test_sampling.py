"""Frame sampling (METHOD.md "Frames"): TSN segments, short videos, multi-clip testing."""

import numpy as np
import pytest

from datasets import sample_indices

N, T = 300, 8
# Integer segment bounds floor(i*n/T) for n=300, T=8.
BOUNDS = [0, 37, 75, 112, 150, 187, 225, 262, 300]


def test_test_mode_centre_rule_takes_segment_middles():
    idx = sample_indices(N, T, "test", rule="centre")
    assert idx.shape == (1, T) and idx.dtype == np.int64
    # middle of segment i = floor(37.5 * i + 18.75)
    assert idx[0].tolist() == [18, 56, 93, 131, 168, 206, 243, 281]


# The published test code's frame choice, 1-based file numbers for T = 8, computed by hand from its formula
# int(i * n / T + (n / T - 1) / 2) (n > T) and floor(i * n / T) (n <= T), plus the 1-based file offset.
PUBLISHED_FRAMES = {
    5: [1, 1, 2, 2, 3, 4, 4, 5],         # n <= T: floor(i * 5 / 8)
    8: [1, 2, 3, 4, 5, 6, 7, 8],         # n == T: floor(i * 8 / 8)
    9: [1, 2, 3, 4, 5, 6, 7, 8],         # offset (9/8 - 1)/2 = 0.0625: i * 1.125 + 0.0625
    37: [2, 7, 12, 16, 21, 25, 30, 35],  # offset 1.8125: i * 4.625 + 1.8125
    79: [5, 15, 25, 35, 44, 54, 64, 74],  # offset 4.4375: i * 9.875 + 4.4375
    300: [19, 56, 94, 131, 169, 206, 244, 281],  # offset 18.25: i * 37.5 + 18.25
}


@pytest.mark.parametrize("n", sorted(PUBLISHED_FRAMES))
def test_published_rule_is_the_published_test_frame_choice(n):
    assert (sample_indices(n, T, "test")[0] + 1).tolist() == PUBLISHED_FRAMES[n]  # the default rule
    assert (sample_indices(n, T, "test", rule="published")[0] + 1).tolist() == PUBLISHED_FRAMES[n]


def test_published_rule_equals_its_float_formula_for_every_length():
    # The integer arithmetic must give exactly what the published float expression gives, for any n and T.
    for t in (1, 2, 3, 8, 16, 32):
        for n in range(1, 3001):
            if n <= t:
                ref = [i * n // t for i in range(t)]
            else:
                ref = [int(i * n / t + (n / t - 1) / 2.0) for i in range(t)]
            assert sample_indices(n, t, "test")[0].tolist() == ref, (n, t)


def test_the_two_rules_differ_where_the_issue_measured_it():
    # 930 of the frame counts 1..1000 give another frame somewhere in the clip (T = 8).
    differ = sum(not np.array_equal(sample_indices(n, T, "test"), sample_indices(n, T, "test", rule="centre"))
                 for n in range(1, 1001))
    assert differ == 930
    with pytest.raises(ValueError, match="published"):
        sample_indices(37, T, "test", rule="middle")


def test_train_mode_one_random_frame_per_segment_covers_each_segment():
    rng = np.random.default_rng(0)
    draws = np.stack([sample_indices(N, T, "train", rng=rng) for _ in range(3000)])  # (3000, T)
    assert draws.shape == (3000, T)
    for i in range(T):
        lo, hi = BOUNDS[i], BOUNDS[i + 1]
        assert draws[:, i].min() >= lo and draws[:, i].max() < hi, f"segment {i} left its bounds"
        # every frame of the segment is drawn at some point (about 80 times each on average)
        assert set(draws[:, i].tolist()) == set(range(lo, hi)), f"segment {i} not uniformly covered"


def test_short_video_test_mode_floor_rule():
    assert sample_indices(5, T, "test")[0].tolist() == [0, 0, 1, 1, 2, 3, 3, 4]


def test_short_video_train_mode_all_frames_plus_sorted_repeats():
    rng = np.random.default_rng(1)
    seen = set()
    for _ in range(200):
        idx = sample_indices(5, T, "train", rng=rng)
        assert idx.shape == (T,)
        assert set(idx.tolist()) == {0, 1, 2, 3, 4}, "every frame of a short video must be used"
        assert (np.diff(idx) >= 0).all(), "indices must stay in time order"
        seen.add(tuple(idx.tolist()))
    assert len(seen) > 5, "the repeats must be random"


def test_n_equals_T_uses_every_frame_once():
    assert sample_indices(8, 8, "test")[0].tolist() == list(range(8))
    for seed in range(20):
        assert sample_indices(8, 8, "train", rng=seed).tolist() == list(range(8))


def test_multi_clip_evenly_spaced_and_clip0_of_one_is_middle():
    for rule in ("published", "centre"):
        one = sample_indices(N, T, "test", num_clips=1, rule=rule)
        assert np.array_equal(one, sample_indices(N, T, "test", rule=rule))
    three = sample_indices(N, T, "test", num_clips=3, rule="centre")
    assert three.shape == (3, T)
    # clip c sits at (c + 0.5) / 3 of every segment of length 37.5
    expected = [[int(37.5 * i + 37.5 * (c + 0.5) / 3) for i in range(T)] for c in range(3)]
    assert three.tolist() == expected
    # the published rule puts every clip half a frame earlier
    published = sample_indices(N, T, "test", num_clips=3)
    assert published.tolist() == [[int(37.5 * i + 37.5 * (c + 0.5) / 3 - 0.5) for i in range(T)] for c in range(3)]
    assert (np.diff(three, axis=0) > 0).all(), "clips must be at distinct, increasing offsets"
    # all clips stay inside their segment
    for i in range(T):
        assert (three[:, i] >= BOUNDS[i]).all() and (three[:, i] < BOUNDS[i + 1]).all()


def test_multi_clip_short_video_repeats_the_only_clip():
    idx = sample_indices(5, T, "test", num_clips=4)
    assert idx.shape == (4, T)
    assert all(row.tolist() == [0, 0, 1, 1, 2, 3, 3, 4] for row in idx)


@pytest.mark.parametrize("t", [1, 3, 8, 16])
def test_indices_valid_for_many_lengths(t):
    rng = np.random.default_rng(2)
    for n in range(1, 120):
        tr = sample_indices(n, t, "train", rng=rng)
        te = sample_indices(n, t, "test", num_clips=2)
        assert tr.shape == (t,) and te.shape == (2, t)
        for idx in (tr, te[0], te[1]):
            assert idx.min() >= 0 and idx.max() < n, (n, t, idx)
            assert (np.diff(idx) >= 0).all(), (n, t, idx)
        if n >= t:
            assert len(set(tr.tolist())) == t, "one frame per segment: no repeats when n >= T"


def test_rng_reproducible_and_seed_dependent():
    a = sample_indices(N, T, "train", rng=np.random.default_rng(5))
    b = sample_indices(N, T, "train", rng=np.random.default_rng(5))
    c = sample_indices(N, T, "train", rng=np.random.default_rng(6))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_bad_arguments():
    with pytest.raises(ValueError, match="0 frames"):
        sample_indices(0, T, "test")
    with pytest.raises(ValueError, match="mode"):
        sample_indices(N, T, "val")
    with pytest.raises(ValueError, match="num_clips"):
        sample_indices(N, T, "train", num_clips=2)
