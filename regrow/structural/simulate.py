"""The equivalence check: simulate a removal with masks, shrink for real, compare the outputs.

The simulation works on a copy of the model *before* shrinking and makes the channels that will go
exactly zero, everywhere they flow:

* a layer that loses output channels has those outputs zeroed (Conv, Linear, BatchNorm, ...);
* a layer that loses input channels has those inputs zeroed, so no activation of a dead channel leaks in;
* a normalisation over the channel dimension (LayerNorm, RMSNorm, GroupNorm, a plain norm such as timm's
  ``RmsNorm2d``, a norm with no ``normalized_shape`` such as Hugging Face's ``LlamaRMSNorm``) computes its
  statistics over the surviving channels only, as the shrunk layer will;
* a loose parameter (a class token, a positional embedding) has its slice zeroed;
* a removed attention head has its value rows zeroed, so its output is exactly zero;
* a convolution with a forward of its own (a weight-standardised one normalises each filter over its inputs)
  that loses inputs is computed by a narrower copy of itself, on the surviving inputs.

If the shrunk model's outputs differ from the simulation's by more than the tolerance, some layer handler
got the surgery wrong, and the error names the group: never a silent accuracy drop.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from regrow.batches import call, output_tensor, tensors
from regrow.structural.attention import MultiheadAttention
from regrow.structural.graph import Cut
from regrow.structural.heads import HeadGroup
from regrow.structural.pruners import is_channel_filter, is_plain_norm

RTOL = 1e-4
ATOL = 1e-5
TELLS = 0.01  # a check can tell a wrong surgery when its tolerance is under this share of the largest output

_CHANNEL_DIM_1 = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.PReLU,
)


@dataclass
class Equivalence:
    """Largest absolute difference between shrunk and simulated outputs, the tolerance it was held to, and the
    largest output (``scale``; when it is 0 every output was zero, and a wrong surgery would have passed too)."""

    max_abs_diff: float
    tolerance: float
    passed: bool
    rtol: float = RTOL
    atol: float = ATOL
    scale: float | None = None  # max |output| of the simulation; 0: all outputs zero, the check proves nothing
    float32_diff: float | None = None  # set when float32 failed and float64 settled the check (see compare)
    shapes: tuple[list[int], list[int]] | None = None  # (simulated, shrunk) output shapes, set when they differ
    output: int = 0  # which returned tensor the numbers are of: 0, the one regrow reads, unless another differs

    @property
    def judges(self) -> bool:
        """Whether the check could tell a wrong surgery from a right one: its tolerance under 1 % of the largest
        output (outputs of 1e-3 and more at the default tolerances). Below that, a difference that is a real share
        of every output passes: random initial weights whose activations shrink layer by layer give such outputs."""
        return self.scale is not None and self.tolerance < TELLS * self.scale

    @property
    def where(self) -> str:
        """Which output the numbers are of, for a message: empty for the one regrow reads."""
        return f" in tensor {self.output} of those the model returns beside its logits" if self.output else ""

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if out["shapes"] is None:  # reports name shapes only where they differed
            del out["shapes"]
        if not out["output"]:  # and another returned tensor only where it is the one that differs
            del out["output"]
        return out


def _channel_dim(module: nn.Module, x: Tensor) -> int:
    channels_first = isinstance(module, _CHANNEL_DIM_1) or is_channel_filter(module)
    return 1 if channels_first and x.dim() > 1 else x.dim() - 1


def _zero(x: Tensor, dim: int, idxs: Tensor) -> Tensor:
    x = x.clone()
    x.index_fill_(dim, idxs.to(x.device), 0.0)
    return x


def _keep(total: int, idxs: tuple[int, ...]) -> Tensor:
    gone = set(idxs)
    return torch.tensor([i for i in range(total) if i not in gone], dtype=torch.long)


def _narrowed(module: nn.Module, keep: Tensor) -> nn.Module:
    """A shallow copy of a LayerNorm / RMSNorm / plain norm / GroupNorm over the channels ``keep`` only: the layer
    the shrunk model will hold (its parameters sliced, its ``normalized_shape`` or ``num_channels`` narrowed),
    run by its own forward (timm's GroupNormAct and RmsNormAct2d apply an activation after the norm)."""
    narrow = copy.copy(module)
    narrow._parameters = {
        name: None if p is None else nn.Parameter(p[..., keep], requires_grad=False)
        for name, p in module._parameters.items()
    }
    if isinstance(module, nn.GroupNorm):
        narrow.num_channels = len(keep)
    elif hasattr(module, "normalized_shape"):
        narrow.normalized_shape = (*tuple(module.normalized_shape[:-1]), len(keep))
    return narrow


def _couples(module: nn.Module, x: Tensor, out: Tensor, dim: int) -> bool:
    """Whether the norm's statistics run along ``dim``: nudging the neighbour, along ``dim``, of the input's
    largest element moves another output on that line (a norm over another dimension leaves the line alone but
    for the nudged element itself). The largest element is not zero, so its own output must move."""
    at = [int(i) for i in torch.unravel_index(x.abs().argmax(), x.shape)]
    nudge = tuple((at[d] + 1) % x.shape[d] if d == dim else at[d] for d in range(x.dim()))
    nudged = x.clone()
    nudged[nudge] += 1.0 + nudged[nudge].abs()
    moved = module.forward(nudged) != out
    moved[nudge] = False
    return bool(moved[tuple(slice(None) if d == dim else at[d] for d in range(x.dim()))].any())


def _norm_dim(module: nn.Module, x: Tensor, out: Tensor) -> int:
    """The dimension of ``x`` that a LayerNorm / RMSNorm / plain norm normalises.

    The last one, as torch defines them; but a subclass or another library's norm may normalise dim 1: timm's
    ``LayerNorm2d`` (ConvNeXt, EfficientFormer, ...) permutes NCHW to NHWC and back, its ``RmsNorm2d`` averages
    over dim 1. When both dimensions are as wide as the channels (a 16x16 map of 16 channels), the one along
    which the norm couples its inputs is the channels.
    """
    last = x.dim() - 1
    if type(module).forward in (nn.LayerNorm.forward, getattr(getattr(nn, "RMSNorm", None), "forward", None)):
        return last
    width = _norm_width(module)
    fits = [d for d in dict.fromkeys((last, 1)) if 0 < d <= last and x.shape[d] == width]
    if len(fits) > 1:
        fits = [d for d in fits if _couples(module, x, out, d)] or fits
    return fits[0] if fits else last


def _masked_norm(module: nn.Module, x: Tensor, keep: Tensor, out: Tensor) -> Tensor:
    """The norm computed over the kept channels only; removed channels come out zero. ``out`` is the module's own
    output on all channels (it tells which dimension holds the channels)."""
    keep = keep.to(x.device)
    result = torch.zeros_like(x)
    dim = 1 if isinstance(module, nn.GroupNorm) else _norm_dim(module, x, out)
    # forward, not __call__: the hook that called this function is registered on the module being copied
    return result.index_copy_(dim, keep, _narrowed(module, keep).forward(x.index_select(dim, keep)))


def _narrowed_inputs(module: nn.Module) -> bool:
    """A convolution whose forward is its own, not torch's (timm's weight-standardised ``StdConv2d`` and
    ``ScaledStdConv2d`` normalise each filter over its inputs, so a zeroed input is not a removed one): a removal
    of its inputs is simulated by a narrower copy of it, as the shrunk layer will be. Ungrouped ones only."""
    torch_conv = next((c for c in (nn.Conv1d, nn.Conv2d, nn.Conv3d) if isinstance(module, c)), None)
    return torch_conv is not None and type(module).forward is not torch_conv.forward and module.groups == 1


def _narrowed_conv(module: nn.Module, keep: Tensor) -> nn.Module:
    """A shallow copy of a convolution over the input channels ``keep`` only (its weight's columns sliced)."""
    narrow = copy.copy(module)
    narrow._parameters = dict(module._parameters)
    narrow._parameters["weight"] = nn.Parameter(module.weight[:, keep], requires_grad=False)
    narrow.in_channels = len(keep)
    return narrow


def _is_channel_norm(module: nn.Module) -> bool:
    rms = (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()  # over one dimension or several
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, *rms)) or is_plain_norm(module)


def _norm_width(module: nn.Module) -> int:
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    shape = getattr(module, "normalized_shape", None)
    return shape[-1] if shape is not None else module.weight.shape[-1]


def _is_shapeless_norm(module: nn.Module) -> bool:
    """A norm that the dependency graph sees as loose parameters: a module of one-dimensional parameters of one
    width and no ``normalized_shape`` (Hugging Face's ``LlamaRMSNorm``, ``T5LayerNorm``, Gemma's ``1 + weight``
    RMSNorm; the shrunk model slices its parameters and its forward follows the input's width). Told from an
    elementwise scale (a layer scale) by what it does: on a row of its width, nudging one input moves the
    others' outputs."""
    params = [p for p in module._parameters.values() if p is not None]
    if _is_channel_norm(module) or not params or any(p.shape != params[0].shape for p in params):
        return False
    stateful = any(True for c in module.children() for _ in (*c.parameters(), *c.buffers()))
    if params[0].dim() != 1 or params[0].numel() < 2 or stateful:
        return False
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, params[0].numel(), generator=generator).to(params[0].device, params[0].dtype)
    try:
        out = module.forward(x)
    except Exception:  # noqa: BLE001 - not a module over rows of its width: not such a norm
        return False
    return isinstance(out, Tensor) and out.shape == x.shape and _couples(module, x, out, 1)


@torch.no_grad()
def simulate(model: nn.Module, cuts: list[Cut], heads: list[tuple[HeadGroup, list[int]]]) -> nn.Module:
    """A copy of ``model`` in which the cut channels and removed heads are exactly zero (see module doc)."""
    sim = copy.deepcopy(model).eval()
    for group, removed in heads:
        group.simulate(sim, removed)
    norms: dict[str, set[int]] = {}  # a norm over a concatenation is cut once by each group it normalises
    narrowed: dict[str, set[int]] = {}  # the inputs a convolution of its own forward loses (_narrowed_inputs)
    for cut in cuts:
        module = sim.get_submodule(cut.target) if cut.kind == "module" and cut.target else sim
        if cut.kind == "module" and not cut.out and _narrowed_inputs(module):
            narrowed.setdefault(cut.target, set()).update(cut.idxs)
    for target, gone in narrowed.items():  # registered first: an output cut of the same layer zeroes after it
        module = sim.get_submodule(target) if target else sim
        keep = _keep(module.in_channels, tuple(gone)).to(module.weight.device)
        module.register_forward_hook(
            lambda m, args, out, keep=keep: _narrowed_conv(m, keep).forward(args[0].index_select(1, keep))
        )
    for cut in cuts:
        idxs = torch.tensor(cut.idxs, dtype=torch.long)
        if cut.kind == "param":
            parent_name, _, attr = cut.target.rpartition(".")
            parent = sim.get_submodule(parent_name) if parent_name else sim
            if _is_shapeless_norm(parent):  # its statistics, like any norm's, over what the cuts keep
                norms.setdefault(parent_name, set()).update(cut.idxs)
                continue
            param = getattr(parent, attr)
            param.index_fill_(cut.dim % param.dim(), idxs.to(param.device), 0.0)
            continue
        module = sim.get_submodule(cut.target) if cut.target else sim
        if cut.out and _is_channel_norm(module):
            norms.setdefault(cut.target, set()).update(cut.idxs)
        elif cut.out:

            def zero_out(m: nn.Module, args: Any, out: Any, idxs: Tensor = idxs) -> Any:
                if isinstance(out, tuple):  # attention: (output, weights)
                    return (_zero(out[0], out[0].dim() - 1, idxs), *out[1:])
                return _zero(out, _channel_dim(m, out), idxs)

            module.register_forward_hook(zero_out)
        elif cut.target not in narrowed:

            def zero_in(m: nn.Module, args: Any, kwargs: Any, idxs: Tensor = idxs) -> Any:
                if isinstance(m, MultiheadAttention):  # query, key and value all carry the channels
                    names = ("query", "key", "value")
                    args = list(args)
                    for i, name in enumerate(names):
                        if i < len(args) and args[i].shape[-1] == m.q_proj.in_features:
                            args[i] = _zero(args[i], args[i].dim() - 1, idxs)
                        elif name in kwargs and kwargs[name].shape[-1] == m.q_proj.in_features:
                            kwargs[name] = _zero(kwargs[name], kwargs[name].dim() - 1, idxs)
                    return tuple(args), kwargs
                x = args[0]
                return (_zero(x, _channel_dim(m, x), idxs), *args[1:]), kwargs

            module.register_forward_pre_hook(zero_in, with_kwargs=True)
    for target, gone in norms.items():  # statistics over what every cut keeps, in one hook
        module = sim.get_submodule(target) if target else sim
        keep = _keep(_norm_width(module), tuple(gone))
        module.register_forward_hook(lambda m, args, out, keep=keep: _masked_norm(m, args[0], keep, out))
    return sim


@torch.no_grad()
def _compare(shrunk: nn.Module, simulated: nn.Module, inputs: Any) -> Equivalence:
    """The output regrow reads (logits) must agree; so must every other tensor the model returns of the same shape
    in both (a pooled output beside the hidden states, features beside the logits). Returned tensors of another
    shape (a key/value cache with heads removed) are not compared: the channels of every returned tensor are kept
    (``tracing.mark_outputs``). The numbers are those of the output regrow reads, or of the first other one that
    differs (``output``: its position among the returned tensors)."""
    was = shrunk.training
    shrunk.eval()
    try:
        out_shrunk, out_sim = call(shrunk, inputs), call(simulated, inputs)
    finally:
        shrunk.train(was)
    y_shrunk, y_sim = output_tensor(out_shrunk), output_tensor(out_sim)
    if y_shrunk.shape != y_sim.shape:
        return Equivalence(float("inf"), 0.0, False, shapes=(list(y_sim.shape), list(y_shrunk.shape)))
    eq = _agree(y_shrunk, y_sim)
    others_shrunk = [t for t in tensors(out_shrunk) if t is not y_shrunk]
    others_sim = [t for t in tensors(out_sim) if t is not y_sim]
    if not eq.passed or len(others_shrunk) != len(others_sim):
        return eq
    for i, (a, b) in enumerate(zip(others_shrunk, others_sim, strict=True), start=1):
        if a.shape == b.shape and not (other := _agree(a, b)).passed:
            return replace(other, output=i)
    return eq


def _agree(got: Tensor, expected: Tensor) -> Equivalence:
    """``got`` against ``expected``: floating point to ``ATOL + RTOL * max |expected|``; anything else exactly."""
    scale = float(expected.float().abs().max()) if expected.numel() else 0.0
    if not expected.is_floating_point():
        same = torch.equal(got, expected)
        return Equivalence(0.0 if same else float("inf"), 0.0, same, scale=scale)
    got, expected = got.float(), expected.float()
    tol = ATOL + RTOL * scale
    diff = float((got - expected).abs().max()) if expected.numel() else 0.0
    return Equivalence(diff, tol, diff <= tol, scale=scale)


def _float64(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.double() if x.dtype == torch.float32 else x
    if isinstance(x, dict):
        return {k: _float64(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_float64(v) for v in x)
    return x


def compare(shrunk: nn.Module, simulated: nn.Module, inputs: Any) -> Equivalence:
    """Run both models on ``inputs``; their outputs must agree to ``ATOL + RTOL * scale``.

    float32 rounding differs between a layer and its narrower self (another blocking of the same sums), and a
    deep network can amplify it past the tolerance where the surgery is exact: a probe of timm's Visformer
    (random weights, outputs up to 343) differed by 0.077 on one thread, 0.019 on two, 0 in float64. A float32
    comparison that fails is therefore settled in float64, on copies: a wrong surgery differs there as much as
    ever; rounding does not. The float32 difference is kept in the result (``float32_diff``).
    """
    eq = _compare(shrunk, simulated, inputs)
    if eq.passed or not math.isfinite(eq.max_abs_diff):
        return eq
    try:
        wide = _compare(copy.deepcopy(shrunk).double(), copy.deepcopy(simulated).double(), _float64(inputs))
    except Exception:  # noqa: BLE001 - a model that cannot run in float64 keeps the float32 verdict
        return eq
    return replace(wide, float32_diff=eq.max_abs_diff) if wide.passed else eq
