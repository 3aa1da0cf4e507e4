"""Piggyback (learn.method = "piggyback"): a frozen backbone, a learned binary mask per task.

Tiny data (scikit-learn digits: a backbone trained on all ten digits, then the tasks "a" = digits
0-4 and "b" = digits 5-9, each a mask plus a head), tiny MLPs, one torch thread, fixed seeds."""

import json
import shutil

import numpy as np
import pytest
import torch
from rich.console import Console

from edgec.base.architecture import ModelTrust
from edgec.base.data import load_dataset
from edgec.data_views import select_classes
from edgec.base.errors import ConfigError, InputError
from edgec.ondevice.tasks import decode_task_models
from edgec.ondevice.transport import TransportError
from edgec.pipeline.algorithms import continual as cl
from edgec.pipeline.algorithms import piggyback as pb
from edgec.pipeline.cache import StageCache
from edgec.pipeline.runner import check_chain, run_chain
from edgec.pipeline.source import make_source
from edgec.pipeline.stage import StageContext
from edgec.pipeline.algorithms.continual import task_model
from edgec.pipeline.stages.learn import LearnConfig, LearnStage
from edgec.pipeline.stages.train import TrainConfig, TrainStage
from support import run_cli

KEYS = {"epochs": 15, "patience": 15, "lr": 3e-3, "mask_lr": 1e-3}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data():
    digits = load_dataset("digits")
    return {"main": digits, "a": select_classes(digits, [0, 1, 2, 3, 4], "a"),
            "b": select_classes(digits, [5, 6, 7, 8, 9], "b")}


def context(data):
    return StageContext(data=data["main"], seed=0, target=None, console=Console(quiet=True), datasets=data,
                        tasks={"a": "a", "b": "b"})


def learn(task, method="piggyback", **keys):
    return LearnStage(LearnConfig(task=task, method=method, **{**KEYS, **keys}), f"learn-{task}")


@pytest.fixture(scope="module")
def steps(tmp_path_factory, data):
    """backbone (train on all digits) -> piggyback "a" -> piggyback "b"."""
    torch.set_num_threads(1)
    cache = StageCache(tmp_path_factory.mktemp("piggyback") / "cache")
    source = make_source("mlp", {"widths": [32]}, None, data["main"], 0, cache, ModelTrust())
    stages = [TrainStage(TrainConfig(epochs=15, patience=15, lr=3e-3), "train"), learn("a"), learn("b")]
    check_chain(stages, source, context(data), data)
    return run_chain(stages, source, context(data), cache, datasets=data)


def test_the_backbone_is_bit_identical_after_every_task(steps):
    trained = steps[0].artifact.checkpoint().state_dict
    for step in steps[1:]:
        ckpt = step.artifact.checkpoint()
        heads = ckpt.extensions["tasks"]["heads"]
        backbone = {n: t for n, t in ckpt.state_dict.items() if not cl.under_any(n.rsplit(".", 1)[0], [heads])}
        assert backbone and set(backbone) <= set(trained)
        for name, tensor in backbone.items():
            assert torch.equal(tensor, trained[name]), name


def test_masks_are_binary_learned_and_packed_one_bit_per_weight(steps):
    ckpt = steps[-1].artifact.checkpoint()
    pg = ckpt.extensions["piggyback"]
    assert pg["tasks"] == ["a", "b"]
    state = ckpt.state_dict
    for task in ("a", "b"):
        masks = pg["masks"][task]
        assert set(masks) == set(cl.prunable_weights(ckpt.build(ModelTrust()), ckpt.extensions["tasks"]["heads"]))
        for name, packed in masks.items():
            assert packed.dtype == torch.uint8 and packed.numel() == -(-state[name].numel() // 8)
        kept = (steps[-1] if task == "b" else steps[1]).artifact.info
        # the scores moved: some weights are masked out, most are kept
        assert 0.5 < kept["piggyback"]["kept"] < 1.0
    assert not all(torch.equal(pg["masks"]["a"][n], pg["masks"]["b"][n]) for n in pg["masks"]["a"])


def test_earlier_tasks_are_exactly_unchanged_by_a_new_task(steps, data):
    after_a, after_b = steps[1], steps[2]
    assert after_b.artifact.info["task_accuracy"]["a"] == after_a.artifact.info["task_accuracy"]["a"]
    assert after_a.artifact.info["task_accuracy"]["a"] > 0.9 and after_b.artifact.info["task_accuracy"]["b"] > 0.9
    x = torch.from_numpy(data["a"].to_input(data["a"].x_test))
    outs = []
    for step in (after_a, after_b):
        ckpt = step.artifact.checkpoint()
        model = task_model(ckpt.build(ModelTrust()), ckpt.extensions, "a").eval()
        a, b = ckpt.extensions["tasks"]["tasks"]["a"]["columns"]
        with torch.no_grad():
            outs.append(model(x)[:, a:b])
    assert torch.equal(outs[0], outs[1])


def test_mask_keep_keeps_more_weights(tmp_path, data, steps):
    """The keep penalty pulls pushed-down scores back to mask_init: the mask drops fewer weights."""
    cache = StageCache(tmp_path / "cache")
    source = make_source("mlp", {"widths": [32]}, None, data["main"], 0, cache, ModelTrust())
    stages = [TrainStage(TrainConfig(epochs=15, patience=15, lr=3e-3), "train"), learn("a", mask_keep=1e-3)]
    kept = run_chain(stages, source, context(data), cache, datasets=data)[-1].artifact.info["piggyback"]["kept"]
    plain = steps[1].artifact.info["piggyback"]["kept"]
    assert 1 - kept < (1 - plain) / 2, (kept, plain)


@pytest.fixture(scope="module")
def bias_steps(tmp_path_factory, data):
    """backbone -> piggyback "a" -> piggyback "b", each task training its own biases too."""
    torch.set_num_threads(1)
    cache = StageCache(tmp_path_factory.mktemp("piggyback-biases") / "cache")
    source = make_source("mlp", {"widths": [32]}, None, data["main"], 0, cache, ModelTrust())
    stages = [TrainStage(TrainConfig(epochs=15, patience=15, lr=3e-3), "train"),
              learn("a", task_biases=True), learn("b", task_biases=True)]
    return run_chain(stages, source, context(data), cache, datasets=data)


def test_task_biases_are_each_tasks_own_and_the_backbone_stays(bias_steps, data):
    backbone = bias_steps[0].artifact.checkpoint().state_dict
    ckpt = bias_steps[-1].artifact.checkpoint()
    biases = ckpt.extensions["piggyback"]["biases"]
    assert set(biases) == {"a", "b"} and set(biases["a"]) == {"hidden.0.bias"}
    assert torch.equal(ckpt.state_dict["hidden.0.bias"], backbone["hidden.0.bias"])  # the backbone never moves
    for t in ("a", "b"):
        assert not torch.equal(biases[t]["hidden.0.bias"], backbone["hidden.0.bias"])  # trained
    model = ckpt.build(ModelTrust())
    for t in ("a", "b"):
        own = task_model(model, ckpt.extensions, t)
        assert torch.equal(dict(own.named_parameters())["hidden.0.bias"], biases[t]["hidden.0.bias"])
        assert bias_steps[-1].artifact.info["task_accuracy"][t] > 0.9
    # task a is exactly what it was before task b learned its own biases
    assert bias_steps[2].artifact.info["task_accuracy"]["a"] == bias_steps[1].artifact.info["task_accuracy"]["a"]


def test_a_task_bias_that_does_not_fit_the_model_is_a_one_line_error(bias_steps):
    ckpt = bias_steps[-1].artifact.checkpoint()
    pg = ckpt.extensions["piggyback"]
    for bad in ({"hidden.0.bias": torch.zeros(7)}, {"out.nope": torch.zeros(32)}):
        with pytest.raises(InputError, match="does not match the model") as err:
            pb.apply_masks(ckpt.build(ModelTrust()), pg["masks"]["a"], bad)
        assert "\n" not in str(err.value)


def test_the_threshold_is_a_straight_through_estimator():
    scores = torch.tensor([0.0, 0.004, 0.006, 0.02], requires_grad=True)
    weight = torch.tensor([1.0, 2.0, 3.0, 4.0])
    keep = torch.tensor([True, False, False, False])
    masked = pb.masked_weight(scores, weight, 5e-3, keep)
    assert masked.tolist() == [1.0, 0.0, 3.0, 4.0]
    (masked * torch.tensor([1.0, -1.0, 2.0, 0.5])).sum().backward()
    assert scores.grad.tolist() == [1.0, -2.0, 6.0, 2.0]  # dL/d(masked weight) * weight, dropped or not
    w = torch.tensor([[0.1, -0.9, 0.2], [0.3, 0.0, -0.4]])
    assert pb.scale_keepers(w).tolist() == [[False, True, False], [False, False, True]]
    m = torch.rand(5, 7) > 0.5
    assert torch.equal(pb.unpack_mask(pb.pack_mask(m), m.shape), m)


def test_scores_in_units_of_mask_lr_over_lr_move_at_mask_lr():
    """One Adam step at the stage's lr moves every score (stored value x unit) by mask_lr, and the
    threshold and initial value are compared in the same units."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    view = pb.MaskedTaskView(layer, (0, 3), ["weight"], 1e-2, 5e-3, score_unit=0.1)  # mask_lr 1e-3 / lr 1e-2
    assert view.masks()["weight"].all() and view.keep_penalty().item() == 0.0
    opt = torch.optim.Adam(view.scores, lr=1e-2)
    view(torch.ones(2, 4)).sum().backward()
    opt.step()
    moved = (view.scores[0].detach() * 0.1 - 1e-2).abs()
    assert torch.allclose(moved, torch.full_like(moved, 1e-3), rtol=1e-3)
    with torch.no_grad():
        view.scores[0].fill_(0.04)  # score 4e-3, under the threshold: only each row's largest weight stays
    assert torch.equal(view.masks()["weight"], pb.scale_keepers(layer.weight))


def test_plan_refuses_foreign_keys_and_mixed_methods(tmp_path, data, steps):
    with pytest.raises(ValueError, match="mask_lr applies to method = \"piggyback\""):
        LearnConfig(task="a", method="packnet", mask_lr=1e-3)
    with pytest.raises(ValueError, match="prune applies to method = \"packnet\""):
        LearnConfig(task="a", method="piggyback", prune=0.5)
    after_a = steps[1].artifact
    with pytest.raises(ConfigError, match="learned with piggyback"):
        check_chain([LearnStage(LearnConfig(task="b", epochs=1), "finetune-b")], after_a, context(data), data)
    cache = StageCache(tmp_path / "cache")
    source = make_source("mlp", {"widths": [8]}, None, data["a"], 0, cache, ModelTrust())
    with pytest.raises(ConfigError, match="piggyback freezes the backbone"):
        check_chain([LearnStage(LearnConfig(task="a", epochs=1), "la"), learn("b")], source, context(data), data)
    with pytest.raises(ConfigError, match="already learned with piggyback"):
        check_chain([learn("a")], after_a, context(data), data)


def test_cli_refuses_a_foreign_key_before_training(tmp_path):
    config = tmp_path / "pg.toml"
    config.write_text(CONFIG.replace('mask_lr = 0.001', 'mask_lr = 0.001\nprune = 0.5', 1))
    proc = run_cli("build", "--config", config, "--target", "rpi", "--out", tmp_path / "out", cwd=tmp_path, check=2)
    assert "prune applies to method = \"packnet\"" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "rpi" / "bundle").exists()


CONFIG = """seed = 0
[data]
source = "digits"
[data.a]
classes = [0, 1, 2, 3, 4]
[data.b]
classes = [5, 6, 7, 8, 9]
[model]
name = "mlp"
args = { widths = [32] }
[[tasks]]
name = "a"
data = "a"
[[tasks]]
name = "b"
data = "b"
[[stages]]
kind = "train"
epochs = 15
lr = 0.003
[[stages]]
kind = "learn"
task = "a"
method = "piggyback"
epochs = 15
lr = 0.003
mask_lr = 0.001
[[stages]]
kind = "learn"
task = "b"
method = "piggyback"
epochs = 15
lr = 0.003
mask_lr = 0.001
task_biases = true  # b's own biases: its model file differs from the backbone's beyond the mask
[[stages]]
kind = "export"
"""


def test_cli_bundle_rebuilds_every_task_model_byte_for_byte(tmp_path):
    config = tmp_path / "pg.toml"
    config.write_text(CONFIG)
    run_cli("build", "--config", config, "--target", "rpi", "--out", tmp_path / "out", cwd=tmp_path)
    bundle = tmp_path / "out" / "rpi" / "bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    tasks = {t["name"]: t for t in manifest["tasks"]}
    assert tasks["a"]["model_file"] == "model.a.tflite" and tasks["b"]["model_file"] == "model.b.tflite"
    assert manifest["model_file"] == "model.tflite"  # the unmasked backbone, the payload's base
    tt = manifest["tasks_transport"]
    assert tt["model_files"] == ["model.a.tflite", "model.b.tflite"]
    payload = (bundle / tt["file"]).read_bytes()
    base = (bundle / "model.tflite").read_bytes()
    rebuilt = decode_task_models(payload, base)
    for name in tt["model_files"]:
        assert rebuilt[name] == (bundle / name).read_bytes()
    # two more task models cost a fraction of one model file: one bit per weight byte, compressed
    assert tt["bytes"] < len(base) / 3
    proc = run_cli("verify", bundle, "--json", "-", cwd=tmp_path)
    report = json.loads(proc.stdout)
    assert report["ok"], report["errors"]
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["tasks transport"]["ok"] and checks["task a: test_vectors"]["ok"] and checks["task b: test_vectors"]["ok"]
    for t in ("a", "b"):
        assert tasks[t]["metrics"]["accuracy"] > 0.9
    # a damaged payload is caught by verify
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    from edgec.pipeline.manifest import write_manifest

    damaged = bytearray(payload)
    damaged[-3] ^= 0xFF
    oversize = _with_header(payload, lambda h: h["files"][0].update(flip_count=10 ** 9))
    for hostile in (bytes(damaged), payload[:len(payload) // 2], oversize):
        (broken / tt["file"]).write_bytes(hostile)
        write_manifest(broken, json.loads((broken / "manifest.json").read_text()))
        proc = run_cli("verify", broken, "--json", "-", cwd=tmp_path, check=1)
        report = json.loads(proc.stdout)
        assert not report["ok"] and any("tasks transport" in e for e in report["errors"])
        assert "Traceback" not in proc.stderr


def test_bitmask_payload_round_trips_and_refuses_hostile_entries():
    rng = np.random.default_rng(0)
    base = rng.integers(1, 256, 4000, dtype=np.uint8)
    files = {}
    for i in range(3):
        f = base.copy()
        f[1000:3000][rng.random(2000) < 0.1] = 0  # masked weights
        f[10 + i] ^= 0x55  # a byte masking does not explain (an activation scale)
        files[f"model.t{i}.tflite"] = f.tobytes()
    files["other.bin"] = b"full file"
    payload = pb.encode_masked_models(base.tobytes(), "model.tflite", files)
    assert decode_task_models(payload, base.tobytes()) == files
    assert len(payload) < 4000  # three 4,000-byte files
    import lzma
    import struct

    from edgec.ondevice import tasks as fmt

    _, zlen, hlen = struct.unpack_from("<8sII", payload)
    header = json.loads(lzma.decompress(payload[16:16 + zlen], format=lzma.FORMAT_RAW, filters=fmt.header_filters()))
    header["files"][0]["index"] = 7  # out of range
    head = json.dumps(header).encode()
    zhead = lzma.compress(head, format=lzma.FORMAT_RAW, filters=fmt.header_filters())
    hostile = struct.pack("<8sII", fmt.TASKS_MAGIC, len(zhead), len(head)) + zhead + payload[16 + zlen:]
    with pytest.raises(TransportError, match="bitmask file entry is malformed"):
        decode_task_models(hostile, base.tobytes())


# --- the mask codec: flips against all ones or the previous mask --------------------------------------


def _payload_header(payload):
    import lzma
    import struct

    from edgec.ondevice import tasks as fmt

    _, zlen, _ = struct.unpack_from("<8sII", payload)
    header = json.loads(lzma.decompress(payload[16:16 + zlen], format=lzma.FORMAT_RAW, filters=fmt.header_filters()))
    return header, payload[16 + zlen:]


def _with_header(payload, edit):
    """``payload`` with its header changed by ``edit(header)`` (sections kept as they are)."""
    import lzma
    import struct

    from edgec.ondevice import tasks as fmt

    header, sections = _payload_header(payload)
    edit(header)
    head = json.dumps(header).encode()
    zhead = lzma.compress(head, format=lzma.FORMAT_RAW, filters=fmt.header_filters())
    return struct.pack("<8sII", fmt.TASKS_MAGIC, len(zhead), len(head)) + zhead + sections


def _masked_files(rng, base, drop, tasks=3):
    """Task files that zero a random ``drop`` share of the base's weight bytes 1000..end-1000."""
    files = {}
    for i in range(tasks):
        f = base.copy()
        body = f[1000:-1000]
        body[rng.random(len(body)) < drop] = 0
        f[10 + i] ^= 0x55  # a byte masking does not explain (an activation scale)
        files[f"model.t{i}.tflite"] = f.tobytes()
    return files


@pytest.mark.parametrize("coding", ["bits", "runs"])
def test_mask_codec_round_trips_every_density(coding):
    from edgec.ondevice import mask_codec

    rng = np.random.default_rng(1)
    for length, p in [(0, 0.0), (1, 1.0), (9, 0.5), (1000, 0.0), (1000, 1.0), (5001, 0.01), (5001, 0.4)]:
        flips = rng.random(length) < p
        flips[:1] = length > 0 and p == 1.0 or flips[:1]
        raw, count = mask_codec.encode(flips, coding)
        assert count == int(flips.sum()) and len(raw) <= mask_codec.max_coded_bytes(coding, count, length)
        assert np.array_equal(mask_codec.decode(raw, coding, count, length), flips)
    runs = mask_codec.encode(np.arange(3000) == 2999, "runs")[0]
    assert len(runs) == 12  # one flip after 2,999 kept positions: 11 full runs of 255 and the rest


def test_sparse_masks_cost_far_less_than_a_bit_per_weight():
    """Masks that drop 2% of 60,000 weight bytes: the coded flips take under 0.16 bit per weight
    (entropy 0.141; one raw bit per weight, LZMA-compressed, takes 0.199), and a task whose mask
    equals the previous task's costs a few bytes."""
    rng = np.random.default_rng(2)
    base = rng.integers(1, 256, 62000, dtype=np.uint8)
    files = _masked_files(rng, base, 0.02)
    files["model.t3.tflite"] = files["model.t2.tflite"]  # the same mask again
    payload = pb.encode_masked_models(base.tobytes(), "model.tflite", files)
    assert decode_task_models(payload, base.tobytes()) == files
    header, _ = _payload_header(payload)
    entries = [f for f in header["files"] if f["mode"] == "bitmask"]
    assert [e["ref"] for e in entries][:3] == ["ones"] * 3 and entries[3]["ref"] == "previous"
    assert entries[3]["flip_count"] == 0 and entries[3]["flips"][1] < 16
    weights = 60000
    for e in entries[:3]:
        assert e["flips"][1] * 8 / weights < 0.16, e  # compressed bytes of the coded flips
    assert len(payload) * 8 / (3 * weights) < 0.18


def test_masks_that_drop_large_weights_are_coded_in_magnitude_order():
    """A task that drops large weights far more often than small ones (as learned masks do): its
    flips, grouped by the base byte's |int8| (``order = "magnitude"``), code smaller than in file
    order, the payload says so, and the files decode exactly."""
    from edgec.ondevice import mask_codec
    from edgec.pipeline.algorithms.transport_codec import compress_section

    rng = np.random.default_rng(4)
    base = rng.integers(-127, 128, 40000).astype(np.int8).view(np.uint8)
    base[base == 0] = 1
    files = {}
    for i in range(2):
        f = base.copy()
        mags = np.abs(base.view(np.int8).astype(np.int16))
        f[rng.random(len(f)) < np.where(mags >= 64, 0.08, 0.002)] = 0
        files[f"model.t{i}.tflite"] = f.tobytes()
    payload = pb.encode_masked_models(base.tobytes(), "model.tflite", files)
    assert decode_task_models(payload, base.tobytes()) == files
    entries = [f for f in _payload_header(payload)[0]["files"] if f["mode"] == "bitmask"]
    assert {e["order"] for e in entries} == {"magnitude"}
    flips = np.frombuffer(files["model.t0.tflite"], dtype=np.uint8) == 0
    in_file_order = min(len(compress_section(mask_codec.encode(flips, c)[0])[0]) for c in mask_codec.CODINGS)
    assert entries[0]["flips"][1] < 0.9 * in_file_order


def _files_with_rescaled_scales(rng, tasks=3):
    """A base whose bytes 8000..9024 are 256 float32 scales, and task files that drop some weight
    bytes and hold those scales times their own ratio (as a task's bias scales follow its activation
    scale), with a few scales off the ratio (the residual must correct them)."""
    base = rng.integers(1, 256, 12000, dtype=np.uint8)
    scales = rng.uniform(1e-4, 1e-2, 256).astype(np.float32)
    base[8000:9024] = scales.view(np.uint8)
    files = {}
    for i in range(tasks):
        f = base.copy()
        f[1000:7000][rng.random(6000) < 0.03] = 0
        own = (scales * np.float32(0.3 + 0.2 * i)).astype(np.float32)
        own[:3] *= np.float32(1.5)
        f[8000:9024] = own.view(np.uint8)
        files[f"model.t{i}.tflite"] = f.tobytes()
    return base, files


def test_scales_that_follow_one_ratio_are_predicted_from_the_base():
    """The residual of a run of scales that are the base's times one ratio is zeros and last bits,
    not 1 KiB of random bytes per task: the payload names the run and its ratio and decodes exactly."""
    rng = np.random.default_rng(5)
    base, files = _files_with_rescaled_scales(rng)
    payload = pb.encode_masked_models(base.tobytes(), "model.tflite", files)
    assert decode_task_models(payload, base.tobytes()) == files
    header, _ = _payload_header(payload)
    for i, e in enumerate(f for f in header["files"] if f["mode"] == "bitmask"):
        assert [run[:2] for run in e["scaled"]] == [[8000, 256]]
        assert e["scaled"][0][2] == pytest.approx(0.3 + 0.2 * i, rel=1e-6)
    assert header["bit_residuals"][1] < 3 * 1024 // 4  # compressed residuals of three tasks


def test_hostile_scaled_runs_are_one_line_errors():
    rng = np.random.default_rng(6)
    base, files = _files_with_rescaled_scales(rng, tasks=1)
    payload = pb.encode_masked_models(base.tobytes(), "model.tflite", files)
    for scaled in ([[8001, 256, 0.5]], [[8000, 0, 0.5]], [[8000, -2, 0.5]], [[11996, 2, 0.5]],
                   [[8000, 256, float("nan")]], [[8000, 256, "0.5"]], [[8000, 256]], [[True, 256, 0.5]],
                   [[8000, 256, float("inf")]], {"start": 8000}, [[8000, 10 ** 12, 0.5]]):
        hostile = _with_header(payload, lambda h: h["files"][0].update(scaled=scaled))
        with pytest.raises(TransportError, match="scaled words are malformed") as err:
            decode_task_models(hostile, base.tobytes())
        assert "\n" not in str(err.value)


def test_hostile_mask_entries_are_one_line_errors():
    rng = np.random.default_rng(3)
    base = rng.integers(1, 256, 12000, dtype=np.uint8)
    files = _masked_files(rng, base, 0.05, tasks=2)
    payload = pb.encode_masked_models(base.tobytes(), "model.tflite", files)
    positions = sum(b - a for a, b in _payload_header(payload)[0]["regions"])  # bits in each mask

    def entry(**keys):
        def edit(header):
            header["files"][0].update(keys)
        return edit

    def section(raw, coding, count, ref="ones"):
        """A payload whose first file's flips are ``raw`` (an extra section appended)."""
        from edgec.pipeline.algorithms.transport_codec import compress_section

        header, sections = _payload_header(payload)
        z, spec = compress_section(raw)
        return _with_header(payload, entry(flips=[len(sections), *spec], coding=coding, flip_count=count, ref=ref)) + z

    cases = {
        "malformed": [_with_header(payload, entry(flip_count=positions + 1)),  # more flips than positions
                      _with_header(payload, entry(flip_count=-1)),
                      _with_header(payload, entry(flip_count=True)),
                      _with_header(payload, entry(coding="zstd")),
                      _with_header(payload, entry(ref="previous")),  # no earlier mask
                      _with_header(payload, entry(ref=["ones"])),
                      _with_header(payload, entry(order="sorted")),  # an order the decoder does not know
                      _with_header(payload, entry(order=["magnitude"]))],
        "too large": [section(b"\0" * (positions + 100), "runs", 5)],  # longer than 5 flips can be
        "flip runs do not give": [section(bytes(6), "runs", 5),  # 6 flips declared as 5
                                  section(b"\xff" * (positions // 255) + bytes([positions % 255]), "runs", 1)],  # outside the mask
        "packed mask has the wrong length": [section(bytes(positions // 8 - 1), "bits", 0)],
        "does not hold its declared": [section(np.packbits(np.arange(positions) < 3).tobytes(), "bits", 2)],
        "tasks payload|damaged|outside the payload": [payload[:len(payload) // 2], payload[:20]],
    }
    for why, payloads in cases.items():
        for hostile in payloads:
            with pytest.raises(TransportError, match=why) as err:
                decode_task_models(hostile, base.tobytes())
            assert "\n" not in str(err.value)
