"""The Python API end to end: train a model, prune it, recover it, measure it, save it.

Run: python examples/python_api.py  (no download; 9.5 s wall on an idle 2-core AMD EPYC with 1 or 2 torch
threads, 17 to 20 s with 2 threads while another process kept one core busy, 9.3 s with 1: OMP_NUM_THREADS=1)
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

import regrow
from regrow.data import DATASETS
from regrow.data.augment import shift
from regrow.models import MODELS

torch.manual_seed(0)
data = DATASETS.get("digits")(batch_size=64)  # train / val / test DataLoaders of 8x8 digit images
model = MODELS.get("digits_cnn")(width=16)

# 1. A trained model. (Yours would come from your own training; here we train one for 30 epochs.)
regrow.recover(
    model,
    regrow.MaskSet({}),
    data.train,
    data.val,
    method="finetune",
    epochs=30,
    lr=3e-3,
    augment=shift,
    patience=None,
    progress=False,
)
baseline = regrow.evaluate(model, data.test, stage="baseline")

# 2. Prune 90% of the Linear/Conv weights (the final classifier is left dense by default).
masks = regrow.prune(model, 0.9)
pruned = regrow.evaluate(model, data.test, masks=masks, stage="pruned")

# 3. Recover by distilling from the dense copy that prune() kept; masked weights stay exactly zero.
result = regrow.recover(model, masks, data.train, data.val, epochs=20, augment=shift, progress=False)
recovered = regrow.evaluate(model, data.test, masks=masks, stage="recovered")

for snap in (baseline, pruned, recovered):
    print(
        f"{snap.stage:>9}: test accuracy {100 * snap.accuracy:.2f}%, nonzero params {snap.nonzero_params}, "
        f"sparsity over targets {100 * snap.target_sparsity:.1f}%, latency {snap.latency.median_ms:.2f} ms "
        f"(batch {snap.latency.batch_size})"
    )
print(f"recovery: best epoch {result.best_epoch} of {result.epochs_run}; {result.stop_reason}")

# 4. Save the weights (masks squashed in) and reload them into a fresh model: identical accuracy.
with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "model.safetensors"
    regrow.save_weights(model, path)
    fresh = regrow.load_weights(MODELS.get("digits_cnn")(width=16), path)
    again = regrow.evaluate(fresh, data.test, masks=masks, latency=False)
    assert again.accuracy == recovered.accuracy
    print(f"reloaded from {path.name}: test accuracy {100 * again.accuracy:.2f}% (identical)")
