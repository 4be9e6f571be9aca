"""`safeloop consolidate`: whole weights from sharded and unsharded checkpoints, checked first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from safeloop import SafeTrainer
from safeloop.checkpoint.consolidate import consolidate, parse_size
from safeloop.checkpoint.manifest import FORMAT_VERSION, HASH_SPEC, MANIFEST, file_digests, hash_pool, results
from safeloop.cli import main
from safeloop.errors import CheckpointError
from tests.helpers.models import classification_data, loader, mlp


def _shard(folder: Path, rank: int, pieces: dict[str, tuple[torch.Tensor, list[int]]]) -> None:
    """One process's shard file as DCP writes it: the pieces, and their offsets in the header."""
    info = {key: {"saved_offsets": offsets} for key, (_, offsets) in pieces.items()}
    path = folder / "shards" / f"shard-0000{rank}-model-00001-of-00001.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {key: tensor.contiguous() for key, (tensor, _) in pieces.items()}
    save_file(tensors, str(path), metadata={"DCP_SHARDING_INFO": json.dumps(info), "format": "pt"})


def _seal(folder: Path, shapes: dict[str, list[int]] | None = None) -> Path:
    """A manifest over every file of ``folder``, as the checkpoint writer leaves it."""
    (folder / "state.json").write_text(
        json.dumps({"parts": {"shard_info": {"shapes": shapes}}} if shapes else {})
    )
    pool = hash_pool()
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        size = path.stat().st_size
        files[path.relative_to(folder).as_posix()] = {
            "size": size,
            "sha256": results(file_digests(path, size, pool)),
        }
    pool.shutdown()
    manifest = {"format_version": FORMAT_VERSION, "hash": HASH_SPEC, "step": 3, "files": files, "meta": {}}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


@pytest.fixture
def weights() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "encoder.weight": torch.randn(6, 4, generator=generator),
        "encoder.bias": torch.randn(6, generator=generator),
        "head.weight": torch.randn(3, 6, generator=generator).to(torch.bfloat16),
        "scale": torch.tensor(2.5),
    }


def _sharded(folder: Path, weights: dict[str, torch.Tensor]) -> Path:
    """Rows split 4/2 and 2/1 over two processes; the bias and the 0-d tensor written by one."""
    w, b, h, s = (weights[k] for k in ("encoder.weight", "encoder.bias", "head.weight", "scale"))
    _shard(folder, 1, {
        "model.encoder.weight": (w[:4], [0, 0]), "model.head.weight": (h[:2], [0, 0]),
        "model.encoder.bias": (b, [0]), "optim.state.encoder.weight.exp_avg": (w[:4] * 0, [0, 0]),
    })  # fmt: skip
    _shard(folder, 2, {
        "model.encoder.weight": (w[4:], [4, 0]), "model.head.weight": (h[2:], [2, 0]), "model.scale": (s, []),
    })  # fmt: skip
    return _seal(folder, _shapes(weights))


def _shapes(weights: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    return {"model." + name: list(tensor.shape) for name, tensor in weights.items()}


def _bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_shards_become_the_whole_tensors_bit_for_bit_without_the_optimizer_state(tmp_path, weights):
    folder = _sharded(tmp_path / "step-00000003", weights)
    [written] = consolidate(folder, tmp_path / "out")
    assert written == tmp_path / "out" / "model.safetensors"
    assert _bitwise(load_file(written), weights)  # bf16 kept, 0-d kept, no `optim.` keys


def test_a_checkpoint_dir_gives_its_newest_valid_checkpoint(tmp_path, weights):
    _sharded(tmp_path / "ckpt" / "step-00000003", weights)
    newer = {k: v + 1 for k, v in weights.items()}
    _sharded(tmp_path / "ckpt" / "step-00000005", newer)
    (tmp_path / "ckpt" / "step-00000007").mkdir()  # an interrupted write: no manifest, ignored
    [written] = consolidate(tmp_path / "ckpt", tmp_path / "out")
    assert _bitwise(load_file(written), newer)


def test_above_the_size_limit_the_weights_are_split_with_an_index(tmp_path, weights):
    folder = _sharded(tmp_path / "step-00000003", weights)
    written = consolidate(folder, tmp_path / "out", max_shard_bytes=100)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) == len(written) - 1 > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in weights.values())
    loaded = {}
    for file in files:  # what a from_pretrained-style loader does with the index
        loaded.update(load_file(tmp_path / "out" / file))
    assert _bitwise(loaded, weights)
    assert {name: index["weight_map"][name] for name in loaded} == index["weight_map"]


def test_an_unsharded_checkpoint_gives_the_models_state_dict(tmp_path):
    model = mlp()
    SafeTrainer(
        model, torch.optim.AdamW(model.parameters(), lr=1e-2), loader(classification_data()),
        loss_fn=nn.CrossEntropyLoss(), max_steps=3, checkpoint_dir=tmp_path / "ckpt", progress_bar=False,
    ).fit()  # fmt: skip
    assert main(["consolidate", str(tmp_path / "ckpt" / "step-00000003"), str(tmp_path / "out")]) == 0
    assert _bitwise(load_file(tmp_path / "out" / "model.safetensors"), model.state_dict())


def test_a_missing_shard_is_named_and_nothing_is_written(tmp_path, weights):
    folder = _sharded(tmp_path / "step-00000003", weights)
    (folder / "shards" / "shard-00002-model-00001-of-00001.safetensors").unlink()
    _seal(folder, _shapes(weights))  # a manifest that matches: the damage is in what the shards cover
    with pytest.raises(CheckpointError, match=r"no shard .* holds any of `scale`: a shard file is missing"):
        consolidate(folder, tmp_path / "out")
    weights.pop("scale")
    _seal(folder, _shapes(weights))
    with pytest.raises(CheckpointError, match=r"`encoder.weight` leave 8 of 24 elements unwritten"):
        consolidate(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_without_saved_shapes_the_pieces_give_them(tmp_path, weights):
    folder = _sharded(tmp_path / "step-00000003", weights)
    _seal(folder)  # a checkpoint of before the whole shapes were saved
    [written] = consolidate(folder, tmp_path / "out")
    assert _bitwise(load_file(written), weights)


def test_overlapping_pieces_that_disagree_are_refused(tmp_path, weights):
    folder = tmp_path / "step-00000003"
    w = weights["encoder.weight"]
    _shard(folder, 1, {"model.encoder.weight": (w[:4], [0, 0])})
    _shard(folder, 2, {"model.encoder.weight": (w[3:] + 1, [3, 0])})
    with pytest.raises(CheckpointError, match=r"`encoder.weight` overlap at offsets \[3, 0\]"):
        consolidate(_seal(folder), tmp_path / "out")
    _seal(folder, {"model.encoder.weight": [5, 4]})  # a piece beyond the saved whole shape
    with pytest.raises(CheckpointError, match=r"lies outside its whole shape \[5, 4\]"):
        consolidate(folder, tmp_path / "out")


def test_a_damaged_checkpoint_and_a_pickled_shard_are_refused(tmp_path, weights, capsys):
    folder = _sharded(tmp_path / "step-00000003", weights)
    shard = folder / "shards" / "shard-00001-model-00001-of-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1] + b"\x00")
    assert main(["consolidate", str(folder), str(tmp_path / "out")]) == 1
    assert "does not verify" in capsys.readouterr().out
    shard.write_bytes(b"\x80\x04K\x01." + shard.read_bytes())  # pickle bytes in front
    _seal(folder, _shapes(weights))
    with pytest.raises(CheckpointError, match="shard refused, not read"):
        consolidate(folder, tmp_path / "out")


def test_bad_places_and_sizes_get_clear_errors(tmp_path, weights, capsys):
    with pytest.raises(CheckpointError, match="neither a checkpoint folder"):
        consolidate(tmp_path, tmp_path / "out")
    folder = _sharded(tmp_path / "step-00000003", weights)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model.safetensors").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="not overwritten"):
        consolidate(folder, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == b"mine"
    assert main(["consolidate", str(folder), str(tmp_path / "o2"), "--max-shard-size", "lots"]) == 1
    assert "not a size: 'lots'" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("text", "size"),
    [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("64kb", 64_000), ("1234", 1234), ("2.5 GB", 25 * 10**8)],
)
def test_sizes_parse_as_the_hub_counts_them(text, size):
    assert parse_size(text) == size


def test_shards_problem_names_a_shard_whose_bytes_changed(tmp_path, weights):
    from types import SimpleNamespace

    from safeloop.checkpoint.spread_hashing import shards_problem

    one = SimpleNamespace(process_index=0, num_processes=1)
    folder = _sharded(tmp_path / "step-00000003", weights)
    assert shards_problem(one, folder) == ""  # type: ignore[arg-type]
    shard = folder / "shards" / "shard-00002-model-00001-of-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1  # one bit of tensor data: the structure is intact, the hash is not
    shard.write_bytes(bytes(data))
    problem = shards_problem(one, folder)  # type: ignore[arg-type]
    assert "shard-00002-model-00001-of-00001.safetensors" in problem
    assert shards_problem(one, tmp_path) != ""  # type: ignore[arg-type]  (no manifest at all)
