"""A small decoder-only language model (nanoGPT-style, byte-level by default) for the language recipes."""

from __future__ import annotations

import torch
from torch import nn

from regrow.structural.attention import MultiheadAttention


class DecoderBlock(nn.Module):
    """Pre-norm causal block: LayerNorm -> causal self-attention -> residual, LayerNorm -> MLP -> residual."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False, is_causal=True)[0]
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """Token and learned position embeddings, ``depth`` causal blocks, a final LayerNorm and an output layer.

    ``forward(input_ids)`` returns (batch, tokens, vocabulary) logits: position t predicts token t + 1.
    """

    def __init__(self, vocab: int = 256, dim: int = 192, depth: int = 4, heads: int = 6, context: int = 64) -> None:
        super().__init__()
        self.context = context
        self.tok_embed = nn.Embedding(vocab, dim)
        self.pos_embed = nn.Parameter(torch.randn(1, context, dim) * 0.02)
        self.blocks = nn.ModuleList(DecoderBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        tokens = input_ids.shape[1]
        if tokens > self.context:
            raise ValueError(f"{tokens} tokens exceed the model's context of {self.context}")
        x = self.tok_embed(input_ids) + self.pos_embed[:, :tokens]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))
