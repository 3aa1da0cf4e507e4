"""benchmarks/speed.py's compute-bound model: big enough to be compute-bound, validated on enough images."""

import torch

from benchmarks.speed import COMPUTE_BOUND, MODELS, TARGETS, resnet18
from pipeline.algorithms.channels import model_cost


def test_compute_bound_model_has_the_macs_of_a_compute_bound_graph():
    """>= 2G MACs: at ~1G (the stride-2 stem at 64x64 or 96x96) the dense int8 p50 on an AMX host was 1.2-2.5 ms,
    too close to the 2 ms the issue asks for; 2.2G measured ~7 ms."""
    spec = MODELS[COMPUTE_BOUND]
    assert spec["model"] == "benchmarks.speed:resnet18" and TARGETS[COMPUTE_BOUND] == "speedup_host"
    macs = model_cost(resnet18(input_shape=spec["shape"]), torch.zeros(1, *spec["shape"]))["macs"]
    assert macs >= 2_000_000_000


def test_compute_bound_validation_split_makes_one_image_a_fraction_of_the_budget():
    """One validation image must weigh well under the 1 pt accuracy budget (<= 0.2 pt: >= 500 images), else the
    budget judges single images (a 60-image split made one image 1.7 pt and refused the dense export)."""
    spec = MODELS[COMPUTE_BOUND]
    validation_images = spec["train_samples"] * spec.get("val_fraction", 0.1)
    assert 100 / validation_images <= 0.2
