"""Render verify / bench result dicts as plain text (no rich on the device) or Markdown."""


def _ms(v):
    if v is None:
        return "-"
    v = float(v)
    if v < 0.1:
        return "%.4f" % v
    if v < 10:
        return "%.3f" % v
    if v < 1000:
        return "%.1f" % v
    return "%.0f" % v


def _lat(v, unit):
    """A latency given in ms, shown in ``unit`` ("ms" or "us")."""
    if v is None:
        return "-"
    return _ms(float(v) * 1e3) if unit == "us" else _ms(v)


def _num(v, fmt="%.4g"):
    return "-" if v is None else fmt % v


def _bytes(v):
    if v is None:
        return "-"
    v = float(v)
    for unit in ("B", "KB", "MB", "GB"):
        if v < 1024 or unit == "GB":
            return ("%d %s" % (v, unit)) if unit == "B" else ("%.1f %s" % (v, unit))
        v /= 1024.0
    return "-"


def _rate(v):
    if v is None:
        return "-"
    if v >= 1e6:
        return "%.2fM" % (v / 1e6)
    if v >= 1e5:
        return "%.0fk" % (v / 1e3)
    if v >= 1e3:
        return "%.1fk" % (v / 1e3)
    return "%.1f" % v


def _table(headers, rows, markdown, left=(0,)):
    rows = [[str(c) for c in r] for r in rows]
    if markdown:
        def esc(c):
            return c.replace("|", "\\|")
        out = ["| " + " | ".join(esc(h) for h in headers) + " |",
               "|" + "|".join("---" if i in left else "---:" for i in range(len(headers))) + "|"]
        out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
        return "\n".join(out)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.ljust(widths[i]) if i in left else c.rjust(widths[i])
                         for i, c in enumerate(cells)).rstrip()
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _runtime_str(rt):
    if not rt:
        return "-"
    return "%s (%s %s)" % (rt.get("name"), rt.get("package"), rt.get("version"))


def render_bench(result, markdown=False):
    """An ``edgec-bench`` dict as a plain-text report (``markdown=True``: Markdown)."""
    r = result
    cfg = r.get("config") or {}
    out = []
    title = "edgec bench: %s" % (r.get("target") or r.get("bundle"))
    out.append(("## " + title) if markdown else title)
    for k, val in _bench_facts(r):
        out.append(("- **%s**: %s" % (k, val)) if markdown else ("%-13s %s" % (k, val)))
    out.append("")
    p50s = [s["latency_ms"]["p50"] for s in r.get("settings") or [] if s.get("ok") and s.get("latency_ms")]
    unit = "us" if p50s and min(p50s) < 1.0 else "ms"
    bsizes = cfg.get("batch_sizes") or [1]
    lat_rows, thr_rows = _settings_rows(r, unit, bsizes, markdown)
    title = "latency at batch 1 (load, first: ms; p50..max: %s)" % unit
    out.append(("### " + title) if markdown else title)
    out.append(_table(["setting", "load", "first", "p50", "p90", "p95", "p99", "mean", "std", "min", "max", "runs"],
                      lat_rows, markdown))
    out.append("")
    out.append(("### throughput (samples/s), memory, test vectors" if markdown
                else "throughput (samples/s), memory, test vectors"))
    out.append(_table(["setting"] + ["batch %d" % b for b in bsizes] + ["peak RSS", "vec max|diff|", "vec top-1"],
                      thr_rows, markdown))
    out.append("")
    out.extend(_best_lines(r.get("best"), unit, markdown))
    if r.get("ops_profile"):
        from .op_profile import render_ops
        out.append("")
        out.extend(render_ops(r["ops_profile"]))
    for n in r.get("notes") or []:
        out.append(("- note: %s" if markdown else "note: %s") % n)
    for e in r.get("errors") or []:
        out.append(("- error: %s" if markdown else "error: %s") % e)
    return "\n".join(out) + "\n"


def _bench_facts(r):
    """``[(label, text)]``: what was measured, where and how, and the best setting's accuracy and vectors."""
    sysi = r.get("system") or {}
    size = r.get("size") or {}
    h = r.get("harness") or {}
    cfg = r.get("config") or {}
    facts = [
        ("bundle", r.get("bundle")),
        ("model", "%s, %s (manifest model %s, transport %s)" % (
            r.get("model_file"), _bytes(size.get("model_file_bytes")), _bytes(size.get("model_bytes")),
            _bytes(size.get("transport_bytes")))),
        ("runtime", _runtime_str(r.get("runtime"))),
        ("machine", "%s, %s, %s CPUs (%s usable), Python %s, numpy %s%s" % (
            sysi.get("machine"), sysi.get("cpu") or sysi.get("system"), sysi.get("cpu_count"),
            sysi.get("usable_cpus"), sysi.get("python"), sysi.get("numpy"),
            (", " + sysi["device_model"]) if sysi.get("device_model") else "")),
        ("method", "warmup %s runs/%.2g s; timed >= %s runs and >= %.2g s (cap %s s) at batch 1; memory: %s" % (
            cfg.get("warmup"), cfg.get("warmup_seconds") or 0, cfg.get("runs"), cfg.get("min_seconds") or 0,
            cfg.get("max_seconds"), (r.get("memory") or {}).get("scope"))),
        ("harness", "%s us per empty timed iteration (timer resolution %s ns); timed region: %s" % (
            _lat(h.get("overhead_ms_per_iteration"), "us"), _num(h.get("timer_resolution_ns"), "%.0f"),
            h.get("timed_region"))),
    ]
    acc = r.get("accuracy")
    if acc:
        facts.append(("accuracy", "%s on %d eval samples (manifest %s)" % (
            _num(acc.get("accuracy")), acc.get("eval_samples") or 0, _num(acc.get("manifest_accuracy")))))
    v = r.get("vectors")
    if v:
        facts.append(("test vectors", "%s: %s vectors, max|diff| %s, top-1 agreement %s" % (
            "ok" if v.get("ok") else "FAILED", v.get("count"), _num(v.get("max_abs_diff"), "%.3g"),
            _num(v.get("top1_agreement")))))
    return facts


def _settings_rows(r, unit, bsizes, markdown):
    """``(latency rows, throughput rows)``: one of each per measured setting, the best one marked."""
    best_id = (r.get("best") or {}).get("id")
    lat_rows, thr_rows = [], []
    for s in r.get("settings") or []:
        mark = "* " if s.get("id") == best_id else "  "
        name = (mark if not markdown else ("**" if mark.strip() else "")) + s.get("id", "?") + \
            ("**" if markdown and mark.strip() else "")
        if not s.get("ok"):
            lat_rows.append([name, "FAILED: " + str(s.get("error"))[:80]] + [""] * 10)
            continue
        L = s.get("latency_ms") or {}
        lat_rows.append([name, _ms(s.get("load_ms")), _ms(s.get("first_inference_ms"))] +
                        [_lat(L.get(k), unit) for k in ("p50", "p90", "p95", "p99", "mean", "std", "min", "max")] +
                        [str(L.get("runs"))])
        thr = {t["batch_size"]: t for t in s.get("throughput") or []}
        cells = []
        for b in bsizes:
            t = thr.get(b)
            cells.append("-" if not t or t.get("samples_per_s") is None else
                         _rate(t["samples_per_s"]) + ("" if t.get("mode") == "native" else " (loop)"))
        vec = s.get("vectors") or {}
        thr_rows.append([name] + cells + [_bytes(s.get("peak_rss_bytes")),
                                          _num(vec.get("max_abs_diff"), "%.3g"), _num(vec.get("top1_agreement"))])
    return lat_rows, thr_rows


def _best_lines(b, unit, markdown):
    if not b:
        return ["best: none (every setting failed)"]
    out = [("**best**: `%s` (p50 %s %s): %s" if markdown else "best: %s (p50 %s %s): %s") % (
        b["id"], _lat(b["p50_ms"], unit), unit, b["criterion"])]
    for x in b.get("excluded_for_tail") or []:
        out.append(("- not %s: lower p50 (%s %s) but p99 %s %s, over the tail limit" if markdown
                    else "not %s: lower p50 (%s %s) but p99 %s %s, over the tail limit") % (
            x["id"], _lat(x["p50_ms"], unit), unit, _lat(x["p99_ms"], unit), unit))
    for x in b.get("excluded_for_vectors") or []:
        out.append(("- not %s: lower p50 (%s %s) but its outputs miss the test vectors (max|diff| %s)" if markdown
                    else "not %s: lower p50 (%s %s) but its outputs miss the test vectors (max|diff| %s)") % (
            x["id"], _lat(x["p50_ms"], unit), unit, _num(x.get("max_abs_diff"), "%.3g")))
    return out


def render_bench_text(result):
    return render_bench(result, markdown=False)


def render_bench_markdown(result):
    return render_bench(result, markdown=True)


def render_verify(result, markdown=False):
    """An ``edgec-verify`` dict as a plain-text report (``markdown=True``: Markdown)."""
    r = result
    sysi = r.get("system") or {}
    out = []
    title = "edgec verify: %s  %s" % ("OK" if r.get("ok") else "FAILED", r.get("target") or r.get("bundle"))
    out.append(("## " + title) if markdown else title)
    rows = [[c["name"], "skipped" if c.get("skipped") else ("ok" if c["ok"] else "FAILED"), c.get("detail") or ""]
            for c in r.get("checks") or []]
    out.append(_table(["check", "result", "detail"], rows, markdown, left=(0, 1, 2)))
    out.append("")
    facts = [("bundle", r.get("bundle")), ("runtime", _runtime_str(r.get("runtime"))),
             ("machine", "%s, Python %s, numpy %s%s" % (r.get("machine"), sysi.get("python"), sysi.get("numpy"),
                                                      (", " + sysi["device_model"]) if sysi.get("device_model")
                                                      else ""))]
    for k, v in facts:
        out.append(("- **%s**: %s" % (k, v)) if markdown else ("%-8s %s" % (k, v)))
    for n in r.get("notes") or []:
        out.append(("- note: %s" if markdown else "note: %s") % n)
    for e in r.get("errors") or []:
        out.append(("- error: %s" if markdown else "error: %s") % e)
    return "\n".join(out) + "\n"


def render_verify_text(result):
    return render_verify(result, markdown=False)


def render_verify_markdown(result):
    return render_verify(result, markdown=True)
