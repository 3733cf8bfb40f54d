"""Objectives: embedding distillation for encoders without labels, and a user's own loss and metric."""

import copy

import pytest
import torch
from torch import nn

import regrow
from regrow.errors import RegrowError
from regrow.measure.metrics import classification_metrics
from regrow.objectives import Embedding, Labels


class TinyEncoder(nn.Module):
    """Token embedding, two Linear layers per token, a Hugging Face-like dict output."""

    def __init__(self, vocab: int = 50, width: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.fc1 = nn.Linear(width, 32)
        self.fc2 = nn.Linear(32, width)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        return {"last_hidden_state": h + self.fc2(torch.relu(self.fc1(h))), "other": h.sum(-1)}


def sentences(n_batches: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(0, 50, (8, 6), generator=g)
        mask = torch.ones(8, 6, dtype=torch.long)
        mask[:4, 4:] = 0  # half the rows padded after 4 tokens
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


class Fixed(nn.Module):
    """Returns the same output whatever the inputs."""

    def __init__(self, out) -> None:
        super().__init__()
        self.out = out

    def forward(self, *args, **kwargs):
        return self.out


def test_mean_pooling_counts_real_tokens_only():
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [100.0, 100.0]]])  # the third token is padding
    model = Fixed({"last_hidden_state": hidden})
    inputs = {"input_ids": torch.zeros(1, 3, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 0]])}
    assert torch.equal(Embedding().embed(model, inputs), torch.tensor([[2.0, 1.0]]))
    assert torch.equal(Embedding(pooling="first").embed(model, inputs), torch.tensor([[1.0, 0.0]]))
    assert torch.equal(Embedding(pooling="none").embed(model, inputs), hidden.reshape(1, 6))


def test_cosine_similarity_metric_on_known_vectors():
    vectors = {"same": torch.tensor([[1.0, 2.0]]), "orthogonal": torch.tensor([[-2.0, 1.0]])}
    teacher = Fixed(vectors["same"])
    data = [(torch.zeros(1), None)]
    for name, expected, loss in (("same", 1.0, 0.0), ("orthogonal", 0.0, 1.0)):
        student = Fixed(vectors[name])
        m = classification_metrics(student, data, objective=Embedding(teacher=teacher))
        assert m["accuracy"] == pytest.approx(expected, abs=1e-7)
        assert m["loss"] == pytest.approx(loss, abs=1e-7)  # 1 - cosine
        assert m["metric"] == "cosine similarity"


def test_an_encoder_without_labels_recovers_its_embeddings():
    torch.manual_seed(0)
    model = TinyEncoder()
    masks = regrow.prune(model, 0.7, targets=["fc1.weight", "fc2.weight"])
    train, val = sentences(8, 1), sentences(2, 2)
    result = regrow.recover(
        model, masks, train, val, method="finetune", objective=Embedding(), epochs=4, lr=3e-3, progress=False
    )
    first, best = result.history[0].val_accuracy, result.best_val_accuracy
    assert first < 0.999 and best > first + 0.01, (first, best)  # cosine to the dense embeddings rose
    for name, mask in masks.masks.items():
        assert not model.get_parameter(name)[~mask].any()  # pruned weights stayed zero
    snap = regrow.evaluate(model, val, objective=Embedding(teacher=masks.dense), latency=False)
    assert snap.metric == "cosine similarity" and snap.accuracy == pytest.approx(best)


def test_distill_with_an_embedding_objective_adds_no_logit_term():
    torch.manual_seed(0)
    model = TinyEncoder()
    masks = regrow.prune(model, 0.5, targets=["fc1.weight"])
    result = regrow.recover(
        model, masks, sentences(2, 1), sentences(1, 2), objective=Embedding(), epochs=1, progress=False
    )
    assert set(result.history[1].parts) == {"task_loss"}  # no kd_loss on top of the embedding loss


def test_unlabeled_batches_with_the_label_objective_say_what_to_use():
    model = TinyEncoder()
    masks = regrow.prune(model, 0.5, targets=["fc1.weight"])
    with pytest.raises(RegrowError, match=r"no labels .* objective=regrow.Embedding"):
        regrow.recover(model, masks, sentences(2, 1), sentences(1, 2), method="finetune", epochs=1, progress=False)


def test_embedding_objective_errors_are_clear():
    model = TinyEncoder()
    with pytest.raises(RegrowError, match="needs|compares with the dense model"):
        regrow.evaluate(model, sentences(1, 0), objective=Embedding(), latency=False)
    with pytest.raises(RegrowError, match=r"no field 'pooled'; it has: 'last_hidden_state', 'other'"):
        regrow.evaluate(model, sentences(1, 0), objective=Embedding(output="pooled", teacher=model), latency=False)
    with pytest.raises(RegrowError, match="pooling must be one of mean, first, none"):
        Embedding(pooling="max")
    with pytest.raises(RegrowError, match="loss must be one of cosine, mse"):
        Embedding(loss="l1")
    masks = regrow.prune(model, 0.5, targets=["fc1.weight"])
    with pytest.raises(RegrowError, match="method 'transfer' .* Labels objective only"):
        regrow.recover(model, masks, sentences(2, 1), method="transfer", objective=Embedding(), progress=False)
    with pytest.raises(RegrowError, match="objective must be a regrow objective"):
        regrow.recover(model, masks, sentences(2, 1), objective="embedding", progress=False)


def test_a_named_output_and_mse_loss():
    torch.manual_seed(0)
    model = TinyEncoder()
    dense = copy.deepcopy(model)
    data = sentences(1, 0)
    same = classification_metrics(model, data, objective=Embedding(output="other", loss="mse", teacher=dense))
    assert same["accuracy"] == pytest.approx(1.0) and same["loss"] == pytest.approx(0.0, abs=1e-12)
    with torch.no_grad():
        model.embed.weight.mul_(2.0)  # "other" doubles: cosine still 1, relative squared error (2x - x)^2 / x^2 = 1
    doubled = classification_metrics(model, data, objective=Embedding(output="other", loss="mse", teacher=dense))
    assert doubled["accuracy"] == pytest.approx(1.0, abs=1e-6) and doubled["loss"] == pytest.approx(1.0, rel=1e-5)


class Regressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 16), nn.Linear(16, 1)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x))).squeeze(-1)


def regression(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(16, 4, generator=g)
        out.append((x, x @ torch.tensor([1.0, -2.0, 0.5, 3.0])))  # float targets: no labels
    return out


def test_a_custom_loss_and_metric_for_recover_and_evaluate():
    torch.manual_seed(0)
    model = Regressor()
    objective = regrow.Custom(
        loss=lambda out, y: nn.functional.mse_loss(out, y), metric_fn=lambda out, y: -(out - y).abs(), name="-MAE"
    )
    data = regression(2, 0)
    m = classification_metrics(model, data, objective=objective)
    with torch.no_grad():
        errors = torch.cat([(model(x) - y).abs() for x, y in data])
    assert m["accuracy"] == pytest.approx(-errors.mean().item(), rel=1e-6) and m["samples"] == 32
    assert m["loss"] == pytest.approx((errors**2).mean().item(), rel=1e-5)
    masks = regrow.prune(model, 0.5, targets=["fc1.weight"])
    result = regrow.recover(
        model, masks, regression(16, 1), regression(2, 2), method="finetune", objective=objective, epochs=5, lr=1e-2,
        progress=False,
    )  # fmt: skip
    assert result.best_val_accuracy > result.history[0].val_accuracy  # the mean absolute error fell
    assert regrow.evaluate(model, data, objective=objective, latency=False).metric == "-MAE"
    again = regrow.recover(model, masks, regression(2, 3), data, objective=objective, epochs=1, progress=False)
    assert set(again.history[1].parts) == {"task_loss"}  # default method distill: no KL on a custom loss's outputs


def test_custom_objective_errors_are_clear():
    model = Regressor()
    data = regression(1, 0)
    with pytest.raises(RegrowError, match="custom loss must return a scalar tensor; it returned a tensor of shape"):
        classification_metrics(model, data, objective=regrow.Custom(loss=lambda out, y: (out - y) ** 2))
    bad_metric = regrow.Custom(loss=lambda out, y: ((out - y) ** 2).mean(), metric_fn=lambda out, y: out.mean())
    with pytest.raises(RegrowError, match="one score per sample"):
        classification_metrics(model, data, objective=bad_metric)
    with pytest.raises(RegrowError, match="callable loss"):
        regrow.Custom(loss="mse")  # type: ignore[arg-type]
    unnamed = regrow.Custom(loss=lambda out, y: ((out - y) ** 2).mean())
    m = classification_metrics(model, data, objective=unnamed)
    assert m["metric"] == "minus the loss" and m["accuracy"] == pytest.approx(-m["loss"], rel=1e-6)


def test_the_default_objective_is_labels():
    assert (
        classification_metrics(nn.Linear(2, 3), [(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))])["metric"]
        == Labels.metric
    )


def test_a_plain_hugging_face_encoder_prunes_heads_and_distils():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    torch.manual_seed(0)
    encoder = transformers.BertModel(config, add_pooling_layer=False).eval()  # returns last_hidden_state, no logits
    data = [{k: v.clamp(max=59) if k == "input_ids" else v for k, v in b.items()} for b in sentences(3, 0)]
    masks = regrow.prune(encoder, pattern="head", sparsity=0.5, example_inputs=data[0])
    assert masks.structure.equivalence.passed
    assert [layer.attention.self.num_attention_heads for layer in encoder.encoder.layer] != [4, 4]
    result = regrow.recover(encoder, masks, data, data[:1], objective=Embedding(), epochs=1, progress=False)
    assert 0.0 < result.history[0].val_accuracy < 1.0
