"""``InterpolationMode`` as torchvision defines it (timm maps its members at import time); no functions."""

from enum import Enum

from torchvision._placeholder import missing


class InterpolationMode(Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def __getattr__(name: str):
    raise missing(__name__, name)
