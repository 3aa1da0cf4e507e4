"""Quantization-aware training: the qat stage, its record in the checkpoint, and the int8 exporters that use it."""

import json

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
import torch
from rich.console import Console
from torch import nn

from edgec.base.data import load_dataset
from edgec.base.errors import ConfigError, ExportError, InputError
from edgec.pipeline.algorithms.sharing import assignments_for, cluster_weights
from edgec.pipeline.cache import StageCache
from edgec.pipeline.runner import check_chain, run_chain
from edgec.pipeline.stage import StageContext
from edgec.pipeline.stages.export import ExportConfig, ExportStage
from edgec.pipeline.stages.prune import PruneConfig, PruneStage
from edgec.pipeline.stages.qat import QatConfig, QatStage
from edgec.pipeline.stages.retrain import RetrainConfig, RetrainStage
from edgec.pipeline.stages.share import ShareConfig, ShareStage
from edgec.pipeline.stages.train import TrainConfig, TrainStage
from edgec.targets.profile import load_target
from edgec.pipeline.extensions import QAT_EXT as QAT_EXTENSION
from edgec.targets.qat import QATModel, convert_qat, prepare_qat, qat_extension, restore_qat, weight_bits_for
from support import run_cli, zoo_source


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(nn.functional.relu6(self.bn(self.conv(x))), 1), 1))


def _trained_graph():
    torch.manual_seed(0)
    model, x = ConvBN(), torch.randn(64, 1, 8, 8)
    graph = prepare_qat(model, x[:1])
    trainee = QATModel(graph).train()
    opt = torch.optim.Adam(graph.parameters(), 1e-2)
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(trainee(x), torch.arange(64) % 4).backward()
        opt.step()
    trainee.eval()
    model.load_state_dict(trainee.trained_state(model))
    return model, graph, x


def test_prepared_graph_keeps_parameter_names_and_restores_exactly():
    model, graph, x = _trained_graph()
    assert {n for n, _ in graph.named_parameters()} == {n for n, _ in model.named_parameters()}
    restored = restore_qat(model, x[:1], qat_extension(graph, per_channel=True))
    with torch.no_grad():
        assert torch.equal(restored(x), graph(x))  # same weights, same trained ranges: the same fake-quantized model
        # BatchNorm folded, fake-quantizers turned into quantize/dequantize with the same parameters: the same
        # numbers (fused fake-quantizers computed weight scales as max/127.5 where convert uses max/127)
        torch.testing.assert_close(convert_qat(restored)(x), graph(x), rtol=0, atol=1e-5)


def test_a_damaged_or_foreign_qat_record_is_refused():
    model, graph, x = _trained_graph()
    good = qat_extension(graph, per_channel=True)
    name = next(k for k in good["state"] if k.endswith(".scale"))
    bad_records = [
        {"state": good["state"]},  # no per_channel
        {"per_channel": True, "state": {k: v for k, v in good["state"].items() if k != name}},
        {"per_channel": True, "state": {**good["state"], name: torch.ones(1000)}},
        {"per_channel": True, "state": {**good["state"], name: torch.full_like(good["state"][name], float("nan"))}},
        {"per_channel": True, "state": {**good["state"], name: "1.0"}},
        *({**good, "weight_bits": bits} for bits in (True, 9, 0, "7", 7.0, None)),
        "not a record",
    ]
    for record in bad_records:
        with pytest.raises(ExportError, match="qat record"):
            restore_qat(model, x[:1], record)


def test_qat_trains_on_the_weight_grid_of_the_targets_export_and_onnx_refuses_another(tmp_path):
    from edgec.targets.onnx_export import export_onnx

    assert (weight_bits_for("tflite"), weight_bits_for("onnx")) == (8, 7)
    model, graph, x = _trained_graph()  # 8-bit weights, as for TFLite
    with pytest.raises(ExportError, match="trained with 8-bit weights; the ONNX int8 route needs 7"):
        export_onnx(model, x[:1], tmp_path / "m.onnx", precision="int8", qat=qat_extension(graph, per_channel=True))
    seven = prepare_qat(model, x[:1], weight_bits=7)
    with torch.no_grad():
        seven(x)
    record = qat_extension(seven, per_channel=True, weight_bits=7)
    info = export_onnx(model, x[:1], tmp_path / "m.onnx", precision="int8", qat=record)
    assert info.conversion["weight_bits"] == 7
    # the float weights are quantized in the graph, then clipped to the trained grid before their DequantizeLinear
    g = onnx.load(info.path).graph
    constants = {t.name: int(onnx.numpy_helper.to_array(t)) for t in g.initializer if not t.dims}
    weight_q = {n.output[0] for n in g.node if n.op_type == "QuantizeLinear" and n.input[0].endswith(".weight")}
    clips = [n for n in g.node if n.op_type == "Clip" and n.input[0] in weight_q]
    assert len(clips) == 2 and all((constants[c.input[1]], constants[c.input[2]]) == (-63, 63) for c in clips)


def test_assignments_are_recovered_from_fine_tuned_unsorted_codebooks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    with torch.no_grad():
        model[0].weight[0, :4] = 0
    codebooks, assignments = cluster_weights(model, bits=2)
    flipped = {"0.weight": codebooks["0.weight"].flip(0)}  # centroids that crossed while fine-tuning
    with torch.no_grad():
        model[0].weight.copy_(torch.where(assignments["0.weight"] >= 0, codebooks["0.weight"][assignments["0.weight"].clamp(min=0)], 0.0))
    recovered = assignments_for(model, flipped)["0.weight"]
    assert torch.equal(recovered < 0, assignments["0.weight"] < 0)
    assert torch.equal(torch.where(recovered >= 0, flipped["0.weight"][recovered.clamp(min=0)], 0.0), model[0].weight)
    with torch.no_grad():
        model[0].weight[1, 1] += 0.123
    with pytest.raises(InputError, match="not all values of its codebook"):
        assignments_for(model, flipped)


# --- the stage, through the pipeline ----------------------------------------------------------------


@pytest.fixture(scope="module")
def pruned_and_shared(tmp_path_factory):
    """cnn-small (conv + BatchNorm) on the digits: trained, pruned and weight-shared (seconds)."""
    data = load_dataset("digits")
    cache = StageCache(tmp_path_factory.mktemp("cache"))
    source = zoo_source(cache, "cnn-small", data, channels=[16, 32])
    ctx = StageContext(data=data, seed=0, target=load_target("rpi"), console=Console(quiet=True))
    steps = run_chain([TrainStage(TrainConfig(epochs=10, patience=10)), PruneStage(PruneConfig(steps=1)),
                       RetrainStage(RetrainConfig(epochs=4)), ShareStage(ShareConfig(epochs=2))], source, ctx, cache)
    return steps[2].artifact, steps[3].artifact, ctx, cache


def test_qat_keeps_masks_and_codebooks_and_rpi_int8_ships_its_ranges(pruned_and_shared):
    _, shared, ctx, cache = pruned_and_shared
    qat_step, export_step = run_chain([QatStage(QatConfig(epochs=2)), ExportStage(ExportConfig())], shared, ctx, cache)
    before, after = shared.checkpoint(), qat_step.artifact.checkpoint()
    model = after.build(ctx.trust)
    for name, param in model.named_parameters():
        if name in after.masks:  # pruned weights stayed exactly zero
            assert not param[~after.masks[name]].any()
        if name in after.codebooks:  # every weight is one of its layer's (fine-tuned) shared values
            values = torch.unique(param[param != 0])
            assert len(values) <= len(before.codebooks[name]) and torch.isin(values, after.codebooks[name]).all()
    assert any(not torch.equal(before.codebooks[n], after.codebooks[n]) for n in before.codebooks)  # it trained
    assert set(after.extensions[QAT_EXTENSION]) == {"per_channel", "weight_bits", "state"}
    assert after.extensions[QAT_EXTENSION]["weight_bits"] == 8  # TFLite's grid
    manifest = json.loads((export_step.artifact.path / "manifest.json").read_text())
    assert manifest["conversion"]["quantization_aware_training"] is True
    assert "prepare_qat_pt2e" in manifest["conversion"]["tool"] and "calibration_samples" not in manifest["conversion"]
    info = export_step.artifact.info
    assert info["top1_agreement"] >= 0.99 and info["accuracy"] > 0.85


def test_desktop_gpu_int8_is_qdq_onnx_from_the_same_training(pruned_and_shared):
    pruned, _, ctx, cache = pruned_and_shared
    gpu = StageContext(data=ctx.data, seed=0, target=load_target("desktop-gpu"), console=ctx.console)
    qat_step, export_step = run_chain([QatStage(QatConfig(epochs=2)), ExportStage(ExportConfig(precision="int8"))],
                                      pruned, gpu, cache)
    manifest = json.loads((export_step.artifact.path / "manifest.json").read_text())
    assert manifest["conversion"]["quantization_aware_training"] is True and "QDQ" in manifest["conversion"]["tool"]
    ops = {node.op_type for node in onnx.load(export_step.artifact.path / "model.onnx").graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    assert export_step.artifact.info["top1_agreement"] >= 0.99
    assert qat_step.artifact.checkpoint().extensions[QAT_EXTENSION]["weight_bits"] == 7  # the ONNX route's grid
    masks = qat_step.artifact.checkpoint().masks
    model = qat_step.artifact.checkpoint().build(ctx.trust)
    assert all(not p[~masks[n]].any() for n, p in model.named_parameters() if n in masks)


def test_qat_plan_errors_cost_no_training(pruned_and_shared):
    pruned, _, ctx, _ = pruned_and_shared
    with pytest.raises(ConfigError, match="comes after qat stage .qat.; qat must be the last stage before export") as e:
        check_chain([QatStage(QatConfig()), RetrainStage(RetrainConfig()), ExportStage(ExportConfig())], pruned, ctx)
    assert e.value.exit_code == 2 and "stage 'retrain'" in str(e.value)
    with pytest.raises(ConfigError, match="export.per_channel = true but the qat stage trained per_channel = false"):
        check_chain([QatStage(QatConfig(per_channel=False)), ExportStage(ExportConfig())], pruned, ctx)
    check_chain([QatStage(QatConfig(per_channel=False)), ExportStage(ExportConfig(per_channel=False))], pruned, ctx)


def test_build_with_qat_through_the_cli(tmp_path):
    (tmp_path / "edgec.toml").write_text(
        '[model]\nname = "cnn-small"\nargs = { channels = [8, 16] }\n'
        '[[stages]]\nkind = "train"\nepochs = 8\n'
        '[[stages]]\nkind = "qat"\nepochs = 1\n'
        '[[stages]]\nkind = "export"\n'
    )
    out = json.loads(run_cli("build", "--target", "rpi", "--json", cwd=tmp_path).stdout)
    assert [s["kind"] for s in out["stages"]] == ["train", "qat", "export"]
    bundle = (tmp_path / out["build_dir"]) / "bundle"
    assert json.loads((bundle / "manifest.json").read_text())["conversion"]["quantization_aware_training"] is True
    run_cli("verify", bundle, cwd=tmp_path)
    bad = run_cli("build", "--target", "rpi", "--set", "qat.per_channel=false", cwd=tmp_path, check=2)
    assert "per_channel" in bad.stderr and "run    " not in bad.stdout + bad.stderr


def test_qat_reference_is_the_fake_quantized_model():
    """What an int8 export of a QAT model must reproduce is its fake-quantized graph, not the float weights."""
    model, graph, x = _trained_graph()
    with torch.no_grad():
        fake_quantized, float_outputs = graph(x), model.eval()(x)
    assert not torch.allclose(fake_quantized, float_outputs)
    np.testing.assert_array_equal(restore_qat(model, x[:1], qat_extension(graph, True))(x).detach().numpy(),
                                  fake_quantized.numpy())


def test_qat_regression_bundle(tmp_path):
    """Tasks other than classification train through the same fake quantization (their own loss)."""
    (tmp_path / "edgec.toml").write_text(
        'task = "regression"\n[data]\nsource = "diabetes"\n[model]\nname = "mlp"\nargs = { widths = [32, 16] }\n'
        '[[stages]]\nkind = "train"\nepochs = 30\n[[stages]]\nkind = "qat"\nepochs = 2\n[[stages]]\nkind = "export"\n'
    )
    out = json.loads(run_cli("build", "--target", "rpi", "--json", cwd=tmp_path).stdout)
    export = out["stages"][-1]["info"]
    manifest = json.loads((tmp_path / out["build_dir"] / "bundle" / "manifest.json").read_text())
    assert manifest["conversion"]["quantization_aware_training"] is True
    assert export["r2"] > 0.2 and "quantization-aware trained" in " ".join(out["reached_bundle"])


@pytest.mark.parametrize("name", ["mobilenet_v3_block", "shufflenet_v2", "efficientnet_mbconv"])
def test_mobile_architectures_export_their_qat_ranges_on_both_routes(name, tmp_path):
    """hardswish, squeeze-excite gates, SiLU, channel shuffle and concat, Dropout heads: QAT-trained, then int8
    TFLite and QDQ ONNX each reproduce the fake-quantized model (the parity the export gate asks for)."""
    from fixtures.edge_models import FACTORIES

    from edgec.ondevice.runtimes import open_model
    from edgec.targets.onnx_export import export_onnx
    from edgec.targets.tflite_export import export_tflite

    data = load_dataset("digits")
    resize = lambda raw: nn.functional.interpolate(torch.from_numpy(data.to_input(raw)), size=(16, 16), mode="bilinear")  # noqa: E731
    x, y, x_test = resize(data.x_train), torch.from_numpy(data.y_train), resize(data.x_test)
    torch.manual_seed(0)
    model = FACTORIES[name](input_shape=(1, 16, 16), num_classes=10)

    def train(module, params, epochs, lr):
        torch.manual_seed(0)  # the same batches whatever ran before (prepare_qat draws random pattern inputs once)
        opt = torch.optim.Adam(params, lr)
        module.train()
        for _ in range(epochs):
            for idx in torch.randperm(len(x)).split(32):
                opt.zero_grad()
                nn.functional.cross_entropy(module(x[idx]), y[idx]).backward()
                opt.step()
        module.eval()

    train(model, model.parameters(), 8, 3e-3)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    step = None
    for exporter, fmt, runtime, file in ((export_tflite, "tflite", "tflite", "m.tflite"),
                                         (export_onnx, "onnx", "onnxruntime", "m.onnx")):
        model.load_state_dict(trained)  # each route fine-tunes on its own weight grid (8 bits; 7 for ONNX)
        bits = weight_bits_for(fmt)
        graph = prepare_qat(model, x[:1], weight_bits=bits)
        trainee = QATModel(graph)
        train(trainee, graph.parameters(), 1, 1e-4)
        model.load_state_dict(trainee.trained_state(model))
        record = qat_extension(graph, per_channel=True, weight_bits=bits)
        with torch.no_grad():
            logits = restore_qat(model, x[:1], record)(x_test).numpy()
        reference = logits.argmax(1)
        assert (reference == data.y_test).mean() > 0.6  # trained, not near chance
        top2 = np.sort(logits, axis=1)[:, -2:]
        info = exporter(model, x[:1], tmp_path / file, precision="int8", qat=record)
        assert info.conversion["quantization_aware_training"] is True
        step = step or info.outputs[0]["quantization"]["scale"]  # the int8 output step (TFLite's int8 output)
        runner = open_model(str(info.path), runtime, io_meta={"input": info.inputs[0], "output": info.outputs[0]})
        try:
            outputs = runner.run_model_input(x_test.numpy())
        finally:
            runner.close()
        # The file computes the fake-quantized model up to integer rounding (int32 biases, fixed-point requantization,
        # the runtime's own kernels): a prediction may differ only where the top two logits are a few output steps apart.
        differ = outputs.argmax(1) != reference
        assert differ.mean() <= 0.02 and (top2[differ, 1] - top2[differ, 0] <= 3 * step).all(), (name, runtime)
