"""Hashing a sharded checkpoint's files with every process, each taking its share.

A sharded checkpoint is as large as the model and optimizer state together; one process
hashing all of it would make the manifest cost what writing the data cost. Here each process
hashes every N-th file of the folder (its SHA-256 per 16 MiB chunk, in a thread pool) and the
digests are gathered as JSON on every process, so the manifest lists them all at the cost of
one process's share. The folder must be one all processes see, as for any checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from accelerate import Accelerator

from safeloop.checkpoint.manifest import file_digests, hash_pool, results
from safeloop.distributed import gather_json

__all__ = ["spread_digests"]


def spread_digests(accelerator: Accelerator, folder: Path, prefix: str) -> tuple[dict[str, list[str]], str]:
    """The chunk digests of every ``*.safetensors`` file in ``folder`` (a collective).

    Args:
        accelerator (`Accelerator`): the run's processes.
        folder (`Path`): the folder of the files (the checkpoint's ``shards/``).
        prefix (`str`): put before each file's name in the result (``"shards/"``).

    Returns:
        `tuple[dict[str, list[str]], str]`: digests by prefixed name, and a problem (empty when
        none): a file one process could not read. Every process gets the same answer.
    """
    names = sorted(path.name for path in folder.glob("*.safetensors"))
    mine: dict[str, list[str]] = {}
    problem = ""
    pool = hash_pool()
    try:
        started = {
            name: file_digests(folder / name, (folder / name).stat().st_size, pool)
            for name in names[accelerator.process_index :: accelerator.num_processes]
        }
        mine = {prefix + name: results(futures) for name, futures in started.items()}
    except OSError as err:
        problem = f"process {accelerator.process_index} could not hash a shard: {err}"
    finally:
        pool.shutdown(cancel_futures=True)
    digests: dict[str, list[str]] = {}
    problems = []
    for part in gather_json(accelerator, {"digests": mine, "problem": problem}):
        digests.update(part["digests"])
        problems += [part["problem"]] if part["problem"] else []
    return digests, "; ".join(problems)
