"""A test-only stand-in for torchvision (see tests/stubs/README.md): just what timm imports.

tests/conftest.py (import_timm) puts tests/stubs on sys.path, for timm's import only, when the real
torchvision cannot be imported.
``FrozenBatchNorm2d`` (torchvision.ops.misc) is a faithful implementation; everything else is a name that
timm's data code imports at import time and that refuses to be used.
"""

__version__ = "0.0.0+regrow.test.stand.in"
STAND_IN = True  # lets a test (or a benchmark) tell this stand-in from the real package
