"""Where the time goes: a per-operator latency table for a bundle's model (``bench --ops``).

ONNX Runtime has a profiler: the session is created with ``enable_profiling``, the model runs
``runs`` times, and the trace's per-node ``kernel_time`` events give each node's mean (the
provider that ran each node is in the trace).

The TFLite Python interpreters (ai-edge-litert, tflite-runtime) expose no op profiler (the C++
``benchmark_model --enable_op_profiling`` is not pip-installable). The method here: each operator
of the main subgraph is cut out into a one-operator model (same tensors, same weights, same
quantization; its non-constant inputs become the model's inputs), opened with the same settings
(threads, XNNPACK) and timed on its own. ``delegated`` says whether XNNPACK took the operator. The
sum of the isolated times is compared with the whole graph's time (``sum_vs_graph``): fused or
delegated subgraphs share work that isolated ops repeat (a ratio near 1 means the table adds up;
above 1, per-op overhead dominates). Cutting needs the flatbuffer schema of ai-edge-litert
(``ai_edge_litert.tools.flatbuffer_utils``); with tflite-runtime alone the table is unavailable and
the result says so.
"""

import json
import os
import re
import tempfile

import numpy as np

from .timing import timed_loop

METHOD_ONNX = ("onnxruntime profiler: mean kernel_time per node over the timed runs; whole graph: mean "
               "model_run (session call) of the same runs")
METHOD_TFLITE = ("each operator cut out into a one-operator model (same weights and quantization) and timed on its "
                 "own with the bundle's settings; mean of the timed runs")


def profile_ops(bundle, settings, runtime=None, runs=50, min_seconds=0.1):
    """``{"method", "runtime", "ops": [{index, name, type, shape, mean_us, share, delegated, provider}],
    "graph_us", "sum_us", "sum_vs_graph"}`` or ``{"error": ...}`` when the runtime cannot profile."""
    if bundle.runtime_name != "tflite":
        return _profile_onnx(bundle.model_path, settings, runs)
    return _profile_tflite(bundle.model_path, settings, runs, min_seconds)


def _finish(ops, graph_us, method, runtime):
    total = sum(o["mean_us"] for o in ops)
    for o in ops:
        o["share"] = o["mean_us"] / total if total > 0 else None
    return {"method": method, "runtime": runtime, "ops": ops, "graph_us": graph_us, "sum_us": total,
            "sum_vs_graph": total / graph_us if graph_us else None}


# --- ONNX Runtime -----------------------------------------------------------------------------


def _profile_onnx(model_path, settings, runs):
    import onnxruntime as ort

    threads = int((settings or {}).get("threads") or 1)
    with tempfile.TemporaryDirectory(prefix="edgec-ops-") as tmp:
        so = ort.SessionOptions()
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, "trace")
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(model_path, so, providers=["CPUExecutionProvider"])
        feeds = _onnx_feeds(sess)
        for _ in range(5 + int(runs)):
            sess.run(None, feeds)
        trace = sess.end_profiling()
        with open(trace) as f:
            events = json.load(f)
    per_node, order, graph = {}, [], []
    for e in events:
        name = str(e.get("name", ""))
        if e.get("cat") == "Session" and name == "model_run":
            graph.append(float(e.get("dur", 0)))
        if e.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        args = e.get("args") or {}
        name = name[: -len("_kernel_time")].replace("InsertedPrecisionFreeCast_", "")
        if name not in per_node:
            order.append(name)
            per_node[name] = {"type": args.get("op_name"), "provider": args.get("provider"),
                              "shape": _onnx_shape(args.get("output_type_shape")), "durs": []}
        per_node[name]["durs"].append(float(e.get("dur", 0)))
    # the warmup calls are in the trace too: keep each node's last `runs` calls
    ops = [{"index": i, "name": n, "type": per_node[n]["type"], "shape": per_node[n]["shape"],
            "mean_us": float(np.mean(per_node[n]["durs"][-runs:])), "provider": per_node[n]["provider"],
            "delegated": None} for i, n in enumerate(order)]
    return _finish(ops, float(np.mean(graph[-runs:])) if graph else None, METHOD_ONNX, "onnxruntime " + ort.__version__)


def _onnx_feeds(sess):
    feeds = {}
    rng = np.random.default_rng(0)
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in i.shape]
        dtype = np.float32 if "float" in i.type else np.int8 if "int8" in i.type and "u" not in i.type else np.uint8
        feeds[i.name] = (rng.standard_normal(shape) if dtype == np.float32 else rng.integers(-8, 8, shape)).astype(dtype)
    return feeds


def _onnx_shape(type_shapes):
    if not type_shapes:
        return None
    first = type_shapes[0]
    return list(next(iter(first.values()))) if isinstance(first, dict) and first else None


# --- TFLite -----------------------------------------------------------------------------------


def _profile_tflite(model_path, settings, runs, min_seconds):
    try:
        from ai_edge_litert.interpreter import Interpreter
        from ai_edge_litert.tools import flatbuffer_utils as fb
    except ImportError:
        return {"error": "per-op timing of TFLite models needs ai-edge-litert (pip install ai-edge-litert); "
                         "tflite-runtime exposes neither a profiler nor the model schema", "method": METHOD_TFLITE}
    threads = int((settings or {}).get("threads") or 1)
    xnnpack = (settings or {}).get("xnnpack", True) is not False
    with open(model_path, "rb") as f:
        content = f.read()
    model = fb.read_model_from_bytearray(bytearray(content))
    graph = _time_tflite(Interpreter, bytes(content), threads, xnnpack, runs, min_seconds)[0]
    sg = model.subgraphs[0]
    operators, inputs, outputs, signatures = sg.operators, sg.inputs, sg.outputs, model.signatureDefs
    ops = []
    try:
        model.signatureDefs = []
        for i, op in enumerate(operators):
            sg.operators = [op]
            sg.inputs = [t for t in op.inputs if t >= 0 and not _is_constant(model, sg, t)]
            sg.outputs = list(op.outputs)
            one = bytes(fb.convert_object_to_bytearray(model))
            us, delegated = _time_tflite(Interpreter, one, threads, xnnpack, runs, min_seconds)
            out = sg.tensors[op.outputs[0]]
            ops.append({"index": i, "name": _name(out.name), "type": fb.opcode_to_name(model, op.opcodeIndex),
                        "shape": [int(v) for v in out.shape] if out.shape is not None else None,
                        "mean_us": us, "delegated": delegated, "provider": "XNNPACK" if delegated else "TFLite builtin"})
    finally:
        sg.operators, sg.inputs, sg.outputs, model.signatureDefs = operators, inputs, outputs, signatures
    return _finish(ops, graph, METHOD_TFLITE, "ai-edge-litert")


def _is_constant(model, sg, t):
    buf = model.buffers[sg.tensors[t].buffer]
    return buf is not None and buf.data is not None and len(buf.data) > 0 or bool(getattr(buf, "size", 0))


_SCOPE = re.compile(r"^(?:[\w]+\.)*_?[A-Za-z0-9]+_(\w+)$")  # 'torch.nn.modules.conv.Conv2d_conv1' -> 'conv1'


def _name(raw):
    """A module path from litert-torch's tensor names: of the ';'-separated scopes the deepest
    ('Net/pkg._Block_stack1/torch.nn.Conv2d_conv1;1' -> 'stack1.conv1')."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, (bytes, bytearray)) else str(raw)
    scope = max(text.split(";"), key=lambda p: (p.count("/"), len(p)))
    attrs = [m.group(1) for m in (_SCOPE.match(p) for p in scope.split("/")[1:]) if m]
    return ".".join(attrs) or scope.rsplit("/", 1)[-1] or text


def _time_tflite(interpreter_cls, content, threads, xnnpack, runs, min_seconds):
    """(mean microseconds per invoke, whether a delegate took the graph)."""
    from ai_edge_litert.interpreter import OpResolverType

    kwargs = {} if xnnpack else {"experimental_op_resolver_type": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES}
    it = interpreter_cls(model_content=content, num_threads=threads, **kwargs)
    it.allocate_tensors()
    rng = np.random.default_rng(0)
    for d in it.get_input_details():
        dt = d["dtype"]
        x = rng.standard_normal(d["shape"]) if np.issubdtype(dt, np.floating) else rng.integers(-8, 8, d["shape"])
        it.set_tensor(d["index"], x.astype(dt))
    delegated = any(o.get("op_name") == "DELEGATE" for o in it._get_ops_details())
    it.invoke()
    durations, _ = timed_loop(it.invoke, runs, min_seconds)
    return float(np.mean(durations)) / 1e3, delegated


def render_ops(profile, top=25):
    """The table as text lines (heaviest first)."""
    if profile.get("error"):
        return ["per-op profile unavailable: " + profile["error"]]
    rows = sorted(profile["ops"], key=lambda o: -o["mean_us"])[:top]
    lines = ["per-op profile (%s; %s)" % (profile["runtime"], profile["method"]),
             "%4s  %-24s %-18s %-20s %10s %6s  %s" % ("#", "op", "type", "shape", "mean us", "share", "ran on")]
    for o in rows:
        lines.append("%4d  %-24s %-18s %-20s %10.2f %5.1f%%  %s" % (
            o["index"], o["name"][:24], str(o["type"])[:18], "x".join(str(v) for v in o["shape"] or [])[:20],
            o["mean_us"], 100 * (o["share"] or 0), o["provider"]))
    if profile.get("graph_us"):
        lines.append("whole graph %.2f us; sum of ops %.2f us (%.2fx)" % (
            profile["graph_us"], profile["sum_us"], profile["sum_vs_graph"] or 0))
    return lines
