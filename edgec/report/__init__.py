"""``edgec report BUILD_DIR``: what each stage of a build bought and cost, as HTML and Markdown.

Writes into the build directory (``<out>/<target>/``):

- ``report.html``: one self-contained page (CSS inline, plots embedded as base64 PNG, no external
  references), so it opens offline and can be mailed or attached to a CI run;
- ``report.md``: the same content in Markdown, with the plots as PNG files in ``report/``.

Content: the stage table (accuracy, parameters, non-zeros, sparsity, distinct values, fp32 / packed /
model / transport bytes, time, cached or ran), the target's budgets and whether each holds, and the
plots: the validation figure after every stage against the accuracy budget and the budgeted prune's
per-layer sensitivity curves, accuracy against bytes for every stage (log x; which byte count each point is labelled), per-
layer sparsity, one layer's weight histogram before and after sharing with the centroids marked (read
from the stage cache; skipped with a note when the cache no longer has those checkpoints), the
confusion matrix of the shipped bundle on its eval set, and the latency distribution from a bench
result (``BUILD_DIR/bench.json`` or ``bench=``) when there is one. Whatever cannot be drawn is
skipped with a note saying why; only an unreadable build directory (or a bad ``bench=`` file) raises.

Modules: ``build_file`` (build.json, checked), ``document`` (the blocks, HTML / Markdown rendering,
writing), ``plots`` (matplotlib), ``sections`` (the build-level sections), ``accuracy_budget`` (the
accuracy budget and pruning sensitivity), ``tasks`` (regression /
reconstruction bundles instead of the confusion matrix), ``continual`` (the forgetting matrix of
multi-task builds), ``pretrain`` (the layer reconstructions and gradient norms of a pretrain stage).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgec.build_layout import BENCH_FILE, BUNDLE_DIR
from edgec.base.errors import InputError
from edgec.ondevice.integrity import MANIFEST_NAME

from .accuracy_budget import IMAGES as BUDGET_IMAGES
from .accuracy_budget import accuracy_budget_section
from .build_file import read_build
from .continual import IMAGES as MULTITASK_IMAGES
from .document import ASSETS_DIR, REPORT_HTML, REPORT_MD, Doc, write_document
from .pretrain import IMAGES as PRETRAIN_IMAGES
from .sections import IMAGES as SECTION_IMAGES
from .sections import (budget_section, confusion_section, header, latency_section,
                       pareto_section, sparsity_section, stage_section)
from .tasks import IMAGES as TASK_IMAGES
from .tasks import task_section

__all__ = ["ASSETS_DIR", "IMAGES", "REPORT_HTML", "REPORT_MD", "write_report"]

IMAGES = SECTION_IMAGES + BUDGET_IMAGES  # the images a single-task build with a budgeted prune draws



def write_report(build_dir: Path, bench: Path | None = None) -> dict[str, Path]:
    """Write ``report.html``, ``report.md`` and ``report/*.png`` into ``build_dir``.

    ``bench``: an ``edgec bench --json`` result; default ``build_dir/bench.json`` when present.
    Returns ``{"html": ..., "markdown": ..., "assets": ..., <image name>: png path, ...}``.
    Raises InputError when ``build_dir`` has no readable build.json or ``bench`` is not a bench result.
    """
    build_dir = Path(build_dir)
    summary = read_build(build_dir)
    bench_data, bench_note = _read_bench(build_dir, bench)
    bundle_dir = build_dir / BUNDLE_DIR
    manifest = _read_manifest(bundle_dir)
    doc = Doc()
    if bench_note:
        doc.notes.append(bench_note)

    header(doc, build_dir, summary, manifest)
    stage_section(doc, summary)
    budget_section(doc, manifest, bench_data)
    pareto_section(doc, summary)
    accuracy_budget_section(doc, summary)
    sparsity_section(doc, summary)
    stage_kind_sections(doc, summary, manifest)
    if (manifest or {}).get("task", "classification") == "classification":
        confusion_section(doc, bundle_dir, manifest)
    else:  # regression / reconstruction
        task_section(doc, bundle_dir, manifest)
    latency_section(doc, bench_data, manifest, build_dir)
    return write_document(doc, build_dir, title=f"edgec build report: {summary.get('target', build_dir.name)}",
                          images=IMAGES + PRETRAIN_IMAGES + MULTITASK_IMAGES + TASK_IMAGES)


def stage_kind_sections(doc: Doc, summary: dict[str, Any], manifest: dict[str, Any] | None) -> None:
    """Each stage kind's own section (``Stage.report_section``: weight sharing, pretraining, the
    forgetting matrix, ...), once per kind, in the order the kinds first appear in the build. A kind
    this edgec does not know (an older or newer build) has none."""
    import edgec.pipeline.stages  # noqa: F401  (registers every kind)
    from edgec.pipeline.stage import Stage

    for kind in dict.fromkeys(s.get("kind", s["stage"]) for s in summary["stages"]):
        stage = Stage.registry.get(kind)
        if stage is not None:
            stage.report_section(doc, summary, manifest)


# --- inputs -------------------------------------------------------------------------------------


def _read_bench(build_dir: Path, bench: Path | None) -> tuple[dict[str, Any] | None, str | None]:
    from edgec.benchmarking import load_bench_json

    if bench is not None:
        return load_bench_json(Path(bench)), None  # asked for by name: a bad file is an error
    default = build_dir / BENCH_FILE
    if not default.is_file():
        return None, None
    try:
        return load_bench_json(default), None
    except InputError as e:
        return None, f"{BENCH_FILE} ignored: {e}"


def _read_manifest(bundle_dir: Path) -> dict[str, Any] | None:
    path = bundle_dir / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
