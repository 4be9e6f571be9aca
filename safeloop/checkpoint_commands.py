"""The checkpoint commands of ``safeloop``: ``verify``, ``inspect`` and ``consolidate``.

Imported by ``cli.py`` only when one of them runs: they read checkpoints (torch, safetensors), while
``safeloop report`` must start without importing torch.
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
from pathlib import Path

from safetensors import safe_open

from safeloop.checkpoint.consolidate import consolidate, parse_size
from safeloop.checkpoint.manifest import MANIFEST, verify_checkpoint
from safeloop.checkpoint.state import JSON_FILE, MODEL_FILE, TENSORS_FILE
from safeloop.checkpoint.store import list_checkpoints
from safeloop.errors import CheckpointError

__all__ = ["verify_command", "inspect_command", "consolidate_command"]

_DIGITS = re.compile(r"(\d+)")
_STEP_FOLDER = re.compile(r"^step-\d{8}$")
_EXPECTED = (
    "`safeloop inspect` takes a checkpoint folder (such as runs/exp1/step-00000500, holding "
    f"{MANIFEST}) or a run's checkpoint_dir (such as runs/exp1, holding step-NNNNNNNN folders)"
)


def _natural(name: str) -> tuple[list[str | int], str]:
    """Sort key: the numbers in a name compare as numbers (``optimizer/2`` before ``optimizer/10``)."""
    return [int(part) if i % 2 else part for i, part in enumerate(_DIGITS.split(name))], name


def verify_command(target: Path) -> int:
    """``safeloop verify``: check every checkpoint in a folder; 1 on damage."""
    folders = [target] if (target / MANIFEST).exists() else [path for _, path in list_checkpoints(target)]
    if not folders:
        print(f"no checkpoint folders (step-NNNNNNNN) in {target}")
        return 1
    damaged = 0
    for folder in folders:
        check = verify_checkpoint(folder)
        if check.ok:
            sharding = _sharding(check.manifest or {})
            print(f"ok        {folder.name}" + (f", {sharding}" if sharding else ""))
        elif not check.complete:
            print(f"unfinished {folder.name}: no {MANIFEST} (an interrupted write; ignored when resuming)")
        else:
            damaged += 1
            print(f"DAMAGED   {folder.name}: {check.problem}")
    print(f"{len(folders)} checkpoints, {damaged} damaged")
    return 1 if damaged else 0


def _sharding(manifest: dict) -> str:
    """How a checkpoint is sharded (engine, files, processes), or empty for an unsharded one."""
    shards = [name for name in manifest.get("files", {}) if name.startswith("shards/")]
    if not shards:
        return ""
    meta = manifest.get("meta", {})
    engine = meta.get("engine", "torch.distributed.checkpoint")
    return f"sharded ({engine}): {len(shards)} shard files from {meta.get('world_size')} processes"


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def inspect_command(path: Path) -> int:
    """``safeloop inspect``: one checkpoint folder, or the checkpoints of a checkpoint_dir."""
    if not path.exists():
        print(f"{path} does not exist: check the path.\n{_EXPECTED}.")
        return 1
    if not path.is_dir():
        print(f"{path} is a file, not a folder.\n{_EXPECTED}.")
        return 1
    if (path / MANIFEST).exists():
        return _inspect_checkpoint(path)
    checkpoints = list_checkpoints(path)
    if checkpoints:
        return _inspect_run(path, checkpoints)
    if _STEP_FOLDER.match(path.name):
        parent = shlex.quote(str(path.parent))
        print(
            f"{path}: not a valid checkpoint: an unfinished one, {path / MANIFEST} is missing (a write "
            "interrupted before its end; resuming ignores it).\n"
            f"`safeloop inspect {parent}` lists the checkpoints beside it."
        )
        return 1
    print(
        f"{path}: not a valid checkpoint, nor a checkpoint_dir: it has no {MANIFEST} and no "
        f"step-NNNNNNNN folders.\n{_EXPECTED}. If this is the checkpoint_dir of a run, the run has "
        "saved no checkpoint in it yet."
    )
    return 1


def _folder_bytes(folder: Path) -> int:
    total = 0
    for file in folder.rglob("*"):
        with contextlib.suppress(OSError):  # deleted meanwhile (rotated by a run writing here)
            total += file.stat().st_size if file.is_file() else 0
    return total


def _inspect_run(root: Path, checkpoints: list[tuple[int, Path]]) -> int:
    """List a checkpoint_dir's checkpoints (each verified as ``verify`` does) and the latest valid one."""
    checks = [verify_checkpoint(folder) for _, folder in checkpoints]
    latest = next((check.path for check in reversed(checks) if check.ok), None)
    count = f"{len(checks)} checkpoint" + ("s" if len(checks) > 1 else "")
    print(f"{root} is a checkpoint_dir, not a checkpoint: it holds {count}")
    for check in checks:
        if check.ok:
            state, note = "valid", ('latest: what resume_from="latest" loads' if check.path == latest else "")
        elif not check.complete:
            state, note = "unfinished", f"no {MANIFEST} (an interrupted write; ignored when resuming)"
        else:
            state, note = "DAMAGED", check.problem
        line = f"  {check.path.name}  {state:<10} {_size(_folder_bytes(check.path)):>10}"
        print(f"{line}  {note}" if note else line)
    if latest is None and any(check.complete for check in checks):
        print(
            '  none is valid: resume_from="latest" refuses to start over damaged state; restore them '
            "from a copy, or start fresh in another checkpoint_dir"
        )
    elif latest is None:
        print('  none is finished: resume_from="latest" starts fresh')
    example = latest if latest is not None else checkpoints[-1][1]
    print(f"Inspect one with: safeloop inspect {shlex.quote(str(example))}")
    return 0


def _inspect_checkpoint(folder: Path) -> int:
    check = verify_checkpoint(folder)
    if not check.ok:
        print(f"{folder}: not a valid checkpoint: {check.problem}")
        return 1
    manifest = check.manifest or {}
    document = json.loads((folder / JSON_FILE).read_bytes())
    trainer = document["trainer"]
    print(f"checkpoint {folder}")
    position = f"micro-batches into the epoch {trainer['batch_in_epoch']}"
    print(f"  step {manifest['step']}, epoch {trainer['epoch']}, {position}")
    healthy = manifest.get("meta", {}).get("healthy")
    print(f"  healthy: {healthy}, skipped steps so far: {trainer['skipped_steps']}")
    print("  files:")
    width = max([20, *(len(name) for name in manifest["files"])])
    for name, entry in sorted(manifest["files"].items(), key=lambda item: _natural(item[0])):
        digests = entry["sha256"]
        chunks = f" (+{len(digests) - 1} more chunks)" if len(digests) > 1 else ""
        print(f"    {name:<{width}} {_size(entry['size']):>10}  sha256 {digests[0][:16]}...{chunks}")
    shards = sorted((name for name in manifest["files"] if name.startswith("shards/")), key=_natural)
    if shards:
        print(f"  {_sharding(manifest)}")
    for file in [name for name in (MODEL_FILE, *shards, TENSORS_FILE) if name in manifest["files"]]:
        with safe_open(str(folder / file), framework="pt") as tensors:
            keys = sorted(tensors.keys(), key=_natural)
            print(f"  {file}: {len(keys)} tensors")
            for key in keys[:20]:
                piece = tensors.get_slice(key)
                print(f"    {key:<50} {piece.get_dtype():<8} {list(piece.get_shape())}")
            if len(keys) > 20:
                print(f"    ... and {len(keys) - 20} more")
    values = document["parts"].get("optimizer_values") or {}  # a sharded optimizer's
    deepspeed = isinstance(values.get("param_groups"), list)  # DeepSpeed's: whole groups, not per parameter
    groups = (
        values["param_groups"]
        if deepspeed
        else (document["parts"].get("optimizer") or {}).get("param_groups", [])
    )
    for i, group in enumerate(groups):
        hyper = {k: v for k, v in group.items() if k != "params"}
        print(f"  optimizer param_groups[{i}]: {json.dumps(hyper, sort_keys=True)}")
    if deepspeed:
        steps = sorted({json.dumps(entry) for entry in values.get("flat_scalars", [])})
        engine = json.dumps(values.get("engine"))
        print(f"  DeepSpeed ZeRO-{values.get('stage')}: engine {engine}, optimizer {', '.join(steps)}")
    elif values:
        shown = {name: values[name] for name in sorted(values, key=_natural)[:6]}
        more = f" ... and {len(values) - 6} more" if len(values) > 6 else ""
        print(f"  optimizer hyper-parameters (per parameter): {json.dumps(shown)}{more}")
    return 0


def consolidate_command(path: Path, out_dir: Path, max_shard_size: str) -> int:
    """``safeloop consolidate``: the whole model weights as model.safetensors."""
    try:
        written = consolidate(path, out_dir, parse_size(max_shard_size))
    except (CheckpointError, FileExistsError, ValueError) as error:
        print(f"nothing consolidated: {error}")
        return 1
    for file in written:
        print(f"wrote {file} ({_size(file.stat().st_size)})")
    return 0
