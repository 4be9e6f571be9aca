"""Shared fixtures: every test starts from clean Accelerate singletons and torch globals,
and fails if it leaks environment variables, a process group or changed torch globals."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState, PartialState

_WATCHED_ENV_PREFIXES = ("ACCELERATE_", "MASTER_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "SAFELOOP_")


def _watched_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(_WATCHED_ENV_PREFIXES)}


def _torch_globals() -> dict[str, object]:
    return {
        "default_dtype": torch.get_default_dtype(),
        "grad_enabled": torch.is_grad_enabled(),
        "anomaly": torch.is_anomaly_enabled(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
    }


def _reset_accelerate() -> None:
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def clean_process_state(tmp_path, monkeypatch):
    """Reset Accelerate singletons, seed, run in tmp_path, and fail on leaks."""
    assert not PartialState._shared_state, "a previous test left Accelerate's PartialState set"
    env_before = _watched_env()
    globals_before = _torch_globals()
    rng_before = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    monkeypatch.chdir(tmp_path)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    try:
        yield
    finally:
        leaks = []
        if _watched_env() != env_before:
            leaks.append(f"environment changed: {set(_watched_env().items()) ^ set(env_before.items())}")
        if _torch_globals() != globals_before:
            leaks.append(f"torch globals changed: {_torch_globals()} != {globals_before}")
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            leaks.append("a process group was left initialised")
        for key in list(os.environ):
            if key.startswith(_WATCHED_ENV_PREFIXES) and key not in env_before:
                del os.environ[key]
        _reset_accelerate()
        random.setstate(rng_before[0])
        np.random.set_state(rng_before[1])
        torch.set_rng_state(rng_before[2])
        if leaks:
            pytest.fail("test leaked state:\n" + "\n".join(leaks))


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny models run faster without thread start-up on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
