import pickle

import pytest
import torch

from edgec.checkpoint import Checkpoint, build_model, factory_arch, load_weights, zoo_arch
from edgec.errors import ConfigError, InputError
from edgec.zoo import ZOO


@pytest.mark.parametrize("name", list(ZOO))
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
    rebuilt = loaded.build()
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(rebuilt(x), model.eval()(x))


def test_plain_state_dict_and_mismatch(tmp_path):
    model = build_model(zoo_arch("mlp", (1, 8, 8), 10, widths=[16]))
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    sd = load_weights(tmp_path / "sd.pt")
    assert isinstance(sd, dict) and set(sd) == set(model.state_dict())
    other = zoo_arch("mlp", (1, 8, 8), 10, widths=[32])
    with pytest.raises(InputError, match="do not fit"):
        Checkpoint(other, sd).build()


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
        build_model(factory_arch("not_a_module_xyz:make"))
