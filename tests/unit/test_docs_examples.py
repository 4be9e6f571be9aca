"""Every ```python block of README.md, docs/*.md and docs/zh/*.md runs.

A block with no marker is a complete program and runs as it is. A block that continues from
objects the page built before it (``model``, ``optimizer``, ``loader``, a ``trainer``) says so in an
HTML comment on the line right above its fence, which the rendered page does not show:

    <!-- run with: classifier -->       run after the named setup below (SETUPS)
    <!-- not run: REASON -->            not run, for the reason given (a signature, a launcher)

and ``needs: MODULE`` may be added to either, separated by ``;`` (the block is skipped when the
optional package is not installed). Every other block must run: a new block that is neither
complete nor marked fails here. Each block runs in the test's temporary folder, on one thread,
with the setups kept small (a few hundred samples, tens of steps), so that all of them together
take seconds.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    *sorted((ROOT / "docs" / "zh").glob("*.md")),
]

_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
_KEYS = ("run with", "not run", "needs")


# -- the objects a page builds before its fragments ------------------------------------------------


def _classifier() -> dict[str, object]:
    """A 3-class problem: 256 samples, 16 batches of 16, an MLP, AdamW, cross-entropy."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, Dataset, TensorDataset

    from safeloop import SafeTrainer

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(320, 8, generator=generator)
    y = (x @ torch.randn(8, 3, generator=generator)).argmax(dim=1)
    dataset = TensorDataset(x[:256], y[:256])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    loader = DataLoader(dataset, batch_size=16, shuffle=True)

    class HFStyleModel(nn.Module):
        """Takes the batch's keys as keyword arguments and returns an object with ``.loss``."""

        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(8, 3)

        def forward(self, input_ids, labels=None):
            logits = self.net(input_ids)
            loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
            return {"loss": loss, "logits": logits}

    class Dicts(Dataset):
        def __len__(self) -> int:
            return len(dataset)

        def __getitem__(self, i):
            inputs, label = dataset[i]
            return {"input_ids": inputs, "labels": label}

    return {
        "torch": torch,
        "nn": nn,
        "DataLoader": DataLoader,
        "TensorDataset": TensorDataset,
        "SafeTrainer": SafeTrainer,
        "dataset": dataset,
        "model": model,
        "optimizer": torch.optim.AdamW(model.parameters(), lr=1e-2),
        "loader": loader,
        "train_loader": loader,
        "train_dataloader": loader,
        "eval_loader": DataLoader(TensorDataset(x[256:], y[256:]), batch_size=32),
        "loss_fn": nn.CrossEntropyLoss(),
        "hf_model": HFStyleModel(),
        "dict_loader": DataLoader(Dicts(), batch_size=16),
    }


def _regression() -> dict[str, object]:
    """examples/divergence.py's regression: 512 samples in 16 dimensions, batches of 32, SGD."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from safeloop import SafeTrainer

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(512, 16, generator=generator)
    y = x @ torch.randn(16, 1, generator=generator) + 0.1 * torch.randn(512, 1, generator=generator)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1))
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    return {
        "torch": torch,
        "nn": nn,
        "DataLoader": DataLoader,
        "TensorDataset": TensorDataset,
        "SafeTrainer": SafeTrainer,
        "model": model,
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.002),
        "loader": loader,
        "train_loader": loader,
        "train_dataloader": loader,
        "loss_fn": nn.MSELoss(),
    }


def _trainer() -> dict[str, object]:
    """The classifier's ``trainer``, with a short range test of it as ``sweep``."""
    namespace = _classifier()
    trainer = namespace["SafeTrainer"](  # type: ignore[operator]
        namespace["model"],
        namespace["optimizer"],
        namespace["loader"],
        loss_fn=namespace["loss_fn"],
        max_epochs=2,
    )
    namespace.update(trainer=trainer, sweep=trainer.find_lr(num_steps=20))
    return namespace


def _lightning() -> dict[str, object]:
    """A ``LightningModule`` as ``model`` (the classifier's MLP, AdamW) and its ``train_loader``."""
    import lightning.pytorch as pl

    namespace = _classifier()
    torch, nn = namespace["torch"], namespace["nn"]

    class Classifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)  # type: ignore[attr-defined]
            self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))  # type: ignore[attr-defined]

        def training_step(self, batch, batch_idx):
            inputs, targets = batch
            return nn.functional.cross_entropy(self.net(inputs), targets)  # type: ignore[attr-defined]

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)  # type: ignore[attr-defined]

    namespace["model"] = Classifier()
    return namespace


SETUPS: dict[str, Callable[[], dict[str, object]]] = {
    "classifier": _classifier,
    "regression": _regression,
    "trainer": _trainer,
    "lightning": _lightning,
}


# -- the blocks -------------------------------------------------------------------------------------


def _marker(before: str) -> dict[str, str]:
    """The ``key: value`` pairs of an HTML comment that ends right above a fence."""
    before = before.rstrip()
    if not before.endswith("-->") or "<!--" not in before:
        return {}
    marker = {}
    for part in before[before.rindex("<!--") + 4 : -3].split(";"):
        key, _, value = part.partition(":")
        marker[key.strip()] = value.strip()
    return marker


def python_blocks(text: str) -> list[tuple[int, dict[str, str], str]]:
    """Each ```python block of a page: its line, its marker, its code."""
    return [
        (text.count("\n", 0, match.start()) + 1, _marker(text[: match.start()]), match.group(1))
        for match in _FENCE.finditer(text)
    ]


def _cases() -> list[object]:
    cases = []
    for page in PAGES:
        for line, marker, code in python_blocks(page.read_text(encoding="utf-8")):
            name = f"{page.relative_to(ROOT)}:{line}"
            cases.append(pytest.param(marker, code, name, id=name))
    return cases


CASES = _cases()


def test_every_page_with_python_is_read_and_every_marker_is_understood():
    chinese = [case for case in CASES if case.id.startswith("docs/zh/")]  # type: ignore[attr-defined]
    assert len(CASES) - len(chinese) >= 15 and len(chinese) >= 10, (len(CASES), len(chinese))
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        # every fence is found (none indented or spelled otherwise), every marker sits on a fence
        assert text.count("```python") == len(python_blocks(text)), page
        for marker in re.findall(r"<!--\s*(?:run with|not run|needs)\b.*?-->", text, flags=re.DOTALL):
            assert text.split(marker, 1)[1].lstrip(" \t\n").startswith("```python"), (page, marker)
        for _, marker, _ in python_blocks(text):
            assert set(marker) <= set(_KEYS), (page, marker)
            assert "not run" not in marker or marker["not run"], (page, "give the reason a block is not run")
            assert "run with" not in marker or marker["run with"] in SETUPS, (page, marker)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(("marker", "code", "name"), CASES)
def test_the_code_block_runs(marker: dict[str, str], code: str, name: str):
    if "not run" in marker:
        pytest.skip(f"not run: {marker['not run']}")
    for module in filter(None, (m.strip() for m in marker.get("needs", "").split(","))):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"needs {module}")
    namespace: dict[str, object] = {"__name__": "__main__"}
    if "run with" in marker:
        namespace.update(SETUPS[marker["run with"]]())
    exec(compile(code, name, "exec"), namespace)


def test_a_fragment_without_its_marker_is_caught():
    page = (
        "Text.\n\n```python\ntrainer.fit()\n```\n\n"
        "<!-- run with: trainer -->\n```python\ntrainer.fit()\n```\n"
    )
    (first, unmarked, _), (second, marked, _) = python_blocks(page)
    assert (first, unmarked) == (3, {})  # so it runs alone, and fails on the undefined `trainer`
    assert (second, marked) == (8, {"run with": "trainer"})
    with pytest.raises(NameError):
        exec(compile(python_blocks(page)[0][2], "page", "exec"), {})
