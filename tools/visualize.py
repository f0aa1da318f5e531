#!/usr/bin/env python
"""``rednet-visualize`` from a checkout; the command lives in ``rednet/tools/visualize.py``."""
import sys

from rednet.tools.visualize import main

if __name__ == "__main__":
    sys.exit(main())
