#!/usr/bin/env python
"""``rednet-train`` from a checkout; the command lives in ``rednet/tools/train.py``."""
import sys

from rednet.tools.train import main

if __name__ == "__main__":
    sys.exit(main())
