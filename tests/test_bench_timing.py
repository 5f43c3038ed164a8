"""Interleaved repeated timing: the round-robin order, the median and spread of each row, and the noisy flag."""

import time

import pytest

from diffexit.app.bench.timing import NOISY_BAND, REPEATS, Timed, is_noisy, time_interleaved


def test_rows_run_round_robin_alternating_and_keep_their_last_result():
    order, counts = [], {"a": 0, "b": 0, "c": 0}

    def call(name):
        def run():
            order.append(name)
            counts[name] += 1
            return (name, counts[name])
        return run

    timed = time_interleaved({n: call(n) for n in "abc"}, repeats=4)
    assert order == list("abc" "cba" "abc" "cba")
    assert list(timed) == ["a", "b", "c"]
    assert all(len(t.seconds) == 4 and t.result == (n, 4) for n, t in timed.items())


def test_the_median_and_spread_are_of_the_repeats():
    t = Timed((0.3, 0.1, 0.25, 0.2))
    assert t.median == pytest.approx(0.225) and t.spread == pytest.approx(0.2)
    assert Timed((2.0, 1.0, 5.0)).figures() == {"seconds": 2.0, "seconds_spread": 4.0, "repeats": 3}


def test_a_slow_row_measures_at_least_its_sleep():
    timed = time_interleaved({"slow": lambda: time.sleep(0.02), "fast": lambda: None})
    assert min(timed["slow"].seconds) >= 0.02
    assert len(timed["fast"].seconds) == REPEATS


@pytest.mark.parametrize("repeats", [2, 0, 3.0, True])
def test_fewer_than_three_repeats_are_refused(repeats):
    with pytest.raises(ValueError, match="repeats must be an int >= 3"):
        time_interleaved({"a": lambda: None}, repeats=repeats)


def test_nothing_to_time_is_refused():
    with pytest.raises(ValueError, match="at least one call"):
        time_interleaved({})


def test_noisy_flags_wall_ratios_outside_the_band_of_the_pass_ratio():
    low, high = NOISY_BAND
    passes = 4.0
    assert is_noisy(passes, passes) is False
    assert is_noisy(low * passes, passes) is False and is_noisy(high * passes, passes) is False
    assert is_noisy(0.99 * low * passes, passes) is True and is_noisy(1.01 * high * passes, passes) is True
    # The case: a row measured while the machine was busy, 5x above its pass ratio.
    assert is_noisy(12.5, 2.5) is True
    assert is_noisy(None, 2.0) is None and is_noisy(2.0, None) is None
    with pytest.raises(ValueError, match="pass speedup is positive"):
        is_noisy(1.0, 0.0)
