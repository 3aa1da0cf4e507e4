"""``edgec search``: a constrained search over pipeline configs, a Pareto front per target, trials
embedded (in this process) or on Ray Tune.

    from edgec.search import search
    result = search(Path("search.toml"), targets=["rpi"], out=Path("search-out"))
    result.summary["targets"]["rpi"]["pareto"]

Modules: ``space`` (the [search] table, grid / random / tpe points), ``trial`` (one point -> plan
check -> build -> validation accuracy and latency), ``pareto`` (feasibility, fronts, the best-point
rule), ``records`` (the trial store that makes a search resumable, and when a stored record may be
reused), ``progress`` (what both backends do with a finished trial: store it, print it, tell a sampler its
objective values), ``runner`` (the embedded backend, the dry run), ``ray_backend`` (a Ray session and Ray
Tune), ``output`` (search.json, report, Pareto bundles, best.toml).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from rich.console import Console

from .runner import SearchOutcome, SearchSetup, load_setup, make_setup, run_search
from .space import SearchConfig, parse_search


@dataclass
class SearchResult:
    outcome: SearchOutcome
    summary: dict[str, Any]  # what search.json holds

    @property
    def out(self) -> Path:
        return self.outcome.setup.out

    def front(self, target: str) -> list[dict[str, Any]]:
        """The trials on ``target``'s Pareto front, best first on the first objective."""
        ids = self.summary["targets"][target]["pareto"]
        by_id = {t["id"]: t for t in self.summary["trials"]}
        return [by_id[i] for i in ids]


def search(config: Path | Mapping[str, Any], *, targets: list[str] | None = None, out: Path | None = None,
           cache_dir: Path | None = None, data: str | None = None, strategy: str | None = None,
           trials: int | None = None, cpus_per_trial: int | None = None, use_ray: bool = False,
           ray_address: str | None = None, ray_cpus: int | None = None, keep_builds: bool = False,
           console: Console | None = None) -> SearchResult:
    """Run a search from a search config (a file, or its keys as a dict: the build config plus
    ``[search]``) and write its outputs into ``out`` (default ./edgec-search)."""
    from .output import analyze, write_outputs

    options = dict(targets=targets, data=data, out=out, cache_dir=cache_dir, strategy=strategy, trials=trials,
                   cpus_per_trial=cpus_per_trial)
    setup = load_setup(config, **options) if isinstance(config, Path) else make_setup(dict(config), **options)
    outcome = run_search(setup, use_ray=use_ray or ray_address is not None, ray_address=ray_address,
                         ray_cpus=ray_cpus, console=console)
    summary = write_outputs(outcome, analyze(outcome), keep_builds=keep_builds, console=console)
    return SearchResult(outcome, summary)


__all__ = ["SearchConfig", "SearchOutcome", "SearchResult", "SearchSetup", "load_setup", "make_setup",
           "parse_search", "run_search", "search"]
