"""INR editing: pairs, equivariant editors, training beats identity, the benchmark runs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from metanet.graph import to_graph
from metanet.testing import assert_equivariant
from tasks.datasets.inr import INRConfig, Siren, image_grid
from tasks.learn.inr_edit import (
    build_editor,
    dilate,
    evaluate,
    make_edit_pairs,
    render,
    train_editor,
)

ROOT = Path(__file__).resolve().parents[2]
TINY = INRConfig(hidden=8, depth=2, steps=30)


@pytest.fixture(scope="module")
def pairs():
    return make_edit_pairs(cfg=TINY, limit=60)


def test_pairs_share_init_seed_split_and_render(pairs, tmp_path):
    assert len(pairs) == 60 and set(pairs.split.tolist()) <= {0, 1, 2}
    # dilation is a 3x3 max-pool: never darker, and a single pixel grows to 3x3
    img = torch.zeros(1, 8, 8)
    img[0, 4, 4] = 1
    assert dilate(img).sum() == 9
    assert bool((pairs.target >= pairs.image).all())
    # one step from the same init: the pair still nearly shares its weights
    one = make_edit_pairs(cfg=INRConfig(hidden=8, steps=1), limit=4)
    for n in one.orig:
        assert (one.orig[n] - one.edit[n]).abs().max() < 1e-2
    # render == the Siren module
    net = Siren(TINY)
    net.load_state_dict({n: t[0] for n, t in pairs.orig.items()})
    want = net(image_grid(8, 8))[:, 0]
    assert torch.allclose(render(TINY, pairs.orig)[0], want, atol=1e-6)
    # the cache round-trips
    path = tmp_path / "p.safetensors"
    a = make_edit_pairs(path, cfg=INRConfig(hidden=8, steps=3), limit=6)
    b = make_edit_pairs(path, cfg=INRConfig(hidden=8, steps=3), limit=6)
    assert all(torch.equal(a.edit[n], b.edit[n]) for n in a.edit)
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("kind", ["unf", "gmn"])
def test_editors_are_equivariant(pairs, kind):
    torch.manual_seed(0)
    ed = build_editor(kind, pairs, hidden=8).double()
    for p in ed.parameters():  # the zero-initialized heads would make it trivial
        torch.nn.init.normal_(p, std=0.2)
    w = {n: t[:4].double() for n, t in pairs.orig.items()}
    with torch.no_grad():
        assert max(float(d.abs().max()) for d in ed.delta(w).values()) > 1e-4
    assert_equivariant(ed.delta, pairs.space, w, n=3, atol=1e-10)
    assert_equivariant(ed, pairs.space, w, n=2, atol=1e-10)


def test_gmn_editor_builds_the_parameter_graph(pairs):
    ed = build_editor("gmn", pairs, hidden=8)
    gather = ed.core.gather
    w = {n: t[:2] for n, t in pairs.orig.items()}
    graph = gather.graph({n: t[:, None] for n, t in w.items()})
    g = to_graph(pairs.space, {n: t[1] for n, t in w.items()})
    nodes, edges = gather.num_nodes, gather.num_edges
    assert torch.equal(graph.x[nodes:], g.x) and torch.equal(graph.edge_attr[edges:], g.edge_attr)
    # and reads outputs back to the same places
    back = gather.weights(graph.x, graph.edge_attr)
    for n in w:
        assert torch.equal(back[n][1], w[n][1]), n


def test_editors_start_as_identity_and_training_beats_it(pairs):
    ident = evaluate(build_editor("identity", pairs), pairs, "train")["image_mse"]
    for kind in ("flat", "unf"):
        ed = build_editor(kind, pairs)
        assert evaluate(ed, pairs, "train")["image_mse"] == pytest.approx(ident, rel=1e-6)
    ed, r = train_editor("unf", pairs, epochs=6, batch_size=16, lr=1e-2, hidden=8)
    assert evaluate(ed, pairs, "train")["image_mse"] < 0.9 * ident
    assert r.history[-1]["train_image_mse"] < r.history[0]["train_image_mse"]


def test_benchmark_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "inr_editing", ROOT / "benchmarks" / "inr_editing.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "res" / "edit.md"
    argv = [
        "--data",
        str(tmp_path / "pairs.safetensors"),
        "--out",
        str(out),
        "--images",
        "40",
        "--steps",
        "5",
        "--epochs",
        "1",
        "--seeds",
        "2",
        "--hidden",
        "4",
    ]
    assert mod.main(argv) == 0
    text = out.read_text()
    for kind in mod.EDITORS:
        assert mod.LABELS[kind] in text
    assert "2 seed(s)" in text
    assert out.with_suffix(".png").stat().st_size > 0
    assert not list(out.parent.glob("*.tmp*"))
