import copy

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from torch import nn

from edgec.base.errors import ConfigError, InputError
from edgec.pipeline.algorithms.pruning import LayerSparsity, apply_masks, compute_masks, prunable_parameters
from edgec.pipeline.algorithms.sharing import CentroidTrainer, apply_sharing, cluster_weights, resolve_bits


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc1 = nn.Linear(4 * 6 * 6, 50)
        self.fc2 = nn.Linear(50, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(x)))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


@pytest.fixture
def pruned():
    torch.manual_seed(0)
    net = Net()
    masks = compute_masks(net, LayerSparsity({"fc1": 0.8, "fc2": 0.5}))
    apply_masks(net, masks)
    return net, masks


def distinct_nonzero(t: torch.Tensor) -> int:
    return len(torch.unique(t[t != 0]))


def test_bits_defaults_and_overrides(pruned):
    net, _ = pruned
    assert resolve_bits(net) == {"conv1.weight": 8, "fc1.weight": 5, "fc2.weight": 5}
    assert resolve_bits(net, 3) == {"conv1.weight": 3, "fc1.weight": 3, "fc2.weight": 3}
    assert resolve_bits(net, {"linear": 4, "fc2": 2}) == {"conv1.weight": 8, "fc1.weight": 4, "fc2.weight": 2}


@pytest.mark.parametrize("bits", [0, 9, 2.5, True, "4"])
def test_bad_bits_names_the_value(pruned, bits):
    with pytest.raises(ConfigError, match="1 to 8") as info:
        resolve_bits(pruned[0], {"fc1": bits})
    assert repr(bits) in str(info.value)


def test_unknown_layer_in_bits(pruned):
    with pytest.raises(ConfigError, match="'fc7'.*conv1, fc1, fc2"):
        cluster_weights(pruned[0], {"fc7": 4})


def test_clustering_keeps_zeros_and_at_most_k_values(pruned):
    net, masks = pruned
    codebooks, assignments = cluster_weights(net, {"fc1": 3, "fc2": 2, "conv": 4})
    for name, k in {"conv1.weight": 16, "fc1.weight": 8, "fc2.weight": 4}.items():
        assert len(codebooks[name]) == k and codebooks[name].dtype == torch.float32
        assert torch.all(codebooks[name][1:] > codebooks[name][:-1])  # sorted, no wasted entry
    for name, weight in prunable_parameters(net).items():
        assert torch.equal(assignments[name] >= 0, weight.detach() != 0)
    before = copy.deepcopy(net.state_dict())
    apply_sharing(net, codebooks, assignments)
    for name, weight in prunable_parameters(net).items():
        assert distinct_nonzero(weight.detach()) <= len(codebooks[name])
        assert torch.all(weight.detach()[~masks.get(name, torch.ones_like(weight, dtype=torch.bool))] == 0)
    # Each weight moved to its nearest centroid.
    w, c = before["fc1.weight"], codebooks["fc1.weight"]
    nearest = (w[w != 0][:, None] - c[None, :]).abs().argmin(1)
    assert torch.equal(nearest, assignments["fc1.weight"][w != 0])


def test_lloyd_matches_scikit_learn_with_linear_init():
    torch.manual_seed(3)
    layer = nn.Linear(100, 40)
    codebooks, _ = cluster_weights(layer, 3)
    x = layer.weight.detach().double().numpy().reshape(-1, 1)
    init = np.linspace(x.min(), x.max(), 8).reshape(-1, 1)
    reference = KMeans(8, init=init, n_init=1, tol=0, max_iter=300).fit(x).cluster_centers_.ravel()
    np.testing.assert_allclose(codebooks["weight"].numpy(), np.sort(reference), rtol=1e-5)


def test_few_distinct_values_are_kept_exactly():
    layer = nn.Linear(4, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.5, 0.0, -0.25, 0.5], [0.0, 0.0, 0.75, -0.25]]))
    codebooks, assignments = cluster_weights(layer, 2)
    assert codebooks["weight"].tolist() == [-0.25, 0.5, 0.75]
    assert assignments["weight"].tolist() == [[1, -1, 0, 1], [-1, -1, 2, 0]]


def test_centroid_fine_tuning(pruned):
    net, masks = pruned
    codebooks, assignments = cluster_weights(net, {"linear": 3, "conv": 4})
    torch.manual_seed(1)
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 3, (64,))

    # The centroid gradient is the sum of the gradients of the weights in its cluster (Han fig. 3).
    plain = copy.deepcopy(net)
    apply_sharing(plain, codebooks, assignments)
    nn.functional.cross_entropy(plain(x), y).backward()
    trainer = CentroidTrainer(net, codebooks, assignments)
    nn.functional.cross_entropy(net(x), y).backward()
    for name, weight in prunable_parameters(plain).items():
        expected = torch.stack([weight.grad[assignments[name] == j].sum() for j in range(len(codebooks[name]))])
        torch.testing.assert_close(trainer.centroids[name].grad, expected)
        assert dict(net.named_parameters())[name].grad is None  # the weight's own gradient is consumed

    bias_before = net.fc1.bias.detach().clone()
    opt = torch.optim.SGD(trainer.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        trainer.write_back()
        for name, weight in prunable_parameters(net).items():
            w = weight.detach()
            assert distinct_nonzero(w) <= len(codebooks[name])
            assert torch.equal(w != 0, assignments[name] >= 0)  # zeros stay zero
            if name in masks:
                assert torch.all(w[~masks[name]] == 0)
    assert not torch.equal(net.fc1.bias, bias_before)  # biases trained by the same optimizer
    tuned = trainer.codebooks()
    assert not torch.equal(tuned["fc1.weight"], codebooks["fc1.weight"])

    # codebooks() follows the weights, e.g. after a training loop restored an earlier epoch.
    snapshot = copy.deepcopy(net.state_dict())
    opt.zero_grad()
    nn.functional.cross_entropy(net(x), y).backward()
    opt.step()
    trainer.write_back()
    net.load_state_dict(snapshot)
    check = copy.deepcopy(net)
    apply_sharing(check, trainer.codebooks(), assignments)
    for name in codebooks:
        assert torch.equal(dict(check.named_parameters())[name], dict(net.named_parameters())[name])
    trainer.remove()


def test_centroid_trainer_parameters_exclude_shared_weights(pruned):
    net, _ = pruned
    codebooks, assignments = cluster_weights(net)
    with CentroidTrainer(net, codebooks, assignments) as trainer:
        ids = {id(p) for p in trainer.parameters()}
        assert not any(id(w) in ids for w in prunable_parameters(net).values())
        assert id(net.fc1.bias) in ids and id(net.bn.weight) in ids
        assert all(id(c) in ids for c in trainer.centroids.values())
    nn.functional.cross_entropy(net(torch.randn(2, 1, 8, 8)), torch.tensor([0, 1])).backward()
    assert net.fc1.weight.grad is not None  # hooks removed: ordinary gradients again


def test_inconsistent_sharing_inputs(pruned):
    net, _ = pruned
    codebooks, assignments = cluster_weights(net, 2)
    with pytest.raises(InputError, match="outside"):
        apply_sharing(net, codebooks, {**assignments, "fc2.weight": assignments["fc2.weight"] + 4})
    with pytest.raises(InputError, match="differ"):
        CentroidTrainer(net, codebooks, {"fc1.weight": assignments["fc1.weight"]})
