"""A masked Hugging Face model saved with regrow.hf.save_pretrained loads with plain from_pretrained."""

import json
import subprocess
import sys

import pytest
import torch

import regrow
from conftest import tiny_llama
from regrow.errors import RegrowError
from regrow.hf import load_masks, save_pretrained

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::regrow.errors.SpeedWarning")


@pytest.fixture
def pruned_llama():
    model = tiny_llama()
    data = [{"input_ids": torch.randint(0, 64, (2, 16))} for _ in range(2)]
    masks = regrow.prune(model, pattern="2:4", criterion="sparsegpt", data=data)
    return model, masks


def test_a_masked_model_loads_with_plain_from_pretrained_and_gives_identical_outputs(pruned_llama, tmp_path):
    model, masks = pruned_llama
    folder = save_pretrained(model, masks, tmp_path / "out")
    assert {"config.json", "model.safetensors", "regrow.json", "regrow_masks.safetensors"} <= {
        p.name for p in folder.iterdir()
    }
    ids = torch.randint(0, 64, (2, 12))
    # a fresh interpreter with regrow made unimportable: transformers alone reads the folder
    script = (
        "import sys, torch; sys.modules['regrow'] = None\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(folder)!r}).eval()\n"
        f"ids = torch.tensor({ids.tolist()})\n"
        "with torch.no_grad(): print(m(ids).logits.flatten().tolist())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    loaded = torch.tensor(json.loads(done.stdout.strip().splitlines()[-1]))
    with torch.no_grad():
        expect = model(ids).logits.flatten()
    assert torch.equal(loaded, expect)
    again = load_masks(folder)
    assert again.spec == masks.spec and sorted(again) == sorted(masks)
    assert all(torch.equal(again[f], masks[f]) for f in masks)
    side = json.loads((folder / "regrow.json").read_text())
    assert side["sparsity"] == pytest.approx(0.5) and side["spec"]["criterion"] == "sparsegpt"
    packed = (folder / "regrow_masks.safetensors").stat().st_size
    assert packed < sum(m.numel() for m in masks.values()) / 4  # about one bit per weight, not a byte


def test_nothing_is_written_over_a_folder_or_from_bad_weights(pruned_llama, tmp_path):
    model, masks = pruned_llama
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("keep me")
    with pytest.raises(RegrowError, match="exists and is not empty"):
        save_pretrained(model, masks, tmp_path / "busy")
    assert (tmp_path / "busy" / "mine.txt").read_text() == "keep me"
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(RegrowError, match="NaN or infinite weights"):
        save_pretrained(model, masks, tmp_path / "new")
    assert not (tmp_path / "new").exists() and [p.name for p in tmp_path.iterdir()] == ["busy"]
    with pytest.raises(RegrowError, match="needs a Hugging Face model"):
        save_pretrained(torch.nn.Linear(2, 2), masks, tmp_path / "other")
    with pytest.raises(RegrowError, match="has no regrow_masks.safetensors"):
        load_masks(tmp_path / "busy")
