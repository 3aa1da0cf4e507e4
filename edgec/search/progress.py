"""What both search backends (embedded and Ray) do with each finished trial: store it and print one line
(:class:`Progress`), and tell a sampler its objective values (:func:`objective_values`)."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.markup import escape

from . import space as sp
from .records import FINISHED, TrialStore

PENALTY = 1e30  # what an unbuilt trial reports to a sampler for an objective it minimises


class Progress:
    """Stores each record as it arrives and prints one line for it."""

    def __init__(self, console: Console, store: TrialStore):
        self.console, self.store = console, store
        self.records: dict[str, dict[str, Any]] = {}
        self.errors: list[dict[str, Any]] = []
        self.total = 0
        self.ray_info: dict[str, Any] | None = None

    def __call__(self, record: dict[str, Any]) -> None:
        if record["status"] in FINISHED:
            self.store.write(record)
        else:
            self.errors.append(record)
        if record["id"] in self.records:
            return
        self.records[record["id"]] = record
        point = ", ".join(f"{k}={_short(v)}" for k, v in record["point"].items())
        parts = []
        for target, res in record["targets"].items():
            m = res.get("metrics") or {}
            if res["status"] == "ok":
                parts.append(f"{target}: val acc {m['accuracy']:.4f}, {m['transport_bytes']:,} B, p50 {m['p50_ms'] * 1e3:.1f} us")
            else:
                parts.append(f"{target}: {res['status']}" + (f" ({_reason(res['reason'])})" if res.get("reason") else ""))
        if not record["targets"]:
            parts.append(f"{record['status']}: {_reason(record['reason'])}")
        self.console.print(f"[{len(self.records)}/{self.total or '?'}] {point} -> {'; '.join(parts)} "
                           f"[dim]({record['stage_runs']} stage run(s), {record['seconds']:.0f} s)[/]")


def _reason(text: Any, limit: int = 300) -> str:
    """Why a trial was rejected or failed, as one line of console text (its markup characters escaped)."""
    line = " ".join(str(text).split())
    return escape(line if len(line) <= limit else line[:limit - 3] + "...")


def _short(value: Any) -> str:
    text = json.dumps(value, separators=(",", ":")) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


# -- objectives as a sampler sees them -------------------------------------------------------------

def objective_values(record: dict[str, Any], target: str, objectives: list[str]) -> list[float]:
    """``objectives``' values of ``record`` on ``target`` as a sampler is told them: a trial that did not build
    reports the worst value (0 for a maximised objective, PENALTY for a minimised one)."""
    res = record["targets"].get(target) or {}
    metrics = res.get("metrics") or {}
    out = []
    for name in objectives:
        value = metrics.get(name) if res.get("status") == "ok" else None
        if value is None:
            value = 0.0 if sp.OBJECTIVES[name] == "max" else PENALTY
        out.append(float(value))
    return out
