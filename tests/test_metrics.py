"""Continual-learning metrics on a hand-computed accuracy matrix."""

import math

import pytest

from mllm_cl.metrics import (accuracy_matrix, average_accuracy, backward_transfer, forgetting, forward_transfer,
                             harmonic_mean, mean_accuracy_over_sequence, nl_delta, nl_omega, sequence_metrics,
                             vl_hmean)

NAN = float("nan")
# A[k][j]: accuracy on task j after learning task k (NaN: task not learned yet)
A = [[80.0, NAN, NAN],
     [60.0, 90.0, NAN],
     [70.0, 45.0, 50.0]]


def test_average_accuracy():
    assert average_accuracy(A, 0) == 80.0
    assert average_accuracy(A, 1) == 75.0  # (60 + 90) / 2
    assert average_accuracy(A) == pytest.approx(55.0)  # (70 + 45 + 50) / 3


def test_forgetting_is_best_earlier_minus_final():
    # task 0: best of rows 0..1 is 80, final 70 -> 10; task 1: best of row 1 is 90, final 45 -> 45
    assert forgetting(A) == [10.0, 45.0]
    assert forgetting([[50.0]]) == []


def test_backward_transfer():
    # ((70 - 80) + (45 - 90)) / 2 = -27.5
    assert backward_transfer(A) == -27.5
    assert backward_transfer([[10.0, NAN], [30.0, 5.0]]) == 20.0  # learning task 1 helped task 0
    with pytest.raises(ValueError, match="two tasks"):
        backward_transfer([[50.0]])


def test_harmonic_mean_with_a_zero():
    assert harmonic_mean([50.0, 25.0]) == pytest.approx(2 / (1 / 50 + 1 / 25))  # 33.33
    # a zero counts as 0.1%: 2 / (1/50 + 1/0.1) = 2 / 10.02
    assert harmonic_mean([50.0, 0.0]) == pytest.approx(0.1996007984)
    assert harmonic_mean({"a": 0.0}, zero_as=1.0) == 1.0
    for bad in ([], [-1.0], [math.nan]):
        with pytest.raises(ValueError):
            harmonic_mean(bad)


def test_paper_scores_and_delta_sign():
    base = nl_omega({"wsc273": 60.0, "winogrande": 50.0, "arc_easy": 40.0, "arc_challenge": 20.0})
    assert base == pytest.approx(4 / (1 / 60 + 1 / 50 + 1 / 40 + 1 / 20))
    worse = nl_omega([55.0, 45.0, 35.0, 15.0])
    assert nl_delta(base, worse) > 0  # forgotten
    assert nl_delta(base, nl_omega([65.0, 55.0, 45.0, 25.0])) < 0  # positive backward transfer
    assert nl_delta(40.0, 32.17) == pytest.approx(7.83)
    assert vl_hmean({"easy_vqa": 80.0, "gqa": 20.0}) == pytest.approx(32.0)


def test_bad_matrices_are_named():
    with pytest.raises(ValueError, match="square"):
        accuracy_matrix([[1.0, 2.0]])
    with pytest.raises(ValueError, match=r"entry \[1\]\[0\]"):
        average_accuracy([[1.0, NAN], [NAN, 2.0]])


def test_wilson_interval_against_hand_computed_values() -> None:
    from mllm_cl.metrics import wilson_interval

    # 8 of 10, z = 1.96: centre (0.8 + 0.19208) / 1.38416 = 0.71676, half 1.96 * sqrt(0.016 + 0.0096040) / 1.38416
    # = 0.22657 -> [49.02, 94.33]
    low, high = wilson_interval(8, 10, z=1.96)
    assert low == pytest.approx(49.02, abs=0.01) and high == pytest.approx(94.33, abs=0.01)
    # 0 of 20: [0, z^2 / (n + z^2)] = [0, 3.8416 / 23.8416] = [0, 16.11]
    low, high = wilson_interval(0, 20, z=1.96)
    assert low == 0.0 and high == pytest.approx(16.11, abs=0.01)
    with pytest.raises(ValueError):
        wilson_interval(3, 0)


def test_paired_bootstrap_delta_interval() -> None:
    from mllm_cl.metrics import bootstrap_delta_interval

    same = {"a": [1, 0] * 50, "b": [1, 1, 0, 0] * 25}
    assert bootstrap_delta_interval(same, same) == (0.0, 0.0)  # paired: identical answers, no spread at all
    base = {"a": [1] * 80 + [0] * 20}
    now = {"a": [1] * 40 + [0] * 60}  # Delta = 80 - 40 = 40 points
    low, high = bootstrap_delta_interval(base, now, resamples=4000, seed=1)
    assert low < 40 < high and 25 < low and high < 55
    assert bootstrap_delta_interval(base, now, seed=1) == bootstrap_delta_interval(base, now, seed=1)
    with pytest.raises(ValueError, match="same benchmarks"):
        bootstrap_delta_interval(base, {"b": [1]})


def test_the_cl_libraries_sequence_metrics_by_hand() -> None:
    a = [[80.0, 10.0, 20.0],
         [60.0, 90.0, 30.0],
         [50.0, 70.0, 95.0]]
    assert mean_accuracy_over_sequence(a) == pytest.approx((80 + 60 + 90 + 50 + 70 + 95) / 6)
    assert average_accuracy(a) == pytest.approx((50 + 70 + 95) / 3)
    # FWT: A[0][1] - b_1 and A[1][2] - b_2, b the zero-shot row
    assert forward_transfer(a, [5.0, 4.0, 25.0]) == pytest.approx(((10 - 4) + (30 - 25)) / 2)
    assert forward_transfer(a, [0.0, 10.0, 30.0]) == 0.0  # no help before learning
    with pytest.raises(ValueError, match="one zero-shot accuracy per task"):
        forward_transfer(a, [1.0, 2.0])
    with pytest.raises(ValueError, match="at least two tasks"):
        forward_transfer([[50.0]], [10.0])
    with pytest.raises(ValueError, match="just before it was learned"):
        forward_transfer([[80.0, float("nan")], [60.0, 90.0]], [0.0, 0.0])


def test_sequence_metrics_gather_the_figures_and_leave_undefined_ones_none() -> None:
    a = [[80.0, 30.0], [60.0, 90.0]]
    assert sequence_metrics(a, [10.0, 20.0]) == {"avg_acc": 75.0, "mean_acc": pytest.approx(230 / 3), "bwt": -20.0,
                                                  "fwt": 10.0, "mean_forgetting": 20.0}
    assert sequence_metrics(a)["fwt"] is None  # no zero-shot row
    assert sequence_metrics([[50.0]], [10.0]) == {"avg_acc": 50.0, "mean_acc": 50.0, "bwt": None, "fwt": None,
                                                  "mean_forgetting": None}
