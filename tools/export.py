#!/usr/bin/env python
"""``rednet-export`` from a checkout; the command lives in ``rednet/tools/export.py``."""
import sys

from rednet.tools.export import main

if __name__ == "__main__":
    sys.exit(main())
