"""The command-line tools: the top layer, one module per command.

Each module has ``build_parser()`` and ``main(argv=None, prog=None) -> int`` (the exit status,
``rednet.engine.EXIT_CODES``). Three spellings run the same code: the ``rednet-<command>``
scripts an installed package provides, ``python -m rednet <command>``, and ``tools/<name>.py``
in a checkout (a wrapper of a few lines). Nothing else in the package imports this one, and
importing it imports no command: ``main`` loads the one asked for.

The options they share mean the same everywhere (``_options``): ``--output``, ``--img-size``,
``--json [FILE]`` and ``--pretrained [PATH|URL]``.
"""
from __future__ import annotations

import importlib
import sys

__all__ = ["COMMANDS", "main"]

# command -> what it does; the module is the command with '_' for '-', the script ``rednet-<command>``.
COMMANDS = {
    "train": "train a model from a YAML config (single process or torchrun)",
    "eval": "single-crop evaluation: top-1, top-5, loss and images/s",
    "export": "export a RedNet to ONNX or a torch.export program",
    "convert-weights": "convert weights of any supported layout to this project's safetensors",
    "complexity": "count a model's parameters and multiply-accumulates",
    "visualize": "draw the kernels an involution layer generates for an image",
    "benchmark": "benchmark the operator and RedNet against its memory floor and ResNet",
    "make-shards": "write an ImageFolder split as tar shards (webdataset layout)",
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {what}" for name, what in COMMANDS.items())
    return (f"usage: python -m rednet <command> [options]\n\ncommands (each also installed as rednet-<command>):\n"
            f"{rows}\n\n'python -m rednet <command> --help' shows a command's options.")


def main(argv: list[str] | None = None) -> int:
    """``python -m rednet <command> [options]``: run one command; without one, list them.

    Args:
        argv: the command and its options (default: ``sys.argv[1:]``).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name = argv[0].replace("_", "-")
    if name not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    command = importlib.import_module(f"{__name__}.{name.replace('-', '_')}")
    return command.main(argv[1:], prog=f"python -m rednet {name}")
