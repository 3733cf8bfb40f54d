import pytest
import torch

import regrow
from conftest import TinyMLP
from regrow.errors import RegrowError
from regrow.masks import MaskSet


def test_save_load_round_trip(tmp_path):
    model = TinyMLP()
    masks = regrow.prune(model, 0.6)
    masks.save(tmp_path / "m.safetensors")
    loaded = MaskSet.load(tmp_path / "m.safetensors")
    assert set(loaded) == set(masks)
    assert all(torch.equal(loaded[f], masks[f]) for f in masks)
    fresh = TinyMLP()
    loaded.apply(fresh)
    assert all(torch.count_nonzero(fresh.get_parameter(f)[~masks[f]]) == 0 for f in masks)


def test_corrupt_or_missing_mask_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(RegrowError, match="not a readable safetensors file"):
        MaskSet.load(bad)
    with pytest.raises(RegrowError, match="does not exist"):
        MaskSet.load(tmp_path / "missing.safetensors")


def test_masks_for_another_model_are_refused():
    masks = MaskSet({"fc1.weight": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(RegrowError, match="has shape"):
        masks.apply(TinyMLP())
    with pytest.raises(RegrowError, match="names no parameter"):
        MaskSet({"nope.weight": torch.ones(1, dtype=torch.bool)}).apply(TinyMLP())


def test_clear_optimizer_state_zeroes_masked_entries():
    model = TinyMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    masks = regrow.prune(model, 0.5)
    buf = opt.state[model.fc1.weight]["momentum_buffer"]
    assert torch.count_nonzero(buf[~masks["fc1.weight"]]) > 0
    masks.clear_optimizer_state(model, opt)
    assert torch.count_nonzero(buf[~masks["fc1.weight"]]) == 0
    assert torch.count_nonzero(buf[masks["fc1.weight"]]) > 0
