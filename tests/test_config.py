import pytest

from edgec.config import Overrides, load_config, parse_config
from edgec.base.errors import ConfigError


def test_defaults_need_no_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, {})
    assert cfg.target == "rpi" and cfg.data.source == "digits"
    assert [s.id for s in cfg.stages] == ["train", "distill", "prune", "retrain", "share", "export"]
    assert [s.kind for s in cfg.stages] == [s.id for s in cfg.stages]


def test_file_then_cli_overrides(tmp_path):
    path = tmp_path / "edgec.toml"
    path.write_text('seed = 3\n[train]\nepochs = 4\nlr = 0.01\n')
    cfg = load_config(path, {"train.epochs": 9})
    train = cfg.stage("train").config
    assert cfg.seed == 3 and train.epochs == 9 and train.lr == 0.01


def test_edgec_toml_in_cwd_is_picked_up(tmp_path, monkeypatch):
    (tmp_path / "edgec.toml").write_text('target = "mobile"\n')
    monkeypatch.chdir(tmp_path)
    assert load_config(None, {}).target == "mobile"


@pytest.mark.parametrize(
    "text, message",
    [
        ("[train]\nepochz = 3\n", "stage 'train': unknown key 'epochz'"),
        ("colour = 'red'\n", "unknown key 'colour'"),
        ("[train]\nepochs = 0\n", "epochs"),
        ("stages = ['train', 'compile']\n", "unknown stage 'compile'"),
        ("[train\n", "not valid TOML"),
        ("[train]\nlr = inf\n", "lr"),
        ("seed = -1\n", "seed"),
        ("seed = 100000000000000000000\n", "seed"),
        ("[distill]\nepochz = 1\nstages = ['train']\n", "unknown key"),  # a section of a stage not listed is still checked
        ("[[stages]]\nkind = 'train'\n[[stages]]\nkind = 'prune'\nid = 'p'\nsparsity = 1.5\n", "stage 'p'"),
        ("[[stages]]\nkind = 'train'\nid = 'x'\n[[stages]]\nkind = 'prune'\nid = 'x'\n", "used twice"),
        ("[[stages]]\nkind = 'train'\nid = 'Bad Id'\n", "must be lowercase"),
        ("[[stages]]\nkind = 'compile'\n", "kind 'compile' is not a stage"),
        ("[[stages]]\nkind = 'train'\n[prune]\nsparsity = 0.5\n", "applies to the shorthand"),
        ("[[stages]]\nkind = 'train'\ndata = 'first'\n", "data 'first' is not declared"),
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


LIST_FORM = """
[[stages]]
kind = "train"
epochs = 5
[[stages]]
kind = "prune"
id = "prune-coarse"
sparsity = 0.5
[[stages]]
kind = "retrain"
[[stages]]
kind = "prune"
id = "prune-fine"
sparsity = 0.8
[[stages]]
kind = "retrain"
[[stages]]
kind = "export"
"""


def test_list_form_ids_and_overrides_by_id(tmp_path):
    path = tmp_path / "edgec.toml"
    path.write_text(LIST_FORM)
    cfg = load_config(path, Overrides({"prune-fine.sparsity": 0.9}, {"export": {"precision": "fp32"}}))
    assert [s.id for s in cfg.stages] == ["train", "prune-coarse", "retrain", "prune-fine", "retrain-2", "export"]
    assert cfg.stage("prune-fine").config.sparsity == 0.9 and cfg.stage("prune-coarse").config.sparsity == 0.5
    assert cfg.stage("export").config.precision == "fp32"
    with pytest.raises(ConfigError, match="no stage has id 'prune'"):
        load_config(path, {"prune.sparsity": 0.3})


def test_stage_selection_by_id_in_list_form(tmp_path):
    path = tmp_path / "edgec.toml"
    path.write_text(LIST_FORM)
    cfg = load_config(path, Overrides({}, {}, ["train", "export"]))
    assert [s.id for s in cfg.stages] == ["train", "export"]
    with pytest.raises(ConfigError, match="no stage with that id"):
        load_config(path, Overrides({}, {}, ["distill"]))


def test_canonical_form_round_trips():
    cfg = load_config(None, {"prune.sparsity": 0.7, "data.val_fraction": 0.2})
    canonical = cfg.canonical()
    prune = next(stage for stage in canonical["stages"] if stage["id"] == "prune")
    assert prune == {**prune, "kind": "prune", "sparsity": 0.7}
    again = parse_config({k: v for k, v in canonical.items() if k not in ("out", "cache_dir")})
    assert again.canonical()["stages"] == canonical["stages"]


def test_named_datasets():
    cfg = parse_config({
        "data": {"source": "digits", "first": {"classes": [0, 1, 2, 3, 4]}, "perm": {"permute": 3}},
        "stages": [{"kind": "train", "data": "first"}, {"kind": "train", "data": "perm"}],
    })
    assert cfg.data.named["first"].classes == [0, 1, 2, 3, 4] and cfg.data.named["perm"].permute == 3
    assert cfg.canonical()["data"]["first"]["classes"] == [0, 1, 2, 3, 4]
