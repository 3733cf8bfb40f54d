"""Scoring per sample or per token: language-model losses, perplexity, distillation and the shapes refused."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import regrow
from regrow.batches import check_batch, check_batches
from regrow.data.text import next_token_batches, next_token_targets
from regrow.errors import RegrowError
from regrow.measure.metrics import classification_metrics
from regrow.objectives import as_scored
from regrow.recovery.compute import DeviceTally
from regrow.tasks import IGNORE, distillation_loss, task_loss

pytestmark = pytest.mark.filterwarnings("ignore::regrow.errors.SpeedWarning")


class Fixed(nn.Module):
    """Returns the same logits whatever the input (for exact metric checks)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits)

    def forward(self, x):
        return self.logits


def test_tokens_as_many_as_the_vocabulary_are_scored_per_token_not_as_classes():
    # (batch 2, tokens 4, vocabulary 4): read as (batch, classes, ...) this scored 113 % accuracy before
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 4)
    targets = torch.tensor([[0, 1, 2, 3], [3, 3, IGNORE, IGNORE]])
    metrics = classification_metrics(Fixed(logits), [(torch.zeros(2, 4), targets)])
    real = targets != IGNORE
    expect_loss = F.cross_entropy(logits[real], targets[real])
    expect_acc = (logits[real].argmax(-1) == targets[real]).float().mean()
    assert metrics["samples"] == 6  # real tokens
    assert metrics["loss"] == pytest.approx(float(expect_loss), rel=1e-6)
    assert metrics["accuracy"] == pytest.approx(float(expect_acc))
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["perplexity"] == pytest.approx(math.exp(float(expect_loss)), rel=1e-6)


@pytest.mark.parametrize(
    "logits, targets",
    [
        (torch.randn(2, 5, 7), torch.tensor([1, 2])),  # token logits, one label per sample
        (torch.randn(2, 7), torch.zeros(2, 5, dtype=torch.long)),  # sample logits, token targets
        (torch.randn(2, 5, 7), torch.zeros(2, 4, dtype=torch.long)),  # tokens do not line up
        (torch.randn(2, 3, 8, 8), torch.zeros(2, 8, 8, dtype=torch.long)),  # a segmentation map
    ],
)
def test_outputs_that_do_not_fit_the_targets_are_refused_not_scored(logits, targets):
    with pytest.raises(RegrowError, match=r"do not fit the targets .* regrow scores \(batch, classes\) logits"):
        classification_metrics(Fixed(logits), [(torch.zeros(2), targets)])
    with pytest.raises(RegrowError, match="do not fit the targets|2-D int64 tensor of token indices, one per position"):
        check_batch(Fixed(logits), [(torch.zeros(2), targets)], "training", label_range=False)


def test_float_targets_are_refused():
    with pytest.raises(RegrowError, match="the targets must be integer class or token indices; got float32"):
        task_loss(torch.randn(2, 8), torch.randn(2, 8))


def test_token_distillation_leaves_padding_out():
    torch.manual_seed(1)
    student, teacher = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    targets = torch.tensor([[1, 2, IGNORE], [0, IGNORE, IGNORE]])
    real = targets != IGNORE
    expect = distillation_loss(student[real], teacher[real], 2.0)  # three real tokens, as samples
    assert float(distillation_loss(student, teacher, 2.0, targets)) == pytest.approx(float(expect), rel=1e-6)
    padded_elsewhere = student.clone()
    padded_elsewhere[~real] = 100.0  # what the model says at padding does not matter
    assert float(distillation_loss(padded_elsewhere, teacher, 2.0, targets)) == pytest.approx(float(expect), rel=1e-6)


def test_a_batch_of_padding_only_has_zero_loss_and_zero_gradients_not_nan():
    # cross_entropy's mean over no scored token is NaN, which the divergence guard takes for a diverged step.
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, requires_grad=True)
    padding = torch.full((2, 5), IGNORE)
    for smoothing in (0.0, 0.1):
        loss = task_loss(logits, padding, label_smoothing=smoothing)
        (grad,) = torch.autograd.grad(loss, logits)
        assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))
    teacher = torch.randn(2, 5, 7)
    kl = distillation_loss(logits, teacher, 2.0, padding)
    (grad,) = torch.autograd.grad(kl, logits)
    assert kl.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))
    # with something to score, the loss is cross_entropy's own, to the bit
    targets = torch.randint(0, 7, (2, 5))
    targets[0, :3] = IGNORE
    expected = F.cross_entropy(logits.reshape(-1, 7), targets.reshape(-1), ignore_index=IGNORE, label_smoothing=0.1)
    assert torch.equal(task_loss(logits, targets, label_smoothing=0.1), expected)


def test_next_token_targets_shift_left_and_skip_padding():
    ids = torch.tensor([[5, 6, 7, 8], [9, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert next_token_targets(ids, mask).tolist() == [[6, 7, 8, IGNORE], [3, IGNORE, IGNORE, IGNORE]]
    batches = next_token_batches(torch.arange(11), seq_len=3, batch_size=2)
    assert [x.tolist() for x, _ in batches] == [[[0, 1, 2], [3, 4, 5]], [[6, 7, 8]]]
    assert [y.tolist() for _, y in batches] == [[[1, 2, 3], [4, 5, 6]], [[7, 8, 9]]]


def test_targets_equal_to_the_inputs_are_refused_as_unshifted_labels():
    ids = torch.randint(0, 10, (2, 6))
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10))
    with pytest.raises(RegrowError, match="token targets equal to its input ids"):
        check_batch(model, [({"input_ids": ids}, ids)], "training")
    with pytest.raises(RegrowError, match="batch 0 of the training data .* token targets equal to its input ids"):
        check_batches(model, [(ids, ids.clone())], "training", classes=10)
    check_batches(model, [(ids, next_token_targets(ids))], "training", classes=10)  # shifted: fine


def test_the_training_tally_counts_real_tokens():
    tally = DeviceTally()
    logits = torch.zeros(2, 3, 4)
    logits[..., 1] = 1.0  # predicts token 1 everywhere
    targets = torch.tensor([[1, 1, IGNORE], [2, IGNORE, IGNORE]])
    tally.add({"loss": torch.tensor(0.5)}, as_scored(logits, targets))
    tally.add({"loss": torch.tensor(2.0)}, as_scored(torch.zeros(1, 3, 4), torch.tensor([[0, 0, 0]])))
    sums, correct, units = tally.read()
    assert units == 6 and tally.seen == 3
    assert sums["loss"] == pytest.approx(0.5 * 3 + 2.0 * 3)  # each batch's mean loss weighted by its tokens
    assert correct == 2 + 3  # the argmax of all-zero logits is token 0


class Bigram(nn.Module):
    """A byte-level language model whose logits at each position depend on that position's token."""

    def __init__(self, vocab: int = 16, width: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.hidden = nn.Linear(width, width)
        self.out = nn.Linear(width, vocab)

    def forward(self, input_ids):
        return self.out(torch.relu(self.hidden(self.embed(input_ids))))


def test_a_language_model_is_pruned_and_recovered_by_token_distillation():
    torch.manual_seed(2)
    stream = torch.tensor([(3 * i + i // 7) % 16 for i in range(4000)])  # a next token mostly fixed by this one
    batches = next_token_batches(stream, seq_len=16, batch_size=25)
    train, val, test = batches[:6], batches[6:8], batches[8:]
    model = Bigram()
    regrow.recover(model, regrow.MaskSet({}), train, val, method="finetune", epochs=15, lr=1e-2, progress=False)
    dense = classification_metrics(model, test)
    masks = regrow.prune(model, 0.8, targets=["hidden.weight", "out.weight"], data=train)
    pruned = classification_metrics(model, test)
    result = regrow.recover(model, masks, train, val, epochs=8, lr=1e-2, patience=None, progress=False)
    recovered = classification_metrics(model, test)
    assert dense["perplexity"] < pruned["perplexity"]  # pruning hurt
    assert recovered["perplexity"] < pruned["perplexity"]  # recovery won some of it back
    assert result.history[-1].parts["kd_loss"] >= 0.0  # distilled from the dense copy, token by token
    assert float((model.hidden.weight == 0).float().mean()) > 0.7  # masks kept
    snapshot = regrow.evaluate(model, test, masks=masks, latency=False)
    assert snapshot.perplexity == pytest.approx(recovered["perplexity"])
    assert 0.0 <= snapshot.accuracy <= 1.0


def test_uint8_class_labels_count_every_class_even_156():
    from regrow.tasks import count, hits

    targets = torch.tensor([156, 1], dtype=torch.uint8)  # -100 wraps to 156 in uint8: it must not mean padding
    logits = torch.zeros(2, 200)
    logits[0, 156] = 1.0
    assert int(count(targets)) == 2 and int(hits(logits, targets)) == 1


def test_unshifted_labels_are_refused_even_with_padding():
    ids = torch.randint(1, 10, (2, 6))
    labels = ids.clone()
    labels[1, 4:] = IGNORE  # what a Hugging Face collator does at padding
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10))
    with pytest.raises(RegrowError, match="token targets equal to its input ids"):
        check_batch(model, [({"input_ids": ids}, labels)], "training")


def test_python_docs_limits_keep_the_first_sequences_of_each_part_and_say_so():
    from regrow.data.text import python_docs

    full = python_docs(seq_len=16, batch_size=4)
    cut = python_docs(seq_len=16, batch_size=4, train_limit=10, eval_limit=6)
    assert [len(cut.train.dataset), len(cut.val.dataset), len(cut.test.dataset)] == [10, 6, 6]
    assert len(full.val.dataset) > 6 and len(full.test.dataset) > 6 and "kept" not in full.description
    for part in ("val", "test"):  # the first windows, unshuffled, the same as the full parts begin with
        whole, first = getattr(full, part).dataset.tensors, getattr(cut, part).dataset.tensors
        assert all(torch.equal(w[:6], f) for w, f in zip(whole, first, strict=True))
    assert torch.equal(cut.train.dataset.tensors[0], full.train.dataset.tensors[0][:10])
    assert cut.description.endswith("; sequences kept: train 10, val 6, test 6")
