import pytest

from edgec.config import load_config
from edgec.errors import ConfigError


def test_defaults_need_no_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, {})
    assert cfg.target == "rpi" and cfg.data.source == "digits"
    assert cfg.stages == ["train", "prune", "retrain", "share", "distill", "export"]


def test_file_then_cli_overrides(tmp_path):
    path = tmp_path / "edgec.toml"
    path.write_text('seed = 3\n[train]\nepochs = 4\nlr = 0.01\n')
    cfg = load_config(path, {"train.epochs": 9})
    assert cfg.seed == 3 and cfg.train.epochs == 9 and cfg.train.lr == 0.01


def test_edgec_toml_in_cwd_is_picked_up(tmp_path, monkeypatch):
    (tmp_path / "edgec.toml").write_text('target = "mobile"\n')
    monkeypatch.chdir(tmp_path)
    assert load_config(None, {}).target == "mobile"


@pytest.mark.parametrize(
    "text, message",
    [
        ("[train]\nepochz = 3\n", "unknown key 'train.epochz'"),
        ("colour = 'red'\n", "unknown key 'colour'"),
        ("[train]\nepochs = 0\n", "train.epochs"),
        ("stages = ['train', 'compile']\n", "unknown stage 'compile'"),
        ("[train\n", "not valid TOML"),
    ],
)
def test_bad_config_files(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path, {})


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", {})
