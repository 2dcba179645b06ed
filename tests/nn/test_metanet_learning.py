"""GMN and UNF learn something real: a held-out property of random MLPs.

The task: predict a random ReLU MLP's output at a fixed probe input from its weights. The
test networks have their hidden units shuffled; the flat-MLP baseline sees the same data
and the same budget. Both metanetworks must cut its test error by more than half.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch_geometric.data import Batch

from converters import from_state_dict
from metanet import to_graph
from metanet.nn import GMN, FlatMLP, UNFLinear, UNFPointwise, UNFPool

HIDDEN, N, N_TRAIN = 16, 800, 500


def _network(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = 0.5 + 1.5 * torch.rand(1, generator=g).item()
    return {
        "0.weight": torch.randn(HIDDEN, 1, generator=g) * s,
        "0.bias": torch.randn(HIDDEN, generator=g) * s,
        "2.weight": torch.randn(1, HIDDEN, generator=g) * s / HIDDEN**0.5,
        "2.bias": torch.randn(1, generator=g) * 0.1,
    }


def _output_at_probe(w, probe: float = 0.5) -> torch.Tensor:
    h = torch.relu(probe * w["0.weight"][:, 0] + w["0.bias"])
    return (h @ w["2.weight"][0] + w["2.bias"]).squeeze()


@pytest.fixture(scope="module")
def task():
    nets = [_network(i) for i in range(N)]
    space = from_state_dict(nets[0], "mlp")
    y = torch.stack([_output_at_probe(w) for w in nets])
    y = (y - y[:N_TRAIN].mean()) / y[:N_TRAIN].std()
    gen = torch.Generator().manual_seed(1)
    test = [space.apply(w, space.random_element(gen)) for w in nets[N_TRAIN:]]
    # shuffling really changes the test weights, and not the target
    assert not torch.equal(test[0]["0.weight"], nets[N_TRAIN]["0.weight"])
    assert torch.allclose(_output_at_probe(test[0]), _output_at_probe(nets[N_TRAIN]), atol=1e-5)
    return space, nets[:N_TRAIN], test, y


def _fit(model, forward, train, test, y, steps=400, batch=64, lr=3e-3) -> float:
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr)
    gen = torch.Generator().manual_seed(2)
    for _ in range(steps):
        idx = torch.randint(0, N_TRAIN, (batch,), generator=gen)
        loss = ((forward(model, train, idx) - y[idx]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return ((forward(model, test, None) - y[N_TRAIN:]) ** 2).mean().item()


def _stack(space, nets):
    return {k: torch.stack([w[k] for w in nets]) for k in space.tensors}


def _dict_forward(model, data, idx):
    return model({k: v[idx] for k, v in data.items()} if idx is not None else data).reshape(-1)


class UNFRegressor(nn.Module):
    def __init__(self, space, channels=16):
        super().__init__()
        self.l1, self.l2 = UNFLinear(space, 1, channels), UNFLinear(space, channels, channels)
        self.act, self.pool = UNFPointwise(), UNFPool(space, channels)
        self.head = nn.Sequential(
            nn.Linear(self.pool.out_features, 64), nn.ReLU(), nn.Linear(64, 1)
        )

    def forward(self, weights):
        x = {k: v.unsqueeze(1) for k, v in weights.items()}
        return self.head(self.pool(self.act(self.l2(self.act(self.l1(x))))))


def test_unf_and_gmn_beat_the_flat_mlp(task):
    space, train, test, y = task
    torch.manual_seed(0)
    flat = _fit(
        FlatMLP(space, hidden=128), _dict_forward, _stack(space, train), _stack(space, test), y
    )
    torch.manual_seed(0)
    unf = _fit(UNFRegressor(space), _dict_forward, _stack(space, train), _stack(space, test), y)

    graphs = [to_graph(space, w) for w in train]
    test_batch = Batch.from_data_list([to_graph(space, w) for w in test])

    def graph_forward(model, data, idx):
        batch = Batch.from_data_list([data[i] for i in idx.tolist()]) if idx is not None else data
        return model(batch).reshape(-1)

    torch.manual_seed(0)
    gmn_model = GMN(graphs[0].x.shape[1], graphs[0].edge_attr.shape[1], hidden=16, layers=2)
    gmn = _fit(gmn_model, graph_forward, graphs, test_batch, y)
    print(f"test MSE (target variance 1): flat {flat:.3f}, UNF {unf:.3f}, GMN {gmn:.3f}")
    assert flat > 0.5  # the baseline does not solve it
    assert unf < 0.5 * flat
    assert gmn < 0.5 * flat
