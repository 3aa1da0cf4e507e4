import pickle

import pytest
import torch

from torch import nn

from edgec.base import architecture
from edgec.base.architecture import ModelTrust
from edgec.base.checkpoint import Checkpoint, load_checkpoint, load_weights
from edgec.base.errors import ConfigError, InputError
from edgec.zoo import ZOO

TRUST = ModelTrust()


def zoo_arch(name, shape, classes, **kwargs):
    return architecture.record(architecture.zoo_base(name, shape, classes, **kwargs))


def build_model(arch, trust=TRUST):
    return architecture.build(arch, trust)


def factory_arch(factory, **kwargs):
    return architecture.record(architecture.factory_base(factory, **kwargs))


CLASSIFIERS = [name for name in ZOO if "autoencoder" not in name]  # autoencoders: tests/test_objectives.py


@pytest.mark.parametrize("name", CLASSIFIERS)
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 12, 12)])
def test_zoo_models_adapt_to_input(name, shape):
    model = build_model(zoo_arch(name, shape, 7))
    assert model(torch.zeros(2, *shape)).shape == (2, 7)


def test_conv_models_refuse_flat_input():
    with pytest.raises(ConfigError, match="needs image input"):
        build_model(zoo_arch("lenet-5", (64,), 10))


def test_lenet5_is_the_caffe_variant_on_mnist():
    model = build_model(zoo_arch("lenet-5", (1, 28, 28), 10))
    assert sum(p.numel() for p in model.parameters()) == 431_080  # Han et al.: 431K weights


def test_lenet_300_100_size():
    model = build_model(zoo_arch("lenet-300-100", (1, 28, 28), 10))
    assert sum(p.numel() for p in model.parameters()) == 266_610  # 267K weights


def test_checkpoint_roundtrip_rebuilds_model(tmp_path):
    arch = zoo_arch("mlp", (1, 8, 8), 10, widths=[16])
    model = build_model(arch)
    Checkpoint(arch, model.state_dict()).save(tmp_path / "c.pt")
    loaded = load_weights(tmp_path / "c.pt")
    assert isinstance(loaded, Checkpoint) and loaded.arch == arch
    rebuilt = loaded.build(TRUST)
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(rebuilt(x), model.eval()(x))


def test_plain_state_dict_and_mismatch(tmp_path):
    model = build_model(zoo_arch("mlp", (1, 8, 8), 10, widths=[16]))
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    sd = load_weights(tmp_path / "sd.pt")
    assert isinstance(sd, dict) and set(sd) == set(model.state_dict())
    other = zoo_arch("mlp", (1, 8, 8), 10, widths=[32])
    with pytest.raises(InputError, match="do not fit"):
        Checkpoint(other, sd).build(TRUST)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_with_code_is_refused(tmp_path):
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"w": Evil()}, f)
    with pytest.raises(InputError, match="pickled code"):
        load_weights(tmp_path / "evil.pt")


def test_not_a_state_dict(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(InputError, match="not a state dict"):
        load_weights(tmp_path / "list.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(InputError):
        load_weights(tmp_path / "junk.pt")
    with pytest.raises(InputError, match="does not exist"):
        load_weights(tmp_path / "missing.pt")


def test_factory_arch_errors():
    with pytest.raises(ConfigError):
        factory_arch("no_colon_here")
    with pytest.raises(InputError, match="cannot import"):
        build_model(factory_arch("not_a_module_xyz:make"), ModelTrust(frozenset({"not_a_module_xyz:make"})))


def _sentinel_factory_file(tmp_path, monkeypatch):
    """A module whose import leaves a trace: proof of whether edgec imported it."""
    (tmp_path / "evil_factory.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_name('imported').write_text('yes')\n"
        "import torch\ndef make(**kw):\n    return torch.nn.Linear(64, 10)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    arch = factory_arch("evil_factory:make")
    Checkpoint(arch, {"weight": torch.zeros(10, 64), "bias": torch.zeros(10)}).save(tmp_path / "ckpt.pt")
    return tmp_path / "ckpt.pt"


def test_checkpoint_naming_another_factory_is_refused_before_import(tmp_path, monkeypatch):
    path = _sentinel_factory_file(tmp_path, monkeypatch)
    ckpt = load_checkpoint(path)
    with pytest.raises(InputError, match="pass --model evil_factory:make"):
        ckpt.build(ModelTrust(frozenset({"mine:make"})))
    assert not (tmp_path / "imported").exists()
    model = ckpt.build(ModelTrust(frozenset({"evil_factory:make"})))  # named by the user: allowed
    assert isinstance(model, nn.Linear) and (tmp_path / "imported").exists()


def test_format_1_checkpoints_still_load(tmp_path):
    arch = zoo_arch("mlp", (1, 8, 8), 10, widths=[16])
    model = build_model(arch)
    torch.save({"format": "edgec-checkpoint", "format_version": 1, "arch": arch["base"], "state_dict": model.state_dict(),
                "masks": {}, "codebooks": {}}, tmp_path / "v1.pt")
    loaded = load_checkpoint(tmp_path / "v1.pt")
    assert loaded.arch == arch
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(loaded.build(TRUST)(x), model.eval()(x))


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(surprise=1), "not part of checkpoint format 2"),
    (lambda d: d.update(format_version=3), "upgrade edgec"),
    (lambda d: d["arch"].update(extra=1), "unexpected keys"),
    (lambda d: d["arch"]["edits"].append({"op": "exec", "path": "x", "module": {}}), "set_module edit"),
    (lambda d: d["arch"]["edits"].append({"op": "set_module", "path": "out",
                                          "module": {"type": "os.system", "args": {}}}), "does not build"),
    (lambda d: d["arch"]["base"]["kwargs"].update(widths=[10**9]), "do not fit"),
])
def test_tampered_checkpoints_are_refused(tmp_path, mutate, message):
    arch = zoo_arch("mlp", (1, 8, 8), 10, widths=[16])
    d = Checkpoint(arch, build_model(arch).state_dict()).to_dict()
    mutate(d)
    torch.save(d, tmp_path / "t.pt")
    with pytest.raises(InputError, match=message):
        load_checkpoint(tmp_path / "t.pt").build(TRUST)


def test_edits_rebuild_a_changed_model(tmp_path):
    """Widened, inserted and replaced modules, recorded as plain data and replayed on the base."""
    arch = zoo_arch("mlp", (1, 8, 8), 10, widths=[16])
    model = build_model(arch)
    model.hidden[0] = nn.Linear(64, 32)
    model.out = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    ckpt = Checkpoint(arch, model.state_dict()).with_model(model, TRUST)
    assert {e["path"] for e in ckpt.arch["edits"]} == {"hidden.0", "out"}
    ckpt.save(tmp_path / "c.pt")
    rebuilt = load_checkpoint(tmp_path / "c.pt").build(TRUST)
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(rebuilt(x), model.eval()(x))


def test_unrecordable_change_is_a_clear_error():
    arch = zoo_arch("mlp", (1, 8, 8), 10, widths=[16])
    model = build_model(arch)

    class Custom(nn.Module):
        def forward(self, x):
            return x

    model.out = Custom()
    with pytest.raises(ConfigError, match="cannot be recorded"):
        Checkpoint(arch, model.state_dict()).with_model(model, TRUST)
