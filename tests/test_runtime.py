"""The daemon's allocator tuning: what it sets, and that the environment and the opt-out win."""

from __future__ import annotations

import pytest

from wardgate import runtime


def test_tuning_sets_the_three_glibc_parameters(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in runtime.ALLOCATOR_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("WARDGATE_MALLOC_TUNING", raising=False)
    done = runtime.tune_allocator()
    assert [d.split("=")[0] for d in done] == list(runtime.ALLOCATOR_SETTINGS)
    assert "MALLOC_MMAP_THRESHOLD_=67108864" in done


def test_a_setting_from_the_environment_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WARDGATE_MALLOC_TUNING", raising=False)
    monkeypatch.setenv("MALLOC_TOP_PAD_", "131072")
    done = runtime.tune_allocator()
    assert not any(d.startswith("MALLOC_TOP_PAD_") for d in done)


def test_tuning_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WARDGATE_MALLOC_TUNING", "0")
    assert runtime.tune_allocator() == []
