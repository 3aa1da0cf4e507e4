"""``python -m edgec_ondevice verify|bench|predict --bundle DIR`` (bundle defaults to the current dir)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m " + (__package__ or "edgec_ondevice")))
