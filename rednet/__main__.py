"""``python -m rednet <command> [options]``: the command-line tools (``rednet.tools``), as the
``rednet-<command>`` scripts run them; ``python -m rednet`` alone lists the commands."""
import sys

from .tools import main

sys.exit(main())
