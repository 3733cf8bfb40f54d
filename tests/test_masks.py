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


def test_masks_are_saved_one_bit_a_weight_and_old_files_still_load(tmp_path):
    from safetensors.torch import load_file, save_file

    keep = torch.tensor([[True, False, True], [False, False, True], [True, True, True]])  # 9 bits: 2 bytes
    MaskSet({"w": keep, "v": torch.zeros(2, 5, 1, dtype=torch.bool)}).save(tmp_path / "m.safetensors")
    raw = load_file(tmp_path / "m.safetensors")
    assert raw["w"].dtype == torch.uint8 and raw["w"].tolist() == [0b10100111, 0b10000000]
    loaded = MaskSet.load(tmp_path / "m.safetensors")
    assert torch.equal(loaded["w"], keep) and loaded["v"].shape == (2, 5, 1) and not loaded["v"].any()
    save_file({"w": keep}, str(tmp_path / "v1.safetensors"), metadata={"format": "regrow.masks", "version": "1"})
    assert torch.equal(MaskSet.load(tmp_path / "v1.safetensors")["w"], keep)  # a file written before packing
    meta = {"format": "regrow.masks", "version": "2", "shapes": '{"w": [5, 4]}'}
    save_file({"w": raw["w"]}, str(tmp_path / "short.safetensors"), metadata=meta)  # 2 bytes cannot hold 20 bits
    with pytest.raises(RegrowError, match="unreadable packed masks"):
        MaskSet.load(tmp_path / "short.safetensors")


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
