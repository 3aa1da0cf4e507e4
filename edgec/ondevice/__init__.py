"""edgec on-device runner: bundle loading, integrity, runtimes, verify and bench.

Imports only the standard library and numpy; the runtimes (ai_edge_litert /
tflite_runtime, onnxruntime) are imported lazily, and so is cryptography (only to check a
signature, ``verify --public-key``). Export copies this package into
every bundle as ``edgec_ondevice/``, so it uses relative imports only.

``python -m edgec_ondevice`` run in the bundle folder puts that folder first on ``sys.path``; the
bundle's copy takes it off before it imports anything (``sys`` and ``os`` are loaded at start-up).
"""

import os
import sys

if "." not in __name__:  # the bundle's copy (edgec_ondevice), not edgec.ondevice on a host
    _BUNDLE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _BUNDLE_DIR]

from .bench import BENCH_SCHEMA, BENCH_SCHEMA_VERSION, bench_bundle, bench_exit_code, measure_setting
from .errors import (BundleError, IntegrityError, ManifestError, ModelLoadError, NotABundleError,
                     RuntimeMissingError, SchemaTooNewError, SettingsError)
from .evaluate import accuracy, check_vectors, compare_outputs, predict_labels, top1_agreement
from .integrity import (MANIFEST_NAME, RECOMMENDED_NAME, SIGNATURE_NAME, check_files, describe_files,
                        sha256_file)
from .machine import machine_info, peak_rss_bytes
from .manifest import SUPPORTED_SCHEMA_VERSION, Bundle, load_bundle, load_manifest, validate_manifest
from .recommend import machine_identity, machine_key, read_recommendations
from .preprocess import dequantize, preprocess_raw, quantize
from .report import (render_bench, render_bench_markdown, render_bench_text, render_verify,
                     render_verify_markdown, render_verify_text)
from .runtimes import MAX_THREADS, Model, import_runtime, normalize_settings, open_model, settings_id, sweep_grid
from .signature import KeyFileError, check_signature
from .verify import VERIFY_SCHEMA, VERIFY_SCHEMA_VERSION, verify_bundle

__all__ = [
    "BENCH_SCHEMA", "BENCH_SCHEMA_VERSION", "Bundle", "BundleError", "IntegrityError", "KeyFileError",
    "MANIFEST_NAME", "MAX_THREADS", "ManifestError", "Model", "ModelLoadError", "NotABundleError",
    "RECOMMENDED_NAME", "RuntimeMissingError", "SIGNATURE_NAME", "SUPPORTED_SCHEMA_VERSION", "SchemaTooNewError",
    "SettingsError", "check_signature", "machine_identity", "machine_key", "read_recommendations", "VERIFY_SCHEMA", "VERIFY_SCHEMA_VERSION", "accuracy", "bench_bundle", "bench_exit_code",
    "check_files", "check_vectors", "compare_outputs", "dequantize", "describe_files", "import_runtime",
    "load_bundle", "load_manifest", "machine_info", "measure_setting", "normalize_settings", "open_model",
    "peak_rss_bytes", "predict_labels", "preprocess_raw", "quantize", "render_bench", "render_bench_markdown",
    "render_bench_text", "render_verify", "render_verify_markdown", "render_verify_text", "settings_id",
    "sha256_file", "sweep_grid", "top1_agreement", "validate_manifest", "verify_bundle",
]
