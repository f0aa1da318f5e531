#!/usr/bin/env python
"""``rednet-convert-weights`` from a checkout; the command lives in ``rednet/tools/convert_weights.py``."""
import sys

from rednet.tools.convert_weights import main

if __name__ == "__main__":
    sys.exit(main())
