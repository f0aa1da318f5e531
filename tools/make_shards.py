#!/usr/bin/env python
"""``rednet-make-shards`` from a checkout; the command lives in ``rednet/tools/make_shards.py``."""
import sys

from rednet.tools.make_shards import main

if __name__ == "__main__":
    sys.exit(main())
