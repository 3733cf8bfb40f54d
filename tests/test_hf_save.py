"""A masked Hugging Face model saved with regrow.hf.save_pretrained loads with plain from_pretrained."""

import json
import os
import stat
from pathlib import Path

import pytest
import torch

import regrow
from conftest import tiny_llama
from forked import Forker
from regrow.errors import RegrowError
from regrow.hf import load_masks, save_pretrained

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::regrow.errors.SpeedWarning")


# Loaded by transformers alone: each load runs in a child forked from one process that has imported torch and
# transformers with regrow unimportable (tests/forked.py), which spares each test the seconds those imports take.
PLAIN = """
import sys, torch
sys.modules["regrow"] = None
from transformers import AutoModel, AutoModelForCausalLM
from transformers.models.bert import modeling_bert
from transformers.models.llama import modeling_llama
from transformers.models.phi3 import modeling_phi3
"""


@pytest.fixture(scope="module")
def plain():
    forker = Forker(PLAIN)
    yield forker
    forker.close()


def _plain_run(plain, script: str) -> str:
    done = plain.run(script)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture
def pruned_llama():
    model = tiny_llama()
    data = [{"input_ids": torch.randint(0, 64, (2, 16))} for _ in range(2)]
    masks = regrow.prune(model, pattern="2:4", criterion="sparsegpt", data=data)
    return model, masks


def test_a_masked_model_loads_with_plain_from_pretrained_and_gives_identical_outputs(pruned_llama, plain, tmp_path):
    model, masks = pruned_llama
    folder = save_pretrained(model, masks, tmp_path / "out")
    assert {"config.json", "model.safetensors", "regrow.json", "regrow_masks.safetensors"} <= {
        p.name for p in folder.iterdir()
    }
    ids = torch.randint(0, 64, (2, 12))
    # a process with regrow made unimportable (PLAIN): transformers alone reads the folder
    script = (
        "import sys, torch; sys.modules['regrow'] = None\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(folder)!r}).eval()\n"
        f"ids = torch.tensor({ids.tolist()})\n"
        "with torch.no_grad(): print(m(ids).logits.flatten().tolist())\n"
    )
    loaded = torch.tensor(json.loads(_plain_run(plain, script).strip().splitlines()[-1]))
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


def test_overwrite_replaces_the_folder_only_once_the_new_one_is_complete(pruned_llama, tmp_path, monkeypatch):
    model, masks = pruned_llama
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("old run")
    real = Path.replace

    def failing(self, target):  # the new folder cannot be renamed into place (after the old one moved aside)
        if self.name.startswith(".out-") and not self.name.startswith(".out-old-"):
            raise OSError("disk gone")
        return real(self, target)

    monkeypatch.setattr(Path, "replace", failing)
    with pytest.raises(OSError, match="disk gone"):
        save_pretrained(model, masks, out, overwrite=True)
    assert (out / "mine.txt").read_text() == "old run" and [p.name for p in tmp_path.iterdir()] == ["out"]
    monkeypatch.undo()
    folder = save_pretrained(model, masks, out, overwrite=True)
    assert not (folder / "mine.txt").exists() and (folder / "regrow.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~mask  # not mkdtemp's 0700
    assert {stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {0o666 & ~mask}  # nor safetensors' 0600
    # a save killed between its two renames left the earlier folder aside: the next save names it, touches nothing
    folder.rename(tmp_path / ".out-old-0123abcd")
    with pytest.raises(RegrowError, match=r"interrupted after moving .*\.out-old-0123abcd'; rename it back"):
        save_pretrained(model, masks, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out-old-0123abcd"]


def test_a_file_or_a_link_of_that_name_is_never_replaced(pruned_llama, tmp_path):
    model, masks = pruned_llama
    (tmp_path / "file").write_text("mine")
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "mine.txt").write_text("mine")
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    for overwrite in (False, True):
        with pytest.raises(RegrowError, match="'.*file' is a file, not a folder"):
            save_pretrained(model, masks, tmp_path / "file", overwrite=overwrite)
        with pytest.raises(RegrowError, match="'.*link' is a link, not a folder.*even with overwrite=True"):
            save_pretrained(model, masks, tmp_path / "link", overwrite=overwrite)
    assert (tmp_path / "file").read_text() == "mine" and (tmp_path / "link" / "mine.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "link", "real"]


def _loaded_outputs(plain, folder, kind: str, inputs: dict) -> torch.Tensor:
    """The model in ``folder`` loaded by transformers alone (regrow unimportable), run on ``inputs``."""
    given = json.dumps({k: v.tolist() for k, v in inputs.items()})
    script = (
        "import sys, json, torch; sys.modules['regrow'] = None\n"
        f"from transformers import {kind}\n"
        f"m = {kind}.from_pretrained({str(folder)!r}).eval()\n"
        f"inputs = {{k: torch.tensor(v) for k, v in json.loads({given!r}).items()}}\n"
        "out = m(**inputs)\n"
        "t = out.logits if hasattr(out, 'logits') else out.last_hidden_state\n"
        "print(json.dumps(t.detach().flatten().tolist()))\n"
    )
    return torch.tensor(json.loads(_plain_run(plain, script).strip().splitlines()[-1]))


def test_llama_with_heads_removed_uniformly_saves_with_its_config_updated(tmp_path, plain):
    model = tiny_llama()
    ids = {"input_ids": torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))}
    masks = regrow.prune(model, pattern="head", sparsity=0.5, scope="layer", example_inputs=ids["input_ids"])
    folder = save_pretrained(model, masks, tmp_path / "out")
    config = json.loads((folder / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (2, 1, 8)
    assert model.config.num_attention_heads == 4  # the model's own config is left as it was
    with torch.no_grad():
        expect = model(**ids).logits.flatten()
    assert torch.equal(_loaded_outputs(plain, folder, "AutoModelForCausalLM", ids), expect)
    assert json.loads((folder / "regrow.json").read_text())["structure"]["pattern"] == "head"


def test_multi_query_llama_with_query_heads_removed_saves_its_one_key_value_head(tmp_path, plain):
    model = tiny_llama(num_key_value_heads=1)
    ids = {"input_ids": torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))}
    masks = regrow.prune(model, pattern="head", sparsity=0.5, scope="layer", example_inputs=ids["input_ids"])
    folder = save_pretrained(model, masks, tmp_path / "out")
    config = json.loads((folder / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (2, 1, 8)
    with torch.no_grad():
        expect = model(**ids).logits.flatten()
    assert torch.equal(_loaded_outputs(plain, folder, "AutoModelForCausalLM", ids), expect)


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_phi3_with_heads_removed_uniformly_saves_with_its_head_size_stated(tmp_path, kv_heads, plain):
    # Phi-3 derives its head size as hidden_size // num_attention_heads: with half its heads gone that gave 16, not
    # 8 ("o_proj.weight is (32, 16), and the config (widths updated) gives (32, 32)"); with grouped queries the
    # fused projection's old width (64) also equalled intermediate_size, which was then set to its new width (32).
    config = transformers.Phi3Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=32, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Phi3ForCausalLM(config).eval()
    ids = {"input_ids": torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))}
    masks = regrow.prune(model, pattern="head", sparsity=0.5, scope="layer", example_inputs=ids["input_ids"])
    folder = save_pretrained(model, masks, tmp_path / "out")
    saved = json.loads((folder / "config.json").read_text())
    expected = (2, kv_heads // 2, 8, 64)
    assert (
        saved["num_attention_heads"],
        saved["num_key_value_heads"],
        saved["head_dim"],
        saved["intermediate_size"],
    ) == expected
    with torch.no_grad():
        expect = model(**ids).logits.flatten()
    assert torch.equal(_loaded_outputs(plain, folder, "AutoModelForCausalLM", ids), expect)


def test_llama_with_a_narrower_hidden_size_saves_with_its_config_updated(tmp_path, plain):
    # the residual stream is a channel group of its own: embeddings, every norm (LlamaRMSNorm), the projections'
    # inputs and outputs, lm_head's inputs; the config states it as hidden_size (head_dim stays explicit)
    model = tiny_llama()
    ids = {"input_ids": torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))}
    masks = regrow.prune(
        model, pattern="channel", sparsity=0.25, scope="layer", example_inputs=ids["input_ids"], round_to=8
    )
    hidden = model.model.embed_tokens.embedding_dim
    assert hidden < 32
    folder = save_pretrained(model, masks, tmp_path / "out")
    config = json.loads((folder / "config.json").read_text())
    assert (config["hidden_size"], config["head_dim"], config["num_attention_heads"]) == (hidden, 8, 4)
    with torch.no_grad():
        expect = model(**ids).logits.flatten()
    assert torch.equal(_loaded_outputs(plain, folder, "AutoModelForCausalLM", ids), expect)


def test_a_derived_head_size_is_stated_and_a_config_that_scales_by_the_hidden_size_is_refused(tmp_path):
    # Qwen2 derives its head size from hidden_size // num_attention_heads: a narrower hidden size is stated with
    # head_dim written out. Gemma also scales its embeddings by sqrt(hidden_size) (a buffer its config builds): its
    # config states the widths, but the model loaded from it computed other outputs (max difference 0.013).
    common = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
    common |= {"num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32}
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    for name, config, cls in (
        ("qwen2", transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM),
        ("gemma", transformers.GemmaConfig(**common, head_dim=8), transformers.GemmaForCausalLM),
    ):
        torch.manual_seed(0)
        model = cls(config).eval()
        masks = regrow.prune(model, pattern="channel", sparsity=0.5, scope="layer", example_inputs=ids, round_to=4)
        hidden = model.get_input_embeddings().embedding_dim
        assert hidden < 32
        if name == "gemma":
            with pytest.raises(RegrowError, match=r"built from it computes other outputs \(max difference"):
                save_pretrained(model, masks, tmp_path / name)
            assert not (tmp_path / name).exists()
            continue
        folder = save_pretrained(model, masks, tmp_path / name)
        saved = json.loads((folder / "config.json").read_text())
        assert (saved["hidden_size"], saved["head_dim"]) == (hidden, 8)
        with torch.no_grad():
            assert torch.equal(cls.from_pretrained(folder).eval()(ids).logits, model(ids).logits)


def test_a_buffer_built_from_the_config_counts_as_the_models_own_up_to_its_precision():
    from regrow.hf import _same_values

    freq = 1.0 / (10000 ** (torch.arange(0, 8, 2).double() / 8))  # rotary frequencies, as a config builds them
    assert _same_values(freq.float(), freq.float())
    assert _same_values(freq.bfloat16(), freq.float())  # a model cast to bfloat16 holds them rounded
    assert not _same_values(torch.tensor(16**0.5), torch.tensor(32**0.5))  # Gemma's embedding scale
    assert not _same_values(freq.float()[:2], freq.float()) and not _same_values(None, freq)
    assert _same_values(torch.arange(3), torch.arange(3)) and not _same_values(torch.arange(3), torch.arange(1, 4))


def test_a_bfloat16_llama_with_a_narrower_hidden_size_saves(tmp_path):
    # Was refused: the rebuilt model's rotary frequencies (float32, from the config) against the model's (cast to
    # bfloat16) made the outputs differ by 0.000488, read as a config that changes the function.
    model = tiny_llama().to(torch.bfloat16)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    masks = regrow.prune(model, pattern="channel", sparsity=0.5, scope="layer", example_inputs=ids, round_to=4)
    assert model.model.embed_tokens.embedding_dim < 32
    folder = save_pretrained(model, masks, tmp_path / "bf16")
    assert json.loads((folder / "config.json").read_text())["hidden_size"] == model.model.embed_tokens.embedding_dim


def tiny_bert():
    config = transformers.BertConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    torch.manual_seed(0)
    return transformers.BertModel(config, add_pooling_layer=False).eval()


def test_a_bfloat16_encoder_without_the_pooler_its_config_builds_saves(tmp_path):
    # The config builds a pooler the model lacks; the rebuilt model's stand-in pooler was float32 beside bfloat16
    # weights and did not run ("mat1 and mat2 must have the same dtype"), which refused the save.
    model = tiny_bert().to(torch.bfloat16)
    ids = torch.randint(0, 60, (2, 10), generator=torch.Generator().manual_seed(1))
    ffn = "encoder.layer.*.intermediate.dense.weight"
    masks = regrow.prune(model, pattern="channel", sparsity=0.5, scope="layer", targets=ffn, example_inputs=ids)
    folder = save_pretrained(model, masks, tmp_path / "bf16")
    assert json.loads((folder / "config.json").read_text())["intermediate_size"] == 32


def test_bert_ffn_channels_save_when_uniform_and_heads_are_refused_with_the_reason(tmp_path, plain):
    inputs = {"input_ids": torch.randint(0, 60, (2, 10), generator=torch.Generator().manual_seed(1))}
    model = tiny_bert()
    ffn = "encoder.layer.*.intermediate.dense.weight"
    masks = regrow.prune(model, pattern="channel", sparsity=0.5, scope="layer", targets=ffn, example_inputs=inputs)
    assert [layer.intermediate.dense.out_features for layer in model.encoder.layer] == [32, 32]
    folder = save_pretrained(model, masks, tmp_path / "ffn")
    assert json.loads((folder / "config.json").read_text())["intermediate_size"] == 32
    with torch.no_grad():
        expect = model(**inputs).last_hidden_state.flatten()
    assert torch.equal(_loaded_outputs(plain, folder, "AutoModel", inputs), expect)

    uneven = tiny_bert()
    with torch.no_grad():
        uneven.encoder.layer[0].intermediate.dense.weight[:40] *= 0.01  # layer 0's channels score low: it gives more
    masks = regrow.prune(uneven, pattern="channel", sparsity=0.4, targets=ffn, example_inputs=inputs, round_to=1)
    assert len({layer.intermediate.dense.out_features for layer in uneven.encoder.layer}) == 2
    with pytest.raises(RegrowError, match=r"different FFN widths .* scope='layer'"):
        save_pretrained(uneven, masks, tmp_path / "uneven")

    for sparsity in (0.5, 0.25):  # 2 heads of 8 wide, which BERT's config cannot state; 3, which do not divide 32
        heads = tiny_bert()
        masks = regrow.prune(heads, pattern="head", sparsity=sparsity, scope="layer", example_inputs=inputs)
        with pytest.raises(RegrowError, match=r"config of BertModel cannot state .* regrow.save"):
            save_pretrained(heads, masks, tmp_path / "heads")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ffn"]  # nothing written for the refused ones


def test_llama_shrunk_uniformly_in_heads_and_ffn_saves_with_its_config_updated(tmp_path, plain):
    model = tiny_llama()
    ids = {"input_ids": torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))}
    # scope layer: every group gives the same share (a params budget may need unit-by-unit filling, which would
    # break the uniformity; a sparsity budget does not)
    masks = regrow.prune(
        model,
        pattern="channel+head",
        sparsity=0.5,
        within="model.layers",
        scope="layer",
        example_inputs=ids["input_ids"],
    )
    folder = save_pretrained(model, masks, tmp_path / "out")
    config = json.loads((folder / "config.json").read_text())
    assert (config["intermediate_size"], config["num_attention_heads"], config["num_key_value_heads"]) == (32, 2, 1)
    with torch.no_grad():
        expect = model(**ids).logits.flatten()
    assert torch.equal(_loaded_outputs(plain, folder, "AutoModelForCausalLM", ids), expect)


def test_a_model_built_with_options_its_config_does_not_hold_saves_its_masks_as_it_is(tmp_path):
    # A model is read as shrunk (its config then rewritten) where its tensors differ in shape from those its config
    # builds; ViT's mask token and BERT without its pooler (as sentence-transformers builds it) differ in which
    # tensors they hold, not in shape, and were refused or given a head_dim their config never had.
    vit = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64
    )
    bert = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64
    )
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for name, model, x in (
        ("vit", transformers.ViTModel(vit, use_mask_token=True), images),
        ("bert", transformers.BertModel(bert, add_pooling_layer=False), ids),
    ):
        masks = regrow.prune(model.eval(), pattern="unstructured", sparsity=0.5, example_inputs=x)
        folder = save_pretrained(model, masks, tmp_path / name)
        assert "head_dim" not in json.loads((folder / "config.json").read_text())


def test_vit_with_heads_removed_uniformly_saves_with_its_head_size_stated(tmp_path):
    # ViT reads the head size as config.head_dim where the config states it, else hidden_size // heads: refused
    # before ("the config (widths updated) gives ..."), as BERT's and GPT-2's heads still are.
    config = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config).eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    masks = regrow.prune(model, pattern="head", sparsity=0.5, scope="layer", example_inputs=images)
    folder = save_pretrained(model, masks, tmp_path / "vit")
    saved = json.loads((folder / "config.json").read_text())
    assert (saved["num_attention_heads"], saved["head_dim"], saved["hidden_size"]) == (2, 8, 32)
    with torch.no_grad():
        loaded = transformers.ViTForImageClassification.from_pretrained(folder).eval()
        assert torch.equal(loaded(images).logits, model(images).logits)
