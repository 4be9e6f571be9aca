"""Building the run's Accelerator, and making CPU-only multi-process launches work.

On a machine without a GPU two launch commands silently go wrong (accelerate 1.x, torch 2.x):

- ``torchrun --nproc_per_node N`` starts N processes with ``WORLD_SIZE=N``, but
  ``Accelerator()`` does not join them into a process group: each trains alone. Building it
  with ``cpu=True`` makes it a gloo group (``DistributedType.MULTI_CPU``).
- ``accelerate launch --num_processes N`` (no config, no ``--multi_gpu``) starts a single
  process. safeloop starts the N - 1 missing ranks itself, as torchrun would, and joins them
  over gloo; ``SAFELOOP_SPAWN=0`` turns that off and raises an error with the command that works.
"""

from __future__ import annotations

import atexit
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from safeloop.config import TrainerConfig
from safeloop.errors import ConfigError

__all__ = ["build_accelerator", "requested_processes", "WORKING_CPU_COMMAND"]

WORKING_CPU_COMMAND = "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes {n} {script}"
_NUM_PROCESSES = re.compile(r"^--num[_-]processes(?:=(\d+))?$")
_spawned: list[subprocess.Popen[bytes]] = []


def _has_gpu() -> bool:
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def _world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def requested_processes(parent_cmdline: list[str] | None = None) -> int:
    """Return the ``--num_processes`` of the ``accelerate launch`` that started this process.

    Args:
        parent_cmdline (`list[str]`, *optional*): the launcher's argv; read from
            ``/proc/<ppid>/cmdline`` when None (Linux), else 1 is returned.

    Returns:
        `int`: the number asked for, or 1 when this process was not started that way.
    """
    if parent_cmdline is None:
        if "ACCELERATE_MIXED_PRECISION" not in os.environ:  # set by every `accelerate launch`
            return 1
        try:
            raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
        except OSError:
            return 1
        parent_cmdline = [part.decode(errors="replace") for part in raw.split(b"\0") if part]
    launcher = any(Path(part).name == "accelerate" for part in parent_cmdline) and "launch" in parent_cmdline
    if not launcher and "accelerate.commands.launch" not in parent_cmdline:
        return 1
    for i, part in enumerate(parent_cmdline):
        match = _NUM_PROCESSES.match(part)
        if match is None:
            continue
        value = match.group(1) or (parent_cmdline[i + 1] if i + 1 < len(parent_cmdline) else "1")
        return int(value) if value.isdigit() else 1
    return 1


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_spawned() -> None:
    for proc in _spawned:
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()


def _spawn_missing_ranks(world_size: int) -> None:
    """Start ranks 1..N-1 as copies of this command and make this process rank 0."""
    env = dict(os.environ)
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        ACCELERATE_USE_CPU="1",
    )
    argv = [sys.executable, *sys.orig_argv[1:]]
    for rank in range(1, world_size):
        child_env = dict(env, RANK=str(rank), LOCAL_RANK=str(rank))
        _spawned.append(subprocess.Popen(argv, env=child_env))
    os.environ.update(env, RANK="0", LOCAL_RANK="0")
    atexit.register(_wait_for_spawned)
    print(
        f"safeloop: `accelerate launch --num_processes {world_size}` started 1 process on a "
        f"machine without a GPU; started the other {world_size - 1} (CPU, gloo). To launch them "
        f"directly: {WORKING_CPU_COMMAND.format(n=world_size, script=' '.join(sys.argv))}",
        file=sys.stderr,
        flush=True,
    )


def build_accelerator(config: TrainerConfig, accelerator: Accelerator | None) -> Accelerator:
    """Return the run's Accelerator: the user's, checked, or one built from ``config``.

    Args:
        config (`TrainerConfig`): validated settings.
        accelerator (`Accelerator`, *optional*): one the user built.

    Returns:
        `Accelerator`: ready for ``prepare``.

    Raises:
        ConfigError: when the launch asked for several processes that cannot be joined.
    """
    world_size = _world_size()
    script = " ".join(sys.argv)
    if accelerator is not None:
        if accelerator.num_processes == 1 and world_size > 1:
            raise ConfigError(
                f"WORLD_SIZE={world_size} but the given Accelerator sees 1 process, so every "
                "process would train alone. On a machine without a GPU build it with "
                "`Accelerator(cpu=True)`, or launch with "
                f"`{WORKING_CPU_COMMAND.format(n=world_size, script=script)}`."
            )
        wanted = requested_processes() if accelerator.num_processes == 1 and not _has_gpu() else 1
        if wanted > 1:
            raise ConfigError(
                f"`accelerate launch --num_processes {wanted}` started 1 process (no GPU, no "
                "config), and the given Accelerator was built before safeloop could start the "
                f"others. Launch with `{WORKING_CPU_COMMAND.format(n=wanted, script=script)}`, "
                "or leave `accelerator=None` so that safeloop starts the missing ranks."
            )
        return accelerator
    if world_size == 1 and not _has_gpu():
        wanted = requested_processes()
        if wanted > 1:
            if os.environ.get("SAFELOOP_SPAWN", "1") == "0":
                raise ConfigError(
                    f"`accelerate launch --num_processes {wanted}` started 1 process: without a "
                    "GPU or a config it does not start more. Launch with "
                    f"`{WORKING_CPU_COMMAND.format(n=wanted, script=script)}` (SAFELOOP_SPAWN=0 "
                    "is set, so safeloop did not start the missing ranks itself)."
                )
            _spawn_missing_ranks(wanted)
            world_size = wanted
    kwargs: dict[str, object] = {
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
    }
    if world_size > 1 and not _has_gpu():
        kwargs["cpu"] = True  # joins the ranks over gloo instead of N lone processes
    if config.mixed_precision is not None:
        kwargs["mixed_precision"] = config.mixed_precision
    if config.log_with:
        kwargs["log_with"] = list(config.log_with)
        kwargs["project_dir"] = config.project_dir
    return Accelerator(**kwargs)
