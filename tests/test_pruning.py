import pytest
import torch
from torch import nn

from edgec.base.errors import ConfigError, InputError
from edgec.pipeline.algorithms.pruning import (
    GlobalSparsity,
    LayerSparsity,
    MaskEnforcer,
    ThresholdPruning,
    apply_masks,
    compute_masks,
    prunable_parameters,
    sparsity_report,
    sparsity_schedule,
)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc1 = nn.Linear(4 * 6 * 6, 20)
        self.fc2 = nn.Linear(20, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(x)))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


@pytest.fixture
def net():
    torch.manual_seed(0)
    return Net()


def test_prunable_parameters_are_conv_and_linear_weights(net):
    assert list(prunable_parameters(net)) == ["conv1.weight", "fc1.weight", "fc2.weight"]
    with pytest.raises(ConfigError, match="no Conv1d, Conv2d or Linear"):
        prunable_parameters(nn.Sequential(nn.ReLU()))


def test_layer_sparsity_by_name_and_type_prunes_the_smallest(net):
    masks = compute_masks(net, LayerSparsity({"linear": 0.5, "fc2": 0.25}))
    assert set(masks) == {"fc1.weight", "fc2.weight"}  # conv1 is not named: left alone
    assert int((~masks["fc1.weight"]).sum()) == 1440  # 50% of 144 * 20
    assert int((~masks["fc2.weight"]).sum()) == 15  # the name wins over the type: 25% of 60
    w = net.fc1.weight.detach().abs()
    assert w[~masks["fc1.weight"]].max() <= w[masks["fc1.weight"]].min()


def test_global_sparsity_uses_one_threshold(net):
    masks = compute_masks(net, GlobalSparsity(0.8))
    weights = prunable_parameters(net)
    total = sum(w.numel() for w in weights.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.8 * total)
    kept = min(weights[n].detach().abs()[m].min() for n, m in masks.items())
    pruned = max(weights[n].detach().abs()[~m].max() for n, m in masks.items())
    assert pruned <= kept


def test_threshold_is_quality_times_std(net):
    masks = compute_masks(net, ThresholdPruning({"fc1": 1.0}))
    w = net.fc1.weight.detach()
    assert torch.equal(masks["fc1.weight"], w.abs() >= w.std())
    assert set(masks) == {"fc1.weight"}
    assert set(compute_masks(net, ThresholdPruning(0.5))) == {"conv1.weight", "fc1.weight", "fc2.weight"}


def test_pruned_weights_never_come_back(net):
    first = compute_masks(net, LayerSparsity({"fc1": 0.5}))
    apply_masks(net, first)
    with torch.no_grad():  # a pruned weight grows large; a later round must not revive it
        net.fc1.weight.view(-1)[torch.nonzero(~first["fc1.weight"].view(-1))[0]] = 100.0
    second = compute_masks(net, LayerSparsity({"fc1": 0.7}), existing_masks=first)
    assert not torch.any(second["fc1.weight"] & ~first["fc1.weight"])
    assert int((~second["fc1.weight"]).sum()) == round(0.7 * 2880)
    # A target below what earlier rounds pruned keeps the earlier mask.
    third = compute_masks(net, LayerSparsity({"fc1": 0.1}), existing_masks=second)
    assert torch.equal(third["fc1.weight"], second["fc1.weight"])


def test_apply_masks_writes_positive_zeros(net):
    masks = compute_masks(net, LayerSparsity({"fc1": 0.9}))
    apply_masks(net, masks)
    pruned = net.fc1.weight.detach()[~masks["fc1.weight"]]
    assert torch.all(pruned.view(torch.int32) == 0)  # +0.0, not -0.0: the transport codec is bit exact


def test_mask_enforcer_keeps_zeros_through_sgd_momentum_and_weight_decay(net):
    torch.manual_seed(1)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 3, (32,))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    for _ in range(3):  # momentum built up before pruning would revive pruned weights
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    masks = compute_masks(net, GlobalSparsity(0.7))
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    with MaskEnforcer(net, masks) as enforcer:
        for _ in range(5):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            for name, param in prunable_parameters(net).items():
                assert torch.all(param.grad[~masks[name]] == 0)
            opt.step()
            enforcer.reapply()
            for name, param in prunable_parameters(net).items():
                assert torch.all(param.detach()[~masks[name]] == 0)
    for name, param in prunable_parameters(net).items():
        kept = masks[name]
        assert not torch.equal(param.detach()[kept], before[name][kept])  # the survivors did train
    # After remove(), gradients flow to every weight again.
    opt.zero_grad()
    nn.functional.cross_entropy(net(x), y).backward()
    assert torch.any(net.fc1.weight.grad[~masks["fc1.weight"]] != 0)


def test_sparsity_schedule_cubic_and_linear():
    cubic = sparsity_schedule(0.9, 4)
    assert cubic == pytest.approx([0.9 - 0.9 * 0.75**3, 0.9 - 0.9 * 0.5**3, 0.9 - 0.9 * 0.25**3, 0.9])
    assert all(a < b for a, b in zip(cubic, cubic[1:]))
    assert sparsity_schedule(0.8, 4, initial=0.4, kind="linear") == pytest.approx([0.5, 0.6, 0.7, 0.8])
    assert sparsity_schedule(0.5, 1) == [0.5]


def test_sparsity_report(net):
    masks = compute_masks(net, LayerSparsity({"fc2": 0.5}))
    apply_masks(net, masks)
    report = sparsity_report(net, masks)
    rows = {row["layer"]: row for row in report["layers"]}
    assert rows["fc2.weight"] == {"layer": "fc2.weight", "params": 60, "nonzero": 30, "sparsity": 0.5}
    assert rows["conv1.weight"]["nonzero"] == 36
    assert report["total"]["params"] == 36 + 2880 + 60
    assert report["total"]["nonzero"] == 36 + 2880 + 30


@pytest.mark.parametrize("value", [1.0, -0.1, 1.5, "0.5", True])
def test_bad_sparsity_names_the_value(value):
    with pytest.raises(ConfigError, match=repr(value).replace(".", r"\.")):
        LayerSparsity({"fc1": value})
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        GlobalSparsity(value)


def test_bad_quality_and_schedule():
    with pytest.raises(ConfigError, match="-1"):
        ThresholdPruning(-1)
    with pytest.raises(ConfigError, match="steps"):
        sparsity_schedule(0.9, 0)
    with pytest.raises(ConfigError, match="above the final"):
        sparsity_schedule(0.5, 3, initial=0.6)
    with pytest.raises(ConfigError, match="'cubic' or 'linear'"):
        sparsity_schedule(0.5, 3, kind="exp")


def test_unknown_layer_names_it_and_lists_valid_names(net):
    with pytest.raises(ConfigError) as info:
        compute_masks(net, LayerSparsity({"fc9": 0.5}))
    assert "'fc9'" in str(info.value) and "conv1, fc1, fc2" in str(info.value)
    with pytest.raises(ConfigError, match="'bn'"):  # not prunable, so not a valid layer name
        compute_masks(net, ThresholdPruning({"bn": 1.0}))


def test_masks_that_do_not_fit_the_model(net):
    with pytest.raises(InputError, match="fc3.weight"):
        apply_masks(net, {"fc3.weight": torch.ones(3, 20, dtype=torch.bool)})
    with pytest.raises(InputError, match="shape"):
        compute_masks(net, GlobalSparsity(0.5), existing_masks={"fc2.weight": torch.ones(20, 3, dtype=torch.bool)})
