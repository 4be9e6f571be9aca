"""First-batch checks: each realistic setup mistake gives its own finding, naming the parameters or
modules involved; a healthy model gives none; the fatal ones become one ``ConfigError``."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from safeloop.diagnostics.first_batch import (
    RAISED_CODES,
    check_double_backward,
    check_gradient_reach,
    check_loss,
    check_optimizer,
    check_trainable,
    raise_if_fatal,
)
from safeloop.diagnostics.watch import ForwardWatch, GradientReach
from safeloop.errors import ConfigError
from safeloop.results import Finding
from tests.helpers.models import DictModel, mlp

X = torch.randn(8, 8, generator=torch.Generator().manual_seed(1))
Y = torch.arange(8) % 3

LossOf = Callable[[nn.Module], torch.Tensor]


def default_loss(model: nn.Module) -> torch.Tensor:
    return F.cross_entropy(model(X), Y)


def first_batch(model: nn.Module, optimizer=None, loss_of: LossOf = default_loss) -> list[Finding]:
    """The trainer's first batch: watched forward, checks, backward unless fatal, reach check."""
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.1)
    watch = ForwardWatch(model)
    with watch:
        loss = loss_of(model)
    findings = check_trainable(model)
    findings += check_optimizer(model, optimizer)
    findings += check_double_backward(model)
    findings += check_loss(loss, watch)
    if not any(f.severity == "error" and f.code in RAISED_CODES for f in findings):
        loss.backward()
        findings += check_gradient_reach(model, watch)
    return findings


def only(findings: list[Finding], code: str) -> Finding:
    assert [f.code for f in findings] == [code], [(f.code, f.message) for f in findings]
    return findings[0]


# -- models --------------------------------------------------------------------------------


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x.view(8, 2, 2, 2)).mean(dim=(2, 3))
        return self.head(h)


class TinyTransformer(nn.Module):
    """Embedding, one encoder layer (MultiheadAttention calls `out_proj` functionally), tied head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 16)
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 12, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = (x.abs() * 10).long() % 12
        return self.head(self.norm(self.layer(self.embed(ids)))).mean(dim=1)[:, :3]


class FunctionalHead(nn.Module):
    """Uses a child's parameters through `F.linear` in its own forward, never calling the child."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 16)
        self.proj = nn.Linear(16, 3)
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.tanh(self.body(x)), self.proj.weight, self.proj.bias) * self.scale


class ZeroGradAux(nn.Module):
    """`aux` runs and gets an all-zero gradient: that is zero-params' business, not reported here."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 3)
        self.aux = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + 0 * self.aux(x)


class Backbone(nn.Module):
    """A model whose classification head may be added later, as fine-tuning scripts do."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.head: nn.Module = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))[:, :3]


# -- healthy runs --------------------------------------------------------------------------


@pytest.mark.parametrize("make", [mlp, ConvNet, TinyTransformer, FunctionalHead, ZeroGradAux])
def test_healthy_model_gives_no_finding(make):
    assert first_batch(make()) == []


def test_dataclass_output_through_a_wrapper_is_watched():
    model = DictModel()
    wrapper = nn.ModuleDict({"module": model})  # stands for DDP: the forward goes through a wrapper
    watch = ForwardWatch(model)
    with watch:
        loss = wrapper["module"](input_ids=X, labels=Y).loss
    assert {"", "net", "net.0", "net.2"} <= watch.ran
    assert "" in watch.grad_output  # found inside the dataclass output
    assert watch.last_grad_output == "" and not watch.no_grad
    assert check_loss(loss, watch) == []


def test_hooks_are_removed_on_exit_and_on_exception():
    model = ConvNet()
    modules = list(model.modules())
    watch = ForwardWatch(model)
    with watch:
        assert all(m._forward_hooks and m._forward_pre_hooks for m in modules)
        model(X)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in modules)
    with pytest.raises(ValueError, match="boom"), ForwardWatch(model):
        raise ValueError("boom")
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in modules)
    ran = set(watch.ran)
    model(X)  # after exit the watch records nothing more
    assert watch.ran == ran and "features.0" in ran


# -- before the backward -------------------------------------------------------------------


def test_all_parameters_frozen():
    model = mlp().requires_grad_(False)
    findings = first_batch(model)
    assert [f.code for f in findings] == ["no-trainable-params", "loss-not-differentiable"]
    assert "all 4 parameter tensors of `Sequential`" in findings[0].message
    assert "`0.weight`" in findings[0].message and "requires_grad_(True)" in findings[0].suggestion
    assert "every parameter has `requires_grad=False`" in findings[1].message


def test_head_added_after_the_optimizer_is_missing():
    model = Backbone()
    optimizer = torch.optim.AdamW(model.parameters())
    model.head = nn.Linear(16, 3)
    finding = only(first_batch(model, optimizer), "optimizer-missing-params")
    assert finding.severity == "warning"
    assert finding.params == ("head.weight", "head.bias")
    assert (
        "2 of the model's 4 trainable tensors" in finding.message
        and "`head` (weight, bias)" in finding.message
    )


def test_head_replaced_after_the_optimizer_is_foreign():
    model = Backbone()
    model.head = nn.Linear(16, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.head = nn.Linear(16, 3)  # same shapes, new tensors
    finding = only(first_batch(model, optimizer), "optimizer-foreign-params")
    assert finding.severity == "error" and finding.params == ("head.weight", "head.bias")
    assert "holds 2 tensors that are not parameters" in finding.message
    assert "(3, 16), (3,)" in finding.message and "re-created after it" in finding.message


def test_optimizer_built_from_another_instance():
    model = mlp()
    optimizer = torch.optim.SGD(mlp().parameters(), lr=0.1)  # equal values, other tensors
    finding = only(first_batch(model, optimizer), "optimizer-foreign-params")
    assert finding.params == ("0.weight", "0.bias", "2.weight", "2.bias")
    assert "shapes (16, 8), (16,), (3, 16), (3,)" in finding.message
    assert "another instance of the model" in finding.message
    assert "model.parameters()" in finding.suggestion


def test_extra_learnable_tensor_beside_all_parameters_is_fine():
    model = mlp()
    log_var = torch.zeros(1, requires_grad=True)  # a learnable loss weight, outside the model
    optimizer = torch.optim.SGD([*model.parameters(), log_var], lr=0.1)
    assert check_optimizer(model, optimizer) == []


def test_training_step_under_no_grad():
    def training_step(model):
        with torch.no_grad():
            logits = model(X)
        return F.cross_entropy(logits, Y)

    finding = only(first_batch(mlp(), loss_of=training_step), "loss-not-differentiable")
    assert "the model itself (`Sequential`) ran with gradients disabled" in finding.message
    assert "element 0 of tensors" in finding.message and finding.params == ("Sequential",)
    assert "Remove `torch.no_grad()`" in finding.suggestion
    assert "inference_mode" not in finding.message


def test_training_step_under_inference_mode():
    def training_step(model):
        with torch.inference_mode():
            return F.cross_entropy(model(X), Y)

    finding = only(first_batch(mlp(), loss_of=training_step), "loss-not-differentiable")
    assert "ran under `torch.inference_mode()`" in finding.message
    assert "gradients disabled" not in finding.message  # one cause, not two
    assert "inference_mode" in finding.suggestion


@pytest.mark.parametrize("cut", [torch.Tensor.detach, lambda t: t.data, lambda t: torch.tensor(t.tolist())])
def test_output_cut_before_the_loss(cut):
    finding = only(
        first_batch(mlp(), loss_of=lambda m: F.cross_entropy(cut(m(X)), Y)), "loss-not-differentiable"
    )
    assert "cut between the model output (which requires grad) and the loss" in finding.message
    assert "`.detach()`" in finding.suggestion


def test_cut_inside_the_model_names_the_last_module_with_a_graph():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Linear(8, 16)
            self.head = nn.Linear(16, 3).requires_grad_(False)

        def forward(self, x):
            return self.head(self.encoder(x).detach())

    finding = only(first_batch(Net()), "loss-not-differentiable")
    assert "inside the model, after `encoder`" in finding.message and finding.params == ("encoder",)


def test_only_frozen_modules_ran():
    model = nn.ModuleDict({"body": nn.Linear(8, 3).requires_grad_(False), "head": nn.Linear(3, 3)})
    loss_of = lambda m: F.cross_entropy(m["body"](X), Y)  # noqa: E731  (the head is forgotten)
    finding = only(first_batch(model, loss_of=loss_of), "loss-not-differentiable")
    assert "no module returned an output requiring grad; the trainable ones: `head`" in finding.message
    assert finding.params == ("head",)


def test_loss_rebuilt_as_a_leaf():
    def training_step(model):
        return torch.tensor(F.cross_entropy(model(X), Y).item(), requires_grad=True)

    finding = only(first_batch(mlp(), loss_of=training_step), "loss-not-differentiable")
    assert "new leaf" in finding.message


def test_unreduced_loss():
    loss_of = lambda m: F.cross_entropy(m(X), Y, reduction="none")  # noqa: E731
    finding = only(first_batch(mlp(), loss_of=loss_of), "loss-not-scalar")
    assert "shape (8,)" in finding.message and "`loss.mean()`" in finding.suggestion


def test_training_step_that_calls_backward_itself():
    def training_step(model):
        loss = F.cross_entropy(model(X), Y)
        loss.backward()
        return loss

    finding = only(first_batch(mlp(), loss_of=training_step), "double-backward")
    assert finding.params == ("0.weight", "0.bias", "2.weight", "2.bias")
    assert "4 of 4 parameter tensors already hold a gradient" in finding.message
    assert "return the loss only" in finding.suggestion and "zero_grad()" in finding.suggestion


# -- after the backward --------------------------------------------------------------------


def test_detach_inside_a_block_makes_the_earlier_layer_detached():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1 = nn.Linear(8, 16)
            self.l2 = nn.Linear(16, 16)

        def forward(self, x):
            return self.l2(torch.relu(self.l1(x)).detach())

    model = nn.Sequential()
    model.add_module("block", Block())
    model.add_module("head", nn.Linear(16, 3))
    finding = only(first_batch(model), "detached-params")
    assert finding.severity == "warning" and finding.params == ("block.l1.weight", "block.l1.bias")
    assert "2 trainable tensors (144 elements)" in finding.message
    assert "`block.l1` (weight, bias): its output required grad but was cut" in finding.message


def test_encoder_run_under_no_grad_inside_forward():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16))
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            with torch.no_grad():  # meant for a frozen encoder, but the encoder was left trainable
                h = self.encoder(x)
            return self.head(h)

    finding = only(first_batch(Net()), "detached-params")
    assert finding.params == ("encoder.0.weight", "encoder.0.bias", "encoder.2.weight", "encoder.2.bias")
    assert "`encoder.0` (weight, bias) ran with gradients disabled" in finding.message


def test_reentrant_checkpoint_whose_inputs_need_no_grad():
    class Net(nn.Module):  # the classic LoRA/frozen-embedding + gradient checkpointing bug
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(8, 16).requires_grad_(False)
            self.block = nn.Linear(16, 16)
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            return self.head(checkpoint(self.block, self.embed(x), use_reentrant=True))

    with pytest.warns(UserWarning, match="requires_grad"):
        finding = only(first_batch(Net()), "detached-params")
    assert finding.params == ("block.weight", "block.bias")
    assert "`block` (weight, bias) ran with gradients disabled" in finding.message
    assert "reentrant `torch.utils.checkpoint`" in finding.message


def test_parameter_its_module_never_uses():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(8, 3)
            self.temperature = nn.Parameter(torch.ones(1))  # declared, forgotten in forward

        def forward(self, x):
            return self.body(x)

    finding = only(first_batch(Net()), "detached-params")
    assert finding.params == ("temperature",)
    assert "`Net` itself (temperature): its forward does not use them" in finding.message


def test_module_defined_but_never_called_is_unused():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(8, 16)
            self.aux_head = nn.Linear(16, 5)  # defined, never called
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            return self.head(torch.relu(self.body(x)))

    finding = only(first_batch(Net()), "unused-params")
    assert finding.params == ("aux_head.weight", "aux_head.bias")
    assert "never ran in the forward: `aux_head` (weight, bias)" in finding.message
    assert "85 elements" in finding.message and "requires_grad_(False)" in finding.suggestion


def test_loss_computed_with_another_model_object():
    other = mlp()
    finding = only(first_batch(mlp(), loss_of=lambda m: F.cross_entropy(other(X), Y)), "unused-params")
    assert "no module of the model ran at all" in finding.message and len(finding.params) == 4


# -- raising -------------------------------------------------------------------------------


def test_raise_if_fatal_lists_every_raised_error_and_only_those():
    raised = [
        Finding("loss-not-scalar", "error", "shape (8,) seen", suggestion="use mean"),
        Finding("double-backward", "error", "grads present", ("0.weight",), 0, "return the loss"),
    ]
    kept_out = [
        Finding("unused-params", "warning", "aux never ran", ("aux.weight",), 0, "call aux"),
        Finding("nonfinite-input", "error", "NaN in batch[0]", (), 0, "clean the data"),
    ]
    with pytest.raises(ConfigError) as excinfo:
        raise_if_fatal([kept_out[0], raised[0], kept_out[1], raised[1]])
    message = str(excinfo.value)
    assert excinfo.value.findings == tuple(raised)
    assert message.startswith("The first batch shows 2 problem(s)")
    assert "1. [loss-not-scalar] shape (8,) seen\n   Fix: use mean" in message
    assert "2. [double-backward] grads present\n   Fix: return the loss" in message
    assert "aux never ran" not in message and "NaN" not in message
    raise_if_fatal(kept_out)  # nothing raised


def test_raise_if_fatal_on_a_real_first_batch():
    model = mlp().requires_grad_(False)
    findings = first_batch(model, loss_of=lambda m: F.cross_entropy(m(X), Y, reduction="none"))
    with pytest.raises(ConfigError, match="no-trainable-params") as excinfo:
        raise_if_fatal(findings)
    codes = [f.code for f in excinfo.value.findings]
    assert codes == ["no-trainable-params", "loss-not-scalar", "loss-not-differentiable"]
    assert "Fix: Reduce it, e.g. `loss.mean()`" in str(excinfo.value)


def test_under_deepspeed_the_optimizer_is_not_compared_with_the_model(monkeypatch):
    # ZeRO's optimizer holds flat partitions of the parameters, never the model's own tensors
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    from safeloop.diagnostics.session import Diagnostics
    from safeloop.findings import Reporter
    from safeloop.hooks import CallbackList
    from safeloop.run_state import Progress, RunRecord
    from tests.helpers.models import classification_data, loader

    model = mlp()
    partition = [nn.Parameter(torch.zeros(366))]  # what a ZeRO optimizer's param_groups hold
    accelerator = Accelerator(cpu=True)
    reporter = Reporter(accelerator, Progress(), RunRecord(), CallbackList(()))

    def diagnostics() -> Diagnostics:
        return Diagnostics(accelerator, model, torch.optim.SGD(partition, lr=0.1), reporter, log_every=10)

    x, y = next(iter(loader(classification_data(n=32), batch_size=8)))
    with pytest.raises(ConfigError, match="optimizer-foreign-params"):  # not under DeepSpeed
        diagnostics().first_loss((x, y), lambda loss_fn: F.cross_entropy(model(x), y))
    monkeypatch.setattr(accelerator.state, "distributed_type", DistributedType.DEEPSPEED)
    loss = diagnostics().first_loss((x, y), lambda loss_fn: F.cross_entropy(model(x), y))
    assert loss.requires_grad


# -- gradient reach from hooks (DeepSpeed ZeRO never leaves a `.grad`) --------------------


class Unused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = mlp()
        self.aux = nn.Linear(3, 3)  # never called
        self.cut = nn.Linear(8, 8)  # called, output detached

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x + self.cut(x).detach())


def test_gradient_hooks_tell_unused_from_detached_where_grad_is_taken_away():
    model = Unused()
    reach = GradientReach(model)
    with ForwardWatch(model) as watch:
        loss = default_loss(model)
    # an engine that moves each gradient out of `.grad` as soon as it is accumulated (ZeRO)
    handles = [
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None)) for p in model.parameters()
    ]
    loss.backward()
    for handle in handles:
        handle.remove()
    assert all(p.grad is None for p in model.parameters())
    reached = reach.close()
    assert reached == {n for n, _ in model.named_parameters() if n.startswith("body.")}
    findings = check_gradient_reach(model, watch, reached)
    assert [(f.code, f.params) for f in findings] == [
        ("unused-params", ("aux.weight", "aux.bias")),
        ("detached-params", ("cut.weight", "cut.bias")),
    ]
    # without the hooks' record, `.grad` would call every parameter unused or cut off
    assert {p for f in check_gradient_reach(model, watch) for p in f.params} == {
        n for n, _ in model.named_parameters()
    }


def test_gradient_reach_hooks_are_removed_on_close():
    model = mlp()
    reach = GradientReach(model)
    assert reach.close() == set()
    default_loss(model).backward()
    assert reach.reached == set()  # no hook fired after close
