"""Symmetry teleportation: exact actions from the WeightSpace, teleports, the wrapper."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

from converters import from_module
from tasks.datasets import digits
from tasks.optim.teleport import (
    Action,
    Teleport,
    act,
    canonicalize_scale,
    group_actions,
    teleport,
)
from tests.fixtures.architectures import entry


def _space(model, inputs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return from_module(model, inputs)


def _random_params(actions, gen):
    out = []
    for a in actions:
        if a.kind == "scale":
            out.append(torch.randn(a.size, generator=gen, dtype=torch.float64))
        else:
            noise = torch.randn(a.size, a.size, generator=gen, dtype=torch.float64)
            out.append(torch.eye(a.size, dtype=torch.float64) + 0.3 * noise / a.size**0.5)
    return out


@pytest.mark.parametrize(
    "name, kind, count",
    [
        ("mlp", "scale", 2),
        ("cnn_bn", "scale", 4),
        ("resnet20", "scale", 12),
        ("vgg11_bn", "scale", 9),
        ("unet", "scale", 8),
        ("lstm_lm", "gl", 1),
        ("gru_seq2seq", "gl", 2),
    ],
)
def test_exact_actions_preserve_the_function(name, kind, count):
    """All of a model's exact actions at once, random elements, float64: same outputs."""
    e = entry(name)
    model = e.build().double().eval()
    inputs = tuple(x.double() if x.is_floating_point() else x for x in e.inputs())
    space = _space(e.build(), e.inputs())
    actions = group_actions(model, space, inputs).of_kind("scale", "gl")
    assert sum(a.kind == kind for a in actions) == count
    w = {k: v.detach() for k, v in model.state_dict().items()}
    if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        gen = torch.Generator().manual_seed(9)  # real statistics, not the 0/1 defaults
        for k in w:
            if "running_var" in k:
                w[k] = torch.rand(w[k].shape, generator=gen, dtype=torch.float64) + 0.5
            elif "running_mean" in k:
                w[k] = torch.randn(w[k].shape, generator=gen, dtype=torch.float64)
    ref = functional_call(model, w, inputs)
    ref = ref[0] if isinstance(ref, tuple) else ref
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        moved = dict(w)
        for a, p in zip(actions, _random_params(actions, gen)):
            moved = act(moved, a, p)
        assert any(not torch.equal(moved[k], w[k]) for k in w)
        out = functional_call(model, moved, inputs)
        out = out[0] if isinstance(out, tuple) else out
        assert float((out - ref).abs().max() / ref.abs().max()) < 1e-9


def test_data_dependent_gl_is_exact_on_its_batch_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.LeakyReLU(0.1), nn.Linear(16, 3)).double()
    space = _space(model, torch.randn(2, 6, dtype=torch.float64))
    found = group_actions(model, space, torch.randn(4, 6).double(), kinds=("scale", "data"))
    (data,) = found.of_kind("data")
    assert not data.exact and "data-dependent" in data.describe()
    x, other = torch.randn(16, 6, dtype=torch.float64), torch.randn(16, 6, dtype=torch.float64)
    w = {k: v.detach() for k, v in model.state_dict().items()}
    z = x @ w["0.weight"].T + w["0.bias"]
    m = torch.eye(16, dtype=torch.float64) + 0.3 * torch.randn(16, 16, dtype=torch.float64) / 4
    moved = act(w, data, m, z, nn.LeakyReLU(0.1))
    same = functional_call(model, moved, (x,)) - model(x)
    assert float(same.abs().max()) < 1e-9  # batch == width: exact on the batch
    off = functional_call(model, moved, (other,)) - model(other)
    assert float(off.abs().max()) > 1e-3  # and only there


@pytest.fixture(scope="module")
def digits_mlp():
    d = digits.load().flat()
    torch.manual_seed(0)
    model = digits.mlp(32, 3)
    return d, model, _space(model, d.x_train[:2])


@pytest.mark.parametrize("objective", ["grad_norm", "curvature", "sharpness"])
def test_teleport_raises_the_objective_and_keeps_the_loss(digits_mlp, objective):
    d, model, space = digits_mlp
    batch = (d.x_train[:64], d.y_train[:64])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = teleport(model, space, batch, objective=objective, steps=8, lr=0.1)
    assert r.accepted, r.reason
    assert r.objective_after > r.objective_before
    assert abs(r.loss_after - r.loss_before) <= 1e-4 * r.loss_before
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])  # the model is not modified
    if objective == "grad_norm":
        m2 = digits.mlp(32, 3)
        m2.load_state_dict(r.weights)
        for net in (model, m2):
            net.zero_grad()
            nn.functional.cross_entropy(net(batch[0]), batch[1]).backward()
        norm = [sum(float((p.grad**2).sum()) for p in net.parameters()) for net in (model, m2)]
        assert norm[1] > 1.5 * norm[0]


def test_teleport_rejects_a_move_that_changes_the_loss(digits_mlp):
    d, model, space = digits_mlp
    # a "scale" action that forgets the readers: not a symmetry
    bogus = Action("scale", "layers", 32, [("0.weight", 0), ("0.bias", 0)], [])
    r = teleport(model, space, (d.x_train[:64], d.y_train[:64]), actions=[bogus], steps=5)
    assert not r.accepted and "loss moved" in r.reason
    assert all(torch.equal(r.weights[k], v) for k, v in model.state_dict().items())


def _leaky(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.LeakyReLU(0.1), nn.Linear(16, 3))


@pytest.mark.parametrize("kinds", [("scale",), ("data",)])
def test_teleport_rejects_non_finite_weights_without_raising(kinds):
    """A diverged run (NaN weights) must not crash the wrapper: the teleport is rejected,
    says why, and hands the weights back untouched."""
    model = _leaky()
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    space = _space(model, x[:2])
    actions = group_actions(model, space, x[:4], kinds=kinds)
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    r = teleport(model, space, (x, y), actions=actions, steps=3)
    assert not r.accepted and "non-finite" in r.reason
    assert torch.equal(r.weights["2.weight"], model[2].weight.detach())


def test_ascent_that_leaves_the_finite_region_keeps_the_last_finite_point():
    """The objective turns NaN mid-ascent (as a diverging ascent does): the teleport stops
    there instead of stepping on NaN gradients, and what it returns is finite."""
    model = _leaky(1)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    space = _space(model, x[:2])
    calls = []

    def objective(loss, grads):
        # the start and the first ascent point: finite; the second: NaN; later calls
        # (after the stop, the reported value at the kept point) finite and higher
        calls.append(1)
        g2 = sum((g * g).sum() for g in grads.values())
        return g2 * {1: 1.0, 2: 1.0, 3: float("nan")}.get(len(calls), 2.0)

    r = teleport(model, space, (x, y), objective=objective, steps=5, lr=0.1)
    assert r.accepted, r.reason  # stepping on the NaN gradient would have made it NaN
    assert all(torch.isfinite(p).all() for p in r.params.values())
    assert all(torch.isfinite(v).all() for v in r.weights.values())


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        lambda p: torch.optim.Adam(p, lr=1e-3),
        lambda p: torch.optim.Adagrad(p, lr=0.01),
        lambda p: torch.optim.RMSprop(p, lr=1e-3),
    ],
    ids=["sgd", "adam", "adagrad", "rmsprop"],
)
def test_wrapper_works_with_any_optimizer(make, digits_mlp):
    d, _, space = digits_mlp
    torch.manual_seed(1)
    model = digits.mlp(32, 3)
    opt = Teleport(make(model.parameters()), model, space, every=5, steps=4, max_ratio=2.0)
    losses = []
    for step in range(12):
        x, y = d.x_train[step * 64 : (step + 1) * 64], d.y_train[step * 64 : (step + 1) * 64]
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step((x, y))
        losses.append(float(loss))
    assert [e["step"] for e in opt.log] == [5, 10] and all(e["accepted"] for e in opt.log)
    assert all(v == v for v in losses)
    # scale teleports transform the optimizer's state rather than dropping it
    assert all(opt.optimizer.state[p] for p in model.parameters())


def test_optimizer_state_follows_a_scale_teleport(digits_mlp):
    d, _, space = digits_mlp
    torch.manual_seed(2)
    model = digits.mlp(32, 3)
    sgd = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    opt = Teleport(sgd, model, space, every=0, steps=3)
    x, y = d.x_train[:64], d.y_train[:64]
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    w0 = model[0].weight
    buf = sgd.state[w0]["momentum_buffer"].clone()
    result = opt.teleport((x, y))
    (a,) = [
        a
        for a in opt.actions
        if a.group == space.tensors["0.weight"].axes[0].groups[0] and a.kind == "scale"
    ]
    s = result.params[a.group + ":scale"].exp()
    torch.testing.assert_close(sgd.state[w0]["momentum_buffer"], buf / s[:, None])


def test_scale_canonical_form(digits_mlp):
    d, model, space = digits_mlp
    actions = group_actions(model, space, d.x_train[:4]).of_kind("scale")
    w = {k: v.detach().double() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(3)
    moved = dict(w)
    for a, p in zip(actions, _random_params(actions, gen)):
        moved = act(moved, a, p)
    c1, c2 = canonicalize_scale(w, space, actions), canonicalize_scale(moved, space, actions)
    for k in w:
        torch.testing.assert_close(c1[k], c2[k], rtol=1e-9, atol=1e-12)
    rows = torch.cat([c1["0.weight"], c1["0.bias"][:, None]], 1).norm(dim=1)
    torch.testing.assert_close(rows, torch.ones(32, dtype=torch.float64))
    net = digits.mlp(32, 3).double()
    x = d.x_test.double()
    out = [functional_call(net, ww, (x,)) for ww in (w, c1)]
    torch.testing.assert_close(out[0], out[1], rtol=1e-9, atol=1e-9)


def test_max_ratio_bounds_the_objective(digits_mlp):
    d, model, space = digits_mlp
    batch = (d.x_train[:64], d.y_train[:64])
    for steps in (1, 3):
        r = teleport(model, space, batch, steps=steps, lr=0.05, max_ratio=1.1)
        assert r.objective_after <= 1.1 * r.objective_before * (1 + 1e-6)


def test_sharpness_is_the_top_hessian_eigenvalue():
    """The Lanczos estimate equals the dense Hessian's largest eigenvalue (float64), and
    a flattening teleport lowers that eigenvalue, measured densely, at an unchanged loss."""
    from torch.func import hessian

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3))
    model = model.double()
    x = torch.randn(40, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (40,))
    space = _space(model, x)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]

    def top_eig(weights):
        flat = torch.cat([weights[n].reshape(-1) for n in names]).detach()

        def loss(v):
            parts = dict(
                zip(
                    names, (t.view(s) for t, s in zip(v.split([s.numel() for s in shapes]), shapes))
                )
            )
            return nn.functional.cross_entropy(functional_call(model, parts, (x,)), y)

        return float(torch.linalg.eigvalsh(hessian(loss)(flat))[-1]), float(loss(flat))

    r = teleport(model, space, (x, y), objective="sharpness", steps=10, lr=0.05)
    assert r.accepted, r.reason
    before, loss0 = top_eig(dict(model.named_parameters()))
    after, loss1 = top_eig(r.weights)
    assert abs(-r.objective_before - before) < 1e-6 * before
    assert abs(-r.objective_after - after) < 1e-6 * after
    assert after < (1 - 1e-3) * before  # estimates are good to 1e-6: a real decrease
    assert abs(loss1 - loss0) < 1e-12


def test_scaling_teleports_on_trained_zoo_cnns():
    """CNNs trained by the zoo's own recipes: exact scaling keeps every output (float64,
    < 1e-9 relative) and a grad-norm teleport raises the gradient at an unchanged loss."""
    import dataclasses

    from tasks.datasets import zoo

    d = digits.load()
    # recipes with lr <= 0.02 (the zoo's larger ones can kill every ReLU in 60 steps, and a
    # dead network has no gradient for a teleport to raise)
    recipes = [zoo.sample_hparams(s) for s in range(20)]
    hps = [dataclasses.replace(h, batch_size=64, steps=60) for h in recipes if h.lr <= 0.02][:3]
    trained = zoo.train_cnns(hps, d)
    x = d.x_test[:200].double()
    for b in range(len(hps)):
        model = zoo.zoo_cnn().double().eval()
        model.load_state_dict({k: v[b].double() for k, v in trained.items()})
        space = _space(zoo.zoo_cnn(), d.x_train[:2])
        actions = group_actions(model, space, x[:8])
        assert [a.kind for a in actions] == ["scale", "scale"]
        w = {k: v.detach() for k, v in model.state_dict().items()}
        ref = model(x)
        gen = torch.Generator().manual_seed(b)
        moved = dict(w)
        for a, p in zip(actions, _random_params(actions, gen)):
            moved = act(moved, a, p)
        out = functional_call(model, moved, (x,))
        assert float((out - ref).abs().max() / ref.abs().max()) < 1e-9
        batch = (x[:64], d.y_test[:64])
        r = teleport(model, space, batch, objective="grad_norm", steps=5, lr=0.1, actions=actions)
        assert r.accepted, r.reason
        assert r.objective_after > r.objective_before
        assert abs(r.loss_after - r.loss_before) <= 1e-9 * max(1.0, r.loss_before)
