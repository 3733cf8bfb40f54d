"""``python -m regrow``: the command line (``torchrun --nproc-per-node N -m regrow run RECIPE``: on N ranks)."""

import sys

from regrow.cli import main

if __name__ == "__main__":
    sys.exit(main())
