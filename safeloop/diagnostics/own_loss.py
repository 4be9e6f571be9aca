"""Target checks for models that compute their own loss: ``labels`` in the batch, ``outputs.loss`` back.

Hugging Face models (and custom models that follow them) take the targets as keyword arguments
(``labels``; ``start_positions``/``end_positions`` for question answering) and compute the loss
inside ``forward``, so no ``loss_fn`` is there to check. The class count comes from the model:

- before the forward, from a Hugging Face model's head: ``config.num_labels`` for sequence and
  token classifiers, the output embeddings' width (else ``config.vocab_size``) for language
  models, the input length for question answering and multiple choice. Checked before the forward
  because an index out of range is a device-side assert on CUDA, which kills the CUDA context;
- after the forward, from the logits' last dimension (``outputs.logits``, ``outputs.start_logits``)
  for any other model; when the forward raised, from a second forward without the targets (error
  path only, under ``torch.no_grad`` with the RNG and buffers restored), so that torch's
  ``IndexError`` comes back as ``target-out-of-range`` with its fix.

The ignore index is -100, as in Hugging Face and torch's cross-entropy. All of it runs once, on the
first batch, and reads the targets on the host.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from safeloop.diagnostics.localize import named_tensors
from safeloop.diagnostics.targets import class_range_findings, no_targets_finding
from safeloop.results import Finding

__all__ = ["OwnLossCheck", "own_targets", "explain_nonfinite_first_loss", "TARGET_KEYS", "IGNORE_INDEX"]

# the batch keys read as targets of a model's own loss (Hugging Face's names)
TARGET_KEYS = ("labels", "label", "start_positions", "end_positions")
# Hugging Face's and torch's default ignore index for cross-entropy
IGNORE_INDEX = -100
_POSITIONS = ("start_positions", "end_positions")
_LOGITS = {"start_positions": "start_logits", "end_positions": "end_logits"}
# the head of a Hugging Face model, from its class name: what its `labels` index
_KINDS = (
    ("ForSequenceClassification", "classes"),
    ("ForImageClassification", "classes"),
    ("ForAudioClassification", "classes"),
    ("ForVideoClassification", "classes"),
    ("ForTokenClassification", "classes"),
    ("ForCausalLM", "causal"),
    ("LMHeadModel", "causal"),
    ("ForMaskedLM", "vocab"),
    ("ForConditionalGeneration", "vocab"),
    ("ForSeq2SeqLM", "vocab"),
    ("ForQuestionAnswering", "qa"),
    ("ForMultipleChoice", "choice"),
)


def own_targets(batch: Any) -> dict[str, torch.Tensor]:
    """The integer target tensors of a mapping batch, by key (``labels``, ``start_positions``, ...).

    Float targets (regression, multi-label) and empty tensors are left out: they hold no class
    indices.
    """
    if not isinstance(batch, Mapping):
        return {}
    found = {}
    for key in TARGET_KEYS:
        value = batch.get(key)
        if (
            isinstance(value, torch.Tensor)
            and value.numel() > 0
            and not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool)
        ):
            found[key] = value
    return found


@dataclass(frozen=True)
class _Classes:
    """How many classes (or positions) a target indexes, and where that number comes from."""

    count: int
    where: str  # "`T5ForConditionalGeneration` has 100 classes (`lm_head.out_features`)"
    source: str  # "config", "outputs", "inputs": which fix to suggest


def _field(outputs: Any, name: str) -> Any:
    if isinstance(outputs, Mapping):
        return outputs.get(name)
    return getattr(outputs, name, None)


def _input_length(batch: Mapping[str, Any]) -> tuple[int, str] | None:
    """The length of the inputs' dimension 1 (tokens, or choices), and where it was read."""
    for key in ("input_ids", "inputs_embeds"):
        value = batch.get(key)
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return int(value.shape[1]), f"batch[{key!r}].shape[1]"
    return None


class OwnLossCheck:
    """The first-batch target checks of a model that computes its own loss.

    Args:
        model (`torch.nn.Module`): the unwrapped model.
        batch (`Mapping`): the first (mapping) batch.
    """

    def __init__(self, model: torch.nn.Module, batch: Mapping[str, Any]) -> None:
        self.model = model
        self.name = type(model).__name__
        self.batch = batch
        self.targets = own_targets(batch)
        self.kind = next((kind for suffix, kind in _KINDS if self.name.endswith(suffix)), None)
        self.checked: set[str] = set()  # keys whose range was judged (before the forward, or after)
        self.masked = False  # every target is the ignore index (reported; explains a NaN loss)

    # -- before the forward: the head a Hugging Face model declares ---------------------------

    def before_forward(self) -> list[Finding]:
        """Check the targets against the class count the model's config or inputs give."""
        findings = self._masked()
        for key, targets in self.targets.items():
            classes = self._declared(key)
            if classes is not None:
                self.checked.add(key)
                findings += self._range(key, targets, classes)
        return findings

    def _declared(self, key: str) -> _Classes | None:
        config = getattr(self.model, "config", None)
        if self.kind is None or config is None:
            return None
        if key in _POSITIONS or self.kind == "choice":
            wanted = "qa" if key in _POSITIONS else "choice"
            length = _input_length(self.batch) if self.kind == wanted else None
            if length is None:
                return None
            what = "tokens" if wanted == "qa" else "choices"
            return _Classes(length[0], f"the inputs have {length[0]} {what} (`{length[1]}`)", "inputs")
        if key != "labels":
            return None
        if self.kind == "classes":
            count = getattr(config, "num_labels", None)
            problem = getattr(config, "problem_type", None)
            # one output is regression, and other problem types take float targets (Hugging Face)
            if (
                not isinstance(count, int)
                or count < 2
                or problem not in (None, "single_label_classification")
            ):
                return None
            return _Classes(count, f"`{self.name}` has {count} classes (`config.num_labels`)", "config")
        if self.kind in ("causal", "vocab"):
            head = (
                self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
            )
            if isinstance(head, nn.Linear):
                count, where = head.out_features, "its output embeddings' `out_features`"
            else:
                count, where = getattr(config, "vocab_size", None), "`config.vocab_size`"
            if not isinstance(count, int) or count < 2:
                return None
            return _Classes(count, f"`{self.name}` predicts {count} token ids ({where})", "vocab")
        return None

    # -- after the forward, or after it raised: the logits' width -----------------------------

    def after_forward(self, outputs: Any) -> list[Finding]:
        """Check the targets not judged yet against the width of the forward's logits."""
        findings: list[Finding] = []
        for key, targets in self.targets.items():
            if key in self.checked:
                continue
            classes = _measured(outputs, key, targets)
            if classes is not None:
                self.checked.add(key)
                findings += self._range(key, targets, classes)
        return findings

    def after_error(self, exc: BaseException) -> list[Finding]:
        """The target findings that explain ``exc``, raised by the first forward (error path only).

        The model runs once more without its targets, to read its logits' width; a model that
        needs them (or fails again) gives no finding, and ``exc`` stands as it is.
        """
        unchecked = [key for key in self.targets if key not in self.checked]
        if not unchecked:
            return []
        inputs = {key: value for key, value in self.batch.items() if key not in TARGET_KEYS}
        buffers = {name: buf.detach().clone() for name, buf in self.model.named_buffers()}
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                outputs = self.model(**inputs)
        except Exception:
            return []
        finally:
            with torch.no_grad():
                for name, buf in self.model.named_buffers():
                    buf.copy_(buffers[name])
        found = self.after_forward(outputs)
        cause = f"`model(**batch)` raised {type(exc).__name__}: {_first_line(exc)}"
        return [
            Finding(f.code, f.severity, f"{f.message} ({cause})", f.params, f.step, f.suggestion)
            for f in found
        ]

    # -- the checks ---------------------------------------------------------------------------

    def _masked(self) -> list[Finding]:
        labels = self.targets.get("labels", self.targets.get("label"))
        if labels is None:
            return []
        key = "labels" if "labels" in self.targets else "label"
        what = f"`batch[{key!r}]`, the targets of `{self.name}`'s own loss"
        if bool((labels == IGNORE_INDEX).all()):
            self.masked = True
            return [no_targets_finding(what, labels, IGNORE_INDEX)]
        if self.kind == "causal" and labels.dim() >= 1 and labels.shape[-1] > 1:
            used = labels[..., 1:]
            if bool((used == IGNORE_INDEX).all()):
                self.masked = True
                note = (
                    ", once the loss shifts them by one (a causal LM predicts token t + 1 from the "
                    "tokens up to t, so the first label of each row is never used)"
                )
                return [no_targets_finding(what, used, IGNORE_INDEX, note)]
        return []

    def _range(self, key: str, targets: torch.Tensor, classes: _Classes) -> list[Finding]:
        if key in _POSITIONS:
            return self._positions(key, targets, classes)
        if self.masked:
            return []
        head = f"`batch[{key!r}]`, the targets of `{self.name}`'s own loss, holds class targets"
        if classes.source == "config":
            resize = (
                "build the model with `num_labels={n}` (e.g. `from_pretrained(name, num_labels={n})`), "
                "or remap the labels to 0..C-1"
            )
        elif classes.source == "vocab":
            resize = (
                "tokenise with the model's own tokenizer, or grow the vocabulary with "
                "`model.resize_token_embeddings(len(tokenizer))` after adding tokens"
            )
        else:
            resize = "give the last layer as many outputs as there are classes (>= {n}), or remap the labels"
        return class_range_findings(
            head,
            targets,
            classes.count,
            classes.where,
            ignore_index=IGNORE_INDEX,
            ignored=f" (or {IGNORE_INDEX}, which the loss ignores)",
            shift=f"`batch[{key!r}] - 1`",
            resize=resize,
            negative=f"map them to {IGNORE_INDEX}, which the model's loss ignores",
        )

    def _positions(self, key: str, positions: torch.Tensor, classes: _Classes) -> list[Finding]:
        """Answer positions outside the input: Hugging Face clamps them, ignoring those past the end."""
        length = classes.count
        outside = (positions < 0) | (positions >= length)
        bad = int(outside.sum())
        if not bad:
            return []
        low, high, total = int(positions.min()), int(positions.max()), positions.numel()
        every = bad == total
        message = (
            f"`batch[{key!r}]` holds answer positions from {low} to {high}, but {classes.where}, so valid "
            f"positions are 0..{length - 1}: {bad} of {total} in the first batch are out of range. A "
            "question-answering loss clamps them without a word: positions past the end are ignored, "
            "negative ones become 0 (the first token). "
            + (
                "Every position of the batch is out of range, so nothing is left to learn from (a NaN "
                "or meaningless loss). "
                if every
                else ""
            )
            + "Likely cause: character offsets instead of token indices, or answers cut off by truncation."
        )
        suggestion = (
            "Map character offsets to token indices with the tokenizer (`return_offsets_mapping=True`, "
            "or `encoding.char_to_token(i)`), and point answers cut off by truncation at the first "
            "token (index 0), as Hugging Face's question-answering examples do."
        )
        severity = "error" if every else "warning"
        return [Finding("target-out-of-range", severity, message, (f"batch[{key!r}]",), 0, suggestion)]


def _measured(outputs: Any, key: str, targets: torch.Tensor) -> _Classes | None:
    """The class count of ``targets`` from the width of the forward's logits, or None."""
    name = _LOGITS.get(key, "logits")
    logits = _field(outputs, name)
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.dim() < 1:
        return None
    width = int(logits.shape[-1])
    if key in _POSITIONS:
        return _Classes(width, f"the inputs have {width} tokens (`outputs.{name}.shape[-1]`)", "inputs")
    if targets.numel() * width != logits.numel() or width < 2:
        return None  # not one row of class scores per target: another kind of loss
    return _Classes(width, f"the logits have {width} classes (`outputs.{name}.shape[-1]`)", "outputs")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else ""


def _nonfinite(tensor: torch.Tensor) -> bool:
    if not (tensor.is_floating_point() or tensor.is_complex()) or tensor.numel() == 0:
        return False
    return not bool(torch.isfinite(tensor).all())


def explain_nonfinite_first_loss(
    value: float, batch: Any, outputs: Any, model: torch.nn.Module, *, masked: bool = False
) -> list[Finding]:
    """Say what made the first loss NaN/Inf when its inputs, parameters and outputs are finite.

    Then the loss computation made it, before any update: no learning rate is involved. A NaN from
    finite values is a mean over zero elements (0/0); an Inf is a log of zero or a division by
    zero. Host reads, first batch only.

    Args:
        value (`float`): the first loss.
        batch (`Any`): the first batch.
        outputs (`Any`): the forward's outputs (the loss among them is skipped).
        model (`torch.nn.Module`): the unwrapped model.
        masked (`bool`, *optional*, defaults to False): ``no-target-tokens`` was found, which
            explains a NaN already.

    Returns:
        `list[Finding]`: one ``nonfinite-loss`` warning at step 0, or nothing.
    """
    if math.isfinite(value) or (masked and math.isnan(value)):
        return []
    if any(_nonfinite(t) for _, t in named_tensors(batch, "batch")):
        return []  # nonfinite-input says it
    with torch.no_grad():
        if any(_nonfinite(p) for p in model.parameters()):
            return []
        tensors = [
            (path, t)
            for path, t in named_tensors(outputs, "outputs")
            if path not in ("outputs['loss']", "outputs.loss") and t.is_floating_point()
        ]
        if any(_nonfinite(t) for _, t in tensors):
            return []  # a module made it: the skipped step's replay names the first one
        if math.isnan(value):
            empty = [path for path, t in named_tensors(batch, "batch") if t.numel() == 0]
            seen = (
                f"{', '.join(f'`{p}`' for p in empty[:3])} {'is' if len(empty) == 1 else 'are'} empty, so "
                "a mean over it divides 0 by 0"
                if empty
                else "from finite values a NaN comes from a mean over zero elements (a mask or "
                "selection that keeps nothing: an empty reduction), 0/0, 0 * inf or inf - inf"
            )
            fix = (
                "Make sure every reduction in the loss has elements (count the mask before dividing, "
                "e.g. `loss.sum() / mask.sum().clamp_min(1)`), and drop empty batches."
            )
        else:
            zeros = [
                (path, int((t == 0).sum()))
                for path, t in tensors
                if t.numel() and float(t.min()) >= 0.0 and float(t.max()) <= 1.0 and bool((t == 0).any())
            ]
            seen = "an infinite loss from finite values is a log of zero (or a division by zero)" + (
                f": `{zeros[0][0]}` lies in [0, 1] like probabilities and holds {zeros[0][1]} exact "
                "zeros, and log(0) = -inf"
                if zeros
                else ""
            )
            fix = (
                "Take logarithms of probabilities in log space: `log_softmax` / `F.logsigmoid`, or "
                "`F.cross_entropy` / `BCEWithLogitsLoss` on the logits, instead of "
                "`torch.log(softmax(...))`; else clamp before the log (`p.clamp_min(1e-12)`) and guard "
                "divisions."
            )
    message = (
        f"The loss of the first batch is {value} while the batch, every parameter and every output of the "
        f"forward are finite: the loss computation itself made it, before any update (so no learning rate "
        f"is involved): {seen}."
    )
    return [Finding("nonfinite-loss", "warning", message, (), 0, fix)]
