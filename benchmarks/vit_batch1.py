"""Why a shrunk ViT can be slower than the dense one at batch 1: each suspect measured alone.

Run (a GPU machine with torchvision): python -m benchmarks.vit_batch1
Smoke test anywhere: python -m benchmarks.vit_batch1 --smoke   (a small ViT built from nn.MultiheadAttention)

On an H200, torchvision's ViT-B/16 shrunk to half its MACs ran at 0.55x of the dense model at batch 1 in
fp32 (1.77x at batch 256). Three suspects, each timed against the dense model in interleaved pairs
(synchronised, median), at batch 1 and at a large batch, in fp32 and bf16:

1. ``swap``: the dense model with regrow's MultiheadAttention swapped in (same weights, same widths): what
   the attention module alone costs (three projections instead of one fused input projection, no native
   fast path).
2. ``shrunk``: regrow.prune(pattern="channel", macs=0.5) as a user runs it.
3. ``heads``: regrow.prune(pattern="head", sparsity=0.5): whole heads removed, head_dim unchanged.

The widths each model ends with (head_dim, MLP hidden width, embedding width) are listed with whether they are
multiples of 8 (tensor-core tiles and the fused attention kernels want that).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from typing import Any

import torch
from torch import nn

import regrow
from benchmarks.common import RESULTS, markdown_table, stamp, stamp_markdown
from regrow.structural.attention import MultiheadAttention, convert_attention


def timed_pair(a: nn.Module, b: nn.Module, x: torch.Tensor, rounds: int, dtype: torch.dtype) -> tuple[float, float]:
    """Median ms of ``a`` and ``b`` on ``x``, alternating one forward of each, synchronised on a GPU."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    times: tuple[list[float], list[float]] = ([], [])
    with torch.inference_mode(), torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        for m in (a, b):
            for _ in range(5):
                m(x)
        sync()
        for _ in range(rounds):
            for m, bucket in zip((a, b), times):
                start = time.perf_counter()
                m(x)
                sync()
                bucket.append((time.perf_counter() - start) * 1000)
    return statistics.median(times[0]), statistics.median(times[1])


def widths(model: nn.Module) -> dict[str, Any]:
    """head_dim, MLP hidden widths and embedding widths found in the model."""
    heads, hidden, embed = set(), set(), set()
    for m in model.modules():
        if isinstance(m, MultiheadAttention):
            heads.add(m.head_dim)
            embed.add(m.embed_dim)
        elif isinstance(m, nn.MultiheadAttention):
            heads.add(m.head_dim)
            embed.add(m.embed_dim)
        elif isinstance(m, nn.Linear) and m.out_features > m.in_features:
            hidden.add(m.out_features)
    return {
        "head_dim": sorted(heads),
        "mlp_hidden": sorted(hidden),
        "embed": sorted(embed),
        "all_multiples_of_8": all(w % 8 == 0 for w in heads | hidden | embed),
    }


class _Block(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.self_attention = nn.MultiheadAttention(d, h, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.self_attention(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class SmallViT(nn.Module):
    """A ViT in torchvision's shape (patch conv, class token, pre-norm blocks with nn.MultiheadAttention)."""

    def __init__(self, d: int = 96, heads: int = 4, depth: int = 2, image: int = 32, patch: int = 8) -> None:
        super().__init__()
        self.conv_proj = nn.Conv2d(3, d, patch, patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, d) * 0.02)
        self.blocks = nn.Sequential(*[_Block(d, heads) for _ in range(depth)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.ln(self.blocks(x))[:, 0])


def variants(dense: nn.Module, image: int, device: torch.device) -> dict[str, nn.Module]:
    example = torch.randn(2, 3, image, image, device=device)
    swap = copy.deepcopy(dense)
    convert_attention(swap)
    shrunk = copy.deepcopy(dense)
    regrow.prune(shrunk, pattern="channel", macs=0.5, example_inputs=example, keep_dense=False)
    heads = copy.deepcopy(dense)
    regrow.prune(heads, pattern="head", sparsity=0.5, example_inputs=example, keep_dense=False)
    return {"swap": swap.eval(), "shrunk": shrunk.eval(), "heads": heads.eval()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a small ViT, few rounds: checks the script runs")
    parser.add_argument("--batch", type=int, default=128, help="the large batch")
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        dense, image, batch, rounds = SmallViT().to(device).eval(), 32, 8, 5
    else:
        from torchvision.models import vit_b_16

        dense, image, batch, rounds = vit_b_16().to(device).eval(), 224, args.batch, args.rounds
    built = variants(dense, image, device)
    rows, out = [], []
    for dtype in (torch.float32, torch.bfloat16):
        for size in (1, batch):
            x = torch.randn(size, 3, image, image, device=device)
            for name, model in built.items():
                base, other = timed_pair(dense, model, x, rounds, dtype)
                kind = str(dtype).removeprefix("torch.")
                row = [name, kind, size, f"{base:.3f}", f"{other:.3f}", f"{base / other:.2f}x"]
                print(" | ".join(str(c) for c in row), flush=True)
                rows.append(row)
                out.append(dict(zip(["variant", "dtype", "batch", "dense_ms", "variant_ms", "speedup"], row)))
    info = stamp() | {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    shapes = {name: widths(m) for name, m in {"dense": dense, **built}.items()}
    if args.smoke:
        print(json.dumps(shapes))
        return
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "vit_batch1.json").write_text(json.dumps({"info": info, "rows": out, "widths": shapes}, indent=1))
    text = [
        "# Shrunk ViT at batch 1: which part costs",
        "",
        stamp_markdown(info) + f" Device: {info['device']}.",
        "",
        markdown_table(["variant", "dtype", "batch", "dense ms", "variant ms", "speed-up"], rows),
        "",
        markdown_table(
            ["model", "head_dim", "MLP hidden", "embed", "all multiples of 8"],
            [[k, v["head_dim"], v["mlp_hidden"], v["embed"], v["all_multiples_of_8"]] for k, v in shapes.items()],
        ),
    ]
    (RESULTS / "vit_batch1.md").write_text("\n".join(text) + "\n")


if __name__ == "__main__":
    main()
