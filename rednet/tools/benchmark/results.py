"""The results files of ``op``, ``model`` and ``selfcheck``: where they go, how a run adds its rows, their markdown."""
from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import shlex
import sys
from pathlib import Path

import torch

from rednet.engine import check_path_options
from rednet.fileio import STDOUT, check_output_dir
from rednet.tools._options import check_json

from ._common import fmt, log

OUTPUT = Path("runs") / "benchmarks"  # the results folder without --output


COMMAND = "python -m rednet benchmark"  # how results files name the command (rednet-benchmark runs the same)


SECTIONS = ("op", "model", "selfcheck", "race")  # one per mode; a run adds its rows and keeps every other


def default_out(device: torch.device, date: str, folder: Path = OUTPUT) -> Path:
    """The day's results file of ``device`` in ``folder``, which ``op``, ``model`` and ``selfcheck`` add to."""
    if device.type == "cpu":
        slug = "cpu"
    else:
        slug = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    return folder / f"{date}-{slug}.json"


def results_file(args: argparse.Namespace) -> Path | None:
    """``--json FILE``; None without a file (the results go into ``--output``, under the mode's name)."""
    return Path(args.json) if args.json not in (None, STDOUT) else None


def new_results_file(path: Path) -> Path:
    """``path``, or ``<stem>-N.json`` beside it: the results of an earlier run are never written over."""
    out, n = path, 2
    while out.exists() or out.with_suffix(".md").exists():
        out, n = path.with_name(f"{path.stem}-{n}{path.suffix}"), n + 1
    return out


def command_line(argv: list[str] | None) -> str:
    """The command that produced a results file, as it can be run again."""
    return f"{COMMAND} {shlex.join(sys.argv[1:] if argv is None else argv)}"


def print_if_asked(args: argparse.Namespace, res: dict) -> None:
    if args.json == STDOUT:  # --json alone: the results on stdout too
        print(json.dumps(res), flush=True)


def markdown(res: dict) -> str:
    lines = [f"# Benchmark {res['date']}: {res['device']}", "",
             f"torch {res['torch']}, CUDA {res['cuda']}, CuPy {res['cupy']}.", "",
             "Runs (the `run` column of each row):", ""]
    for run in res["runs"]:
        gbps = "" if run.get("copy_gbps") is None else f", copy bandwidth {run['copy_gbps']:.1f} GB/s"
        lines.append(f"{run['run']}. {run.get('time') or ''} `{run['command']}`{gbps}")
    lines.append("")
    if res.get("selfcheck"):
        lines += ["## First-contact check of the CUDA kernels", "",
                  "| dtype | K | stride | dilation | memory format | result | s | cause | run |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in res["selfcheck"]:
            cause = r["cause"].splitlines()[0][:200].replace("|", "/") if r["cause"] else ""
            lines.append(f"| {r['dtype']} | {r['K']} | {r['stride']} | {r['dilation']} | {r['memory_format']} | "
                         f"{'pass' if r['ok'] else 'FAIL: ' + r['stage']} | {r['seconds']:.2f} | {cause} | "
                         f"{r.get('run', '')} |")
        lines.append("")
    if res.get("op"):
        lines += ["## Involution op (RedNet-50 shapes at 224x224)", "",
                  "| shape | name | batch | dtype | layout | pass | backend | ms | floor ms | x floor | peak MiB "
                  "| run |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["op"]:
            ratio = None if r["ms"] is None else r["ms"] / r["floor_ms"]
            lines.append(f"| {r['shape']} | {r['name']} | {r['batch']} | {r['dtype']} | {r['layout']} | {r['pass']} | "
                         f"{r['backend']} | {fmt(r['ms'])} | {fmt(r['floor_ms'])} | {fmt(ratio, 1)} | "
                         f"{fmt(r.get('peak_mem_mb'), 1)} | {r.get('run', '')} |")
        lines += _speedups(res["op"])
    if res.get("race"):
        lines += ["## RedNet vs ResNet, one process, interleaved (224x224)", "",
                  "| memory format | mode | batch | threads | model | backend | median ms | img/s | "
                  "throughput vs baseline (median of per-repeat ratios) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in res["race"]:
            lines.append(f"| {r['memory_format']} | {r['mode']} | {r['batch']} | {r['threads']} | {r['model']} | "
                         f"{r['backend']} | {r['ms']:.1f} | {r['img_per_s']:.1f} | {r['vs_baseline']:.2f}x |")
        lines.append("")
    if res.get("model"):
        lines += ["## Models (224x224)", "", "| model | backend | mode | batch | img/s | peak GB | run |",
                  "|---|---|---|---|---|---|---|"]
        for r in res["model"]:
            lines.append(f"| {r['model']} | {r['backend']} | {r['mode']} | {r['batch']} | {r['img_per_s']:.1f} | "
                         f"{fmt(r['peak_mem_gb'], 2)} | {r.get('run', '')} |")
        lines.append("")
    return "\n".join(lines)


def _speedups(rows: list[dict]) -> list[str]:
    """Baseline time / backend time per shape, and over a whole RedNet-50 pass (shapes weighted by count).

    The baseline is unfold where it ran, else the reference.
    """
    base_name = "unfold" if any(r["backend"] == "unfold" for r in rows) else "reference"
    out = ["", f"### Speedup over {base_name}", "",
           f"| batch | dtype | layout | pass | backend | per shape ({base_name} ms / ms) | RedNet-50 total ms "
           f"| {base_name} total ms | speedup | run |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, dict[str, dict[str, dict]]] = {}
    for r in rows:  # within one run: the rows of two runs were timed under different loads
        group = groups.setdefault((r["batch"], r["dtype"], r["layout"], r["pass"], r.get("run", "")), {})
        group.setdefault(r["backend"], {})[r["name"]] = r
    for key, by_backend in groups.items():
        base = by_backend.get(base_name)
        for backend, by_name in by_backend.items():
            if backend == base_name or not base:
                continue
            common = [n for n in by_name if n in base and by_name[n]["ms"] and base[n]["ms"]]
            if not common:
                continue
            per = ", ".join(f"{n} {base[n]['ms'] / by_name[n]['ms']:.1f}x" for n in common)
            tot = sum(by_name[n]["ms"] * by_name[n]["count"] for n in common)
            tot_u = sum(base[n]["ms"] * base[n]["count"] for n in common)
            out.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {backend} | {per} | {tot:.1f} | {tot_u:.1f} | "
                       f"{tot_u / tot:.1f}x | {key[4]} |")
    return out + [""] if len(out) > 5 else [""]


def check_destination(args: argparse.Namespace) -> None:
    """That the results can be written (``--json FILE``, else ``--output``): said before minutes of benchmarking."""
    check_path_options(args, ("output", "json"))
    check_json(args.json)
    if args.json in (None, STDOUT):
        check_output_dir(args.output, "--output")


def write_results(out: Path, res: dict, mode: str) -> None:
    """Add ``res`` (one run of ``mode``) to ``out`` and rewrite its markdown beside it.

    Every row already in ``out`` stays (an earlier run of any mode, the same day and device);
    the new rows are numbered with the run, and ``runs`` lists every command that wrote the file.
    """
    old = json.loads(out.read_text()) if out.exists() else {}
    runs = old.get("runs") or ([dict(run=1, command=old["command"], copy_gbps=old.get("copy_gbps"))]
                               if old.get("command") else [])  # a file written before runs were kept
    run = dict(run=len(runs) + 1, command=res.pop("command"), time=dt.datetime.now().strftime("%H:%M:%S"),
               copy_gbps=res.get("copy_gbps"))  # the file's copy_gbps: the latest run's
    res["runs"] = [*runs, run]
    for section in SECTIONS:
        res[section] = old.get(section, []) + [{**r, "run": run["run"]} for r in (res.get(section) or [])
                                               if section == mode]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(res))
    log(f"wrote {out} and {out.with_suffix('.md').name} (run {run['run']})")

