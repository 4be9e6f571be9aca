"""Sharded checkpoints, the parts that need no process group: names, file structure, refusals."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

from safeloop.checkpoint.checkpointer import build_manager
from safeloop.checkpoint.manifest import valid_file_name
from safeloop.checkpoint.sharded import safetensors_problem
from safeloop.config import TrainerConfig
from safeloop.errors import ConfigError


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("state.json", True),
        ("shards/shard-00001-model-00001-of-00001.safetensors", True),
        ("manifest.json", False),
        ("other/file.safetensors", False),
        ("shards/../state.json", False),
        ("shards/.hidden", False),
        ("/etc/passwd", False),
        ("shards/a/b", False),
        (".state.json", False),
    ],
)
def test_only_plain_names_and_names_in_shards_may_be_listed(name, valid):
    assert valid_file_name(name) is valid


def test_a_well_formed_safetensors_file_passes_and_planted_bytes_do_not(tmp_path):
    path = tmp_path / "shard.safetensors"
    save_file(
        {"a": torch.arange(6.0), "b": torch.ones(2, 3, dtype=torch.int64)}, str(path), metadata={"k": "v"}
    )
    assert safetensors_problem(path) is None
    data = path.read_bytes()
    cases = {
        "pickle in front": pickle.dumps({"lr": 0.1}) + data,
        "pickle behind": data + pickle.dumps({"lr": 0.1}),
        "truncated": data[:-4],
        "no header": data[:5],
    }
    for what, content in cases.items():
        path.write_bytes(content)
        assert safetensors_problem(path) is not None, what


def test_an_engine_whose_state_cannot_be_written_refuses_checkpoint_dir_naming_the_problem(tmp_path):
    problem = "this DeepSpeed (0.1) lacks update_lp_params, which restoring ZeRO-2 state needs"
    config = TrainerConfig(checkpoint_dir=str(tmp_path))
    with pytest.raises(
        ConfigError, match=r"`checkpoint_dir` is set under DeepSpeed, but this DeepSpeed \(0.1\) lacks"
    ):
        build_manager(config, accelerator=None, engine="deepspeed", engine_problem=problem)  # type: ignore[arg-type]
    manager, note = build_manager(
        TrainerConfig(), accelerator=None, engine="deepspeed", engine_problem=problem
    )  # type: ignore[arg-type]
    assert manager is None and note is not None and note.code == "rollback-unavailable"
    assert "DeepSpeed" in note.message and "update_lp_params" in note.message


@pytest.mark.parametrize(("engine", "name"), [("fsdp2", "FSDP2"), ("fsdp1", "FSDP1")])
def test_fsdp_on_a_torch_without_the_safetensors_writer_is_refused_naming_the_version(
    tmp_path, monkeypatch, engine, name
):
    from safeloop.checkpoint import sharded

    monkeypatch.setattr(sharded, "_HF_WRITER", False)
    problem = sharded.dcp_support_problem()
    with pytest.raises(ConfigError, match=rf"under {name}, but sharded checkpoints need .*save_distributed"):
        build_manager(
            TrainerConfig(checkpoint_dir=str(tmp_path)),
            accelerator=None,
            engine=engine,
            engine_problem=problem,
        )  # type: ignore[arg-type]
    manager, note = build_manager(TrainerConfig(), accelerator=None, engine=engine, engine_problem=problem)  # type: ignore[arg-type]
    assert manager is None and note is not None and f"under {name} here" in note.message


def test_a_deepspeed_engine_is_checked_for_every_call_a_restore_needs():
    from types import SimpleNamespace

    from safeloop.checkpoint.zero_state import zero_checkpoint_problem

    class Zero2:
        single_partition_of_fp32_groups = bit16_groups = ()

        def update_lp_params(self): ...

        def _lazy_init_hp_params_optimizer_state(self): ...

    def engine(stage, optimizer):
        return SimpleNamespace(zero_optimization_stage=lambda: stage, optimizer=optimizer)

    assert zero_checkpoint_problem(engine(2, Zero2())) is None
    assert zero_checkpoint_problem(engine(1, Zero2())) is None
    del Zero2.update_lp_params
    problem = zero_checkpoint_problem(engine(2, Zero2()))
    assert problem is not None and "lacks update_lp_params" in problem and "ZeRO-2" in problem
    problem = zero_checkpoint_problem(engine(3, Zero2()))  # ZeRO-3's own calls
    assert problem is not None and "_get_fp32_opt_state_partition" in problem
    plain = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    assert zero_checkpoint_problem(engine(0, plain)) is None  # stage 0 in fp32: the torch optimizer
    plain.loss_scaler = object()  # a mixed-precision wrapper's mark
    assert "use ZeRO stage 1, 2 or 3" in (zero_checkpoint_problem(engine(0, plain)) or "")
    assert "no optimizer" in (zero_checkpoint_problem(engine(2, None)) or "")


def test_spread_digests_on_one_process_are_the_manifests_chunk_digests(tmp_path):
    from types import SimpleNamespace

    from safeloop.checkpoint.manifest import CHUNK_BYTES, file_digests, hash_pool, results
    from safeloop.checkpoint.spread_hashing import spread_digests

    sizes = {"shard-00001-model-00001-of-00001.safetensors": CHUNK_BYTES + 5, "b.safetensors": 0}
    for name, size in sizes.items():
        (tmp_path / name).write_bytes(bytes(range(256)) * (size // 256) + b"x" * (size % 256))
    one = SimpleNamespace(process_index=0, num_processes=1)
    digests, problem = spread_digests(one, tmp_path, sorted(sizes))  # type: ignore[arg-type]
    pool = hash_pool()
    expected = {n: results(file_digests(tmp_path / n, s, pool)) for n, s in sizes.items()}
    pool.shutdown()
    assert problem == "" and digests == expected
    assert len(digests["shard-00001-model-00001-of-00001.safetensors"]) == 2  # one per 16 MiB chunk
