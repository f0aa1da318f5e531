#!/usr/bin/env python
"""``rednet-eval`` from a checkout; the command lives in ``rednet/tools/eval.py``."""
import sys

from rednet.tools.eval import main

if __name__ == "__main__":
    sys.exit(main())
