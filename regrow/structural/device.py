"""Where and how regrow's own forward passes run: on a CPU copy of the model, in exact float32 arithmetic.

Structural pruning runs the model many times to decide what it can remove: probes (a little of each group
removed, compared with its simulation), budget candidates (shrunk copies, counted), the final equivalence
check. Those passes must mean the same on every machine, and must never hurt the user's GPU:

* **On the CPU.** A probe runs a surgery that may be wrong; on a GPU a wrong index raises a device-side
  assert, which poisons the whole process's CUDA context (nothing on that GPU works afterwards, the user's
  own model included). So when the model is not on the CPU, all of them run on one CPU copy of it
  (:func:`host_copy`); the user's model on the device is only shrunk, once, after the check has passed on
  the copy, and is then held to the copy's weights (the final check, too, runs on the copy: its simulation
  is regrow code that indexes channels, and on the copy it costs no GPU memory for two more models). The
  device runs only the finished model: BatchNorm recalibration, latency budgets (a candidate runs once on
  the copy before it is timed there). Same CPU arithmetic everywhere also means the same groups are chosen
  for the same weights on a CPU machine and on a GPU one (with the same ``round_to``: the default follows
  the device's kernels).
* **In exact float32** (:func:`exact_arithmetic`). TF32 (cuDNN convolutions, on by default on Ampere and later;
  CUDA matmuls with ``set_float32_matmul_precision("high")``) and oneDNN's reduced-precision fp32 on CPUs
  (``"medium"`` selects bf16 kernels) round inputs to 10 or 7 mantissa bits. A shrunk model and its
  simulation sum the same terms in a different order (kernels tile each shape differently), so their
  float32 results differ in the last bits; in TF32 the difference is one TF32 unit (5e-4 relative) per
  layer, which the network amplifies (reported on an H200: 3.6e-05 against a tolerance of 2.8e-05 on
  timm's resnet18, and probes that left most groups out). A tolerance derived from the device's precision
  was the alternative; it is not taken because it would also pass real surgery errors of that size (a
  mis-sliced bias on a small channel), and the CPU copy runs in float32 anyway. The guard matters there
  too: ``"medium"`` changes CPU matmuls.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import chain
from typing import Any

import torch
from torch import Tensor, nn

HOST = torch.device("cpu")

# torch >= 2.9: per backend and operation; "none" inherits from the level above. Ops set to "ieee" here.
_PRECISION_OPS = (("cuda", "matmul"), ("cuda", "conv"), ("cuda", "rnn"), ("mkldnn", "matmul"), ("mkldnn", "conv"))
_PRECISION_ALL = (("generic", "all"), ("cuda", "all"), ("mkldnn", "all"), *_PRECISION_OPS, ("mkldnn", "rnn"))


def _precision_api() -> bool:
    return hasattr(torch._C, "_get_fp32_precision_getter") and hasattr(torch._C, "_set_fp32_precision_setter")


_LEGACY = {
    "matmul": (lambda: torch.backends.cuda.matmul.allow_tf32, False),
    "cudnn": (lambda: torch.backends.cudnn.allow_tf32, False),
    "precision": (torch.get_float32_matmul_precision, "highest"),
}


def _legacy_flags() -> dict[str, Any]:
    """The legacy TF32 switches torch lets us read (it refuses one the new API has made ambiguous)."""
    flags = {}
    for name, (read, _) in _LEGACY.items():
        try:
            flags[name] = read()
        except RuntimeError:
            continue
    return flags


def _set_legacy(flags: dict[str, Any]) -> None:
    if "matmul" in flags:
        torch.backends.cuda.matmul.allow_tf32 = flags["matmul"]
    if "cudnn" in flags:
        torch.backends.cudnn.allow_tf32 = flags["cudnn"]
    if "precision" in flags:
        torch.set_float32_matmul_precision(flags["precision"])


@contextmanager
def exact_arithmetic() -> Iterator[None]:
    """Run the block with TF32 and reduced-precision float32 kernels off; restore the caller's settings after.

    Sets cuDNN's and CUDA matmul's TF32 switches off and the float32 matmul precision to "highest" (and, on
    torch >= 2.9, every backend's ``fp32_precision`` to "ieee"), then puts back exactly what the caller had,
    through either API: each legacy switch torch lets us read, the per-backend precisions as
    they were stored.
    """
    legacy = _legacy_flags()
    saved = {k: torch._C._get_fp32_precision_getter(*k) for k in _PRECISION_ALL} if _precision_api() else None
    try:
        _set_legacy({name: _LEGACY[name][1] for name in legacy})
        if saved is not None:
            for key in _PRECISION_OPS:
                torch._C._set_fp32_precision_setter(*key, "ieee")
        yield
    finally:
        _set_legacy(legacy)
        if saved is not None:
            for key, value in saved.items():
                torch._C._set_fp32_precision_setter(*key, value)


def _to_host(t: Tensor) -> Tensor:
    return t.detach().to(HOST)


def inputs_to_host(x: Any) -> Any:
    """Inputs (a tensor, or a dict, list or tuple of them) on the CPU."""
    if isinstance(x, Tensor):
        return _to_host(x)
    if isinstance(x, dict):
        return {k: inputs_to_host(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(inputs_to_host(v) for v in x)
    return x


def on_host(model: nn.Module) -> bool:
    """Whether every parameter and buffer of ``model`` is on the CPU."""
    return all(t.device.type == "cpu" for t in chain(model.parameters(), model.buffers()))


def host_copy(model: nn.Module) -> nn.Module:
    """``model`` itself when it is on the CPU; otherwise a CPU copy (same modules, hooks and attributes).

    Each tensor is copied to the CPU directly, never duplicated on the device first (``deepcopy(model).cpu()``
    would need the model's memory twice on the GPU). Tied parameters stay tied.
    """
    if on_host(model):
        return model
    memo: dict[int, Any] = {}
    for _, t in chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False)):
        if id(t) in memo:
            continue
        if isinstance(t, nn.Parameter):
            memo[id(t)] = nn.Parameter(_to_host(t), requires_grad=t.requires_grad)
        else:
            memo[id(t)] = _to_host(t)
    return copy.deepcopy(model, memo)


def copy_grads(model: nn.Module, host: nn.Module) -> None:
    """The gradients of ``model`` onto the same parameters of its ``host`` copy (for taylor scores)."""
    if host is model:
        return
    params = dict(host.named_parameters())
    for name, p in model.named_parameters():
        if p.grad is not None and name in params:
            params[name].grad = _to_host(p.grad)


def drop_autograd_caches(model: nn.Module) -> None:
    """Empty the dicts of tensors with an autograd history that modules keep between forward passes.

    timm's and Hugging Face's LeViT keep their attention biases per device in eval mode; filled by a pass with
    autograd on (the trace, taylor's gradients), they hold tensors that ``copy.deepcopy`` refuses ("Only Tensors
    created explicitly by the user (graph leaves) support the deepcopy protocol"), and every probe, simulation and
    budget candidate copies the model: each group of Hugging Face's LeViT failed its probe so. The modules fill
    them again on their next forward pass.
    """
    for module in model.modules():
        for name, value in vars(module).items():
            if name.startswith("_") or not isinstance(value, dict) or not value:
                continue  # its parameters, buffers and submodules (a buffer refreshed in forward has a history too)
            if all(isinstance(v, Tensor) and v.grad_fn for v in value.values()):
                value.clear()
