import pytest
import torch

from regrow.components import build_augment
from regrow.data.augment import hflip, noise, shift
from regrow.errors import RegrowError


def test_shift_moves_whole_pixels_and_repeats_the_border():
    torch.manual_seed(0)
    x = torch.arange(16.0).reshape(1, 1, 4, 4).repeat(64, 1, 1, 1)
    out = shift(x)
    assert out.shape == x.shape
    originals = {tuple(x[0].flatten().tolist())}
    seen = set()
    for img in out:
        seen.add(tuple(img.flatten().tolist()))
        assert set(img.flatten().tolist()) <= set(range(16))  # values are moved, never blended
    assert len(seen) > 1 and originals & seen  # several distinct shifts, including none
    # a one-pixel shift to the right repeats the first column
    right = torch.tensor([[0, 0, 1, 2], [4, 4, 5, 6], [8, 8, 9, 10], [12, 12, 13, 14]], dtype=torch.float)
    assert tuple(right.flatten().tolist()) in seen


def test_image_augments_refuse_non_images():
    with pytest.raises(RegrowError, match=r"needs batches shaped \(N, C, H, W\); got shape \(4, 8\)"):
        shift(torch.zeros(4, 8))
    with pytest.raises(RegrowError, match="'hflip' mirrors images"):
        hflip(torch.zeros(4, 8))


def test_noise_and_hflip_keep_shapes():
    x = torch.randn(8, 1, 4, 4)
    assert noise(x).shape == x.shape
    flipped = hflip(x)
    assert all(torch.equal(f, o) or torch.equal(f, o.flip(-1)) for f, o in zip(flipped, x))


def test_build_augment_by_name_or_factory():
    assert build_augment("shift") is shift
    assert build_augment(None) is None and build_augment("none") is None
    assert build_augment("regrow.data.augment:noise") is noise
    with pytest.raises(RegrowError, match="unknown augment 'rotate'; allowed values: hflip, noise, shift"):
        build_augment("rotate")
