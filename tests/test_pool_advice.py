"""Pool balance advice from exact loads: demand per pool, the window, the idle fallback."""

from __future__ import annotations

import pytest

from engine_core.pool_advice import PoolAdvisor, PoolDemand, PoolLoad, demand


def load(
    queued: int = 0,
    seqs: int = 0,
    kv: float = 0.0,
    budget: int = 2048,
    cap: int = 64,
    workers: tuple[int, int] = (1, 1),
) -> PoolLoad:
    return PoolLoad(queued, budget, seqs, cap, kv, *workers)


def test_demand_counts_full_steps_and_full_batches() -> None:
    # 3072 queued prompt tokens = 1.5 full prefill steps; 16 of 64 slots = a quarter batch
    assert demand(load(queued=3072, seqs=16)) == PoolDemand(1.5, 0.25)


def test_decode_demand_is_bound_by_memory_when_kv_fills_first() -> None:
    # 8 sequences use an eighth of the slots, but the two decode pools are 70 % and 90 % full
    assert demand(load(seqs=8, kv=1.6)) == PoolDemand(0.0, 1.6)


def test_fraction_balances_the_two_demands() -> None:
    advisor = PoolAdvisor(window=30.0)
    advisor.observe(0.0, load(queued=2048, seqs=192))  # 1 prefill step, 3 decode batches
    assert advisor.recommended_prefill_fraction() == pytest.approx(0.25)


def test_fraction_is_the_window_mean() -> None:
    advisor = PoolAdvisor(window=10.0)
    advisor.observe(0.0, load(queued=6144, seqs=0))  # prefill 3, decode 0
    advisor.observe(5.0, load(queued=0, seqs=64))  # prefill 0, decode 1
    # means: prefill 1.5, decode 0.5
    assert advisor.mean_demand() == PoolDemand(1.5, 0.5)
    assert advisor.recommended_prefill_fraction() == pytest.approx(0.75)


def test_samples_leave_the_window() -> None:
    advisor = PoolAdvisor(window=10.0)
    advisor.observe(0.0, load(queued=6144))
    advisor.observe(10.0, load(seqs=64))  # the first sample is exactly a window old: gone
    assert advisor.mean_demand() == PoolDemand(0.0, 1.0)
    assert advisor.recommended_prefill_fraction() == 0.0


def test_idle_advises_the_current_split() -> None:
    advisor = PoolAdvisor()
    assert advisor.recommended_prefill_fraction() is None  # nothing known yet
    advisor.observe(0.0, load(workers=(1, 3)))
    assert advisor.recommended_prefill_fraction() == 0.25


def test_a_pool_with_no_workers_still_has_demand() -> None:
    # every prefill worker is gone and prompts pile up: all capacity should go to prefill
    advisor = PoolAdvisor()
    advisor.observe(0.0, load(queued=4096, workers=(0, 2)))
    assert advisor.recommended_prefill_fraction() == 1.0
