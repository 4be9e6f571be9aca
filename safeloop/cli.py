"""The ``safeloop`` command: check and look into checkpoints without loading a model.

safeloop verify DIR             check every checkpoint in DIR (or one folder); exit 1 on damage
safeloop inspect CKPT           step, health, files and sizes, tensors, optimizer hyper-parameters
safeloop inspect RUN_DIR        a checkpoint_dir's checkpoints: valid / unfinished / DAMAGED, size, latest
safeloop consolidate CKPT OUT   the whole model weights as model.safetensors (from shards too)
safeloop report RUN_DIR         the run's record drawn: report.html (self-contained) and PNGs beside it
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]


def _report(target: Path, output: Path | None) -> int:
    """Exit 0 with the files written; 2 with one line on stderr when the record cannot be drawn."""
    # here, not at the top: the report never needs torch, which the checkpoint commands import
    from safeloop.report.optional import MissingExtra
    from safeloop.report.reading import RecordError
    from safeloop.report.render import write_report

    try:
        files = write_report(target, output)
    except (MissingExtra, RecordError) as error:
        print(f"safeloop report: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the report's own files: a folder not writable, a full disk
        where = error.filename or output or target
        why = error.strerror or error
        print(f"safeloop report: could not write {where}: {why}; choose another -o", file=sys.stderr)
        return 2
    for note in files.notes:
        print(f"note: {note}")
    names = ", ".join(path.name for path in files.images)
    print(f"wrote {files.page}" + (f" and beside it {names}" if names else ""))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``safeloop`` command; return its exit code."""
    parser = argparse.ArgumentParser(
        prog="safeloop", description="Check and inspect safeloop checkpoints, and draw a run's record."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser("verify", help="check every checkpoint in a folder; exit 1 on damage")
    verify.add_argument("path", type=Path)
    inspect = commands.add_parser(
        "inspect", help="describe one checkpoint folder, or list the checkpoints of a checkpoint_dir"
    )
    inspect.add_argument("path", type=Path, help="a checkpoint folder, or a checkpoint_dir")
    merge = commands.add_parser(
        "consolidate", help="write a checkpoint's whole model weights as model.safetensors (sharded or not)"
    )
    merge.add_argument(
        "path", type=Path, help="a checkpoint folder, or a checkpoint_dir (its newest valid one)"
    )
    merge.add_argument("out_dir", type=Path, help="where model.safetensors (or its split files) go")
    merge.add_argument(
        "--max-shard-size", default="5GB", help="split above this size, with an index file (default 5GB)"
    )
    report = commands.add_parser(
        "report", help="draw a run's record as one self-contained HTML page, with the PNGs beside it"
    )
    report.add_argument("path", type=Path, help="a run's checkpoint_dir (holding metrics.jsonl), or the file")
    report.add_argument(
        "-o", "--output", type=Path, default=None,
        help="the HTML page to write (default: report.html beside the record); the PNGs go beside it",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.command == "report":
        return _report(args.path, args.output)
    from safeloop import checkpoint_commands  # torch and safetensors: only for these commands

    if args.command == "verify":
        return checkpoint_commands.verify_command(args.path)
    if args.command == "consolidate":
        return checkpoint_commands.consolidate_command(args.path, args.out_dir, args.max_shard_size)
    return checkpoint_commands.inspect_command(args.path)


if __name__ == "__main__":
    sys.exit(main())
