"""``host`` mode: the host's share of the CUDA path per involution layer-step, with launches replaced by no-ops."""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import statistics
import tempfile
from pathlib import Path

import torch

from rednet.analysis.shapes import involution_shapes
from rednet.engine import UsageError
from rednet.fileio import STDOUT
from rednet.ops import (
    MEMORY_FORMATS,
)

from ._common import CHECKOUT, DTYPES, device_name, log, shape_str
from .op import op_inputs
from .results import check_destination, command_line, new_results_file, print_if_asked, results_file


def host_markdown(res: dict) -> str:
    base = res.get("baseline")
    lines = [f"# Host cost of the CUDA involution path {res['date']}: {res['device']}", "",
             f"torch {res['torch']}; launches replaced by no-ops; batch {res['batch']}; {res['rounds']} rounds of "
             f"{res['calls']} calls, median of the rounds' means (fastest round in brackets)"
             + (f"; baseline: the launch plans of {base}, alternating round by round." if base else "."),
             f"Command: `{res['command']}`", "",
             "| dtype | layout | shape | name | count | fwd us | fwd+bwd us |"
             + (" baseline fwd+bwd us |" if base else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if base else "")]
    for r in res["rows"]:
        lines.append(f"| {r['dtype']} | {r['layout']} | {r['shape']} | {r['name']} | {r['count']} | "
                     f"{r['fwd_us']:.1f} ({r['fwd_us_min']:.1f}) | {r['fwd_bwd_us']:.1f} ({r['fwd_bwd_us_min']:.1f}) |"
                     + (f" {r['baseline_fwd_bwd_us']:.1f} |" if base else ""))
    lines += ["", "| dtype | layout | layers | per layer-step us | per RedNet-50 step ms |"
              + (" baseline per layer-step us | current / baseline |" if base else ""),
              "|---|---|---|---|---|" + ("---|---|" if base else "")]
    for t in res["totals"]:
        lines.append(f"| {t['dtype']} | {t['layout']} | {t['layers']} | {t['per_layer_step_us']:.1f} "
                     f"({t['per_layer_step_us_min']:.1f}) | {t['per_step_ms']:.2f} |"
                     + (f" {t['baseline_per_layer_step_us']:.1f} | {t['vs_baseline']:.3f} |" if base else ""))
    return "\n".join(lines) + "\n"


def _baseline_plans(rev: str, tmp: Path):
    """``rednet/ops/_plan.py`` as it was at git revision ``rev``, imported as a module of ``rednet.ops``."""
    import subprocess

    got = subprocess.run(["git", "-C", str(CHECKOUT), "show", f"{rev}:rednet/ops/_plan.py"], capture_output=True,
                         text=True)
    if got.returncode:
        raise UsageError(f"--baseline {rev}: git cannot show rednet/ops/_plan.py there ({got.stderr.strip()})")
    path = tmp / "_plan_baseline.py"
    path.write_text(got.stdout)
    spec = importlib.util.spec_from_file_location("rednet.ops._plan_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _host_rounds(x, kernel, stride: int, pad: int, rounds: int, plans) -> dict[str, dict[str, list[float]]]:
    """Per side (``current``, and ``baseline`` when ``plans``), each round's per-call means; the sides alternate."""
    from rednet.ops import measure_host_overhead

    sides = {"current": None} if plans is None else {"current": None, "baseline": plans}
    out: dict[str, dict[str, list[float]]] = {side: {"fwd_us": [], "fwd_bwd_us": []} for side in sides}
    for r in range(rounds):
        for side in (list(sides) if r % 2 == 0 else list(reversed(sides))):
            us = measure_host_overhead(x, kernel, stride, pad, calls=100, rounds=1, plans=sides[side])
            for key in ("fwd_us", "fwd_bwd_us"):
                out[side][key].append(us[key])
    return out


def run_host(args: argparse.Namespace, argv: list[str] | None) -> int:
    """Host microseconds per involution layer-step of the CUDA path over RedNet-50's layers; a new file each run."""

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch, rounds = (args.batch or [32])[0], args.repeats or 7
    dtypes, formats = args.dtypes or ["bf16"], args.memory_formats or list(MEMORY_FORMATS)
    for flag, vals, allowed in (("--dtypes", dtypes, DTYPES), ("--memory-formats", formats, MEMORY_FORMATS)):
        if any(v not in allowed for v in vals):
            raise UsageError(f"{flag}: unknown {[v for v in vals if v not in allowed]}; choose from {list(allowed)}")
    if batch < 1 or rounds < 1:
        raise UsageError("--batch and --repeats must be >= 1")
    check_destination(args)
    shapes = involution_shapes("rednet50", 224)
    rows, totals = [], []
    with tempfile.TemporaryDirectory() as tmp:
        plans = _baseline_plans(args.baseline, Path(tmp)) if args.baseline else None
        for dname in dtypes:
            for fmt in formats:
                part, network = [], {"current": [0.0] * rounds, "baseline": [0.0] * rounds}
                for s in shapes:
                    x, kernel, stride, pad = op_inputs(s, batch, DTYPES[dname], fmt, device)
                    got = _host_rounds(x, kernel, stride, pad, rounds, plans)
                    row = dict(shape=shape_str(s), name=s["name"], count=s["count"], batch=batch, dtype=dname,
                               layout=fmt)
                    for key, values in got["current"].items():
                        row[key], row[f"{key}_min"] = statistics.median(values), min(values)
                    for side, values in got.items():
                        network[side] = [t + v * s["count"] for t, v in zip(network[side], values["fwd_bwd_us"])]
                    if plans is not None:
                        row["baseline_fwd_bwd_us"] = statistics.median(got["baseline"]["fwd_bwd_us"])
                    part.append(row)
                    log(f"{dname} {fmt} {s['name']:<12} {shape_str(s):<24} fwd {row['fwd_us']:7.1f} us  "
                        f"fwd+bwd {row['fwd_bwd_us']:7.1f} us"
                        + (f"  baseline {row['baseline_fwd_bwd_us']:7.1f} us" if plans is not None else ""))
                layers = sum(r["count"] for r in part)
                total = dict(dtype=dname, layout=fmt, layers=layers,
                             per_step_ms=statistics.median(network["current"]) / 1e3,
                             per_layer_step_us=statistics.median(network["current"]) / layers,
                             per_layer_step_us_min=min(network["current"]) / layers)
                if plans is not None:
                    total["baseline_per_layer_step_us"] = statistics.median(network["baseline"]) / layers
                    total["vs_baseline"] = statistics.median(c / b for c, b in zip(network["current"],
                                                                                    network["baseline"]))
                totals.append(total)
                rows += part
    date = dt.date.today().isoformat()
    res = dict(date=date, device=device_name(device), torch=torch.__version__, batch=batch, rounds=rounds, calls=100,
               baseline=args.baseline,
               command=command_line(argv), rows=rows, totals=totals)
    out = new_results_file(results_file(args) or Path(args.output) / f"{date}-host-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    out.with_suffix(".md").write_text(host_markdown(res))
    if args.json == STDOUT:
        print_if_asked(args, res)
    else:
        print(host_markdown(res))
    log(f"wrote {out} and {out.with_suffix('.md').name}")
    return 0

