"""``data`` mode: the input pipeline's CPU cost, the path before issue 17 against rednet.data's."""
from __future__ import annotations

import argparse
import datetime as dt
import json
import tempfile
from pathlib import Path

from rednet.engine import UsageError
from rednet.fileio import STDOUT

from ._common import log
from .results import check_destination, command_line, new_results_file, print_if_asked, results_file


def run_data(args: argparse.Namespace, argv: list[str] | None) -> int:
    """The input pipeline, old against new, in CPU time; a new results file each run."""

    from rednet.analysis import inputbench

    batch, rounds = (args.batch or [64])[0], args.repeats or 5
    if args.images < batch or rounds < 1 or args.workers < 0:
        raise UsageError(f"--images ({args.images}) must hold one --batch ({batch}); --repeats >= 1, --workers >= 0")
    check_destination(args)
    date = dt.date.today().isoformat()
    with tempfile.TemporaryDirectory() as tmp:
        res = inputbench.run(Path(tmp), args.images, rounds, batch, args.workers, log=log)
    res = dict(date=date, command=command_line(argv), environment=inputbench.environment(), **res)
    out = new_results_file(results_file(args) or Path(args.output) / f"{date}-data-cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    out.with_suffix(".md").write_text(inputbench.markdown(res))
    if args.json == STDOUT:
        print_if_asked(args, res)
    else:
        print(inputbench.markdown(res))
    log(f"wrote {out} and {out.with_suffix('.md').name}")
    return 0

