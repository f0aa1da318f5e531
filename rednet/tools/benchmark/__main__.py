"""``python -m rednet.tools.benchmark``: the same command as ``rednet-benchmark``."""
import sys

from . import main

sys.exit(main())
