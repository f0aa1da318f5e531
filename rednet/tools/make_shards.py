"""Write an ImageFolder split as tar shards of about 1 GB (webdataset layout) for ``data.dataset: wds``.

    rednet-make-shards /data/imagenet/train /data/shards            # split "train"
    rednet-make-shards /data/imagenet/val --output /data/shards --shard-size 1GB --json

Each shard holds ``<key>.<ext>`` (the image file's bytes, unchanged) and ``<key>.cls`` (the
class index) per image, the images in a random order fixed by ``--seed``. ``OUT/_info.json``
lists the splits (their shards and sample counts) and the classes; both splits of a dataset
go into the same OUT. Shards are written whole or not at all (``.partial`` files renamed
when complete): after an interruption, the same command writes only the missing shards, and
the result is byte-for-byte that of an uninterrupted run.

Exit status (rednet.engine.EXIT_CODES): 0 done; 2 bad input (no ImageFolder at SRC, OUT not writable, an interrupted run
of different source or options in OUT), with one ``error:`` line; 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from rednet.tools._options import add_json, check_json, write_json

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """``1GB``, ``500MB``, ``2GiB``, ``1000000`` -> bytes."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"expected a size such as 1GB or 500MB, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="an ImageFolder split: one folder per class (e.g. /data/imagenet/train)")
    p.add_argument("out", nargs="?", metavar="OUT",
                   help="the shards' folder (created; shared by the splits of one dataset), or --output")
    p.add_argument("--output", help="the shards' folder, as OUT")
    p.add_argument("--split", default=None, help="the split's name (default: SRC's folder name)")
    p.add_argument("--shard-size", type=parse_size, default=parse_size("1GB"), help="about this many bytes a shard")
    p.add_argument("--seed", type=int, default=0, help="seed of the order of the images across shards")
    add_json(p, "the summary")
    return p


def _progress(done: int, total: int, t0: float) -> None:
    rate = (time.perf_counter() - t0) / max(1, done)
    print(f"shard {done}/{total}, eta {rate * (total - done):.0f} s", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    from rednet.engine import run_command

    return run_command(lambda: _make_shards(args),
                       interrupted="interrupted; run the same command again to write the missing shards")


def _make_shards(args: argparse.Namespace) -> int:
    from rednet.data import DataError
    from rednet.data.shards import INFO_FILE, plan_shards, write_shard
    from rednet.engine import OutputDirError, UsageError, check_path_options
    from rednet.fileio import check_output_dir

    if (args.out is None) == (args.output is None):
        raise UsageError("give the shards' folder once: OUT or --output DIR")
    args.out = args.out if args.out is not None else args.output
    check_path_options(args, ("source", "out", "json"))
    check_json(args.json)
    source, out = Path(args.source), Path(args.out)
    split = args.split or source.resolve().name
    try:
        if not re.fullmatch(r"[A-Za-z0-9_.]+", split):
            raise DataError(f"split name {split!r}: use letters, digits, '_' and '.' (it prefixes the shard files)")
        plan = plan_shards(source, split, args.shard_size, args.seed)
        check_output_dir(out, "OUT")
        state_path = out / f".{split}.plan"
        if state_path.exists() and state_path.read_text().strip() != plan.digest:
            raise DataError(f"{out} holds an interrupted run for split {split!r} of other images or options; "
                            f"remove {state_path} and the {split}-*.tar files, or choose another OUT")
        state_path.write_text(plan.digest + "\n")
    except OSError as e:  # an unreadable source, an OUT that cannot be written
        raise DataError(str(e)) from None
    for leftover in out.glob(f"{split}-*.tar.partial"):  # an interrupted shard: written again
        leftover.unlink()
    todo = [i for i in range(len(plan.shards)) if not (out / plan.filename(i)).exists()]
    t0 = time.perf_counter()
    try:
        for n, index in enumerate(todo, 1):
            write_shard(plan, index, source, out)
            _progress(len(plan.shards) - len(todo) + n, len(plan.shards), t0)
    except OSError as e:
        raise OutputDirError(f"writing {out}: {e}; the shards written so far are kept, run the command again") from None
    info_path = out / INFO_FILE
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    if info.get("classes") not in (None, plan.classes):
        raise DataError(f"{info_path} lists other classes than {source}; write this dataset into another OUT")
    entry = {"name": split, "num_samples": sum(len(s) for s in plan.shards),
             "filenames": [plan.filename(i) for i in range(len(plan.shards))],
             "shard_lengths": [len(s) for s in plan.shards]}
    info = {"name": info.get("name", out.resolve().name), "classes": plan.classes,
            "splits": {**info.get("splits", {}), split: entry}}
    tmp = info_path.with_name(info_path.name + ".partial")
    tmp.write_text(json.dumps(info, indent=1) + "\n")
    tmp.replace(info_path)
    (out / f".{split}.plan").unlink()
    summary = {"split": split, "shards": len(plan.shards), "written": len(todo), "images": entry["num_samples"],
               "classes": len(plan.classes), "bytes": sum((out / f).stat().st_size for f in entry["filenames"]),
               "out": str(out)}
    if args.json:
        write_json(summary, args.json)
    else:
        print(f"{split}: {summary['images']} images of {summary['classes']} classes in {summary['shards']} shards "
              f"({summary['bytes'] / 1e9:.2f} GB; {summary['written']} written now) in {out}")
    return 0

