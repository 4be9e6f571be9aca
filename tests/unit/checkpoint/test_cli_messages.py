"""What `safeloop inspect` and `safeloop verify` say to a new user: run folders, name order, byte ranges."""

from __future__ import annotations

import torch
from torch import nn

from safeloop import SafeTrainer
from safeloop.checkpoint.manifest import CHUNK_BYTES, digest_mismatch
from safeloop.checkpoint.store import latest_valid, write_checkpoint
from safeloop.cli import main
from tests.helpers.models import classification_data, loader, mlp

EXPECTED = (
    "`safeloop inspect` takes a checkpoint folder (such as runs/exp1/step-00000500, holding "
    "manifest.json) or a run's checkpoint_dir (such as runs/exp1, holding step-NNNNNNNN folders)"
)


def _blob_checkpoint(root, step, size=2048):
    return write_checkpoint(root, step, {"blob.bin": bytes(range(256)) * (size // 256)}, meta={})


def _kb(folder):
    return f"{sum(f.stat().st_size for f in folder.rglob('*') if f.is_file()) / 1024:.1f} KB"


def _flip_byte(file, offset):
    data = bytearray(file.read_bytes())
    data[offset] ^= 0xFF
    file.write_bytes(bytes(data))


def test_inspect_on_a_run_folder_lists_its_checkpoints_and_the_latest_valid_one(tmp_path, capsys):
    root = tmp_path / "run"
    first, second, damaged = (_blob_checkpoint(root, step) for step in (100, 200, 300))
    _flip_byte(damaged / "blob.bin", 10)
    unfinished = root / "step-00000400"
    unfinished.mkdir()
    (unfinished / "blob.bin").write_bytes(bytes(100))
    (root / ".step-00000500.tmp").mkdir()  # a write in progress: not a checkpoint folder
    (root / "findings.json").write_text("[]")
    assert main(["inspect", str(root)]) == 0
    assert capsys.readouterr().out == (
        f"{root} is a checkpoint_dir, not a checkpoint: it holds 4 checkpoints\n"
        f"  step-00000100  valid      {_kb(first):>10}\n"
        f'  step-00000200  valid      {_kb(second):>10}  latest: what resume_from="latest" loads\n'
        f"  step-00000300  DAMAGED    {_kb(damaged):>10}  {damaged}/blob.bin does not match its SHA-256 "
        "in the manifest (bytes 0-2047 differ)\n"
        "  step-00000400  unfinished      100 B  no manifest.json (an interrupted write; ignored when "
        "resuming)\n"
        f"Inspect one with: safeloop inspect {second}\n"
    )
    assert latest_valid(root)[0] == second  # "latest" is what resuming picks


def test_inspect_on_a_run_folder_with_no_valid_checkpoint_says_what_resuming_does(tmp_path, capsys):
    _flip_byte(_blob_checkpoint(tmp_path, 7) / "blob.bin", 0)
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{tmp_path} is a checkpoint_dir, not a checkpoint: it holds 1 checkpoint"
    assert out[-2:] == [
        '  none is valid: resume_from="latest" refuses to start over damaged state; restore them from '
        "a copy, or start fresh in another checkpoint_dir",
        f"Inspect one with: safeloop inspect {tmp_path / 'step-00000007'}",
    ]
    (tmp_path / "step-00000007" / "manifest.json").unlink()
    assert main(["inspect", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines()[-2] == '  none is finished: resume_from="latest" starts fresh'


def test_inspect_on_a_folder_without_checkpoints_says_what_was_expected(tmp_path, capsys):
    unrelated = tmp_path / "data"
    unrelated.mkdir()
    (unrelated / "train.csv").write_text("x,y\n")
    assert main(["inspect", str(unrelated)]) == 1
    assert capsys.readouterr().out == (
        f"{unrelated}: not a valid checkpoint, nor a checkpoint_dir: it has no manifest.json and no "
        f"step-NNNNNNNN folders.\n{EXPECTED}. If this is the checkpoint_dir of a run, the run has saved "
        "no checkpoint in it yet.\n"
    )
    assert main(["inspect", str(tmp_path / "missing")]) == 1
    assert capsys.readouterr().out == f"{tmp_path / 'missing'} does not exist: check the path.\n{EXPECTED}.\n"
    assert main(["inspect", str(unrelated / "train.csv")]) == 1
    assert capsys.readouterr().out == f"{unrelated / 'train.csv'} is a file, not a folder.\n{EXPECTED}.\n"


def test_inspect_on_an_unfinished_checkpoint_points_to_its_run_folder(tmp_path, capsys):
    folder = tmp_path / "step-00000300"
    folder.mkdir()
    assert main(["inspect", str(folder)]) == 1
    assert capsys.readouterr().out == (
        f"{folder}: not a valid checkpoint: an unfinished one, {folder}/manifest.json is missing (a write "
        "interrupted before its end; resuming ignores it).\n"
        f"`safeloop inspect {tmp_path}` lists the checkpoints beside it.\n"
    )


def test_inspect_lists_tensor_names_in_natural_order(tmp_path, capsys):
    model = mlp()  # 4 parameters: AdamW keeps 3 tensors each, optimizer/0 .. optimizer/11
    SafeTrainer(
        model,
        torch.optim.AdamW(model.parameters(), lr=1e-3),
        loader(classification_data(n=16)),
        loss_fn=nn.CrossEntropyLoss(),
        max_steps=2,
        checkpoint_dir=tmp_path,
        checkpoint_every=1,
        progress_bar=False,
    ).fit()
    assert main(["inspect", str(tmp_path / "step-00000002")]) == 0
    out = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in out if line.startswith("    ") and ":" in line.split()[0]]
    moments = ("step", "exp_avg", "exp_avg_sq")
    assert names == [f"optimizer/{i}:optimizer.state.{i // 3}.{moments[i % 3]}" for i in range(12)]
    assert "  state.safetensors: 12 tensors" in out
    model_at = out.index("  model.safetensors: 4 tensors")
    assert [line.split()[0] for line in out[model_at + 1 : model_at + 5]] == [
        "0.bias",
        "0.weight",
        "2.bias",
        "2.weight",
    ]


def test_verify_names_the_bytes_of_a_small_file_not_the_whole_chunk(tmp_path, capsys):
    folder = _blob_checkpoint(tmp_path, 5, size=5120)
    _flip_byte(folder / "blob.bin", 4000)
    assert main(["verify", str(tmp_path)]) == 1
    assert capsys.readouterr().out == (
        f"DAMAGED   step-00000005: {folder}/blob.bin does not match its SHA-256 in the manifest "
        "(bytes 0-5119 differ)\n"
        "1 checkpoints, 1 damaged\n"
    )


def test_the_byte_range_of_a_later_chunk_ends_at_the_end_of_the_file(tmp_path):
    blob = tmp_path / "blob.bin"
    with blob.open("wb") as fh:
        fh.truncate(CHUNK_BYTES + 100)  # sparse: two chunks, the second 100 bytes
    problem = digest_mismatch(tmp_path, "blob.bin", ["a", "b"], ["a", "c"], CHUNK_BYTES + 100)
    assert problem == (
        f"{blob} does not match its SHA-256 in the manifest (bytes {CHUNK_BYTES}-{CHUNK_BYTES + 99} differ)"
    )
    # without the manifest's size (a caller that has only the digests): the size on disk
    assert digest_mismatch(tmp_path, "blob.bin", ["a", "b"], ["a", "c"]) == problem


def test_a_file_that_changed_size_after_the_check_names_both_sizes(tmp_path):
    blob = tmp_path / "blob.bin"
    blob.write_bytes(bytes(5000))
    assert digest_mismatch(tmp_path, "blob.bin", ["a"], ["b"], 5120) == (
        f"{blob} does not match its SHA-256 in the manifest (bytes 0-4999 differ, up to the size on "
        "disk; the file has 5000 bytes on disk, the manifest says 5120: something wrote to it after its "
        "size was checked)"
    )
    blob.write_bytes(bytes(6000))
    assert digest_mismatch(tmp_path, "blob.bin", ["a"], ["b"], 5120) == (
        f"{blob} does not match its SHA-256 in the manifest (bytes 0-5119 differ, up to the manifest's "
        "size; the file has 6000 bytes on disk, the manifest says 5120: something wrote to it after its "
        "size was checked)"
    )
