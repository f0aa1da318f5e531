#!/usr/bin/env python
"""``rednet-benchmark`` from a checkout; the command lives in ``rednet/tools/benchmark/``."""
import sys

from rednet.tools.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
