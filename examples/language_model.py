"""A small language model: train it, prune it to 2:4 with magnitude and with SparseGPT, recover by distillation.

Run: python examples/language_model.py  (no download: the text is Python's own documentation, shipped with
CPython; a 0.1 M-parameter byte-level model on 2,048 training sequences, to keep the example short: 21 s of CPU
time at 1 torch thread on a 2-core AMD EPYC, 45 s wall while three benchmarks shared its cores)
"""

from __future__ import annotations

import copy
import warnings

import torch

import regrow
from regrow.data import DATASETS
from regrow.measure.metrics import classification_metrics
from regrow.models import MODELS

warnings.filterwarnings("ignore", category=regrow.errors.SpeedWarning)  # 2:4 is not faster on dense CPU kernels
torch.manual_seed(0)
# (inputs, targets) batches of 64 bytes; targets[:, t] is the byte after inputs[:, t]
data = DATASETS.get("python_docs")(batch_size=32, train_limit=2048)
model = MODELS.get("gpt")(dim=64, depth=2, heads=4)

# 1. A trained model: next-byte cross-entropy, averaged over tokens (regrow reads the logits' shape).
regrow.recover(model, regrow.MaskSet({}), data.train, data.val, method="finetune", epochs=4, lr=3e-3, patience=None,
               progress=False)  # fmt: skip
dense = classification_metrics(model, data.test)["perplexity"]
print(f"dense test perplexity: {dense:.3f}")

# 2. One-shot 2:4 (keep 2 of every 4 input weights): magnitude against SparseGPT, which calibrates each layer on
#    a few training batches and updates the weights it keeps to preserve the layer's output.
for criterion in ("magnitude", "sparsegpt"):
    pruned = copy.deepcopy(model)
    masks = regrow.prune(pruned, pattern="2:4", criterion=criterion, data=data.train, calibration=None
                         if criterion == "magnitude" else {"batches": 8})  # fmt: skip
    print(f"{criterion:>9} 2:4 one-shot: {classification_metrics(pruned, data.test)['perplexity']:.3f}")

# 3. Recovery: distillation from the dense model, token by token over the vocabulary.
regrow.recover(pruned, masks, data.train, data.val, epochs=2, lr=1e-3, patience=None, progress=False)
print(f"sparsegpt 2:4 after 2 recovery epochs: {classification_metrics(pruned, data.test)['perplexity']:.3f}")
