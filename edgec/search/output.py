"""What a search writes into OUT:

    search.json          every trial: point, resolved config, per target its metrics, feasible (and why
                         not), on the front; per target the front, the best point and its rule
    report.md / .html    per target the Pareto plots (validation accuracy vs transport bytes, vs p50)
    report/*.png         and tables of the front and of every trial
    pareto/<target>/<NNN>-<id>/bundle/   the bundle of every Pareto point (and its build.json)
    best.toml            the build config of the rule's pick for the first target (best-<target>.toml
                         for each target when there are several): `edgec build --config best.toml`
    trials/<id>.json     one record per finished trial (a restarted search reuses them)
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from edgec.build_layout import BUILD_FILE, BUNDLE_DIR, REFERENCE_FILE
from edgec.base.errors import EdgecError
from edgec.ondevice.integrity import MANIFEST_NAME

from .pareto import baseline_accuracy, limits, pareto_front, select_best, violations
from .runner import SearchOutcome
from .space import Range
from .trial import BUILDS_DIR, resolve

SEARCH_SCHEMA = "edgec-search"
SEARCH_FILE = "search.json"
PARETO_DIR = "pareto"


def analyze(outcome: SearchOutcome) -> dict[str, dict[str, Any]]:
    """Per target: limits, feasibility of every trial, the Pareto front and the rule's best point."""
    from edgec.targets.profile import load_target

    spec = outcome.setup.search
    order = {r["id"]: r["number"] for r in outcome.records}
    result = {}
    for target in outcome.setup.targets:
        bounds = limits(load_target(target).budgets, spec.constraints)
        why = {r["id"]: violations(r["targets"].get(target, {"status": r["status"], "reason": r["reason"]}), bounds)
               for r in outcome.records}
        candidates = {r["id"]: r["targets"][target]["metrics"] for r in outcome.records if not why[r["id"]]}
        front = pareto_front(candidates, spec.objectives, spec.latency_tolerance)
        baseline = baseline_accuracy(outcome.records, target)
        best = select_best(candidates, spec.best, baseline, order)
        result[target] = {"limits": bounds, "violations": why, "front": front, "best": best,
                          "baseline_val_accuracy": baseline, "feasible": len(candidates)}
    return result


def write_outputs(outcome: SearchOutcome, analysis: dict[str, dict[str, Any]], *, keep_builds: bool = False,
                  console: Console | None = None) -> dict[str, Any]:
    console = console or Console(quiet=True)
    setup = outcome.setup
    out = setup.out
    bundles = _materialize_front(outcome, analysis, console)
    best_files = _write_best(outcome, analysis)
    summary = _summary(outcome, analysis, bundles, best_files)
    (out / SEARCH_FILE).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    write_report(out, summary)
    if not keep_builds:
        shutil.rmtree(out / BUILDS_DIR, ignore_errors=True)
    return summary


# -- search.json ------------------------------------------------------------------------------------

def _summary(outcome: SearchOutcome, analysis: dict[str, dict[str, Any]], bundles: dict[tuple[str, str], str],
             best_files: dict[str, str]) -> dict[str, Any]:
    setup, spec = outcome.setup, outcome.setup.search
    trials = []
    for r in outcome.records:
        targets = {}
        for target, a in analysis.items():
            res = r["targets"].get(target, {})
            targets[target] = {
                "status": res.get("status", r["status"]), "feasible": not a["violations"][r["id"]],
                "violations": a["violations"][r["id"]], "on_front": r["id"] in a["front"], "best": r["id"] == a["best"],
                "metrics": res.get("metrics") or {}, "precision": res.get("precision"), "latency": res.get("latency"),
                "stages": res.get("stages") or [], "bundle": bundles.get((target, r["id"])),
            }
        trials.append({"id": r["id"], "number": r["number"], "point": r["point"], "config": r["config"],
                       "status": r["status"], "reason": r["reason"], "seconds": r.get("seconds"),
                       "stage_steps": r["stage_steps"], "stage_runs": r["stage_runs"],
                       "reused": r["id"] not in outcome.ran, "targets": targets})
    steps, runs = outcome.stage_steps, outcome.stage_runs
    return {
        "schema": SEARCH_SCHEMA, "schema_version": 1,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "search": {
            "config_file": str(setup.config_file) if setup.config_file else None,
            "strategy": spec.strategy, "trials": spec.trials, "seed": spec.seed, "objectives": spec.objectives,
            "space": {k: (v.model_dump() if isinstance(v, Range) else v) for k, v in spec.space.items()},
            "targets": setup.targets, "cpus_per_trial": spec.cpus_per_trial, "gpus_per_trial": spec.gpus_per_trial,
            "latency_tolerance": spec.latency_tolerance, "latency": spec.latency.model_dump(),
            "best_rule": spec.best.model_dump() | {"text": spec.best.describe()},
            "constraints": spec.constraints.model_dump(exclude_none=True),
            "selection": "accuracy = the bundle's top-1 on the validation split, in its runtime; test accuracy is reported only",
        },
        "backend": outcome.backend, "ray": outcome.ray, "seconds": round(outcome.seconds, 3),
        "cache": {"cache_dir": str(setup.cache_dir), "trials_run": len(outcome.ran),
                  "trials_reused": len([r for r in outcome.records if r["id"] not in outcome.ran]),
                  "stage_steps": steps, "stage_runs": runs, "stage_runs_saved": steps - runs},
        "targets": {t: {"limits": a["limits"], "baseline_val_accuracy": a["baseline_val_accuracy"],
                        "feasible_trials": a["feasible"], "pareto": a["front"], "best": a["best"],
                        "best_toml": best_files.get(t)} for t, a in analysis.items()},
        "trials": trials,
    }


# -- the bundles of the Pareto points ---------------------------------------------------------------

def _materialize_front(outcome: SearchOutcome, analysis: dict[str, dict[str, Any]], console: Console) -> dict:
    """Copy each Pareto point's bundle to pareto/<target>/; a trial built elsewhere (another node, an
    earlier run whose builds were removed) is rebuilt from the shared stage cache."""
    setup = outcome.setup
    by_id = {r["id"]: r for r in outcome.records}
    root = setup.out / PARETO_DIR
    shutil.rmtree(root, ignore_errors=True)
    placed = {}
    for target, a in analysis.items():
        for tid in a["front"]:
            record = by_id[tid]
            dest = root / target / f"{record['number']:03d}-{tid}"
            build_dir = setup.out / BUILDS_DIR / tid / target
            if not (build_dir / BUNDLE_DIR / MANIFEST_NAME).is_file():
                try:
                    build_dir = _rebuild(outcome, record, target, console)
                except EdgecError as e:  # e.g. edgec changed since the trial ran and its export now refuses
                    console.print(f"[yellow]warning[/] the bundle of trial {record['number']} ({tid}) for {target} "
                                  f"could not be rebuilt: {e}")
                    continue
            dest.mkdir(parents=True)
            shutil.copytree(build_dir / BUNDLE_DIR, dest / BUNDLE_DIR)
            for name in (BUILD_FILE, REFERENCE_FILE):
                if (build_dir / name).is_file():
                    shutil.copy2(build_dir / name, dest / name)
            placed[(target, tid)] = str(dest.relative_to(setup.out) / BUNDLE_DIR)
    return placed


def _rebuild(outcome: SearchOutcome, record: dict[str, Any], target: str, console: Console) -> Path:
    import torch

    from edgec import api

    setup = outcome.setup
    config = resolve(setup.base, record["point"], setup.factories)  # the job's point (records.reuse)
    tmp = Path(tempfile.mkdtemp(prefix=".rebuild-", dir=setup.out))
    previous = torch.get_num_threads()
    torch.set_num_threads(setup.search.cpus_per_trial)  # the trial's thread count: its cache keys
    try:
        plan = api.check(config, target=target, cache_dir=setup.cache_dir)
        if not all(row["cached"] for row in plan):
            console.print(f"[yellow]note[/] trial {record['id']} is not all in the cache {setup.cache_dir}: rebuilding "
                          "its stages (put the cache on storage every node sees)")
        api.build(config, target=target, out=tmp, cache_dir=setup.cache_dir)
    finally:
        torch.set_num_threads(previous)
    dest = setup.out / BUILDS_DIR / record["id"]
    dest.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(dest / target, ignore_errors=True)
    (tmp / target).rename(dest / target)
    shutil.rmtree(tmp, ignore_errors=True)
    return dest / target


# -- best.toml ---------------------------------------------------------------------------------------

def _write_best(outcome: SearchOutcome, analysis: dict[str, dict[str, Any]]) -> dict[str, str]:
    setup = outcome.setup
    by_id = {r["id"]: r for r in outcome.records}
    written = {}
    for path in setup.out.glob("best*.toml"):
        path.unlink()
    for i, (target, a) in enumerate(analysis.items()):
        if a["best"] is None:
            continue
        record = by_id[a["best"]]
        metrics = record["targets"][target]["metrics"]
        header = [
            f"edgec search: the pick for target {target!r} by the rule: {setup.search.best.describe()}",
            f"trial {record['number']} ({record['id']}): {json.dumps(record['point'])}",
            f"validation accuracy {metrics['accuracy']:.4f} (best uncompressed: {a['baseline_val_accuracy']:.4f}); "
            f"test accuracy {metrics['test_accuracy']:.4f}",
            f"{metrics['transport_bytes']:,} transport bytes ({metrics['ratio']:.1f}x fp32), {metrics['model_bytes']:,} model "
            f"bytes, p50 {metrics['p50_ms'] * 1e3:.2f} us here",
            f"rebuild: edgec build --config THIS_FILE (torch threads = {setup.search.cpus_per_trial}, e.g. "
            f"OMP_NUM_THREADS={setup.search.cpus_per_trial}, reuses the search's cache entries)",
        ]
        text = "".join(f"# {line}\n" for line in header) + "\n" + to_toml({"target": target, **record["config"]})
        names = ["best.toml"] if i == 0 else []
        if len(analysis) > 1:
            names.append(f"best-{target}.toml")
        for name in names:
            (setup.out / name).write_text(text)
        written[target] = names[-1]
    return written


_BARE = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(k: str) -> str:
    return k if _BARE.match(k) else json.dumps(k)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"{v} has no TOML form here")
        text = repr(v)
        return text if any(c in text for c in ".en") else text + ".0"
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v if x is not None) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(k)} = {_toml_value(x)}" for k, x in v.items() if x is not None) + "}"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """A small TOML writer for configs: None values are left out (their keys take their defaults),
    top-level tables become [tables], lists of tables [[arrays]] whose nested tables are inline."""
    lines, tables, arrays = [], [], []
    for k, v in data.items():
        if v is None:
            continue
        if isinstance(v, dict):
            tables.append((k, v))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            arrays.append((k, v))
        else:
            lines.append(f"{_key(k)} = {_toml_value(v)}")
    out = "\n".join(lines) + ("\n" if lines else "")
    for k, v in tables:
        name = f"{prefix}{_key(k)}"
        body = to_toml(v, prefix=f"{name}.")
        out += f"\n[{name}]\n{body}"
    for k, items in arrays:
        name = f"{prefix}{_key(k)}"
        for item in items:
            out += f"\n[[{name}]]\n" + "".join(f"{_key(ik)} = {_toml_value(iv)}\n" for ik, iv in item.items()
                                               if iv is not None)
    return out


# -- the report --------------------------------------------------------------------------------------

def _fmt_bytes(n: Any) -> str:
    return "-" if n is None else f"{int(n):,}"


def _fmt_pct(x: Any) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _fmt_us(ms: Any) -> str:
    return "-" if ms is None else f"{ms * 1e3:.2f}"


def _point_text(point: dict[str, Any]) -> str:
    return ", ".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in point.items())


def _rows(summary: dict[str, Any], target: str, only_front: bool) -> list[list[str]]:
    rows = []
    for t in summary["trials"]:
        res = t["targets"][target]
        if only_front and not res["on_front"]:
            continue
        m = res["metrics"]
        mark = ("front" if res["on_front"] else "") + (" best" if res["best"] else "")
        rows.append([str(t["number"]), _point_text(t["point"]), _fmt_pct(m.get("accuracy")), _fmt_pct(m.get("test_accuracy")),
                     _fmt_bytes(m.get("transport_bytes")), "-" if m.get("ratio") is None else f"{m['ratio']:.1f}x",
                     _fmt_bytes(m.get("model_bytes")), _fmt_us(m.get("p50_ms")), _fmt_us(m.get("p95_ms")),
                     "yes" if res["feasible"] else "no: " + "; ".join(res["violations"])[:160], mark.strip()])
    return rows


HEAD = ["#", "point", "val acc %", "test acc %", "transport B", "ratio", "model B", "p50 us", "p95 us", "feasible", ""]


def plot_target(summary: dict[str, Any], target: str, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (matplotlib.ticker below)

    folder.mkdir(parents=True, exist_ok=True)
    built = [(t, t["targets"][target]) for t in summary["trials"] if t["targets"][target]["metrics"]]
    paths = []
    for figure, label, scale, log in (("transport_bytes", "transport bytes (download)", 1.0, True),
                                      ("p50_ms", "p50 latency at batch 1, here (us)", 1e3, False)):
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
        groups = {"infeasible": ([], [], "x", "#999999"), "feasible": ([], [], "o", "#4c72b0"),
                  "Pareto front": ([], [], "o", "#d62728")}
        front = []
        for t, res in built:
            x, y = res["metrics"][figure] * scale, 100 * res["metrics"]["accuracy"]
            group = "Pareto front" if res["on_front"] else ("feasible" if res["feasible"] else "infeasible")
            groups[group][0].append(x)
            groups[group][1].append(y)
            if res["on_front"]:
                front.append((x, y))
            if res["best"]:
                ax.scatter([x], [y], marker="*", s=260, facecolors="none", edgecolors="black", zorder=5,
                           label="best (rule)")
            ax.annotate(str(t["number"]), (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7, color="#555555")
        for name, (xs, ys, marker, color) in groups.items():
            if xs:
                ax.scatter(xs, ys, marker=marker, color=color, label=name, zorder=3 if name == "Pareto front" else 2)
        xs_all = [res["metrics"][figure] * scale for _, res in built]
        if log and xs_all and min(xs_all) > 0 and max(xs_all) / min(xs_all) > 10:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        if figure.endswith("bytes"):
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(
                lambda v, _: f"{v / 1e6:g}M" if v >= 1e6 else (f"{v / 1e3:g}k" if v >= 1e3 else f"{v:g}")))
        ax.set_xlabel(label)
        ax.set_ylabel("validation accuracy (%), in the bundle's runtime")
        ax.set_title(f"{target}: accuracy vs {'transport bytes' if figure == 'transport_bytes' else 'p50 latency'}")
        ax.grid(True, alpha=0.3)
        if built:
            ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
        path = folder / f"{target}-accuracy-vs-{figure.split('_')[0]}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(out: Path, summary: dict[str, Any]) -> None:
    folder = out / "report"
    shutil.rmtree(folder, ignore_errors=True)
    s = summary["search"]
    cache = summary["cache"]
    md = [f"# edgec search: {s['strategy']}, {len(summary['trials'])} trials",
          "",
          f"Objectives: {', '.join(s['objectives'])} (accuracy = validation split, the bundle in its runtime; test "
          f"accuracy is reported, never selected on). Latencies within {100 * s['latency_tolerance']:g}% tie. "
          f"Backend: {summary['backend']}, {s['cpus_per_trial']} CPU(s) per trial, {summary['seconds']:.0f} s. "
          f"Stage cache: {cache['stage_runs']} stage run(s) for {cache['stage_steps']} stage step(s): "
          f"{cache['stage_runs_saved']} saved; {cache['trials_reused']} trial(s) reused from an earlier run.",
          ""]
    htm = [f"<h1>edgec search: {html.escape(s['strategy'])}, {len(summary['trials'])} trials</h1>",
           f"<p>{html.escape(md[2])}</p>"]
    for target, t in summary["targets"].items():
        plots = plot_target(summary, target, folder)
        best = next((x for x in summary["trials"] if x["id"] == t["best"]), None)
        limits_text = ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v:g}" for k, v in t["limits"].items()) or "none"
        best_text = (f"trial {best['number']} ({_point_text(best['point'])}) -> `{t['best_toml']}`" if best
                     else "no feasible trial meets the rule")
        md += [f"## {target}", "", f"Limits: {limits_text}. Best uncompressed validation accuracy: "
               f"{_fmt_pct(t['baseline_val_accuracy'])}%. Feasible trials: {t['feasible_trials']}.", "",
               f"Best by the rule ({s['best_rule']['text']}): {best_text}", ""]
        md += [f"![{p.stem}](report/{p.name})" for p in plots] + [""]
        md += ["### Pareto front", "", _md_table(HEAD, _rows(summary, target, True)), "",
               "### Every trial", "", _md_table(HEAD, _rows(summary, target, False)), ""]
        htm += [f"<h2>{html.escape(target)}</h2>", f"<p>Limits: {html.escape(limits_text)}. Best by the rule "
                f"({html.escape(s['best_rule']['text'])}): {html.escape(best_text)}</p>"]
        for p in plots:
            data = base64.b64encode(p.read_bytes()).decode()
            htm.append(f'<img alt="{html.escape(p.stem)}" src="data:image/png;base64,{data}">')
        htm += ["<h3>Pareto front</h3>", _html_table(HEAD, _rows(summary, target, True)),
                "<h3>Every trial</h3>", _html_table(HEAD, _rows(summary, target, False))]
    (out / "report.md").write_text("\n".join(md) + "\n")
    style = ("body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}td:nth-child(2){text-align:left}")
    (out / "report.html").write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>edgec search</title>"
                                     f"<style>{style}</style></head><body>{''.join(htm)}</body></html>\n")


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    esc = lambda c: c.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"


def print_summary(console: Console, summary: dict[str, Any], out: Path) -> None:
    for target, t in summary["targets"].items():
        table = Table(title=f"{target}: Pareto front ({len(t['pareto'])} of {t['feasible_trials']} feasible)",
                      show_edge=False)
        for col in ("#", "point", "val acc %", "test acc %", "transport B", "ratio", "p50 us", ""):
            table.add_column(col, justify="left" if col == "point" else "right")
        for row in _rows(summary, target, True):
            table.add_row(row[0], row[1], row[2], row[3], row[4], row[5], row[7], row[10])
        console.print(table)
        best = next((x for x in summary["trials"] if x["id"] == t["best"]), None)
        if best is not None:
            console.print(f"best    trial {best['number']} -> {out / t['best_toml']}")
        else:
            console.print(f"best    no feasible trial meets: {summary['search']['best_rule']['text']}")
    c = summary["cache"]
    console.print(f"cache   {c['stage_runs']} stage run(s) for {c['stage_steps']} stage step(s): {c['stage_runs_saved']} saved; "
                  f"{c['trials_reused']} trial(s) reused")
    console.print(f"wrote   {out / SEARCH_FILE}, {out / 'report.html'}, {out / PARETO_DIR}/")
