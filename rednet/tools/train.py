"""Train any timm-registered model (RedNet by default) from a YAML config.

Single process:   rednet-train --config digits        (python -m rednet train, python tools/train.py)
One node, 8 GPUs: torchrun --nproc_per_node 8 -m rednet train --config rednet50 --data /data/imagenet
--config takes a YAML file or the name of a bundled config (--list-configs lists them). The run
directory is --output, else the config's train.output, else runs/<model.name>.
Exit status (rednet.engine.EXIT_CODES): 0 done (or the run was already finished); 2 bad config, data or
checkpoint, or a run directory that cannot be written, whose results the command would overwrite (see --resume,
--restart), that another trainer holds, or whose disk is full; 3 non-finite loss; 128+N stopped by signal N after
checkpointing: 129 SIGHUP, 130 SIGINT, 138 SIGUSR1, 143 SIGTERM (Linux's numbers); 130 Ctrl-C before training
starts.
"""
from __future__ import annotations

import argparse
import json
import logging
import os

import yaml

from rednet.engine import (
    RESUME_SAFE_KEYS,
    check_path_options,
    config_to_dict,
    fit,
    list_configs,
    load_config,
    path_values,
    run_command,
)
from rednet.tools._options import add_json, check_json, write_json

# Path options and the config keys they set.
PATH_KEYS = {"output": "train.output", "data": "data.root"}


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a YAML file, or the name of a bundled config (e.g. rednet50, digits)")
    p.add_argument("--list-configs", action="store_true", help="print the bundled configs and exit")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a dotted config key, e.g. --set optim.lr=0.1 (repeatable)")
    p.add_argument("--output", help="run directory (overrides train.output; default: runs/<model.name>)")
    p.add_argument("--data", help="dataset root with train/ and val/ (overrides data.root)")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--resume", metavar="auto|PATH",
                       help="'auto': the newest usable checkpoint of the run directory (a fresh run if the directory "
                            "holds no results); or a checkpoint path")
    start.add_argument("--restart", action="store_true",
                       help="start over in a run directory that holds results: they are first moved into "
                            "OUTPUT/previous-<time>/")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume from a checkpoint whose config differs in more than the keys a resume may change ("
                        + ", ".join(RESUME_SAFE_KEYS) + "), or whose class names differ from the data's (renamed "
                        "class folders)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (base file merged, overrides applied) as YAML and exit")
    add_json(p, "the final validation metrics")
    return p


def _config_overrides(args: argparse.Namespace) -> list[str]:
    """The command-line options as dotted config overrides (after any --set)."""
    overrides = list(args.overrides)
    if args.data is not None:
        overrides.append("data.dataset=imagenet")
    return overrides


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.list_configs:
        return list_configs()
    if args.config is None:
        parser.error("the following arguments are required: --config (or --list-configs)")
    return run_command(lambda: _train(args), log=True)


def _train(args: argparse.Namespace) -> int:
    check_path_options(args, ("config", "output", "data", "resume", "json"))
    check_json(args.json)  # before hours of training
    cfg = load_config(args.config, _config_overrides(args), path_values(args, PATH_KEYS))
    if args.print_config:
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0
    result = fit(cfg, resume=args.resume, restart=args.restart, allow_config_change=args.allow_config_change)
    final = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}
    logging.getLogger("rednet").info("final: %s", json.dumps(final))
    if args.json and int(os.environ.get("RANK", "0")) == 0:
        write_json(final, args.json)
    return 0

