"""Hashing a sharded checkpoint's files with every process, each taking its share.

A sharded checkpoint is as large as the model and optimizer state together; one process
hashing all of it would cost what writing or reading the data costs. Here each process hashes
every N-th shard file (its SHA-256 per 16 MiB chunk, in a thread pool) and the digests are
gathered as JSON on every process: for the manifest when saving, against the manifest when
loading, at the cost of one process's share. The folder must be one all processes see, as for
any checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from accelerate import Accelerator

from safeloop.checkpoint.manifest import check_manifest, digest_mismatch, file_digests, hash_pool, results
from safeloop.checkpoint.sharded import SHARD_DIR
from safeloop.distributed import gather_json

__all__ = ["spread_digests", "shards_problem"]


def spread_digests(
    accelerator: Accelerator, root: Path, names: list[str], problem: str = ""
) -> tuple[dict[str, list[str]], str]:
    """The chunk digests of the files ``names`` under ``root``, each hashed by one process.

    A collective: every process calls it with the same ``names``.

    Args:
        accelerator (`Accelerator`): the run's processes.
        root (`Path`): the checkpoint folder (temporary or published).
        names (`list[str]`): the files, relative to ``root``; the same list on every process.
        problem (`str`, *optional*): what this process found wrong already; shared with all.

    Returns:
        `tuple[dict[str, list[str]], str]`: digests by name, and the problems (empty when none):
        a file one process could not read, or what a process passed in. Every process gets the
        same answer.
    """
    mine: dict[str, list[str]] = {}
    pool = hash_pool()
    try:
        started = {
            name: file_digests(root / name, (root / name).stat().st_size, pool)
            for name in sorted(names)[accelerator.process_index :: accelerator.num_processes]
        }
        mine = {name: results(futures) for name, futures in started.items()}
    except OSError as err:
        problem = problem or f"process {accelerator.process_index} could not hash a shard: {err}"
    finally:
        pool.shutdown(cancel_futures=True)
    digests: dict[str, list[str]] = {}
    problems = []
    for part in gather_json(accelerator, {"digests": mine, "problem": problem}):
        digests.update(part["digests"])
        problems += [part["problem"]] if part["problem"] else []
    return digests, "; ".join(problems)


def shards_problem(accelerator: Accelerator, path: Path) -> str:
    """Why a published checkpoint's shards do not match its manifest, or "" (a collective).

    Each process hashes its share of the shard files; every process gets the same answer. A
    checkpoint without shards has no problem here. The other files are each process's own
    business (``read_state`` hashes what it reads).
    """
    check = check_manifest(path)
    if check.manifest is None or check.problem:
        names: list[str] = []
        problem = check.problem or f"{path} has no manifest"
    else:
        names = sorted(name for name in check.manifest["files"] if name.startswith(f"{SHARD_DIR}/"))
        problem = ""
    # every process calls the collective, whatever it found, so that none waits alone; what any
    # of them found comes back to all, and the rest is decided from the same gathered digests
    digests, problem = spread_digests(accelerator, path, [] if problem else names, problem)
    if problem:
        return problem
    for name in names:
        mismatch = digest_mismatch(
            path, name, check.manifest["files"][name].get("sha256"), digests.get(name, [])
        )
        if mismatch:
            return mismatch
    return ""
