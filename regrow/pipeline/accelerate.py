"""Stage 8b, accelerate (when the recipe asks): the recovered 2:4 model's weights packed for sparse tensor cores,
on a copy, with its speed-up and accuracy measured. The exported files stay dense, with the masks squashed in:
packed weights cannot be saved, so a user packs at load time with ``regrow.accelerate``."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from regrow.accelerate import accelerate
from regrow.batches import to_device
from regrow.masks import MaskSet
from regrow.measure import sample_inputs
from regrow.measure.metrics import classification_metrics
from regrow.pipeline.context import Timer
from regrow.pipeline.load import Loaded
from regrow.pipeline.plan import Plan

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Cast(nn.Module):
    """Feeds a half-precision model the loaders' float32 inputs, and hands its outputs back in float32."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, inputs: Any) -> Tensor:
        if isinstance(inputs, Tensor) and inputs.is_floating_point():
            inputs = inputs.to(self.dtype)
        return self.model(inputs).float()


def accelerate_model(loaded: Loaded, decided: Plan, masks: MaskSet, timer: Timer) -> dict[str, Any] | None:
    """The report's acceleration section (None unless ``accelerate.enabled``): layers converted or left dense
    with the reason, the measured speed-up at the latency batch size, and the test accuracy of the packed copy."""
    options = decided.cfg.accelerate
    if not options.enabled:
        return None
    device, dtype = torch.device(loaded.device), DTYPES[options.dtype]
    with timer.stage("accelerate"):
        packed = copy.deepcopy(loaded.model).to(device).eval()
        inputs = to_device(sample_inputs(loaded.test, decided.cfg.evaluate.latency_batch_size), device)
        report = accelerate(
            packed,
            dict(masks),
            backend=options.backend,
            dtype=dtype,
            example_inputs=inputs,
            cuda_graph=options.cuda_graph,
        )
        accuracy = classification_metrics(Cast(packed, dtype), loaded.test)["accuracy"] if report.converted else None
    return report.to_dict() | {"accuracy": accuracy, "markdown": report.markdown()}
