"""Dataset names timm's dataset factory imports unconditionally; none can be built."""

from torchvision._placeholder import missing, placeholder_class

_NAMES = ("CIFAR10", "CIFAR100", "FashionMNIST", "ImageFolder", "KMNIST", "MNIST")
globals().update({name: placeholder_class(__name__, name) for name in _NAMES})


def __getattr__(name: str):
    raise missing(__name__, name)  # timm imports the others (Places365, ImageNet, ...) under try/except ImportError
