"""The export's parts: the converter registry, the typed parity gate, the int8 quantizer's own module."""

import subprocess
import sys

import numpy as np
import pytest

from edgec.base.errors import ConfigError, RunError
from edgec.pipeline.parity import Parity, ParityMismatch, enforce_parity, measure_parity
from edgec.targets.converters import CONVERTERS, FORMATS, PRECISIONS, Converter, converter_for
from edgec.targets.profile import Budgets, builtin_targets, load_target
from support import run_cli


def test_an_unknown_format_is_a_one_line_error_naming_the_known_ones(tmp_path):
    with pytest.raises(ConfigError) as err:
        converter_for("pte")
    assert "\n" not in str(err.value) and "'pte'" in str(err.value) and all(f in str(err.value) for f in FORMATS)
    board = tmp_path / "board.toml"
    board.write_text('name = "board"\nformat = "pte"\nprecision = "fp32"\nprecisions = ["fp32"]\n'
                     'requirements = ["numpy"]\n')
    with pytest.raises(ConfigError, match=r"board.toml: format: 'pte' is not a model format edgec converts to"):
        load_target(str(board))
    proc = run_cli("build", "--target", board, "--epochs", "1", "--cache-dir", tmp_path / "cache", cwd=tmp_path, check=2)
    assert "format: 'pte'" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_every_converter_declares_its_precisions_and_runtime():
    assert set(FORMATS) == {"tflite", "onnx"}
    for fmt, converter in CONVERTERS.items():
        assert isinstance(converter, Converter) and converter.format == fmt and converter.runtime
        assert converter.precisions and set(converter.precisions) <= set(PRECISIONS)
        assert converter.precision("int8").calibrated and not converter.precision("int8").lossless
        assert converter.precision("fp32").lossless and not converter.precision("fp16").calibrated
    for target in builtin_targets().values():  # every built-in target asks only for what its converter writes
        assert set(target.precisions) <= set(converter_for(target.format).precisions)


def test_a_converter_refuses_a_precision_it_does_not_declare():
    class Int8Only(Converter):
        format, runtime, min_runtime_versions, precisions = "int8-only", "x", {"x": "1"}, ("int8",)

    with pytest.raises(ConfigError, match=r"the int8-only converter writes no 'fp16' models \(it writes int8\)"):
        Int8Only().precision("fp16")


def test_automatic_remedies_are_the_converters_own():
    assert [w for w, _ in converter_for("tflite").automatic_remedies("minmax")] == ["minmax activation observer"]
    onnx = converter_for("onnx")
    assert [o for _, o in onnx.automatic_remedies("percentile")] == [{"calibration_method": "entropy"}]
    assert onnx.manual_remedies("minmax", [{"calibration_method": "percentile"}]) == [
        "another calibration method (--set export.calibration.method=entropy)"]
    assert onnx.manual_remedies("minmax", [{"calibration_method": m} for m in ("percentile", "entropy")]) == []
    assert converter_for("tflite").manual_remedies("minmax", []) == []  # onnxruntime's methods are not TFLite's


def test_the_manifest_runtime_record_comes_from_the_converter():
    target = load_target("desktop-gpu")
    assert converter_for("onnx").recommended(target) == {"threads": target.threads, "provider": target.providers[0],
                                                         "graph_optimization_level": "all"}
    assert converter_for("tflite").recommended(load_target("rpi"))["xnnpack"] is True


def _logits(n=400, classes=5, seed=0):
    rng = np.random.default_rng(seed)
    reference = rng.normal(0, 3, (n, classes)).astype(np.float32)
    return reference, reference.argmax(1)


def test_parity_is_a_typed_result_with_the_recorded_figures():
    reference, labels = _logits()
    parity = measure_parity(reference, reference + 0.001, labels)
    assert isinstance(parity, Parity) and parity.passes(Budgets()) and parity.problems(Budgets()) == []
    assert list(parity.as_dict()) == ["reference_accuracy", "accuracy", "top1_agreement", "decided_agreement",
                                      "decided_samples", "margin_bound", "logit_snr_db", "max_abs_diff", "test_samples"]
    assert parity.test_samples == 400 and parity.accuracy == 1.0 and parity.logit_snr_db > 60
    with pytest.raises(Exception):
        parity.accuracy = 0.0  # frozen: the gate's evidence is not edited after the fact


def test_the_gate_raises_a_typed_mismatch_naming_every_failing_task():
    reference, labels = _logits()
    good = measure_parity(reference, reference, labels)
    bad = measure_parity(reference, np.random.default_rng(1).normal(0, 3, reference.shape), labels)
    enforce_parity({"a": good, None: good}, Budgets(), "try nothing")  # passes: no exception
    with pytest.raises(ParityMismatch) as err:
        enforce_parity({"a": good, "b": bad}, Budgets(), "try fp32")
    mismatch = err.value
    assert isinstance(mismatch, RunError)  # exit 1: a failed run, nothing written
    assert mismatch.problems and all(p.startswith("task 'b': ") for p in mismatch.problems)
    assert mismatch.remedies == "try fp32" and "\n" not in str(mismatch)
    assert str(mismatch).startswith("exported model does not match the reference (task 'b': ")
    assert str(mismatch).endswith("); no bundle written; try fp32")
    with pytest.raises(ParityMismatch, match=r"^exported model does not match the reference \(outputs differ .*SNR"):
        enforce_parity({None: bad}, Budgets(), "x")  # the bundle's one model: no task name


def test_the_qat_route_does_not_import_the_tflite_exporter():
    """The int8 quantizer has its own module: QAT (and so the ONNX QAT route) needs no TFLite exporter."""
    code = ("import sys, torch; from edgec.targets.qat import prepare_qat; import edgec.targets.onnx_export; "
            "prepare_qat(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2)), "
            "torch.randn(1, 4)); print('edgec.targets.tflite_export' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
