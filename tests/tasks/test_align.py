"""Alignment and merging (tasks.align, tasks.merge): exactness on the zoo, real barriers."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from converters import from_module
from tasks.align import (
    AlignmentError,
    MatchLog,
    activation_matching,
    check_same_architecture,
    ste_matching,
    verify_aligned,
    weight_matching,
)
from tasks.datasets import digits
from tasks.merge import (
    average,
    evaluator,
    interpolate,
    loss_barrier,
    merge_many,
    plot_barriers,
    repair,
    repair_batchnorm,
    task_arithmetic,
    ties_merge,
)
from tests.fixtures.architectures import ZOO, entry

SMALL_ZOO = [e.name for e in ZOO if not e.name.startswith("hf_minilm")]


def _perturbed(model: nn.Module, seed: int = 0) -> dict:
    """float64 state dict with norm scales/biases moved off their init (no accidental ties)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            v = v.double() + 0.1 * torch.randn(v.shape, generator=gen, dtype=torch.float64)
            if "running_var" in k:
                v = v.abs() + 0.5
        out[k] = v
    return out


@pytest.mark.parametrize("name", SMALL_ZOO)
def test_weight_matching_undoes_a_random_element(name):
    """b = g·a: weight matching recovers a exactly, and the aligned b is b's function."""
    e = entry(name)
    model = e.build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        space = from_module(model, e.inputs())
    a = _perturbed(model)
    g = space.random_element(torch.Generator().manual_seed(1))
    b = space.apply(a, g)
    log = MatchLog()
    h = weight_matching(space, a, b, log=log)
    aligned = space.apply(b, h)
    for k in a:
        assert torch.equal(aligned[k], a[k]), k
    assert log.objective[-1] > log.objective[0]
    assert verify_aligned(model, b, aligned, e.inputs()) < 1e-9


def test_heads_are_matched_as_heads_and_within_heads():
    e = entry("vit_tiny")
    space = from_module(e.build(), e.inputs())
    inner = [n for n, grp in space.groups.items() if grp.within]
    assert inner, "vit_tiny has per-head groups"
    a = _perturbed(e.build())
    g = space.random_element(torch.Generator().manual_seed(3))
    h = weight_matching(space, a, space.apply(a, g))
    # h undoes g on every group, the per-head rows included
    ident = space.compose(g, h)
    for n, v in ident.items():
        assert torch.equal(v, space.identity()[n]), n


def test_mismatched_architectures_name_the_tensor():
    a = digits.mlp(32, 2).state_dict()
    b = digits.mlp(16, 2).state_dict()
    space = from_module(digits.mlp(32, 2), torch.randn(2, 64))
    with pytest.raises(AlignmentError, match=r"tensor '0\.weight'.*\(16, 64\)"):
        check_same_architecture(space, a, b)
    with pytest.raises(AlignmentError, match="0.weight"):
        weight_matching(space, a, b)


def test_verify_aligned_refuses_a_wrong_permutation():
    model = digits.mlp(16, 2)
    w = model.state_dict()
    bad = dict(w)
    bad["0.weight"] = w["0.weight"].flip(0)  # rows moved without the next layer's columns
    with pytest.raises(AlignmentError, match="refusing"):
        verify_aligned(model, w, bad, torch.randn(8, 64))


@pytest.mark.parametrize("name", ["mlp", "cnn_bn"])
def test_activation_matching_undoes_a_random_element(name):
    e = entry(name)
    model_a = e.build().eval()
    space = from_module(model_a, e.inputs())
    model_a.load_state_dict({k: v.float() for k, v in _perturbed(model_a).items()})
    g = space.random_element(torch.Generator().manual_seed(2))
    model_b = e.build().eval()
    model_b.load_state_dict(space.apply(model_a.state_dict(), g))
    data = [torch.randn(64, *e.inputs()[0].shape[1:]) for _ in range(4)]
    h = activation_matching(model_a, model_b, space, data)
    aligned = space.apply(model_b.state_dict(), h)
    for k, v in model_a.state_dict().items():
        assert torch.equal(aligned[k], v), k


@pytest.fixture(scope="module")
def digit_mlps():
    """Two 3×512 ReLU MLPs trained on digits from different seeds (the issue's setting)."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    d = digits.load().flat()
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(digits.train(digits.mlp(512, 3), d, epochs=8, batch_size=128, seed=seed))
    return d, models


def test_weight_matching_removes_most_of_the_barrier(digit_mlps):
    d, (ma, mb) = digit_mlps
    a, b = ma.state_dict(), mb.state_dict()
    space = from_module(ma, d.x_train[:2])
    test = evaluator(ma, digits.batches(d.x_test, d.y_test), accuracy=True)
    naive = loss_barrier(test, a, b, alphas=5)
    g = weight_matching(space, a, b)
    aligned = loss_barrier(test, a, space.apply(b, g), alphas=5)
    assert naive.barrier > 0.2  # the pair really has a barrier
    assert aligned.barrier <= 0.2 * naive.barrier, (naive.barrier, aligned.barrier)
    assert aligned.extra["metric1"][2] > 0.9  # the merged midpoint classifies digits


def test_ste_returns_an_element_that_beats_naive(digit_mlps):
    d, (ma, mb) = digit_mlps
    a, b = ma.state_dict(), mb.state_dict()
    space = from_module(ma, d.x_train[:2])
    train = digits.batches(d.x_train[:512], d.y_train[:512], 128)
    log = MatchLog()
    g = ste_matching(ma, space, a, b, train, epochs=1, log=log)
    assert len(log.objective) == 4 and all(v == v for v in log.objective)
    test = evaluator(ma, digits.batches(d.x_test, d.y_test))
    assert (
        loss_barrier(test, a, space.apply(b, g), alphas=[0, 0.5, 1]).barrier
        < loss_barrier(test, a, b, alphas=[0, 0.5, 1]).barrier
    )
    assert torch.equal(a["0.weight"], ma.state_dict()["0.weight"])  # inputs untouched


def test_merge_many_of_relabelled_copies_is_the_model():
    e = entry("cnn_bn")
    model = e.build()
    space = from_module(model, e.inputs())
    w = _perturbed(model)
    copies = [
        space.apply(w, space.random_element(torch.Generator().manual_seed(s))) for s in (5, 6, 7)
    ]
    merged, elements = merge_many(copies, space)
    ref = space.apply(copies[0], elements[0])
    for k, v in merged.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, ref[k], rtol=0, atol=1e-12)
    assert verify_aligned(model, w, merged, e.inputs()) < 1e-9


def test_interpolate_average_and_task_vectors():
    a = {"w": torch.tensor([0.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([2.0, 0.0]), "n": torch.tensor(5)}
    mid = interpolate(a, b, 0.25)
    assert torch.equal(mid["w"], torch.tensor([0.5, 1.5])) and int(mid["n"]) == 3
    assert torch.equal(average([a, b])["w"], torch.tensor([1.0, 1.0]))
    base = {"w": torch.zeros(4)}
    t1 = {"w": torch.tensor([3.0, -1.0, 0.1, 2.0])}
    t2 = {"w": torch.tensor([1.0, 2.0, -0.2, -4.0])}
    assert torch.equal(
        task_arithmetic(base, [t1, t2], 0.5)["w"], torch.tensor([2.0, 0.5, -0.05, -1.0])
    )
    # TIES, density 1/2: t1 keeps {3, 2}, t2 keeps {2, -4}; signs: +, +, 0, -;
    # disjoint means: 3, 2, 0, -4
    assert torch.equal(
        ties_merge(base, [t1, t2], density=0.5)["w"], torch.tensor([3.0, 2.0, 0.0, -4.0])
    )


def test_repair_batchnorm_recomputes_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 2))
    w = model.state_dict()
    x = torch.randn(300, 5) * 3 + 1
    fixed = repair_batchnorm(model, w, [x[:150], x[150:]])
    h = x @ w["0.weight"].T + w["0.bias"]
    torch.testing.assert_close(fixed["1.running_mean"], h.mean(0), rtol=1e-4, atol=1e-5)
    # the cumulative average of the per-batch (unbiased) variances, as BatchNorm keeps them
    per_batch = 0.5 * (h[:150].var(0) + h[150:].var(0))
    torch.testing.assert_close(fixed["1.running_var"], per_batch, rtol=1e-4, atol=1e-5)
    assert torch.equal(w["1.running_mean"], torch.zeros(7))  # input untouched


def test_repair_restores_interpolated_statistics(digit_mlps):
    d, (ma, mb) = digit_mlps
    space = from_module(ma, d.x_train[:2])
    a, b = ma.state_dict(), mb.state_dict()
    mid = interpolate(a, b, 0.5)
    data = digits.batches(d.x_train, d.y_train)
    fixed = repair(ma, mid, a, b, data, 0.5, space=space)

    def std0(w):
        return (d.x_train @ w["0.weight"].T + w["0.bias"]).std(0)

    target = 0.5 * (std0(a) + std0(b))
    assert (std0(mid) - target).abs().mean() > 0.01  # naive midpoint has collapsed variance
    torch.testing.assert_close(std0(fixed), target, rtol=1e-3, atol=1e-4)
    assert torch.equal(fixed["6.weight"], mid["6.weight"])  # logits layer left alone


def test_barrier_plot_is_written(tmp_path):
    from tasks.merge import Barrier

    path = tmp_path / "b.png"
    plot_barriers({"mlp: naive": Barrier([0, 0.5, 1], [0.1, 1.0, 0.1])}, path)
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_recurrent_matching_stops_and_logs_the_true_objective():
    """A group on both axes of weight_hh is linearized per step; sweeps are judged on the
    true objective, so the run stops and never ends below where it started."""
    e = entry("lstm_lm")
    space = from_module(e.build(), e.inputs())
    a, b = _perturbed(e.build(), seed=0), _perturbed(e.build(), seed=1)
    torch.manual_seed(5)
    b = {k: (torch.randn_like(v) if v.is_floating_point() else v) for k, v in b.items()}
    log = MatchLog()
    g = weight_matching(space, a, b, log=log, max_sweeps=50)
    assert log.sweeps < 50
    names = [n for n in space.tensors if space.tensors[n].kind == "parameter"]

    def true(w):  # up to a constant (fixed views are not logged)
        return sum(float((a[n].double() * w[n].double()).sum()) for n in names)

    gained = true(space.apply(b, g)) - true(b)
    assert gained > 0
    assert abs(gained - (log.objective[-1] - log.objective[0])) <= 1e-6 * abs(gained)
    assert log.objective == sorted(log.objective)


def test_ste_starts_where_init_says():
    """``init`` sets where the STE's first projection starts: with no epochs the result is
    weight matching from that start (an element, or activation matching's element)."""
    e = entry("vit_tiny")
    model = e.build().eval()
    space = from_module(model, e.inputs())
    a = {k: v.float() for k, v in _perturbed(model, seed=0).items()}
    gen = torch.Generator().manual_seed(4)
    b = {k: torch.randn(v.shape, generator=gen) for k, v in a.items()}
    data = [(e.inputs()[0], torch.zeros(len(e.inputs()[0]), dtype=torch.long))]
    start = space.random_element(torch.Generator().manual_seed(9))
    got = ste_matching(model, space, a, b, data, epochs=0, init=start)
    want = weight_matching(space, a, b, init=start)
    assert all(torch.equal(got[n], want[n]) for n in got)
    plain = ste_matching(model, space, a, b, data, epochs=0)
    assert any(not torch.equal(got[n], plain[n]) for n in got)  # the start mattered
    model_a, model_b = copy.deepcopy(model), copy.deepcopy(model)
    model_a.load_state_dict(a)
    model_b.load_state_dict(b)
    am = activation_matching(model_a, model_b, space, data)
    log = MatchLog()
    got = ste_matching(model, space, a, b, data, epochs=0, init="activation", log=log)
    want = weight_matching(space, a, b, init=am)
    assert all(torch.equal(got[n], want[n]) for n in got)
    assert any(not torch.equal(got[n], plain[n]) for n in got)
    assert log.notes == ["started from activation matching"]
    with pytest.raises(ValueError, match="init"):
        ste_matching(model, space, a, b, data, epochs=0, init="weights")


def test_weight_matching_progress_shows_a_total(capsys):
    """The bar counts group solves against the solves of the sweeps begun (an ETA for the
    current sweep), with the sweep count and objective (#26: it showed no total)."""
    import re

    from converters import from_module
    from tasks.align import weight_matching

    torch.manual_seed(0)
    m = torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
        torch.nn.Linear(32, 3),
    )  # fmt: skip
    space = from_module(m, torch.randn(2, 8))
    a = m.state_dict()
    b = space.apply(a, space.random_element(torch.Generator().manual_seed(1)))
    weight_matching(space, a, b, progress=True)
    err = capsys.readouterr().err
    assert "weight matching" in err and re.search(r"\d+/\d+ \[", err) and "sweep=" in err
