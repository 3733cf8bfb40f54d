"""Sparse transfer: prune a model trained on one task, then recover it on another.

A small CNN learns digits 0-4 (scikit-learn's 8x8 digits, no download), is pruned to 80% sparsity, gets a
new classifier head, and is recovered on digits 5-9 with its masks kept. The dense source model is the
teacher of the shared part (feature distillation: the pruned model's input to its classifier is pulled
towards the source model's). For comparison: the same without the teacher, and the dense model
transferred with the same budget.

Run: python examples/sparse_transfer.py  (about 20 seconds on 2 CPU cores)
"""

from __future__ import annotations

import copy
import warnings

import torch

import regrow
from regrow.data import DATASETS
from regrow.data.augment import shift
from regrow.errors import SpeedWarning
from regrow.models import MODELS
from regrow.recovery import new_head

warnings.filterwarnings("ignore", category=SpeedWarning)  # unstructured zeros: the point here is accuracy
EPOCHS = 15
source = DATASETS.get("digits")(classes=[0, 1, 2, 3, 4])
target = DATASETS.get("digits")(classes=[5, 6, 7, 8, 9])

torch.manual_seed(0)
model = MODELS.get("digits_cnn")(width=16, num_classes=5)
regrow.recover(
    model,
    regrow.MaskSet({}),
    source.train,
    source.val,
    method="finetune",
    epochs=30,
    lr=3e-3,
    augment=shift,
    patience=None,
    progress=False,
)
source_accuracy = regrow.evaluate(model, source.test, latency=False).accuracy
print(f"source model on digits 0-4: test accuracy {100 * source_accuracy:.2f}%")
dense_source = copy.deepcopy(model).eval()


def transfer(pruned: bool, teacher: bool) -> float:
    torch.manual_seed(1)
    student = copy.deepcopy(dense_source)
    masks = regrow.prune(student, 0.8) if pruned else regrow.MaskSet({})
    new_head(student, 5)  # a fresh head for digits 5-9
    regrow.recover(
        student,
        masks,
        target.train,
        target.val,
        epochs=EPOCHS,
        augment=shift,
        progress=False,
        method="transfer" if teacher else "finetune",
        teacher=dense_source if teacher else None,
    )
    if pruned:
        assert all(torch.count_nonzero(student.get_parameter(f)[~m]) == 0 for f, m in masks.items())
    return regrow.evaluate(student, target.test, latency=False).accuracy


for label, pruned, teacher in [
    ("dense model, fine-tuned", False, False),
    ("80% sparse, fine-tuned (no teacher)", True, False),
    ("80% sparse, transfer with feature distillation", True, True),
]:
    print(f"{label:48} digits 5-9 test accuracy {100 * transfer(pruned, teacher):.2f}%")
