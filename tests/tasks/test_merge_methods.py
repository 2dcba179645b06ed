"""Per-tensor merge methods (mergekit semantics) and the merge config parser.

Expected values are computed from the papers' formulas (or written out by hand), not by
the code under test.
"""

import math

import pytest
import torch

from tasks.checkpoints.config import load_config, parse_config
from tasks.merge.methods import METHODS, merge_state_dicts, merge_tensor

D = torch.float64


def t64(*v):
    return torch.tensor(v, dtype=D)


# ---------------------------------------------------------------- slerp


def test_slerp_orthogonal_midpoint_unit_norm():
    a, b = t64(1, 0, 0), t64(0, 1, 0)
    out = merge_tensor("slerp", "w", [b], a, params={"t": 0.5})
    torch.testing.assert_close(out, (a + b) / math.sqrt(2))
    assert abs(out.norm().item() - 1) < 1e-12


def test_slerp_general_angle_and_endpoints():
    theta = math.pi / 3
    a, b = t64(2, 0), t64(2 * math.cos(theta), 2 * math.sin(theta))  # same norm, 60 degrees
    t = 0.25
    want = (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)
    torch.testing.assert_close(merge_tensor("slerp", "w", [b], a, params={"t": t}), want)
    assert torch.equal(merge_tensor("slerp", "w", [b], a, params={"t": 0.0}), a)
    torch.testing.assert_close(merge_tensor("slerp", "w", [b], a, params={"t": 1.0}), b)


def test_slerp_colinear_falls_back_to_lerp():
    a = t64(1, 2, 3)
    b = 3 * a  # cos = 1
    torch.testing.assert_close(
        merge_tensor("slerp", "w", [b], a, params={"t": 0.25}), 0.75 * a + 0.25 * b
    )
    c = -a  # cos = -1, also colinear
    torch.testing.assert_close(
        merge_tensor("slerp", "w", [c], a, params={"t": 0.5}), torch.zeros(3, dtype=D)
    )


def test_slerp_needs_t_and_exactly_one_model():
    a = t64(1, 0)
    with pytest.raises(ValueError, match="'t'"):
        merge_tensor("slerp", "w", [a], a)
    with pytest.raises(ValueError, match="exactly one"):
        merge_tensor("slerp", "w", [a, a], a, params={"t": 0.5})


# ---------------------------------------------------------------- linear


def test_linear_with_and_without_normalize():
    x1, x2 = t64(1, 2), t64(5, -2)
    mp = [{"weight": 1.0}, {"weight": 3.0}]
    torch.testing.assert_close(
        merge_tensor("linear", "w", [x1, x2], model_params=mp), (x1 + 3 * x2) / 4
    )
    torch.testing.assert_close(
        merge_tensor("linear", "w", [x1, x2], model_params=mp, params={"normalize": False}),
        x1 + 3 * x2,
    )
    # default weight 1 + normalize: the plain mean
    torch.testing.assert_close(merge_tensor("linear", "w", [x1, x2]), (x1 + x2) / 2)
    with pytest.raises(ValueError, match="takes no base"):
        merge_tensor("linear", "w", [x1], x2)


# ---------------------------------------------------------------- task arithmetic / TIES


def test_task_arithmetic_formula():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 4, generator=g, dtype=D)
    xs = [base + torch.randn(3, 4, generator=g, dtype=D) for _ in range(2)]
    w, lam = [0.3, 0.7], 0.5
    want = base + lam * sum(wi * (x - base) for wi, x in zip(w, xs))
    out = merge_tensor(
        "task_arithmetic",
        "w",
        xs,
        base,
        params={"lambda": lam},
        model_params=[{"weight": wi} for wi in w],
    )
    torch.testing.assert_close(out, want)
    # normalize divides by the weight sum
    out = merge_tensor(
        "task_arithmetic",
        "w",
        xs,
        base,
        params={"normalize": True},
        model_params=[{"weight": 2.0}, {"weight": 2.0}],
    )
    torch.testing.assert_close(out, base + sum(x - base for x in xs) / 2)


def test_ties_hand_example():
    base = t64(1, 1, 1, 1)
    d1 = t64(3, -1, 2, -4)  # top-2 by magnitude: 3, -4  -> [3, 0, 0, -4]
    d2 = t64(-2, 5, 1, -1)  # top-2 by magnitude: 5, -2  -> [-2, 5, 0, 0]
    # weighted: 0.5*d1 -> [1.5, 0, 0, -2]; 2*d2 -> [-4, 10, 0, 0]
    # elected signs (sum): [-2.5 -> -, 10 -> +, 0 -> +, -2 -> -]
    # agreeing: idx0 model 2 only, idx1 model 2, idx2 nobody, idx3 model 1
    # disjoint mean (divide by agreeing weights): [-4/2, 10/2, 0, -2/0.5]
    mp = [{"weight": 0.5, "density": 0.5}, {"weight": 2.0, "density": 0.5}]
    out = merge_tensor("ties", "w", [base + d1, base + d2], base, model_params=mp)
    torch.testing.assert_close(out, base + t64(-2, 5, 0, -4))
    out = merge_tensor(
        "ties", "w", [base + d1, base + d2], base, model_params=mp, params={"normalize": False}
    )
    torch.testing.assert_close(out, base + t64(-4, 10, 0, -2))


def test_global_parameters_are_per_model_defaults():
    base = t64(0, 0, 0, 0)
    x1, x2 = t64(3, -1, 2, -4), t64(-2, 5, 1, -1)
    a = merge_tensor("ties", "w", [x1, x2], base, params={"density": 0.5})
    b = merge_tensor("ties", "w", [x1, x2], base, model_params=[{"density": 0.5}] * 2)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, t64(3, 5, 0, -4))


# ---------------------------------------------------------------- DARE


def _pair(seed=0, shape=(6, 5)):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(*shape, generator=g, dtype=D)
    return base, [base + torch.randn(*shape, generator=g, dtype=D) for _ in range(2)]


def test_dare_density_one_is_task_arithmetic():
    base, xs = _pair()
    mp = [{"weight": 0.4, "density": 1.0}, {"weight": 0.9, "density": 1.0}]
    ta = merge_tensor("task_arithmetic", "w", xs, base, model_params=mp)
    torch.testing.assert_close(merge_tensor("dare_linear", "w", xs, base, model_params=mp), ta)
    ties_dense = merge_tensor("ties", "w", xs, base, model_params=mp, params={"normalize": False})
    torch.testing.assert_close(
        merge_tensor("dare_ties", "w", xs, base, model_params=mp), ties_dense
    )


def test_dare_rescale_unbiased_in_expectation():
    base = torch.zeros(40, dtype=D)
    delta = torch.linspace(-2, 3, 40, dtype=D)
    p, n = 0.3, 4000
    acc = torch.zeros(40, dtype=D)
    for s in range(n):
        acc += merge_tensor(
            "dare_linear",
            "w",
            [base + delta],
            base,
            params={"rescale": "density"},
            model_params=[{"density": p}],
            seed=s,
        )
    mean = acc / n
    # each draw is delta*m/p, m ~ Bernoulli(p): std of the mean = |delta| sqrt((1-p)/(p n)); allow 5 sigma
    tol = 5 * delta.abs() * math.sqrt((1 - p) / (p * n)) + 1e-12
    assert ((mean - delta).abs() <= tol).all()


def test_dare_l1_rescale_keeps_l1_norm_and_drop_rate():
    base = torch.zeros(2000, dtype=D)
    delta = torch.randn(2000, generator=torch.Generator().manual_seed(1), dtype=D)
    out = merge_tensor("dare_linear", "w", [delta], base, model_params=[{"density": 0.25}])
    kept = (out != 0).double().mean().item()
    assert abs(kept - 0.25) < 5 * math.sqrt(0.25 * 0.75 / 2000)
    torch.testing.assert_close(out.abs().sum(), delta.abs().sum())
    nz = out != 0
    ratio = out[nz] / delta[nz]
    torch.testing.assert_close(ratio, torch.full_like(ratio, ratio[0].item()))


def test_dare_reproducible_per_seed_and_name():
    base, xs = _pair(shape=(20, 20))
    mp = [{"density": 0.5}] * 2
    a = merge_tensor("dare_ties", "layer.w", xs, base, model_params=mp, seed=7)
    b = merge_tensor("dare_ties", "layer.w", xs, base, model_params=mp, seed=7)
    assert torch.equal(a, b)
    assert not torch.equal(
        a, merge_tensor("dare_ties", "layer.b", xs, base, model_params=mp, seed=7)
    )
    assert not torch.equal(
        a, merge_tensor("dare_ties", "layer.w", xs, base, model_params=mp, seed=8)
    )
    # tensor order in a state dict does not matter
    sd = [{"x": base, "layer.w": x} for x in xs]
    m1 = merge_state_dicts("dare_ties", sd, {"x": base, "layer.w": base}, model_params=mp, seed=7)
    m2 = merge_state_dicts("dare_ties", sd, {"layer.w": base, "x": base}, model_params=mp, seed=7)
    assert torch.equal(m1["layer.w"], a) and torch.equal(m2["layer.w"], a)


# ---------------------------------------------------------------- breadcrumbs, della


def test_breadcrumbs_drops_largest_and_smallest():
    base = torch.zeros(10, dtype=D)
    delta = t64(4, -9, 1, 7, -2, 10, 3, -6, 5, 8)
    # n=10, density 0.5 keeps 5, gamma 0.2 drops the 2 largest (10, -9) and the 3 smallest (1, -2, 3)
    out = merge_tensor(
        "breadcrumbs", "w", [delta], base, model_params=[{"density": 0.5, "gamma": 0.2}]
    )
    torch.testing.assert_close(out, t64(4, 0, 0, 7, 0, 0, 0, -6, 5, 8))
    # density 0.9 leaves room to drop only one element: the largest one goes
    out = merge_tensor(
        "breadcrumbs", "w", [delta], base, model_params=[{"density": 0.9, "gamma": 0.2}]
    )
    torch.testing.assert_close(out, t64(4, -9, 1, 7, -2, 0, 3, -6, 5, 8))
    # gamma 0 is plain magnitude pruning
    out = merge_tensor(
        "breadcrumbs", "w", [delta], base, model_params=[{"density": 0.3, "gamma": 0.0}]
    )
    torch.testing.assert_close(out, t64(0, -9, 0, 0, 0, 10, 0, 0, 0, 8))


def test_della_keep_rate_and_reproducible():
    base = torch.zeros(50, 40, dtype=D)
    delta = torch.randn(50, 40, generator=torch.Generator().manual_seed(2), dtype=D)
    mp = [{"density": 0.4, "epsilon": 0.2}]
    out = merge_tensor(
        "della_linear", "w", [delta], base, model_params=mp, params={"rescale": False}
    )
    assert torch.equal(
        out,
        merge_tensor(
            "della_linear", "w", [delta], base, model_params=mp, params={"rescale": False}
        ),
    )
    kept = out != 0
    assert abs(kept.double().mean().item() - 0.4) < 5 * math.sqrt(0.24 / 2000)
    # keep probability rises with magnitude rank: 0.2 for the smallest, 0.6 for the largest of each row
    ranks = delta.abs().argsort(1).argsort(1)
    low, high = kept[ranks < 10].double().mean().item(), kept[ranks >= 30].double().mean().item()
    assert low < 0.35 < 0.45 < high
    with pytest.raises(ValueError, match="epsilon"):
        merge_tensor("della", "w", [delta], base, model_params=[{"density": 0.9, "epsilon": 0.2}])


# ---------------------------------------------------------------- model stock


def test_model_stock_t_from_cosine():
    base = t64(1, -1)
    d1 = t64(1, 0)
    d2 = t64(math.cos(math.pi / 3), math.sin(math.pi / 3))  # cos = 1/2 with d1
    t = 2 * 0.5 / (1 + 0.5)  # k cos / (1 + (k-1) cos), k = 2
    avg = base + (d1 + d2) / 2
    want = t * avg + (1 - t) * base
    torch.testing.assert_close(merge_tensor("model_stock", "w", [base + d1, base + d2], base), want)
    # 1-D and 2-D tensors are flattened: the same vectors as a 2x1 tensor give the same result
    out = merge_tensor(
        "model_stock", "w", [(base + d1).view(2, 1), (base + d2).view(2, 1)], base.view(2, 1)
    )
    torch.testing.assert_close(out.view(2), want)
    # opposite task vectors: cos = -1, 1 + (k-1) cos = 0 -> keep the base
    torch.testing.assert_close(merge_tensor("model_stock", "w", [base + d1, base - d1], base), base)
    with pytest.raises(ValueError, match="two"):
        merge_tensor("model_stock", "w", [base + d1], base)


def test_model_stock_filter_wise_rows():
    base = torch.zeros(2, 2, dtype=D)
    x1 = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=D)
    x2 = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=D)  # row 0: cos 0 -> t 0; row 1: cos 1 -> t 1
    out = merge_tensor("model_stock", "w", [x1, x2], base, params={"filter_wise": True})
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=D))


# ---------------------------------------------------------------- dtypes, pass-through, errors


def test_non_float_tensors_pass_through():
    base = torch.tensor([3, 4])
    other = torch.tensor([5, 6])
    assert merge_tensor("ties", "num_batches_tracked", [other], base) is base
    assert merge_tensor("linear", "ids", [other, base]) is other


def test_bfloat16_in_bfloat16_out_computed_in_float32():
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(64, generator=g).bfloat16() for _ in range(3)]
    w = [0.1, 0.3, 0.35]
    out = merge_tensor("linear", "w", xs, model_params=[{"weight": v} for v in w])
    assert out.dtype == torch.bfloat16
    want = (sum(v * x.float() for v, x in zip(w, xs)) / sum(w)).bfloat16()
    assert torch.equal(out, want)
    base = torch.randn(64, generator=g).bfloat16()
    out = merge_tensor("task_arithmetic", "w", xs, base, model_params=[{"weight": v} for v in w])
    want = (base.float() + sum(v * (x.float() - base.float()) for v, x in zip(w, xs))).bfloat16()
    assert out.dtype == torch.bfloat16 and torch.equal(out, want)


def test_errors():
    a, b = torch.zeros(2, 3), torch.zeros(3, 2)
    with pytest.raises(ValueError, match="'nope'"):
        merge_tensor("nope", "w", [a], a)
    with pytest.raises(ValueError, match="'densty'"):
        merge_tensor("ties", "w", [a], a, model_params=[{"densty": 0.5}])
    with pytest.raises(ValueError, match="'lamda'"):
        merge_tensor("ties", "w", [a], a, params={"lamda": 0.5})
    with pytest.raises(ValueError, match=r"'blk.w'.*\(2, 3\).*\(3, 2\)"):
        merge_tensor("ties", "blk.w", [b], a)
    with pytest.raises(ValueError, match="needs a base"):
        merge_tensor("ties", "w", [a])


def test_every_method_runs_and_keeps_shape():
    base, xs = _pair(shape=(4, 6))
    xs.append(base + 0.1)
    for name, m in METHODS.items():
        params = {"t": 0.3} if name in ("slerp", "nearswap") else {}
        models = xs[: m.n_models] if m.n_models else xs
        out = merge_tensor(
            name, "w", models, base if m.needs_base else None, params=params, model_params=None
        )
        assert out.shape == base.shape and torch.isfinite(out).all(), name


def test_merge_state_dicts():
    base = {"w": t64(0, 0), "n": torch.tensor(1)}
    ms = [{"w": t64(1, 2), "n": torch.tensor(5)}, {"w": t64(3, 4), "n": torch.tensor(6)}]
    out = merge_state_dicts(
        "task_arithmetic", ms, base, model_params=[{"weight": 0.5}, {"weight": 0.5}]
    )
    torch.testing.assert_close(out["w"], t64(2, 3))
    assert out["n"].item() == 1
    with pytest.raises(ValueError, match="'w'"):
        merge_state_dicts("task_arithmetic", [{"n": torch.tensor(1)}], base)


# ---------------------------------------------------------------- config


CFG = """
merge_method: ties
base_model: base
models:
  - model: a
    parameters:
      weight: 0.7
      density: [{filter: self_attn, value: 0.3}, {filter: mlp, value: 0.6}, {value: 0.9}]
    align: weight
  - model: /abs/b
    parameters: {weight: 0.3}
parameters:
  normalize: true
  lambda: [{filter: lm_head, value: 0.0}, {value: 1.5}]
dtype: float16
"""


def test_config_parse_filters_and_paths(tmp_path):
    p = tmp_path / "sub" / "cfg.yml"
    p.parent.mkdir()
    p.write_text(CFG)
    cfg = load_config(p)
    assert cfg.method == "ties" and cfg.dtype == "float16"
    assert cfg.base == str(p.parent / "base")
    assert [m.path for m in cfg.models] == [str(p.parent / "a"), "/abs/b"]
    assert [m.align for m in cfg.models] == ["weight", "none"]
    params, mps = cfg.resolve("layers.0.self_attn.q_proj.weight")
    assert params == {"normalize": True, "lambda": 1.5}
    assert mps == [{"weight": 0.7, "density": 0.3}, {"weight": 0.3}]
    params, mps = cfg.resolve("layers.0.mlp.up.weight")
    assert mps[0]["density"] == 0.6
    params, mps = cfg.resolve("lm_head.weight")
    assert params["lambda"] == 0.0 and mps[0]["density"] == 0.9
    # resolved parameters feed merge_tensor directly
    base = torch.zeros(4, dtype=D)
    out = merge_tensor(
        cfg.method, "lm_head.weight", [base + 1, base - 1], base, params=params, model_params=mps
    )
    torch.testing.assert_close(out, base)


def test_config_filter_without_default_leaves_parameter_unset():
    cfg = parse_config(
        {
            "merge_method": "slerp",
            "base_model": "b",
            "models": [{"model": "a"}],
            "parameters": {"t": [{"filter": "attn", "value": 0.2}, {"value": 0.7}]},
        }
    )
    assert cfg.resolve("x.attn.w")[0] == {"t": 0.2}
    assert cfg.resolve("x.mlp.w")[0] == {"t": 0.7}
    cfg = parse_config(
        {
            "merge_method": "linear",
            "models": ["a", "b"],
            "parameters": {"normalize": [{"filter": "attn", "value": False}]},
        }
    )
    assert cfg.resolve("mlp")[0] == {} and cfg.base is None


@pytest.mark.parametrize(
    "data, key",
    [
        ({"base_model": "b", "models": ["a"]}, "merge_method"),
        ({"merge_method": "frankenmerge", "base_model": "b", "models": ["a"]}, "frankenmerge"),
        ({"merge_method": "ties", "models": ["a"]}, "base_model"),
        ({"merge_method": "ties", "base_model": "b"}, "models"),
        ({"merge_method": "ties", "base_model": "b", "models": [{"path": "a"}]}, "model"),
        (
            {
                "merge_method": "ties",
                "base_model": "b",
                "models": [{"model": "a", "align": "perm"}],
            },
            "align",
        ),
        (
            {
                "merge_method": "ties",
                "base_model": "b",
                "models": [{"model": "a", "parameters": {"wieght": 1}}],
            },
            "wieght",
        ),
        ({"merge_method": "slerp", "base_model": "b", "models": ["a"]}, "'t'"),
        (
            {
                "merge_method": "slerp",
                "base_model": "b",
                "models": ["a", "c"],
                "parameters": {"t": 0.5},
            },
            "exactly one",
        ),
        ({"merge_method": "ties", "base_model": "b", "models": ["a"], "dtype": "int3"}, "dtype"),
        ({"merge_method": "ties", "base_model": "b", "models": ["a"], "slices": []}, "slices"),
        (
            {
                "merge_method": "ties",
                "base_model": "b",
                "models": ["a"],
                "parameters": {"lambda": [0.1, {"value": 1}]},
            },
            "lambda",
        ),
        (
            {"merge_method": "passthrough", "slices": [{"sources": [{"model": "a"}]}]},
            "layer_range",
        ),
        (
            {
                "merge_method": "passthrough",
                "slices": [{"sources": [{"model": "a", "layer_range": [2, 1]}]}],
            },
            "layer_range",
        ),
        (
            {
                "merge_method": "linear",
                "slices": [
                    {
                        "sources": [
                            {"model": "a", "layer_range": [0, 2]},
                            {"model": "b", "layer_range": [0, 3]},
                        ]
                    }
                ],
            },
            "same number of layers",
        ),
        ({"merge_method": "passthrough", "models": ["a", "b"]}, "exactly one"),
        (
            {
                "merge_method": "ties",
                "base_model": "b",
                "models": ["a"],
                "tokenizer_source": "union",
                "tokenizer": {"source": "base"},
            },
            "tokenizer_source and tokenizer",
        ),
        (
            {
                "merge_method": "ties",
                "base_model": "b",
                "models": ["a"],
                "parameters": {"densty": 0.5},
            },
            "densty",
        ),
        (  # a YAML integer of hundreds of digits overflowed float()
            {
                "merge_method": "linear",
                "models": [
                    {"model": "a", "parameters": {"weight": 10**350}},
                    {"model": "b", "parameters": {"weight": 1}},
                ],
            },
            "'weight' must be finite, got a 351-digit number",
        ),
        (  # checked when read, not after the merge when the tokenizer is written
            {"merge_method": "linear", "models": ["a", "b"], "chat_template": "{% for m in x %}"},
            r"chat_template: not valid Jinja \(Unexpected end of template",
        ),
        (
            {"merge_method": "linear", "models": ["a", "b"], "chat_template": "chatmlx"},
            "neither a known template",
        ),  # fmt: skip
        (  # mergekit's range: a fraction of entries kept (0 keeps none)
            {
                "merge_method": "sce",
                "base_model": "b",
                "models": ["a"],
                "parameters": {"select_topk": -5},
            },
            r"'select_topk' must lie in \[0, 1\]",
        ),
    ],
)
def test_config_errors(data, key):
    with pytest.raises(ValueError, match=key) as err:
        parse_config(data)
    assert "\n" not in str(err.value)


def test_config_invalid_yaml(tmp_path):
    p = tmp_path / "bad.yml"
    p.write_text("merge_method: [ties\n")
    with pytest.raises(ValueError, match="YAML"):
        load_config(p)


def test_config_base_listed_among_models_is_dropped_and_resolve_feeds_state_dict_merge(tmp_path):
    cfg = parse_config(
        {
            "merge_method": "task_arithmetic",
            "base_model": "/m/base",
            "models": [
                {"model": "/m/base"},
                {
                    "model": "/m/a",
                    "parameters": {"weight": [{"filter": "bias", "value": 0.0}, {"value": 1.0}]},
                },
            ],
        }
    )
    assert [m.path for m in cfg.models] == ["/m/a"]
    base = {"l.weight": t64(0, 0), "l.bias": t64(0, 0)}
    a = {"l.weight": t64(1, 2), "l.bias": t64(3, 4)}
    out = merge_state_dicts(
        cfg.method,
        [a],
        base,
        params=lambda n: cfg.resolve(n)[0],
        model_params=lambda n: cfg.resolve(n)[1],
    )
    torch.testing.assert_close(out["l.weight"], t64(1, 2))
    torch.testing.assert_close(out["l.bias"], t64(0, 0))
    with pytest.raises(ValueError, match="besides base_model"):
        parse_config({"merge_method": "ties", "base_model": "/m/base", "models": ["/m/base"]})


def test_della_density_rescale_unbiased():
    base = torch.zeros(1, 30, dtype=D)
    delta = torch.linspace(0.5, 3, 30, dtype=D).view(1, 30)
    n, dens, eps = 3000, 0.5, 0.3
    acc = torch.zeros_like(delta)
    for s in range(n):
        acc += merge_tensor(
            "della_linear",
            "w",
            [delta],
            base,
            params={"rescale": "density"},
            model_params=[{"density": dens, "epsilon": eps}],
            seed=s,
        )
    # keep probability p_i in [0.2, 0.8]; each draw delta*m/p_i has std |delta| sqrt((1-p)/p) <= 2|delta|
    tol = 5 * 2 * delta / math.sqrt(n)
    assert ((acc / n - delta).abs() <= tol).all()


# ---------------------------------------------------------------- mergekit 0.1.5's newer methods


def test_ram_and_ramplus_on_the_papers_example():
    base = torch.zeros(6, dtype=D)
    m1, m2 = t64(1, 1, 0, 0, 1, 0), t64(1, 0, 1, 0, 0, 0)
    torch.testing.assert_close(merge_tensor("ram", "w", [m1, m2], base), t64(1, 1, 1, 0, 1, 0))
    out = merge_tensor("ramplus_tl", "w", [m1, m2], base)  # r 0.1, alpha 0.2: unique x 1.02
    torch.testing.assert_close(out, t64(1, 1.02, 1.02, 0, 1.02, 0))


def test_nearswap_takes_the_other_model_where_it_is_near():
    a, b = t64(0, 0, 0), t64(0.05, 1.0, -4.0)
    out = merge_tensor("nearswap", "w", [b], a, params={"t": 0.1})
    torch.testing.assert_close(out, t64(0.05, 0.1, -0.1))  # near: b; far: t/|a-b| of the way


def test_nuslerp_rows_and_weights():
    a, b = t64(1, 0, 0, 1).view(2, 2), t64(0, 1, 1, 0).view(2, 2)
    mp = [{"weight": 1.0}, {"weight": 1.0}]  # t = 1 / 2
    out = merge_tensor("nuslerp", "w", [a, b], None, model_params=mp,
                       params={"nuslerp_flatten": False})  # fmt: skip
    r = 1 / math.sqrt(2)  # each row: the midpoint of two orthogonal unit vectors
    torch.testing.assert_close(out, t64(r, r, r, r).view(2, 2))
    skew = merge_tensor("nuslerp", "w", [a, b], None, model_params=[{"weight": 3.0}, {"weight": 1.0}],
                        params={"nuslerp_flatten": False})  # fmt: skip
    c, s = math.cos(math.pi / 8), math.sin(math.pi / 8)  # t = 1/4 of a right angle
    torch.testing.assert_close(skew, t64(c, s, s, c).view(2, 2))


def test_karcher_and_multislerp_of_orthogonal_vectors():
    x, y = t64(2, 0), t64(0, 4)  # the mean direction bisects them; the norm is the mean norm
    r = 3 / math.sqrt(2)
    torch.testing.assert_close(merge_tensor("karcher", "w", [x, y], None), t64(r, r))
    out = merge_tensor("multislerp", "w", [x, y], None, model_params=[{"weight": 1.0}] * 2)
    torch.testing.assert_close(out, t64(r, r), atol=1e-6, rtol=0)


def test_sce_small_deltas_fall_back_to_the_disjoint_mean():
    base = torch.zeros(4, dtype=D)
    x1, x2 = t64(1e-4, -2e-4, 3e-4, 0), t64(3e-4, 2e-4, -1e-4, 0)
    out = merge_tensor("sce", "w", [x1, x2], base)
    # sum of mean squared deltas << 1e-6: uniform weights, sign election, disjoint mean
    want = t64(2e-4, 2e-4, 3e-4, 0)  # entry 1: sum 0 -> majority +, only x2 agrees
    torch.testing.assert_close(out, want, atol=1e-12, rtol=0)


def test_arcee_fusion_keeps_only_outlying_changes():
    torch.manual_seed(0)
    base = torch.randn(8, 16, dtype=D)
    other = base.clone()
    other[3, 5] += 5.0  # one large, important change among small ones
    other += 1e-3 * torch.randn_like(other)
    out = merge_tensor("arcee_fusion", "w", [other], base)
    changed = (out != base).nonzero().tolist()
    assert [3, 5] in changed and len(changed) < 0.3 * base.numel()
    torch.testing.assert_close(out[3, 5], other[3, 5])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_zero_element_tensors_pass_through_every_method(method):
    """A tensor with no elements has nothing to merge: every method returns it (slerp's
    norms and the top-k of the trimming methods failed on it)."""
    m = METHODS[method]
    empty = torch.zeros(0, 3, dtype=torch.float16)
    base = empty if m.needs_base else None
    params = {"t": 0.5} if method in ("slerp", "nearswap") else {}
    out = merge_tensor(method, "e", [empty] * (m.n_models or 2), base, params=params)
    assert out.shape == (0, 3) and out.dtype == torch.float16
