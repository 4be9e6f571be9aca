"""FSDP2's local gradients for the noise scale: the measuring comm, where it goes, when not, the windows.

Host side and with stand-ins for FSDP2's modules and comms; the real ``fully_shard`` runs in
``tests/distributed/test_noise_scale.py``.
"""

from __future__ import annotations

import gc
import math
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from safeloop.diagnostics.noise_probe_fsdp import (
    MeasuredReduceScatter,
    attach_sharded_probe,
    measure_local_gradients,
)
from safeloop.diagnostics.noise_scale import NoiseScaleProbe, two_sizes

CPU = torch.device("cpu")


class _Comm:
    """A reduce-scatter comm that records its calls (FSDP2's default allocates and communicates)."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def allocate(self, size, *, dtype, device):
        return torch.zeros(size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        self.calls.append({"input": input_tensor.clone(), "group": group, "op": op, "async_op": async_op})
        output_tensor.copy_(input_tensor[: output_tensor.numel()])
        return "work"


class _Module:
    """An FSDP2 module as the attachment sees it: parameter groups with a comm, a public setter."""

    def __init__(self, *comms) -> None:
        self.groups = [SimpleNamespace(_reduce_scatter_comm=comm) for comm in comms]

    def _get_fsdp_state(self):
        return SimpleNamespace(_fsdp_param_groups=self.groups)

    def set_custom_reduce_scatter(self, comm) -> None:
        for group in self.groups:
            group._reduce_scatter_comm = comm


def _probe(mode: str = "fsdp", accumulation: int = 1, scaler=None) -> NoiseScaleProbe:
    return NoiseScaleProbe([torch.nn.Parameter(torch.zeros(2))], mode, accumulation, scaler)


def test_the_comm_measures_the_input_then_hands_everything_on_unchanged():
    inner, probe = _Comm(), _probe()
    comm = MeasuredReduceScatter(inner, probe)
    buffer = comm.allocate((4,), dtype=torch.float32, device=CPU)
    assert buffer.shape == (4,)
    buffer.copy_(torch.tensor([1.0, 2.0, 2.0, 0.0]))  # a gradient of norm 3 and a zero padding
    probe.see(8)
    output = torch.empty(2)
    assert comm(output_tensor=output, input_tensor=buffer, group="pg", op="avg") == "work"
    [call] = inner.calls
    assert call["input"].tolist() == [1.0, 2.0, 2.0, 0.0] and buffer.tolist() == [1.0, 2.0, 2.0, 0.0]
    assert (call["group"], call["op"], call["async_op"]) == ("pg", "avg", False)
    assert [float(p) for p in probe._pieces] == [pytest.approx(9.0)]


def test_an_fp16_buffer_divided_by_fsdp_is_left_out_and_a_dead_probe_only_communicates():
    inner, probe = _Comm(), _probe()
    comm = MeasuredReduceScatter(inner, probe)
    probe.see(8)
    comm(torch.empty(1, dtype=torch.float16), torch.ones(2, dtype=torch.float16), None, "sum")
    assert math.isnan(float(probe._pieces[0]))
    del probe
    gc.collect()
    comm(torch.empty(1), torch.ones(2), None, "sum")  # the trainer is gone: the model still trains
    assert len(inner.calls) == 2


def test_every_module_is_wrapped_once_and_a_second_probe_takes_over_the_same_wrappers():
    first, second = _Comm(), _Comm()
    modules = [_Module(first), _Module(second)]
    old, new = _probe(), _probe()
    assert measure_local_gradients(modules, old) is None
    wrapped = [m.groups[0]._reduce_scatter_comm for m in modules]
    assert [type(c) for c in wrapped] == [MeasuredReduceScatter] * 2
    assert [c.inner for c in wrapped] == [first, second]
    assert measure_local_gradients(modules, new) is None  # a second trainer on the same model
    assert [m.groups[0]._reduce_scatter_comm for m in modules] == wrapped  # not wrapped twice
    assert all(c.probe() is new for c in wrapped)


def test_a_module_with_several_groups_or_unknown_internals_changes_nothing():
    plain, several = _Module(_Comm()), _Module(_Comm(), _Comm())
    reason = measure_local_gradients([plain, several], _probe())
    assert reason is not None and "2 parameter groups" in reason
    assert type(plain.groups[0]._reduce_scatter_comm) is _Comm  # all or nothing
    reason = measure_local_gradients([object()], _probe())
    assert reason is not None and "does not keep its reduce-scatter comm" in reason


def _accelerator(**overrides):
    values = {
        "num_processes": 2,
        "gradient_accumulation_steps": 1,
        "mixed_precision": "no",
        "distributed_type": DistributedType.FSDP,
        "scaler": None,
        "state": SimpleNamespace(fsdp_plugin=SimpleNamespace(mixed_precision_policy=None)),
        "gradient_state": SimpleNamespace(plugin_kwargs={}),
    }
    return SimpleNamespace(**(values | overrides))


class _Sharded(torch.nn.Module):
    """A model whose submodule is an FSDP2 module (``fsdp2_modules`` looks for the class)."""

    def __init__(self) -> None:
        from torch.distributed.fsdp import FSDPModule

        super().__init__()
        layer = torch.nn.Linear(2, 2)
        layer.__class__ = type("FSDPLinear", (FSDPModule, torch.nn.Linear), {})
        stand_in = _Module(_Comm())
        layer._get_fsdp_state = stand_in._get_fsdp_state  # type: ignore[method-assign]
        layer.set_custom_reduce_scatter = stand_in.set_custom_reduce_scatter  # type: ignore[method-assign]
        self.layer = layer


def _wrapped(model: _Sharded) -> int:
    """The parameter groups of ``model`` whose reduce-scatter comm now measures."""
    groups = model.layer._get_fsdp_state()._fsdp_param_groups
    return sum(isinstance(group._reduce_scatter_comm, MeasuredReduceScatter) for group in groups)


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"num_processes": 1}, "one process has no reduce-scatter"),
        ({"mixed_precision": "fp16"}, "fp16 gradients"),
        (
            {
                "state": SimpleNamespace(
                    fsdp_plugin=SimpleNamespace(
                        mixed_precision_policy=SimpleNamespace(reduce_dtype=None, param_dtype=torch.float16)
                    )
                )
            },
            "fp16 gradients",
        ),
        (
            {
                "gradient_accumulation_steps": 2,
                "gradient_state": SimpleNamespace(plugin_kwargs={"sync_each_batch": True}),
            },
            "sync_each_batch=True",
        ),
        (
            {"distributed_type": DistributedType.DEEPSPEED},
            "DeepSpeed reduces the gradients inside its engine",
        ),
    ],
)
def test_runs_whose_reduce_scatter_input_is_not_a_gradient_say_why(overrides, words):
    model = _Sharded()
    probe = _probe()
    reason = attach_sharded_probe(_accelerator(**overrides), model, list(model.parameters()), probe)
    assert reason is not None and words in reason
    assert _wrapped(model) == 0  # refused before any comm was replaced


def test_fsdp1_is_not_measured_and_fsdp2_gets_a_probe_of_its_own_mode():
    plain = torch.nn.Linear(2, 2)  # FSDP1 leaves no FSDP2 module
    reason = attach_sharded_probe(_accelerator(), plain, list(plain.parameters()), _probe())
    assert reason is not None and "under FSDP1" in reason
    model = _Sharded()
    probe = _probe(accumulation=2)
    reason = attach_sharded_probe(
        _accelerator(gradient_accumulation_steps=2), model, list(model.parameters()), probe
    )
    assert reason is None and _wrapped(model) > 0


def test_fsdp_sizes_are_a_process_window_against_all_processes():
    assert two_sizes(8, 2, 2, "fsdp") == (16, 32)
    assert two_sizes(16, 1, 4, "fsdp") == (16, 64)
    assert two_sizes(8, 4, 1, "fsdp") is None  # one process: one size


def _window(probe: NoiseScaleProbe, pieces_per_backward: list[list[float]], total: float = 1.0) -> None:
    for index, pieces in enumerate(pieces_per_backward):
        probe.see(8)
        for square in pieces:  # the comm's calls during this micro-batch's backward
            probe.add_local(torch.tensor(square))
        probe.after_backward(first=index == 0)
    probe.at_step(torch.tensor(total), torch.tensor(1.0))


def test_the_fsdp_probe_sums_the_modules_of_the_window_last_backward_only():
    probe = _probe(accumulation=2)
    _window(probe, [[], [3.0, 1.0]])  # no_sync, then two FSDP modules reduce-scatter: kept
    _window(probe, [[2.0], [2.0]])  # every micro-batch reduce-scattered (sync_each_batch): out
    _window(probe, [[], []])  # nothing communicated: out
    probe.add_local(torch.tensor(50.0))  # a backward outside the trainer's windows: ignored
    _window(probe, [[], [1.0]], total=0.5)
    assert probe.measurements(CPU).tolist() == pytest.approx([4.0 + 1.0, 1.0 + 0.25, 2.0])


class _Scaler:
    def __init__(self, scale: float) -> None:
        self._scale = torch.tensor(scale)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_hook_pieces_are_unscaled_by_the_fp16_loss_scale(mode):
    probe = _probe(mode, scaler=_Scaler(64.0))
    _window(probe, [[9.0 * 64.0**2]], total=2.0)  # the hook saw the loss-scaled gradient
    assert probe.measurements(CPU).tolist() == pytest.approx([9.0, 4.0, 1.0])
