"""``accelerate launch -m diffdistill.train CONFIG [key=value ...] [--resume latest]``."""

import sys

from diffdistill.app.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
