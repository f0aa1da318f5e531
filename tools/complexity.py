#!/usr/bin/env python
"""``rednet-complexity`` from a checkout; the command lives in ``rednet/tools/complexity.py``."""
import sys

from rednet.tools.complexity import main

if __name__ == "__main__":
    sys.exit(main())
