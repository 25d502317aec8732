"""``python -m diffdistill.cli`` (and ``accelerate launch -m diffdistill.cli bench ...``): the
``diffdistill`` command, which lives in :mod:`diffdistill.app.cli`."""

import sys

from diffdistill.app.cli import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
