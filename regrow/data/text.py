"""Language-model batches: inputs and the next token at each position (``regrow.tasks``: ``"tokens"``), and
the built-in text dataset ``python_docs``."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from regrow.data.bundle import DATASETS, DataBundle
from regrow.errors import RegrowError
from regrow.tasks import IGNORE


def next_token_targets(input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Targets for (batch, tokens) ``input_ids``: each position's next token; -100 (not scored) at the last
    position, and where the next token is padding (``attention_mask`` 0)."""
    if input_ids.dim() != 2:
        raise RegrowError(f"input_ids must be (batch, tokens); got shape {tuple(input_ids.shape)}.")
    targets = torch.full_like(input_ids, IGNORE, dtype=torch.long)
    targets[:, :-1] = input_ids[:, 1:]
    if attention_mask is not None:
        targets[:, :-1][attention_mask[:, 1:] == 0] = IGNORE
    return targets


def next_token_batches(
    tokens: Tensor, seq_len: int, batch_size: int, *, shuffle: bool = False, seed: int = 0
) -> list[tuple[Tensor, Tensor]]:
    """Cut a 1-D stream of token ids into (inputs, targets) batches of ``seq_len`` tokens, targets shifted by one
    (nanoGPT style: every position is scored). The tail that does not fill a sequence is dropped."""
    if tokens.dim() != 1:
        raise RegrowError(f"tokens must be a 1-D stream of token ids; got shape {tuple(tokens.shape)}.")
    if seq_len < 1 or batch_size < 1:
        raise RegrowError(f"seq_len and batch_size must be at least 1; got {seq_len} and {batch_size}.")
    if tokens.numel() - 1 < seq_len:
        raise RegrowError(f"{tokens.numel()} tokens do not fill one sequence of {seq_len} tokens plus its target.")
    x, y = _sequences(tokens, seq_len)
    if shuffle:
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        x, y = x[order], y[order]
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]


def _sequences(tokens: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
    """Consecutive (inputs, targets) windows of ``seq_len`` tokens from a 1-D stream."""
    n = (tokens.numel() - 1) // seq_len
    index = torch.arange(n)[:, None] * seq_len + torch.arange(seq_len + 1)[None, :]
    seqs = tokens.long()[index]
    return seqs[:, :-1], seqs[:, 1:]


@DATASETS.register("python_docs")
def python_docs(seq_len: int = 64, batch_size: int = 32, seed: int = 0, train_limit: int | None = None) -> DataBundle:
    """Python's reference documentation as bytes (pydoc_data.topics, shipped with every CPython): a language
    model's next byte; topics split 8:1:1 into train / validation / test (every 10th topic tested)."""
    import sys
    from pydoc_data.topics import topics

    names = sorted(topics)
    texts: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for i, name in enumerate(names):
        texts["test" if i % 10 == 0 else "val" if i % 10 == 5 else "train"].append(topics[name])
    streams = {
        k: torch.frombuffer(bytearray("\n\n".join(v).encode("utf-8")), dtype=torch.uint8) for k, v in texts.items()
    }
    x, y = _sequences(streams["train"], seq_len)
    if train_limit is not None:
        x, y = x[:train_limit], y[:train_limit]
    gen = torch.Generator().manual_seed(seed)
    train = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, generator=gen)
    val = DataLoader(TensorDataset(*_sequences(streams["val"], seq_len)), batch_size=batch_size)
    test = DataLoader(TensorDataset(*_sequences(streams["test"], seq_len)), batch_size=batch_size)
    version = ".".join(map(str, sys.version_info[:3]))
    sizes = ", ".join(f"{k} {v.numel() / 1000:.0f}k" for k, v in streams.items())
    return DataBundle(
        train=train,
        val=val,
        test=test,
        num_classes=256,
        description=f"python_docs: Python {version} reference documentation, {len(names)} topics as bytes "
        f"(bytes: {sizes}); {seq_len}-byte sequences, next byte at each position",
    )
