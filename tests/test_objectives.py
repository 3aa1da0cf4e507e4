"""Beyond classification, piece by piece: on-device metrics, data loading, objectives, zoo
autoencoders, the int8 output range of autoencoders (issue 17). The end-to-end builds are in
test_beyond_classification.py."""

import numpy as np
import pytest
import torch

from edgec.config import parse_config
from edgec.base.data import load_dataset
from edgec.base.errors import ConfigError, InputError
from edgec.ondevice import metrics as M
from edgec.pipeline.algorithms.output_range import covering, representable
from edgec.pipeline.objectives import objective_for
from edgec.zoo import ZOO


# --- metrics.py (numpy only, shipped in the bundle) ------------------------------------------------


def test_roc_auc_matches_scikit_learn_with_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 500)
    scores = np.round(rng.normal(size=500) + labels, 1)  # rounded: many ties
    assert M.roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert M.roc_auc([0.1, 0.2, 0.3], [0, 0, 0]) is None
    assert M.roc_auc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0
    assert M.roc_auc([4, 3, 2, 1], [0, 0, 1, 1]) == 0.0


def test_roc_curve_ends_at_one_and_integrates_to_auc():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 300)
    scores = rng.normal(size=300) + 2 * labels
    fpr, tpr = M.roc_curve(scores, labels)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(M.roc_auc(scores, labels), abs=1e-9)


def test_regression_metrics_match_scikit_learn_for_several_targets():
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    rng = np.random.default_rng(2)
    true = rng.normal(size=(50, 3)) * [1, 10, 100]
    pred = true + rng.normal(size=(50, 3))
    got = M.regression_metrics(pred, true)
    assert got["r2"] == pytest.approx(r2_score(true, pred))
    assert got["mae"] == pytest.approx(mean_absolute_error(true, pred))
    assert got["rmse"] == pytest.approx(np.sqrt(mean_squared_error(true, pred)))
    assert M.regression_metrics(pred[:, 0], true[:, 0])["samples"] == 50


def test_postprocess_maps_standardized_outputs_to_real_units():
    out = np.array([[0.0, 1.0], [-1.0, 2.0]], dtype=np.float32)
    got = M.postprocess(out, {"scale": [2.0, 10.0], "offset": [1.0, 100.0]})
    assert got.tolist() == [[1.0, 110.0], [-1.0, 120.0]]
    with pytest.raises(ValueError, match="3 values for 2 outputs"):
        M.postprocess(out, {"scale": [1, 2, 3]})


def test_reconstruction_metrics_score_each_sample_by_its_error():
    inputs = np.zeros((4, 1, 2, 2), dtype=np.float32)
    outputs = np.zeros((4, 4), dtype=np.float32)  # flat outputs of an image input are fine
    outputs[2:] = 1.0  # the last two reconstruct badly
    got = M.reconstruction_metrics(outputs, inputs, [0, 0, 1, 1])
    assert got == {"mse": 0.5, "auc": 1.0, "samples": 4, "anomalous": 2}
    with pytest.raises(ValueError, match="does not reconstruct"):
        M.reconstruction_errors(np.zeros((4, 3)), inputs)


def test_headline_and_tolerance():
    assert M.headline("reconstruction", {"auc": None, "mse": 0.2}) == ("mse", 0.2, False)
    assert M.headline("regression", {"r2": 0.5}) == ("r2", 0.5, True)
    assert M.within_tolerance(0.495, 0.5, True, 0.01) and not M.within_tolerance(0.48, 0.5, True, 0.01)
    assert M.within_tolerance(0.101, 0.1, False, 0.05) and not M.within_tolerance(0.2, 0.1, False, 0.05)
    assert M.relative_error(np.ones((3, 2)), np.ones((3, 2))) == 0.0


# --- data --------------------------------------------------------------------------------------


def test_diabetes_regression_standardizes_features_and_targets():
    data = load_dataset("diabetes", task="regression")
    assert data.task == "regression" and data.y_train.shape[1] == 1 and data.y_train.dtype == np.float32
    assert len(data.x_train) + len(data.x_val) + len(data.x_test) == 442
    x = data.to_input(data.x_train)
    assert np.allclose(x.mean(0), 0, atol=1e-4) and np.allclose(x.std(0), 1, atol=1e-3)
    target = objective_for(data).train_targets(data)
    assert abs(target.mean()) < 1e-4 and abs(target.std() - 1) < 1e-3
    assert "regression of 1 target(s)" in data.summary()
    assert data.digest != load_dataset("diabetes", task="regression", val_fraction=0.2).digest


def test_npz_regression_with_several_targets(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 4)).astype(np.float32)
    np.savez(tmp_path / "r.npz", x_train=x[:50], y_train=x[:50, :2] * 3 + 7, x_test=x[50:], y_test=x[50:, :2] * 3 + 7)
    data = load_dataset(f"npz:{tmp_path / 'r.npz'}", task="regression")
    assert data.labels == ("y0", "y1") and data.y_test.shape == (10, 2)
    assert data.target_offset[0] == pytest.approx(7, abs=1.5)
    np.savez(tmp_path / "bad.npz", x_train=x[:50], y_train=np.full(50, np.nan), x_test=x[50:], y_test=x[50:, 0])
    with pytest.raises(InputError, match="NaN"):
        load_dataset(f"npz:{tmp_path / 'bad.npz'}", task="regression")
    with pytest.raises(InputError, match="cannot train a regression"):
        load_dataset("digits", task="regression")


def test_reconstruction_from_labelled_data_marks_the_other_classes_anomalous():
    data = load_dataset("digits", task="reconstruction", normal=[3])
    full = load_dataset("digits")
    assert data.task == "reconstruction" and data.labels == ("normal", "anomalous")
    assert len(data.x_train) + len(data.x_val) == int((np.concatenate([full.y_train, full.y_val]) == 3).sum())
    assert data.y_test.tolist() == (full.y_test != 3).astype(int).tolist()
    with pytest.raises(InputError, match="class indices"):
        load_dataset("digits", task="reconstruction", normal=[12])


def test_npz_reconstruction_needs_only_x_and_reads_anomaly_flags(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "x.npz", x_train=rng.normal(size=(30, 6)), x_test=rng.normal(size=(10, 6)),
             anomaly_test=np.arange(10) % 2 == 0)
    data = load_dataset(f"npz:{tmp_path / 'x.npz'}", task="reconstruction", input_noise=0.1)
    assert data.y_test.tolist() == [1, 0] * 5 and data.input_noise == 0.1 and data.x_train.dtype == np.float32
    np.savez(tmp_path / "plain.npz", x_train=rng.normal(size=(30, 6)), x_test=rng.normal(size=(10, 6)))
    assert load_dataset(f"npz:{tmp_path / 'plain.npz'}", task="reconstruction").y_test.sum() == 0
    np.savez(tmp_path / "bad.npz", x_train=rng.normal(size=(30, 6)), x_test=rng.normal(size=(10, 6)),
             anomaly_test=np.arange(10))
    with pytest.raises(InputError, match="0 \\(normal\\) or 1"):
        load_dataset(f"npz:{tmp_path / 'bad.npz'}", task="reconstruction")
    with pytest.raises(InputError, match="no labels"):
        load_dataset(f"npz:{tmp_path / 'plain.npz'}", task="reconstruction", normal=[0])


def test_classification_data_is_unchanged_by_the_task_fields():
    data = load_dataset("digits")
    assert data.task == "classification" and data.summary().endswith("10 classes")


def test_config_task_and_its_data_keys():
    cfg = parse_config({"task": "reconstruction", "data": {"source": "digits", "normal": [0], "input_noise": 0.2}})
    assert cfg.task == "reconstruction" and cfg.data.normal == [0]
    assert parse_config(cfg.canonical() | {"cache_dir": "x"}).task == "reconstruction"
    with pytest.raises(ConfigError, match="apply to task"):
        parse_config({"data": {"normal": [0]}})
    with pytest.raises(ConfigError, match="task"):
        parse_config({"task": "segmentation"})


# --- objectives --------------------------------------------------------------------------------


def test_reconstruction_objective_trains_on_noisy_inputs_against_clean_targets():
    data = load_dataset("digits", task="reconstruction", normal=[0], input_noise=0.5)
    objective = objective_for(data)
    target = objective.train_targets(data)
    assert target.shape == (len(data.x_train), 64)
    xb = torch.from_numpy(data.to_input(data.x_train[:4]))
    noisy = objective.train_inputs(xb, torch.Generator().manual_seed(0))
    assert 0.3 < float((noisy - xb).std()) < 0.7
    out = torch.zeros(4, 64)
    assert float(objective.loss(out, xb, torch.from_numpy(target[:4]))) == pytest.approx(float((xb ** 2).mean()))
    idx = objective.calibration_indices(40)
    assert len(idx) == 40 and len(set(idx.tolist())) == 40
    x = data.x_train.reshape(len(data.x_train), -1)
    assert x[idx].max() == x.max()  # the samples holding the extremes are among the calibration samples


def test_regression_objective_calibrates_over_the_target_range():
    data = load_dataset("diabetes", task="regression")
    objective = objective_for(data)
    idx = objective.calibration_indices(50)
    y = data.y_train[idx, 0]
    assert len(idx) == 50 and y.min() < np.quantile(data.y_train, 0.1) and y.max() > np.quantile(data.y_train, 0.9)
    assert objective.postprocessing()["scale"] == list(data.target_scale)
    with pytest.raises(InputError, match="1 target"):
        objective.check_output(torch.zeros(2, 3), data)


def test_distillation_loss_beyond_classification_is_mse_to_the_teacher():
    data = load_dataset("diabetes", task="regression")
    objective = objective_for(data)
    student, teacher, target = torch.zeros(3, 1), torch.ones(3, 1), torch.zeros(3, 1)
    assert float(objective.distill_loss(student, teacher, target, alpha=1.0)) == 1.0
    assert float(objective.distill_loss(student, teacher, target, alpha=0.0)) == 0.0


# --- zoo ----------------------------------------------------------------------------------------


def test_dense_autoencoder_is_mlperf_tiny_by_default():
    model = ZOO["autoencoder"]((640,), None)
    widths = [m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert widths == [128, 128, 128, 128, 8, 128, 128, 128, 128, 640]
    half = ZOO["autoencoder"]((1, 8, 8), 2, widths=[32, 16], bottleneck=4, width=0.5)
    assert [m.out_features for m in half.modules() if isinstance(m, torch.nn.Linear)] == [16, 8, 4, 8, 16, 64]
    assert half(torch.zeros(3, 1, 8, 8)).shape == (3, 64)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 7, 9), (1, 1, 1)])
def test_conv_autoencoder_keeps_the_input_shape(shape):
    model = ZOO["conv-autoencoder"](shape, None, channels=(4, 8), output="sigmoid")
    with torch.no_grad():
        out = model(torch.rand(2, *shape))
    assert out.shape == (2, *shape) and float(out.min()) >= 0 and float(out.max()) <= 1
    with pytest.raises(ConfigError, match="image input"):
        ZOO["conv-autoencoder"]((10,), None)


# --- int8 output range ---------------------------------------------------------------------------


def test_covering_quantization_keeps_the_whole_range_and_zero():
    for lo, hi in ((0.0, 1.0), (-3.2, 5.1), (0.2, 0.9), (-2.0, -0.5)):
        scale, zero_point = covering(lo, hi)
        r_lo, r_hi = representable(scale, zero_point)
        assert r_lo <= min(lo, 0) + scale / 2 and r_hi >= max(hi, 0) - scale / 2
        assert -128 <= zero_point <= 127
