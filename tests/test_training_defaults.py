"""The train stage's defaults hold their own against a well-kept baseline on small tabular data."""

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.preprocessing import StandardScaler

from edgec.api import build


@pytest.fixture(scope="module")
def breast_cancer(tmp_path_factory):
    data = load_breast_cancer()
    x_tr, x_te, y_tr, y_te = train_test_split(data.data.astype(np.float32), data.target, test_size=0.2, random_state=0,
                                              stratify=data.target)
    path = tmp_path_factory.mktemp("bc") / "bc.npz"
    np.savez(path, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
    return path, (x_tr, y_tr, x_te, y_te)


def test_train_stage_is_within_two_points_of_sklearn_mlp(breast_cancer, tmp_path):
    """MLP 30-64-32-2 through the Python API vs scikit-learn's MLPClassifier with the same layers
    (standardised inputs, mean of three seeds). Raw features used to leave edgec 5 points behind."""
    path, (x_tr, y_tr, x_te, y_te) = breast_cancer
    result = build({"data": {"source": f"npz:{path}"}, "model": {"name": "mlp", "args": {"widths": [64, 32]}},
                    "stages": [{"kind": "train"}]}, out=tmp_path / "out", cache_dir=tmp_path / "cache")
    ours = result.stages[0].info["accuracy"]
    scaler = StandardScaler().fit(x_tr)
    theirs = np.mean([
        MLPClassifier((64, 32), random_state=seed, max_iter=500).fit(scaler.transform(x_tr), y_tr).score(scaler.transform(x_te), y_te)
        for seed in range(3)
    ])
    assert ours >= theirs - 0.02, (ours, theirs)
    assert result.bundle is None and (result.build_dir / "model.pt").is_file()
