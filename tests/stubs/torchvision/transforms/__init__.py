"""Transform names timm's data modules use at import time (``class MaybeToTensor(transforms.ToTensor)``)."""

from torchvision._placeholder import missing, placeholder_class
from torchvision.transforms import functional
from torchvision.transforms.functional import InterpolationMode

_NAMES = (
    "CenterCrop",
    "ColorJitter",
    "Compose",
    "GaussianBlur",
    "Normalize",
    "PILToTensor",
    "RandomApply",
    "RandomGrayscale",
    "RandomHorizontalFlip",
    "RandomResizedCrop",
    "RandomVerticalFlip",
    "Resize",
    "ToTensor",
)
globals().update({name: placeholder_class(__name__, name) for name in _NAMES})


def __getattr__(name: str):
    raise missing(__name__, name)


__all__ = ["InterpolationMode", "functional", *_NAMES]
