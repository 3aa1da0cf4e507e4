"""pretrain (stacked denoising autoencoders): the stack it accepts, one layer's training, plan-time
refusals and the stage through the CLI with its report section, determinism, hostile
reconstructions.npz."""

import copy
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from torch import nn

from edgec.base.checkpoint import load_checkpoint
from edgec.base.data import load_dataset
from edgec.base.errors import ConfigError
from edgec.pipeline.algorithms.denoising import (Decoder, corrupt, hidden_stack, reconstruction_loss,
                                                 train_layer)
from edgec.pipeline.artifact import CHECKPOINT_FILE
from edgec.pipeline.cache import StageCache
from edgec.pipeline.runner import run_chain
from edgec.pipeline.stage import StageContext
from edgec.pipeline.stages.pretrain import RECONSTRUCTIONS_FILE, PretrainConfig, PretrainStage
from edgec.report.document import Doc
from edgec.report.pretrain import BadReconstructions, pretrain_section, read_reconstructions
from edgec.zoo import MLP
from support import run_cli, zoo_source

TOML = """
seed = 0
stages = ["pretrain", "train"]
[data]
source = "digits"
[model]
name = "{model}"
args = {args}
[pretrain]
epochs = 2
{extra}
[train]
epochs = 2
"""


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _mlp(widths=(24, 16), seed=0) -> MLP:
    torch.manual_seed(seed)
    return MLP((1, 8, 8), 10, widths=widths)


def _refusal(model: nn.Module, sample: torch.Tensor) -> str:
    with pytest.raises(ConfigError) as e:
        hidden_stack(model, sample)
    return str(e.value)


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)
        self.out = nn.Linear(64, 10)

    def forward(self, x):
        return self.out(torch.relu(self.fc(torch.relu(self.fc(x.flatten(1))))))


def test_hidden_stack_accepts_an_mlp_and_refuses_everything_else():
    x = torch.rand(4, 1, 8, 8)
    assert [layer.name for layer in hidden_stack(_mlp((24, 16, 12)), x)] == ["hidden.0", "hidden.1", "hidden.2"]
    flat = nn.Flatten()
    assert "calls 1 Linear layer(s)" in _refusal(nn.Sequential(flat, nn.Linear(64, 10)), x)
    assert "'3' does not take ReLU('1')" in _refusal(nn.Sequential(flat, nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10)), x)
    bn = nn.Sequential(flat, nn.Linear(64, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 10))
    assert "'2' (BatchNorm1d) has weights or statistics of its own" in _refusal(bn, x)  # the identity at init
    # the classifier must read the last hidden layer's ReLU too, or the features it fine-tunes are not the pretrained ones
    last = nn.Sequential(flat, nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 8), nn.Sigmoid(), nn.Linear(8, 10))
    assert "'5' does not take ReLU('3')" in _refusal(last, x)
    hidden_stack(nn.Sequential(flat, nn.Dropout(0.5), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10)), x)  # eval: identity
    assert "called more than once" in _refusal(_Twice(), x)


def test_first_layer_must_read_the_flattened_input():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.out = nn.Linear(64, 8), nn.Linear(8, 10)

        def forward(self, x):
            return self.out(torch.relu(self.fc(2 * x.flatten(1))))

    assert "the first Linear layer 'fc' does not take the flattened input" in _refusal(Scaled(), torch.rand(2, 1, 8, 8))


def test_train_layer_lowers_the_loss_and_leaves_every_other_layer_untouched(digits):
    model = _mlp((24, 16))
    x = torch.from_numpy(digits.to_input(digits.x_train))
    x_val = torch.from_numpy(digits.to_input(digits.x_val))
    layers = hidden_stack(model, x[:2])
    before = copy.deepcopy(model.state_dict())
    untrained = reconstruction_loss(layers, 1, Decoder(torch.zeros(24), relu=True), x_val)
    losses, decoder = train_layer(layers, 1, x, epochs=3, batch_size=32, lr=3e-3, noise="mask", level=0.25, seed=0)
    assert losses[-1] < losses[0]
    assert reconstruction_loss(layers, 1, decoder, x_val) < 0.5 * untrained
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == ["hidden.1.weight", "hidden.1.bias"]
    assert decoder.relu and decoder.bias.shape == (24,) and not decoder.bias.requires_grad


def test_decoder_is_linear_only_where_its_target_can_be_negative():
    torch.manual_seed(0)
    x = torch.randn(256, 12)  # standardised features: half of them negative, out of a ReLU's reach
    model = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    layers = hidden_stack(model, x[:2])
    kwargs = dict(epochs=1, batch_size=64, lr=1e-3, noise="gaussian", level=0.1, seed=0)
    assert not train_layer(layers, 0, x, **kwargs)[1].relu
    assert train_layer(layers, 1, x, **kwargs)[1].relu  # its input is a ReLU code


def test_corruption_masks_the_asked_fraction_or_adds_the_asked_noise():
    x = torch.ones(200, 500)
    masked = corrupt(x, "mask", 0.25, torch.Generator().manual_seed(0))
    assert set(masked.unique().tolist()) == {0.0, 1.0} and abs(float((masked == 0).float().mean()) - 0.25) < 0.01
    noisy = corrupt(x, "gaussian", 0.3, torch.Generator().manual_seed(0))
    assert abs(float((noisy - x).std()) - 0.3) < 0.01
    assert torch.equal(x, torch.ones(200, 500))  # the clean input (the target) is not modified


def test_same_seed_same_checkpoint_bytes_other_seed_other_weights(digits, tmp_path):
    stage = PretrainStage(PretrainConfig(epochs=1, batch_size=32))

    def run(seed: int, where: str):
        cache = StageCache(tmp_path / where)
        source = zoo_source(cache, "mlp", digits, widths=[16, 12])
        ctx = StageContext(data=digits, seed=seed, target=None, console=Console(quiet=True))
        (step,) = run_chain([stage], source, ctx, cache)
        return step.artifact.path

    a, b, c = run(0, "a"), run(0, "b"), run(1, "c")
    assert (a / CHECKPOINT_FILE).read_bytes() == (b / CHECKPOINT_FILE).read_bytes()
    with np.load(a / RECONSTRUCTIONS_FILE) as ra, np.load(b / RECONSTRUCTIONS_FILE) as rb:
        assert all(np.array_equal(ra[k], rb[k]) for k in ra.files)
    wa, wc = load_checkpoint(a / CHECKPOINT_FILE).state_dict, load_checkpoint(c / CHECKPOINT_FILE).state_dict
    assert not torch.equal(wa["hidden.0.weight"], wc["hidden.0.weight"])
    assert torch.equal(wa["out.weight"], wc["out.weight"])  # the classifier is not pretrained (same seed-0 source)


def _write_toml(tmp_path: Path, model="mlp", args="{ widths = [24, 16, 12] }", extra="", head="") -> Path:
    path = tmp_path / "pretrain.toml"
    path.write_text(head + TOML.format(model=model, args=args, extra=extra))
    return path


@pytest.mark.parametrize("model, args, extra, head, message", [
    ("cnn-small", "{}", "", "", "stage 'pretrain': pretrain needs an MLP whose nn.Linear layers feed each other through ReLU; "
                                "this model calls 1 Linear layer(s)"),
    ("mlp", "{ widths = [16] }", 'level = 1.0', "", "stage 'pretrain': level = 1.0 would mask every input"),
    ("autoencoder", "{ widths = [16], bottleneck = 4 }", "", 'task = "reconstruction"\n',
     "stage 'pretrain': pretrain prepares a classifier's hidden layers, but the data's task is reconstruction"),
])
def test_cli_refuses_at_plan_time_with_one_line(tmp_path, model, args, extra, head, message):
    config = _write_toml(tmp_path, model, args, extra, head)
    if head:  # reconstruction: the digits of class 0 are normal
        config.write_text(config.read_text().replace('source = "digits"', 'source = "digits"\nnormal = [0]'))
    proc = run_cli("build", "--config", config, "--target", "rpi", cwd=tmp_path, check=2)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and "run    " not in proc.stdout + proc.stderr
    assert not (tmp_path / "edgec-out").exists()


def test_stage_through_the_cli_writes_reconstructions_info_and_its_report_section(tmp_path):
    config = _write_toml(tmp_path)
    run_cli("build", "--config", config, "--target", "rpi", "--json", cwd=tmp_path)
    build_dir = tmp_path / "edgec-out" / "rpi"
    summary = json.loads((build_dir / "build.json").read_text())
    pre = next(s for s in summary["stages"] if s["kind"] == "pretrain")
    info = pre["info"]["pretrain"]
    assert [layer["layer"] for layer in info["layers"]] == ["hidden.0", "hidden.1", "hidden.2"]
    for layer in info["layers"]:
        assert len(layer["loss"]) == 2 and layer["loss"][-1] < layer["loss"][0] and layer["val_loss"] > 0
    grads = info["grad_norms"]
    assert grads["layers"] == ["hidden.0", "hidden.1", "hidden.2"]
    assert all(len(grads[k]) == 3 and all(v > 0 for v in grads[k]) for k in ("before", "pretrained"))
    assert not any("pretrain" in r for r in summary.get("reached_bundle", []))  # initial weights, not compression

    npz = Path(summary["config"]["cache_dir"]) / "pretrain" / pre["key"] / RECONSTRUCTIONS_FILE
    shape, rows = read_reconstructions(npz)
    assert shape == (1, 8, 8) and list(rows) == ["input", "layer1", "layer2", "layer3"]
    assert rows["input"].shape == (8, 64) and float(rows["layer1"].min()) >= 0

    report = (build_dir / "report.md").read_text()
    assert "## Pretraining (stacked denoising autoencoders)" in report and "| `hidden.2` | 16 -> 12 |" in report
    for name in ("pretrain_reconstructions", "pretrain_gradients"):
        assert (build_dir / "report" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


# --- reconstructions.npz read as hostile input ---------------------------------------------------


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def _good(n=3, layers=2):
    rows = {"input": np.random.default_rng(0).random((n, 64), dtype=np.float32)}
    rows.update({f"layer{i}": rows["input"] * 0.5 for i in range(1, layers + 1)})
    return {"image_shape": np.array([1, 8, 8]), **rows}


@pytest.mark.parametrize("change, message", [
    ({"input": np.array([{"a": 1}] * 3, dtype=object)}, "numeric arrays only"),
    ({"image_shape": np.array([1, 100000, 100000])}, "is not 1 to 3 sides"),
    ({"image_shape": np.array([1.0, 8, 8])}, "is not 1 to 3 sides"),
    ({"input": np.zeros((3, 65), np.float32)}, "input has shape [3, 65]"),
    ({"input": np.zeros((1000, 64), np.float32)}, "input has shape [1000, 64]"),
    ({"layer2": np.zeros((2, 64), np.float32)}, "layer2 is [2, 64]"),
    ({"layer2": np.full((3, 64), np.nan, np.float32)}, "expected finite floats"),
    ({"layer7": np.zeros((3, 64), np.float32)}, "expected input and layer1..layerN"),
])
def test_hostile_reconstructions_are_refused_with_one_line(tmp_path, change, message):
    path = _npz(tmp_path / RECONSTRUCTIONS_FILE, **{**_good(), **change})
    with pytest.raises(BadReconstructions) as e:
        read_reconstructions(path)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_huge_or_broken_file_is_refused_before_it_is_read(tmp_path):
    path = _npz(tmp_path / "big.npz", **_good())
    header = io.BytesIO()  # a valid header promising 2^40 x 64 floats, in a file of a few kB
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (2**40, 64)})
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("layer3.npy", header.getvalue() + b"\0" * 64)
    with pytest.raises(BadReconstructions, match="unreadable .*need more than"):
        read_reconstructions(path)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(BadReconstructions, match="unreadable"):
        read_reconstructions(tmp_path / "junk.npz")


def test_report_section_skips_a_hostile_file_with_a_note(tmp_path):
    key = "k" * 64
    (tmp_path / "pretrain" / key).mkdir(parents=True)
    _npz(tmp_path / "pretrain" / key / RECONSTRUCTIONS_FILE, **{**_good(), "layer1": np.zeros((3, 64), np.int64)})
    info = {"layers": [{"layer": "hidden.0", "in": 64, "out": 8, "loss": [0.2, 0.1], "val_loss": 0.1}],
            "noise": "mask", "level": 0.25, "epochs": 2,
            "grad_norms": {"layers": ["hidden.0"], "before": [0.01], "pretrained": [0.2]}}
    summary = {"config": {"cache_dir": str(tmp_path)},
               "stages": [{"stage": "pretrain", "id": "pretrain", "kind": "pretrain", "key": key, "info": {"pretrain": info}}]}
    doc = Doc()
    pretrain_section(doc, summary)
    assert [block.name for kind, block in doc.blocks if kind == "image"] == ["pretrain_gradients"]
    assert any("layer reconstructions" in note and "layer1 is [3, 64] int64" in note for note in doc.notes)
