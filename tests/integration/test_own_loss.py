"""Models that compute their own loss (``labels`` in the batch, ``outputs.loss`` back): the target checks.

Real ``transformers`` models built from tiny configs (no download), and a custom module that follows
the same convention. For each classic data mistake, the right finding code; for the healthy version
of each model, no warning or error and the parameters of a bare Accelerate loop, bit for bit.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from safeloop import ConfigError, DivergenceError, SafeTrainer
from safeloop.results import FitResult
from tests.helpers.models import state_equal
from tests.integration.test_parity import SEED, _assert_parity, hand_written_loop

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, LENGTH, SAMPLES, BATCH = 40, 8, 32, 8


# -- tiny models, built from configs --------------------------------------------------------------


def _bert(**extra: Any) -> Any:
    return transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32, pad_token_id=0, **extra,
    )  # fmt: skip


def sequence_classifier(classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(_bert(num_labels=classes))


def token_classifier(tags: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return transformers.BertForTokenClassification(_bert(num_labels=tags))


def question_answering() -> nn.Module:
    torch.manual_seed(0)
    return transformers.BertForQuestionAnswering(_bert())


def causal_lm() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=32, bos_token_id=1, eos_token_id=2
    )
    return transformers.GPT2LMHeadModel(config)


def seq2seq() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return transformers.T5ForConditionalGeneration(config)


@dataclass
class _Output:
    loss: torch.Tensor | None
    logits: torch.Tensor


class OwnLossMLP(nn.Module):
    """A custom model with a ``labels`` argument: a dataclass (or a dict) with ``.loss`` back."""

    def __init__(self, classes: int = 3, as_dict: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, classes))
        self.as_dict = as_dict

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        logits = self.net(features)
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits} if self.as_dict else _Output(loss, logits)


# -- batches ----------------------------------------------------------------------------------------


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (SAMPLES, LENGTH), generator=torch.Generator().manual_seed(seed))


def _loader(columns: dict[str, torch.Tensor]) -> DataLoader:
    rows = [{key: value[i] for key, value in columns.items()} for i in range(SAMPLES)]
    return DataLoader(rows, batch_size=BATCH, shuffle=False)


def _classes(high: int, low: int = 0, shape: tuple[int, ...] = (SAMPLES,)) -> torch.Tensor:
    return torch.randint(low, high, shape, generator=torch.Generator().manual_seed(1))


def sequence_batches(labels: torch.Tensor | None = None) -> DataLoader:
    ids = _ids()
    labels = _classes(3) if labels is None else labels
    return _loader({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})


def token_batches(labels: torch.Tensor | None = None) -> DataLoader:
    ids = _ids()
    if labels is None:
        labels = _classes(5, shape=(SAMPLES, LENGTH))
        labels[:, -2:] = -100  # padding, as a collator marks it
    return _loader({"input_ids": ids, "labels": labels})


def qa_batches(start: torch.Tensor | None = None) -> DataLoader:
    ids = _ids()
    start = _classes(LENGTH // 2) if start is None else start
    return _loader({"input_ids": ids, "start_positions": start, "end_positions": start + 1})


def lm_batches(labels: Callable[[torch.Tensor], torch.Tensor] | None = None) -> DataLoader:
    ids = _ids()
    if labels is None:
        masked = ids.clone()
        masked[:, : LENGTH // 2] = -100  # the prompt is masked, the answer is learnt
    else:
        masked = labels(ids)
    return _loader({"input_ids": ids, "labels": masked})


def seq2seq_batches(labels: torch.Tensor | None = None) -> DataLoader:
    target = _ids(seed=2)[:, :5] if labels is None else labels
    return _loader({"input_ids": _ids(), "labels": target})


def feature_batches(labels: torch.Tensor | None = None) -> DataLoader:
    features = torch.randn(SAMPLES, 8, generator=torch.Generator().manual_seed(3))
    return _loader({"features": features, "labels": _classes(3) if labels is None else labels})


# -- helpers ----------------------------------------------------------------------------------------


def _fit(model: nn.Module, batches: DataLoader, **kwargs: Any) -> FitResult:
    kwargs = {"max_steps": 4, "seed": SEED, "progress_bar": False, **kwargs}
    return SafeTrainer(model, torch.optim.AdamW(model.parameters(), lr=1e-3), batches, **kwargs).fit()


def _raised(model: nn.Module, batches: DataLoader) -> ConfigError:
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError) as caught:
        _fit(model, batches)
    assert state_equal(before, model.state_dict()), "a weight changed before the error"
    return caught.value


def _own_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    outputs = model(**batch)
    return outputs["loss"] if isinstance(outputs, dict) else outputs.loss


def _codes(findings: Any) -> list[str]:
    return [f.code for f in findings]


def _alarms(result: FitResult) -> list[str]:
    return [f"[{f.code}] {f.message}" for f in result.findings if f.severity in ("warning", "error")]


# -- the healthy versions: no false alarm, the numbers of a bare loop -------------------------------

HEALTHY = {
    "sequence-classifier": (sequence_classifier, sequence_batches),
    "token-classifier": (token_classifier, token_batches),
    "question-answering": (question_answering, qa_batches),
    "causal-lm": (causal_lm, lm_batches),
    "seq2seq": (seq2seq, seq2seq_batches),
    "custom-dataclass": (OwnLossMLP, feature_batches),
    "custom-dict": (lambda: OwnLossMLP(as_dict=True), feature_batches),
}


@pytest.mark.parametrize("name", list(HEALTHY))
def test_healthy_model_with_its_own_loss_matches_a_bare_loop_bitwise_without_findings(name):
    build, batches = HEALTHY[name]
    model = build()
    initial, reference = copy.deepcopy(model), copy.deepcopy(model)
    expected = hand_written_loop(
        reference,
        torch.optim.AdamW(reference.parameters(), lr=1e-3),
        batches(),
        _own_loss,
        epochs=1,
    )
    result = _fit(model, batches(), max_steps=None, max_epochs=1)
    assert result.global_step == SAMPLES // BATCH and result.skipped_steps == 0
    assert not _alarms(result), _alarms(result)
    _assert_parity(initial, expected, model)


# -- the mistakes -------------------------------------------------------------------------------


def test_sequence_classifier_with_labels_numbered_from_one_stops_with_target_out_of_range():
    error = _raised(sequence_classifier(3), sequence_batches(_classes(4, low=1)))
    [finding] = error.findings
    assert finding.code == "target-out-of-range" and finding.severity == "error"
    assert "`batch['labels']`" in finding.message and "`config.num_labels`" in finding.message
    assert "numbered 1..3 instead of 0..2" in finding.message
    assert "`batch['labels'] - 1`" in finding.suggestion
    assert "IndexError" not in type(error.__cause__).__name__  # caught before the forward ran


def test_token_classifier_with_more_tags_than_its_head_names_the_num_labels_fix():
    labels = _classes(7, shape=(SAMPLES, LENGTH))
    labels[:, -1] = -100
    error = _raised(token_classifier(5), token_batches(labels))
    [finding] = error.findings
    assert finding.code == "target-out-of-range"
    assert "valid targets are 0..4 (or -100, which the loss ignores)" in finding.message
    assert "at least 7 classes" in finding.message and "num_labels=7" in finding.suggestion


@pytest.mark.parametrize("as_dict", [False, True], ids=["dataclass", "dict"])
def test_custom_model_raising_inside_its_forward_is_explained_from_its_logits(as_dict):
    error = _raised(OwnLossMLP(3, as_dict=as_dict), feature_batches(_classes(4, low=1)))
    [finding] = error.findings
    assert finding.code == "target-out-of-range"
    assert "the logits have 3 classes (`outputs.logits.shape[-1]`)" in finding.message
    assert "numbered 1..3 instead of 0..2" in finding.message
    assert isinstance(error.__cause__, IndexError), "torch's error must stay chained"
    assert "raised IndexError" in finding.message


def test_question_answering_with_character_offsets_as_positions_stops_with_target_out_of_range():
    error = _raised(question_answering(), qa_batches(_classes(60, low=20)))
    assert _codes(error.findings) == ["target-out-of-range", "target-out-of-range"]
    start = error.findings[0]
    assert "`batch['start_positions']`" in start.message and "character offsets" in start.message
    assert "the inputs have 8 tokens" in start.message and "char_to_token" in start.suggestion


def test_question_answering_with_some_positions_past_the_input_warns_and_trains():
    start = _classes(LENGTH // 2)
    start[:3] = 50
    result = _fit(question_answering(), qa_batches(start))
    found = [f for f in result.findings if f.code == "target-out-of-range"]
    assert found and all(f.severity == "warning" for f in found)
    assert "3 of 8 in the first batch are out of range" in found[0].message


def test_causal_lm_with_every_label_masked_diverges_on_no_target_tokens_never_on_the_learning_rate():
    with pytest.raises(DivergenceError) as caught:
        _fit(causal_lm(), lm_batches(lambda ids: torch.full_like(ids, -100)), max_steps=40,
             max_consecutive_skips=2, max_rollbacks=1)  # fmt: skip
    error = caught.value
    codes = _codes(error.findings)
    assert codes[0] == "no-target-tokens" and "lr-too-high" not in codes, str(error)
    assert "64 of 64 targets (100%) are the ignore index -100" in error.findings[0].message
    assert "[lr-too-high]" not in str(error)


def test_causal_lm_with_only_the_first_label_kept_counts_the_shift():
    def first_only(ids: torch.Tensor) -> torch.Tensor:
        masked = torch.full_like(ids, -100)
        masked[:, 0] = ids[:, 0]
        return masked

    result = _fit(causal_lm(), lm_batches(first_only), max_steps=2)
    [finding] = [f for f in result.findings if f.code == "no-target-tokens"]
    assert finding.severity == "error" and "shifts them by one" in finding.message
    assert result.skipped_steps == 2
    # the model returns its NaN loss: the replay blames the loss computation, not the model
    replayed = [f for f in result.findings if f.code == "nonfinite-loss"]
    assert all("GPT2LMHeadModel" not in f.params for f in replayed)


def test_seq2seq_with_every_label_masked_reports_no_target_tokens():
    labels = torch.full((SAMPLES, 5), -100)
    result = _fit(seq2seq(), seq2seq_batches(labels), max_steps=2)
    assert "no-target-tokens" in _codes(result.findings)
    assert result.skipped_steps == 2 and "lr-too-high" not in _codes(result.findings)


def test_custom_model_with_every_label_masked_reports_no_target_tokens():
    result = _fit(OwnLossMLP(), feature_batches(torch.full((SAMPLES,), -100)), max_steps=2)
    [finding] = [f for f in result.findings if f.code == "no-target-tokens"]
    assert "`OwnLossMLP`" in finding.message and "8 of 8 targets (100%)" in finding.message
