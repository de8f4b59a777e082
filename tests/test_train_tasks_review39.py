"""Review 39: the training loop computes the loss of the model's own task, as transformers does
given ``labels`` (token classification unshifted, sequence classification by problem type),
with the loop's reduction (sum over micro-batches / targets of the step); causal LMs keep the
same bits; tasks the loop cannot train are refused before training."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertGenerationConfig,
    BertGenerationDecoder,
    GPT2Config,
    GPT2DoubleHeadsModel,
    LlamaForCausalLM,
    LlamaModel,
)

import lorakit
from lorakit.errors import UserError
from lorakit.train import TrainingConfig, evaluate, pad_collate, train
from lorakit.train.losses import batch_loss_sum, target_count
from tests import tiny_models

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZES = dict(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
LORA = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"])


def _injected(model_class, **config):
    torch.manual_seed(0)
    model = model_class(BertConfig(**SIZES, **config))
    lorakit.inject(model, LORA)
    tiny_models.randomize_adapters(model)  # (B != 0: the adapter takes part)
    return model.to(torch.float64)


def _ids(rows: int, length: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, 100, (rows, length), generator=torch.Generator().manual_seed(seed))


def _own_loss(model, batch) -> float:
    """The model's own ``outputs.loss`` (on a copy: transformers sets config.problem_type)."""
    with torch.no_grad():
        return float(copy.deepcopy(model)(**batch).loss)


def _loop_loss(model, batches) -> float:
    """The loop's reduction (``evaluate`` shares it with the training step): summed losses of
    the (micro-)batches / their targets together."""
    return evaluate(model, batches, metric_fn=None)["loss"]


def _halves(batch):
    rows = batch["labels"].shape[0] // 2
    return [{k: v[:rows] for k, v in batch.items()}, {k: v[rows:] for k, v in batch.items()}]


def _token_batch(rows: int = 4):
    labels = torch.randint(0, 5, (rows, 8), generator=torch.Generator().manual_seed(2))
    labels[:, 0] = -100
    labels[1, 5:] = -100
    ids = _ids(rows)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


@pytest.mark.parametrize("model_class", [BertForTokenClassification, BertForMaskedLM])
def test_token_level_loss_is_the_models_own_unshifted_loss(model_class):
    model = _injected(model_class, num_labels=5).eval()
    batch = _token_batch()
    own = _own_loss(model, batch)
    assert _loop_loss(model, [batch]) == pytest.approx(own, rel=1e-12)
    assert _loop_loss(model, _halves(batch)) == pytest.approx(own, rel=1e-12)  # (accumulated)


SEQUENCE_CASES = {
    "single label": ({"num_labels": 3}, torch.tensor([0, 2, 1, 2])),
    "regression, float labels": ({"num_labels": 1}, torch.tensor([0.3, -1.2, 2.0, 0.7])),
    "regression, (B, 1) labels": ({"num_labels": 1}, torch.tensor([[0.3], [-1.2], [2.0], [0.7]])),
    "regression, k = 2": (
        {"num_labels": 2, "problem_type": "regression"},
        torch.tensor([[0.3, 1.0], [-1.2, 0.5], [2.0, -2.0], [0.7, 0.0]]),
    ),
    "multi-label, by problem_type": (
        {"num_labels": 3, "problem_type": "multi_label_classification"},
        torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0]]),
    ),
    "multi-label, by float labels": (
        {"num_labels": 3},
        torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0]]),
    ),
}


@pytest.mark.parametrize("case", SEQUENCE_CASES)
def test_sequence_classification_loss_is_the_models_own(case):
    config, labels = SEQUENCE_CASES[case]
    if labels.is_floating_point():
        labels = labels.double()  # (float32 labels make transformers' own loss float32)
    model = _injected(BertForSequenceClassification, **config).eval()
    ids = _ids(4)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    own = _own_loss(model, batch)
    assert _loop_loss(model, [batch]) == pytest.approx(own, rel=1e-12)
    assert _loop_loss(model, _halves(batch)) == pytest.approx(own, rel=1e-12)


def test_regression_with_integer_labels_is_the_float_labels_loss():
    model = _injected(BertForSequenceClassification, num_labels=1).eval()
    ids = _ids(4)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    floats = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    own = _own_loss(model, {**batch, "labels": floats})
    loop = _loop_loss(model, [{**batch, "labels": torch.tensor([0, 1, 0, 1])}])
    assert loop == pytest.approx(own, rel=1e-12)


def test_train_logs_the_token_classifiers_own_loss(tmp_path):
    model = _injected(BertForTokenClassification, num_labels=5)
    batch = _token_batch(rows=8)
    data = [
        {"input_ids": ids.tolist(), "labels": labels.tolist()}
        for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True)
    ]
    own = _own_loss(model.eval(), pad_collate(0)(data))
    config = TrainingConfig(
        output_dir=str(tmp_path),
        max_steps=1,
        batch_size=4,
        grad_accum=2,
        progress=False,
        plot=False,
    )
    train(model, data, pad_collate(0), config)
    logged = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert logged == pytest.approx(own, rel=1e-12)


def test_evaluate_accuracy_follows_the_task():
    model = _injected(BertForTokenClassification, num_labels=5).eval()
    batch = _token_batch()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits
    scored = batch["labels"] != -100
    right = ((logits.argmax(-1) == batch["labels"]) | ~scored).all(dim=1)
    results = evaluate(model, [batch])
    assert results["accuracy"] == pytest.approx(float(right.float().mean()))
    assert results["loss"] == pytest.approx(_own_loss(model, batch), rel=1e-12)
    regression = _injected(BertForSequenceClassification, num_labels=1).eval()
    ids = _ids(4)
    values = {"input_ids": ids, "labels": torch.tensor([0.3, -1.2, 2.0, 0.7])}
    assert set(evaluate(regression, [values])) == {"loss"}  # (no accuracy for regression)


# ---------------------------------------------------------------- causal LM: the same bits
def _old_batch_loss_sum(model, batch):
    """lorakit.train.losses.batch_loss_sum before review 39 (causal LM path), verbatim."""
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    labels = batch["labels"]
    if labels.dim() == 2:
        predicting = (labels[:, 1:] != -100).any(dim=0).nonzero().flatten()
        if 0 < len(predicting) + 1 < labels.shape[1]:
            columns = torch.cat([predicting, predicting[-1:]])
            output = model(**inputs, logits_to_keep=columns)
            aligned = torch.full(
                (labels.shape[0], len(columns)), -100, dtype=labels.dtype, device=labels.device
            )
            aligned[:, 1:] = labels[:, predicting + 1]
            labels, logits = aligned, output.logits
        else:
            logits = model(**inputs).logits
    shifted = logits[:, :-1].float()
    loss = F.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    return loss, int((batch["labels"][:, 1:] != -100).sum())


@pytest.mark.parametrize("answer_only", [False, True])  # (True: the logits_to_keep path)
def test_causal_lm_loss_and_gradients_are_bit_identical(answer_only):
    model = tiny_models.llama()
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    tiny_models.randomize_adapters(model)
    ids = tiny_models.input_ids(batch=3, length=10)
    labels = ids.clone()
    if answer_only:
        labels[:, :7] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    results = []
    for loss_of in (_old_batch_loss_sum, lambda m, b: (batch_loss_sum(m, b)[0], None)):
        model.zero_grad()
        loss, _ = loss_of(model, batch)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results.append((loss.detach(), grads))
    (old_loss, old_grads), (new_loss, new_grads) = results
    assert torch.equal(old_loss, new_loss)
    assert all(torch.equal(a, b) for a, b in zip(old_grads, new_grads, strict=True))
    assert target_count(batch) == _old_batch_loss_sum(model, batch)[1]


# ---------------------------------------------------------------- refusals, before training
def _stack(examples):
    """Collate for sequence classification: ids (B, T), one label (or label row) per example."""
    ids = torch.tensor([example["input_ids"] for example in examples])
    labels = torch.tensor([example["labels"] for example in examples])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _refused_before_training(tmp_path, model, data, match):
    before = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    output = tmp_path / "run"
    config = TrainingConfig(output_dir=str(output), max_steps=1, progress=False, plot=False)
    with pytest.raises(UserError, match=match) as error:
        train(model, data, _stack, config)
    assert "\n" not in str(error.value)
    assert not output.exists()
    after = {k: v for k, v in model.named_parameters() if v.requires_grad}
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_models_whose_loss_the_loop_does_not_compute_are_refused(tmp_path):
    data = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}] * 2
    question_answering = _injected(BertForQuestionAnswering)
    _refused_before_training(
        tmp_path, question_answering, data, r"BertForQuestionAnswering.*Trainer"
    )
    torch.manual_seed(0)
    no_head = LlamaModel(tiny_models.llama_config())
    lorakit.inject(no_head, lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    _refused_before_training(tmp_path, no_head, data, r"of LlamaModel")
    seq2seq = tiny_models.t5()
    lorakit.inject(seq2seq, lorakit.LoraConfig(r=4, target_modules=["q"]))
    _refused_before_training(tmp_path, seq2seq, data, r"T5ForConditionalGeneration")


def test_labels_that_do_not_fit_the_task_are_refused(tmp_path):
    classifier = _injected(BertForSequenceClassification, num_labels=3)
    floats = [{"input_ids": [1, 2, 3], "labels": 1.0}] * 2  # (B,) floats: neither kind of labels
    _refused_before_training(
        tmp_path, classifier, floats, r"BertForSequenceClassification \(multi_label.*problem_type"
    )
    tokens = _injected(BertForTokenClassification, num_labels=5)
    one_per_example = [{"input_ids": [1, 2, 3], "labels": 2}] * 2
    _refused_before_training(tmp_path, tokens, one_per_example, r"BertForTokenClassification")
    classifier.config.problem_type = "ranking"
    ints = [{"input_ids": [1, 2, 3], "labels": 1}] * 2
    _refused_before_training(tmp_path, classifier, ints, r"problem_type 'ranking'")


# ---- models the old loop trained as causal LMs keep that loss (a regression review's cases) ----
class _MyLlama(LlamaForCausalLM):  # a user's subclass: its parent names the head
    pass


class TinyForMaskedLM(torch.nn.Module):  # not a transformers model, whatever its name says
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = torch.nn.Embedding(100, 16), torch.nn.Linear(16, 100)

    def forward(self, input_ids, attention_mask=None):
        return (self.head(self.embed(input_ids)),)


def _next_token_batch():
    ids = _ids(2)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


@pytest.mark.parametrize(
    "build",
    [
        lambda: _MyLlama(tiny_models.llama_config(vocab_size=100)),
        lambda: GPT2DoubleHeadsModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2)),
        lambda: BertGenerationDecoder(
            BertGenerationConfig(**{k: v for k, v in SIZES.items()}, is_decoder=True)
        ),
    ],
    ids=["subclass", "gpt2-double-heads", "bert-generation-decoder"],
)
def test_causal_lms_of_other_class_names_train_on_their_own_loss(build):
    torch.manual_seed(0)
    model = build().to(torch.float64).eval()
    batch = _next_token_batch()
    # (transformers computes a causal LM's own loss on float32 logits)
    assert _loop_loss(model, [batch]) == pytest.approx(_own_loss(model, batch), rel=1e-6)


def test_a_module_that_is_not_a_transformers_model_stays_a_causal_lm_whatever_its_name():
    model = TinyForMaskedLM().double()
    batch = _next_token_batch()
    with torch.no_grad():
        logits = model(batch["input_ids"])[0]
    shifted = F.cross_entropy(logits[:, :-1].reshape(-1, 100), batch["labels"][:, 1:].reshape(-1))
    assert _loop_loss(model, [batch]) == pytest.approx(float(shifted), rel=1e-6)  # (float32 CE)
