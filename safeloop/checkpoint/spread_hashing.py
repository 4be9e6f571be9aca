"""Hashing a sharded checkpoint's files with every process, each taking its share.

A sharded checkpoint is as large as the model and optimizer state together; one process
hashing all of it would cost what writing or reading the data costs. When saving, each process
hashes the shard files it writes as it writes them (``hashed_write.py``) and the digests are
gathered as JSON on every process (:func:`gather_shard_digests`); a file no writer hashed, and every
file when loading, is hashed by one process: each takes every N-th file (its SHA-256 per 16 MiB
chunk, in a thread pool), at the cost of one process's share. The folder must be one all
processes see, as for any checkpoint.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from safeloop.checkpoint.manifest import check_manifest, digest_mismatch, file_digests, hash_pool, results
from safeloop.checkpoint.sharded import SHARD_DIR
from safeloop.distributed import gather_json

__all__ = ["gather_shard_digests", "spread_digests", "shards_problem"]

Gather = Callable[[Any], list[Any]]  # every process's JSON value, by rank (a collective)


def gather_shard_digests(
    accelerator: Accelerator,
    root: Path,
    written: dict[str, list[str]],
    *,
    hash_rest: bool = True,
    problem: str = "",
    gather: Gather | None = None,
) -> tuple[dict[str, list[str] | None], str]:
    """The chunk digests of every file in ``root``'s shards folder, for the manifest (a collective).

    Called once every process has written and fsynced its shard files. The digests each process
    took as it wrote its own files are gathered; the files no process hashed (a writer that
    returned none) are hashed from disk, each by one process.

    Args:
        accelerator (`Accelerator`): the run's processes.
        root (`Path`): the temporary checkpoint folder.
        written (`dict[str, list[str]]`): this process's files (names in the shards folder)
            and the digests it took while writing them.
        hash_rest (`bool`, *optional*, defaults to True): False leaves the files no writer
            hashed to the caller (None in the answer): the main process of an asynchronous
            save on one process hashes them in the background.
        problem (`str`, *optional*): what went wrong with this process's files (nothing is
            hashed then); shared with all.
        gather (`Callable[[Any], list[Any]]`, *optional*): the collective that gathers JSON
            values; defaults to the run's group (``distributed.gather_json``).

    Returns:
        `tuple[dict[str, list[str] | None], str]`: digests by name relative to ``root``
        (``shards/...``), and the problems (empty when none). Every process gets the same answer.
    """
    gather = gather or functools.partial(gather_json, accelerator)
    mine = {f"{SHARD_DIR}/{name}": digests for name, digests in written.items()}
    taken: dict[str, list[str]] = {}
    problems = []
    for part in gather({"digests": mine, "problem": problem}):
        taken.update(part["digests"])
        problems += [part["problem"]] if part["problem"] else []
    if problems:  # every process got the same parts: all return here together
        return {}, "; ".join(dict.fromkeys(problems))  # DCP's error comes the same from each
    # every file on disk is listed, and every file a process says it wrote (adopting it checks
    # that it is there): none goes unlisted
    on_disk = {f"{SHARD_DIR}/{path.name}" for path in (root / SHARD_DIR).glob("*.safetensors")}
    names = sorted(on_disk | taken.keys())
    rest = [name for name in names if name not in taken]
    hashed, problem = (
        spread_digests(accelerator, root, rest, gather=gather) if rest and hash_rest else ({}, "")
    )
    return {name: taken.get(name, hashed.get(name)) for name in names}, problem


def spread_digests(
    accelerator: Accelerator, root: Path, names: list[str], problem: str = "", *, gather: Gather | None = None
) -> tuple[dict[str, list[str]], str]:
    """The chunk digests of the files ``names`` under ``root``, each hashed by one process.

    A collective: every process calls it with the same ``names``.

    Args:
        accelerator (`Accelerator`): the run's processes.
        root (`Path`): the checkpoint folder (temporary or published).
        names (`list[str]`): the files, relative to ``root``; the same list on every process.
        problem (`str`, *optional*): what this process found wrong already; shared with all.
        gather (`Callable[[Any], list[Any]]`, *optional*): the collective that gathers JSON
            values; defaults to the run's group.

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
    gather = gather or functools.partial(gather_json, accelerator)
    for part in gather({"digests": mine, "problem": problem}):
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
