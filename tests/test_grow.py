"""grow (Net2Net): function preservation, the architecture record, plan-time refusals, the gate."""

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch import nn

from edgec.base import architecture
from edgec.base.architecture import ModelTrust
from edgec.base.checkpoint import Checkpoint, load_checkpoint
from edgec.config import parse_config
from edgec.base.data import load_dataset
from edgec.data_views import select_classes
from edgec.base.errors import ConfigError, RunError
from edgec.pipeline.algorithms import net2net
from edgec.pipeline.artifact import CHECKPOINT_FILE, MODEL
from edgec.pipeline.cache import StageCache
from edgec.pipeline.runner import check_chain, run_chain
from edgec.pipeline.stage import StageContext
from edgec.pipeline.stages.grow import GrowConfig, GrowStage
from edgec.pipeline.stages.train import TrainConfig, TrainStage
from edgec.zoo import MLP, CNNSmall
from support import run_cli

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "grow-new-classes.toml"
FIXTURES = Path(__file__).resolve().parent


def _randomise_batchnorm(model: nn.Module) -> nn.Module:
    """Trained-looking BatchNorm statistics, so a mapping mistake in them shows."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
    return model.eval()


def _max_diff(a: nn.Module, b: nn.Module, x: torch.Tensor, train: bool = False) -> float:
    a, b = copy.deepcopy(a).train(train), copy.deepcopy(b).train(train)
    with torch.no_grad():
        ya, yb = a(x), b(x)
    return float((yb[:, : ya.shape[1]] - ya).abs().max())


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --- the algorithm ------------------------------------------------------------------------------


def test_wider_linear_replicates_units_and_divides_the_next_layer():
    torch.manual_seed(0)
    model = MLP((1, 8, 8), 10, widths=(12, 6)).eval()
    x = torch.randn(32, 1, 8, 8)
    grown = net2net.widen(model, "hidden.0", 30, example=x[:2], generator=_gen())
    assert grown.hidden[0].out_features == 30 and grown.hidden[1].in_features == 30
    assert _max_diff(model, grown, x) < 1e-5
    assert model.hidden[0].out_features == 12  # the input is untouched
    old_w, new_w = model.hidden[0].weight, grown.hidden[0].weight
    assert torch.equal(new_w[:12], old_w)  # the first n units are kept
    source = [next(i for i in range(12) if torch.equal(new_w[j], old_w[i])) for j in range(30)]  # g
    counts = torch.bincount(torch.tensor(source), minlength=12)
    for j, i in enumerate(source):
        assert torch.allclose(grown.hidden[1].weight[:, j], model.hidden[1].weight[:, i] / counts[i])


def test_noise_breaks_symmetry_but_keeps_the_function():
    torch.manual_seed(0)
    model = MLP((1, 8, 8), 10, widths=(8,)).eval()
    x = torch.randn(32, 1, 8, 8)
    grown = net2net.widen(model, "hidden.0", 16, example=x[:2], generator=_gen(), noise=0.1)
    assert _max_diff(model, grown, x) < 1e-5
    out = grown.out.weight
    assert len({tuple(out[:, j].tolist()) for j in range(16)}) == 16  # every replica's outgoing weights differ
    # symmetry broken: after one SGD step the replicas of a unit compute different things
    opt = torch.optim.SGD(grown.parameters(), lr=0.1)
    nn.functional.cross_entropy(grown.train()(x), torch.randint(0, 10, (32,))).backward()
    opt.step()
    w = grown.hidden[0].weight
    assert len({tuple(w[j].tolist()) for j in range(16)}) == 16


def test_wider_conv_bn_pool_flatten_linear_in_eval_and_train_mode():
    torch.manual_seed(0)
    model = _randomise_batchnorm(CNNSmall((1, 8, 8), 10))
    x = torch.randn(16, 1, 8, 8)
    grown = model
    for layer, width in (("features.0.0", 24), ("features.1.0", 64)):  # conv -> conv, conv -> flatten -> linear
        grown = net2net.widen(grown, layer, width, example=x[:2], generator=_gen(), noise=0.05)
    assert grown.features[1][1].num_features == 64 and grown.fc.in_features == 64 * 2 * 2
    assert _max_diff(model, grown, x) < 1e-4
    assert _max_diff(model, grown, x, train=True) < 1e-4  # batch statistics follow the mapping too


def test_deeper_inserts_identity_after_the_relu():
    torch.manual_seed(0)
    x = torch.randn(64, 1, 8, 8)
    mlp = MLP((1, 8, 8), 10, widths=(12, 6)).eval()  # forward applies torch.relu: found by tracing
    grown = net2net.deepen(mlp, "hidden.1", example=x[:2])
    assert [type(m) for m in grown.hidden[1]] == [nn.Linear, nn.ReLU, nn.Linear]
    assert torch.equal(grown.hidden[1][2].weight, torch.eye(6))
    assert _max_diff(mlp, grown, x) < 1e-6

    cnn = _randomise_batchnorm(CNNSmall((1, 8, 8), 10))
    grown = net2net.deepen(cnn, "features.1.0", example=x[:2], calibration=x)
    block = grown.features[1][1]  # the BatchNorm is wrapped: BN -> ReLU -> new conv -> new BN, then the old ReLU
    assert [type(m) for m in block] == [nn.BatchNorm2d, nn.ReLU, nn.Conv2d, nn.BatchNorm2d]
    assert block[2].padding == (1, 1) and block[2].weight[:, :, 1, 1].equal(torch.eye(32))
    assert _max_diff(cnn, grown, x) < 1e-5
    bn = block[3]  # undoes its own normalisation, at the statistics measured on the calibration data
    assert bn.running_mean.abs().sum() > 0 and torch.allclose(bn.bias, bn.running_mean)
    assert torch.allclose(bn.weight, torch.sqrt(bn.running_var + bn.eps))


def test_deeper_refuses_an_activation_that_is_not_idempotent():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))
    with pytest.raises(ConfigError, match="after '1' is 2 \\(Tanh\\), which is not idempotent"):
        net2net.deepen(model, "1", example=torch.randn(2, 1, 8, 8))
    with pytest.raises(ConfigError, match="'3' has no activation after it"):
        net2net.deepen(model, "3", example=torch.randn(2, 1, 8, 8))
    # widening does not need idempotence: tanh is applied unit by unit
    grown = net2net.widen(model, "1", 20, example=torch.randn(2, 1, 8, 8), generator=_gen())
    assert _max_diff(model, grown, torch.randn(8, 1, 8, 8)) < 1e-6


def test_user_model_residual_and_multi_consumer_layers_are_refused():
    from fixtures.user_models import make

    torch.manual_seed(0)
    model = _randomise_batchnorm(make(channels=8))
    x = torch.randn(8, 1, 8, 8)
    with pytest.raises(ConfigError, match="'stem.0' cannot be grown: its output \\(through stem.2 \\(ReLU\\)\\) feeds 2 consumers"):
        net2net.widen(model, "stem.0", 16, example=x[:2], generator=_gen())
    with pytest.raises(ConfigError, match="'block.3' cannot be grown: .* feeds a residual add"):
        net2net.widen(model, "block.3", 16, example=x[:2], generator=_gen())
    with pytest.raises(ConfigError, match="'head' is the output layer"):
        net2net.widen(model, "head", 16, example=x[:2], generator=_gen())
    with pytest.raises(ConfigError, match="'nope' is not a Linear or Conv2d layer.*stem.0, block.0, block.3, head"):
        list(net2net.grow(model, wider={"nope": 3}, example=x[:2]))
    grown = net2net.widen(model, "block.0", 16, example=x[:2], generator=_gen(), noise=0.05)
    grown = net2net.deepen(grown, "block.0", example=x[:2], calibration=x)
    assert _max_diff(model, grown, x) < 1e-5


def test_new_classes_keep_the_old_outputs_and_predictions():
    torch.manual_seed(0)
    model = MLP((1, 8, 8), 5, widths=(16,)).eval()
    x = torch.randn(64, 1, 8, 8)
    grown = net2net.extend_classes(model, 10, example=x[:2], calibration=x, generator=_gen(), noise=0.05)
    assert grown.out.out_features == 10
    with torch.no_grad():
        old, new = model(x), grown(x)
    # The old rows are copied exactly, but a 10-wide matmul may sum in another order than a 5-wide one
    # (CPU-dependent kernels): a few ulps of the largest output, never the noise the new rows carry.
    ulps = 16 * torch.finfo(torch.float32).eps * float(old.abs().max())
    assert _max_diff(model, grown, x) <= ulps
    top2 = old.topk(2, dim=1).values
    clear = top2[:, 0] - top2[:, 1] > 2 * ulps  # a lead that those ulps cannot swap
    assert torch.equal(new.argmax(1)[clear], old.argmax(1)[clear])  # the new classes start below every top logit
    assert torch.all(new[:, 5:].amax(1) < old.amax(1))
    with pytest.raises(ConfigError, match="has 5 outputs already"):
        net2net.extend_classes(model, 3, example=x[:2], generator=_gen())


# --- the stage ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _source(cache, arch, trust=ModelTrust(), seed=0):
    torch.manual_seed(seed)
    model = architecture.build(arch, trust)
    return cache.put("source", f"s-{seed}-{architecture.describe(arch)}", MODEL,
                     lambda out: Checkpoint(arch, model.state_dict()).save(out / CHECKPOINT_FILE) or {})


@pytest.fixture(scope="module")
def trained_mlp(digits, tmp_path_factory):
    cache = StageCache(tmp_path_factory.mktemp("cache"))
    arch = architecture.record(architecture.zoo_base("mlp", digits.input_shape, digits.num_classes, widths=[16]))
    ctx = StageContext(data=digits, seed=0, target=None, console=Console(quiet=True))
    (step,) = run_chain([TrainStage(TrainConfig(epochs=8))], _source(cache, arch), ctx, cache)
    return step.artifact, ctx, cache


def test_stage_grows_records_and_later_stages_reload(trained_mlp, digits):
    teacher, ctx, cache = trained_mlp
    stages = [GrowStage(GrowConfig(wider={"hidden.0": 32}, deeper=["hidden.0"], noise=0)),
              TrainStage(TrainConfig(epochs=2))]
    check_chain(stages, teacher, ctx)
    grow_step, train_step = run_chain(stages, teacher, ctx, cache)
    info = grow_step.artifact.info
    assert info["function_preserved"]["passed"] and info["function_preserved"]["enforced"]
    assert info["function_preserved"]["max_abs_diff"] <= 1e-4
    assert info["accuracy"] == info["source_accuracy"] == teacher.info["accuracy"]  # same predictions
    assert [s["op"] for s in info["steps"]] == ["wider", "deeper"]
    ckpt = grow_step.artifact.checkpoint()
    assert {e["path"] for e in ckpt.arch["edits"]} == {"hidden.0", "out"}
    assert ckpt.arch["edits"][0]["module"]["type"] == "Sequential"
    rebuilt = ckpt.build(ModelTrust())  # the record alone rebuilds the grown model
    assert rebuilt.hidden[0][2].weight.shape == (32, 32)
    trained = train_step.artifact.checkpoint()
    assert trained.arch == ckpt.arch and train_step.artifact.info["params"] == info["params"]


def test_noise_is_reported_not_enforced(trained_mlp):
    teacher, ctx, cache = trained_mlp
    (step,) = run_chain([GrowStage(GrowConfig(wider={"hidden.0": 40}, noise=0.2))], teacher, ctx, cache)
    gate = step.artifact.info["function_preserved"]
    assert gate["enforced"] is False and gate["max_abs_diff"] < 1e-4  # zero-sum noise keeps the function anyway


def test_gate_fails_naming_the_step(trained_mlp, monkeypatch):
    """A widening that forgets to divide the next layer's weights by the replica counts is caught."""
    teacher, ctx, cache = trained_mlp
    real = net2net.widen

    def forgetful(model, layer, width, **kw):
        grown = real(model, layer, width, **kw)
        with torch.no_grad():
            grown.out.weight[:, 16:] *= 2
        return grown

    monkeypatch.setattr(net2net, "widen", forgetful)
    stage = GrowStage(GrowConfig(wider={"hidden.0": 24}, deeper=["hidden.0"], noise=0))
    with pytest.raises(RunError, match="grow: wider 'hidden.0' changed the model's function: max \\|logit difference\\|"):
        run_chain([stage], teacher, ctx, cache)


def test_plan_check_refuses_before_anything_runs(trained_mlp, digits, tmp_path, monkeypatch):
    teacher, ctx, cache = trained_mlp
    train = TrainStage(TrainConfig(epochs=1))
    cases = [
        (GrowConfig(wider={"hidden.1": 8}), "stage 'grow': grow.wider: 'hidden.1' is not a Linear or Conv2d layer.*hidden.0, out"),
        (GrowConfig(wider={"hidden.0": 8}), "'hidden.0' has 16 units; the new width 8"),
        (GrowConfig(deeper=["out"]), "'out' has no activation after it"),
        (GrowConfig(wider={"out": 20}), "'out' is the output layer"),
        (GrowConfig(), "grow needs at least one of"),
        (GrowConfig(classes=10, wider={"hidden.0": 20}), None),
    ]
    for cfg, message in cases:
        stages = [train, GrowStage(cfg), train]
        if message is None:
            check_chain(stages, teacher, ctx)
        else:
            with pytest.raises(ConfigError, match=message):
                check_chain(stages, teacher, ctx)
    with pytest.raises(ConfigError, match="stage 'grow': deeper: Value error, deeper lists a layer twice"):
        parse_config({"stages": [{"kind": "grow", "deeper": ["a", "a"]}]})
    unquoted = parse_config({"stages": [{"kind": "grow", "wider": {"features": {"0": {"0": 32}}}}]})  # TOML's dotted keys
    assert unquoted.stages[0].config.wider == {"features.0.0": 32}
    with pytest.raises(ConfigError, match="stage 'grow': unknown key 'wide'"):
        parse_config({"stages": [{"kind": "grow", "wide": {"a": 3}}]})

    # a user model with a tanh: refused by name at plan time
    (tmp_path / "tanh_models.py").write_text(
        "import torch\ndef make(num_classes=10):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, num_classes))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    trust = ModelTrust(frozenset({"tanh_models:make"}))
    source = _source(cache, architecture.record(architecture.factory_base("tanh_models:make")), trust)
    with pytest.raises(ConfigError, match="the activation after '1' is 2 \\(Tanh\\), which is not idempotent"):
        check_chain([GrowStage(GrowConfig(deeper=["1"]))], source, dataclasses.replace(ctx, trust=trust))


def test_later_checks_see_the_grown_model(digits, tmp_path):
    """A 5-class model and 10-class data: train's check refuses it, unless grow adds the classes first."""
    first = select_classes(digits, [0, 1, 2, 3, 4], "data.first")
    cache = StageCache(tmp_path)
    arch = architecture.record(architecture.zoo_base("cnn-small", first.input_shape, first.num_classes))
    source = _source(cache, arch)
    ctx = StageContext(data=digits, seed=0, target=None, console=Console(quiet=True))
    train = TrainStage(TrainConfig(epochs=1))
    with pytest.raises(ConfigError, match="outputs \\[5\\] per sample but the data digits has 10 classes"):
        check_chain([train], source, ctx)
    check_chain([GrowStage(GrowConfig(classes=10, wider={"features.1.0": 40})), train], source, ctx)


def test_user_model_through_the_stage(digits, tmp_path):
    trust = ModelTrust(frozenset({"fixtures.user_models:make"}))
    arch = architecture.record(architecture.factory_base("fixtures.user_models:make", channels=8))
    cache = StageCache(tmp_path)
    ctx = StageContext(data=digits, seed=0, target=None, console=Console(quiet=True), trust=trust)
    source = _source(cache, arch, trust)
    with pytest.raises(ConfigError, match="'stem.0' cannot be grown"):
        check_chain([GrowStage(GrowConfig(wider={"stem.0": 16}))], source, ctx)
    (step,) = run_chain([GrowStage(GrowConfig(wider={"block.0": 16}, deeper=["block.0"], noise=0))], source, ctx, cache)
    assert step.artifact.info["function_preserved"]["passed"]
    grown = load_checkpoint(step.artifact.path / CHECKPOINT_FILE).build(trust)
    assert grown.block[0].out_channels == 16 and isinstance(grown.block[1][2], nn.Conv2d)


def test_example_builds_verifies_and_reloads_through_the_cli(tmp_path):
    """The example end to end (about 20 s on the digits), the bundle verified, the grown reference
    reloaded with --weights."""
    out = json.loads(run_cli("build", "--config", EXAMPLE, "--target", "rpi", "--json", cwd=tmp_path).stdout)
    grow = next(s for s in out["stages"] if s["kind"] == "grow")
    assert grow["info"]["function_preserved"]["max_abs_diff"] <= 1e-4
    assert grow["info"]["function_preserved"]["top1_agreement_all_outputs"] == 1.0
    assert [s["op"] for s in grow["info"]["steps"]] == ["wider", "wider", "classes"]
    run_cli("verify", tmp_path / "edgec-out" / "rpi" / "bundle", cwd=tmp_path)
    reference = tmp_path / "edgec-out" / "rpi" / "reference.pt"
    assert load_checkpoint(reference).arch["edits"]
    again = json.loads(run_cli("build", "--weights", reference, "--stages", "train", "--epochs", "1", "--out",
                               tmp_path / "o2", "--json", cwd=tmp_path).stdout)
    assert again["source"]["params"] == grow["info"]["params"] and again["source"]["accuracy"] > 0.8
    # a bad layer name exits 2 at plan time, naming it
    bad = run_cli("build", "--config", EXAMPLE, "--set", 'grow.deeper=["features.9.0"]', "--out", tmp_path / "o3",
                  cwd=tmp_path, check=2)
    assert "'features.9.0' is not a Linear or Conv2d layer" in bad.stderr
