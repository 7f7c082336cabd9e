"""The CPU thread policy of `hf_align.utils.cpu_threads`: the count follows the other processes' load, is restored after
the call, and can be fixed or switched off through HF_ALIGN_NUM_THREADS."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from hf_align.utils import cpu_threads as policy
from hf_align.utils.cpu_threads import ENV_VAR, cpu_threads, threads_for


@pytest.fixture
def two_torch_threads(monkeypatch):
    """torch at 2 threads on a 2-core machine, restored afterwards; no OMP_NUM_THREADS, no cached start sample."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(policy, "_available_cores", lambda: 2)
    monkeypatch.setattr(policy, "_start_sample", None)
    yield
    torch.set_num_threads(previous)


def fake_load(monkeypatch, *busy: float) -> None:
    """Make the CPU clock report `busy` cores used by other processes, one value per reading."""
    readings = iter(busy)
    monkeypatch.setattr(policy._CpuClock, "cores_busy_elsewhere", lambda self: next(readings))


@pytest.mark.parametrize(
    "busy, ceiling, cores, expected",
    [
        (0.0, 2, 2, 2),  # quiet: torch's setting
        (0.29, 2, 2, 2),  # background noise below the threshold
        (0.3, 2, 2, 1),  # a neighbour sharing a core with one of our spinning threads
        (1.0, 2, 2, 1),
        (1.5, 2, 2, 1),  # never fewer than one
        (2.0, 2, 2, 1),
        (1.0, 4, 8, 4),  # the free cores exceed torch's setting: keep the setting
        (5.2, 8, 8, 3),  # 5 contended cores of 8 (the sixth, at 0.2, is noise)
        (5.3, 8, 8, 2),  # 6 contended
    ],
)
def test_threads_for(busy, ceiling, cores, expected):
    assert threads_for(busy, ceiling, cores) == expected


def test_busy_neighbour_lowers_the_count_and_the_call_restores_it(two_torch_threads, monkeypatch, caplog):
    fake_load(monkeypatch, 1.0, 0.0)
    with caplog.at_level(logging.INFO, logger="hf_align.utils.cpu_threads"):
        with cpu_threads() as governor:
            assert torch.get_num_threads() == 1
            governor._next_check = 0.0  # the neighbour leaves; the next step looks again
            governor.step()
            assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == 2
    assert "torch now uses 1 CPU thread(s) (was 2): other processes keep 1.0 core(s) busy" in caplog.text


def test_a_neighbour_that_starts_mid_call_is_followed_at_most_once_a_second(two_torch_threads, monkeypatch):
    fake_load(monkeypatch, 0.0, 1.2)
    with cpu_threads() as governor:
        assert torch.get_num_threads() == 2
        governor.step()  # within the second after the start: no new reading (the iterator would give 1.2)
        assert torch.get_num_threads() == 2
        governor._next_check = 0.0
        governor.step()
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_restored_when_the_call_raises(two_torch_threads, monkeypatch):
    fake_load(monkeypatch, 1.0)
    with pytest.raises(RuntimeError, match="boom"), cpu_threads():
        assert torch.get_num_threads() == 1
        raise RuntimeError("boom")
    assert torch.get_num_threads() == 2


def test_nested_calls_keep_the_outer_choice(two_torch_threads, monkeypatch):
    fake_load(monkeypatch, 1.0)  # a second reading would raise StopIteration
    with cpu_threads():
        with cpu_threads() as inner:
            inner.step()
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("setting, expected", [("3", 3), ("1", 1), ("torch", 2)])
def test_the_environment_overrides_the_policy(two_torch_threads, monkeypatch, setting, expected):
    monkeypatch.setenv(ENV_VAR, setting)
    fake_load(monkeypatch)  # any reading of the load would raise StopIteration
    with cpu_threads() as governor:
        governor._next_check = 0.0
        governor.step()
        assert torch.get_num_threads() == expected
    assert torch.get_num_threads() == 2


def test_omp_num_threads_means_the_user_has_chosen(two_torch_threads, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    fake_load(monkeypatch)
    with cpu_threads():
        assert torch.get_num_threads() == 2


@pytest.mark.parametrize("setting", ["0", "-1", "two", "1.5"])
def test_a_bad_setting_is_named(two_torch_threads, monkeypatch, setting):
    monkeypatch.setenv(ENV_VAR, setting)
    with pytest.raises(ValueError, match=r"HF_ALIGN_NUM_THREADS must be 'auto', 'torch' or a positive integer, got"):
        with cpu_threads():
            pass
    assert torch.get_num_threads() == 2


def test_the_cpu_clock_counts_other_processes_not_this_one(monkeypatch):
    """Machine busy time minus this process's own, over the wall time: (3.0 - 0.5 s) - (0.8 - 0.1 s) over 2 s."""
    machine = iter([SimpleNamespace(user=1.0, system=0.5), SimpleNamespace(user=2.5, system=0.5, nice=0.5)])
    own = iter([SimpleNamespace(user=0.1, system=0.0), SimpleNamespace(user=0.6, system=0.2)])
    wall = iter([10.0, 12.0])
    monkeypatch.setattr(policy.psutil, "cpu_times", lambda: next(machine))
    monkeypatch.setattr(policy.psutil, "Process", lambda: SimpleNamespace(cpu_times=lambda: next(own)))
    monkeypatch.setattr(policy.time, "monotonic", lambda: next(wall))
    assert policy._CpuClock().cores_busy_elsewhere() == pytest.approx((3.5 - 1.5 - 0.7) / 2.0)


def test_follow_load_reaches_the_enclosing_governor_and_is_inert_outside(two_torch_threads, monkeypatch):
    fake_load(monkeypatch, 0.0, 1.0)
    policy.follow_load()  # outside any block: no reading (the first reading would be taken here)
    with cpu_threads() as governor:
        assert torch.get_num_threads() == 2
        governor._next_check = 0.0
        policy.follow_load()
        assert torch.get_num_threads() == 1
    policy.follow_load()
    assert torch.get_num_threads() == 2
