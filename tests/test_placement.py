"""Each worker kind gets its own cores."""

from __future__ import annotations

from engine_core.placement import cores_for


def test_two_cores_one_per_kind() -> None:
    assert cores_for("prefill", {0, 1}) == [0]
    assert cores_for("decode", {0, 1}) == [1]


def test_decode_gets_the_larger_half_and_mixed_is_never_pinned() -> None:
    assert cores_for("prefill", {4, 5, 6}) == [4]
    assert cores_for("decode", {4, 5, 6}) == [5, 6]
    assert cores_for("mixed", {0, 1}) is None
    assert cores_for("decode", {3}) is None
