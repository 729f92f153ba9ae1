"""The dashboard's arithmetic on exact readings: bucket quantiles, windows, rates."""

from __future__ import annotations

import math

import pytest

from frontend.dashboard import Reading, Readings, quantile

INF = math.inf
BOUNDS = [0.1, 0.5, 1.0, INF]


def reading(at: float, tokens_out: float, itl: list[float]) -> Reading:
    return Reading(at, {"generation_tokens": tokens_out}, {"itl": (BOUNDS, itl)})


def test_quantile_interpolates_inside_its_bucket() -> None:
    # 10 observations: 4 up to 0.1 s, 4 in (0.1, 0.5], 2 in (0.5, 1.0]
    cumulative = [4.0, 8.0, 10.0, 10.0]
    assert quantile(0.5, BOUNDS, cumulative) == pytest.approx(0.1 + 0.4 * (5 - 4) / 4)
    assert quantile(0.2, BOUNDS, cumulative) == pytest.approx(0.1 * 2 / 4)
    assert quantile(0.9, BOUNDS, cumulative) == pytest.approx(0.5 + 0.5 * (9 - 8) / 2)


def test_quantile_of_the_open_bucket_is_its_lower_bound() -> None:
    assert quantile(0.99, BOUNDS, [0.0, 0.0, 1.0, 5.0]) == 1.0


def test_quantile_of_nothing_is_none() -> None:
    assert quantile(0.5, BOUNDS, [0.0, 0.0, 0.0, 0.0]) is None


def test_series_are_rates_and_window_percentiles() -> None:
    readings = Readings()
    readings.add(reading(100.0, 0.0, [0.0, 0.0, 0.0, 0.0]))
    readings.add(reading(101.0, 30.0, [2.0, 2.0, 2.0, 2.0]))  # 2 ITLs under 0.1 s
    readings.add(reading(103.0, 90.0, [2.0, 4.0, 4.0, 4.0]))  # then 2 in (0.1, 0.5]
    series = readings.series()
    assert series["t"] == [-2.0, 0.0]
    assert series["tokens_out"] == [30.0, 30.0]  # 30 in 1 s, then 60 in 2 s
    # each point covers the trailing 10 s: at 103 s all four ITLs, median at 0.1 s
    assert series["itl_p50"] == [pytest.approx(0.05), pytest.approx(0.1)]
    assert readings.before(2.5) is readings.before(2.0)  # the oldest within 2.5 s: 101 s


def test_rates_after_a_gap_span_back_to_the_previous_reading() -> None:
    readings = Readings()
    readings.add(reading(100.0, 0.0, [0.0] * 4))
    readings.add(reading(101.0, 10.0, [0.0] * 4))
    assert readings.rate_base().at == 100.0  # within the window
    readings.add(reading(131.0, 70.0, [0.0] * 4))  # nobody looked for 30 s
    assert readings.rate_base().at == 101.0
