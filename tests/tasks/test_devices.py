"""Device placement, checked on a CPU-only machine with the meta device.

A meta tensor mixed with a CPU tensor raises, so a pipeline run with ``device="meta"``
fails on any tensor it creates on the CPU inside its loop. What the meta device cannot
follow, and so is not checked here: host syncs on values (early-stopping checks, the
assignment solved by scipy in weight matching, methods with a data-dependent branch),
which need real values; ``benchmarks/gpu.py`` runs those on a GPU.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tasks.datasets.inr import INRConfig, fit_sirens, image_grid
from tasks.merge.methods import METHODS, merge_tensor

META = torch.device("meta")


def test_meta_device_catches_a_cpu_tensor():
    with pytest.raises(RuntimeError, match="device"):
        torch.zeros(3, device=META) + torch.zeros(3)


@pytest.mark.parametrize("target_psnr", [None, 40.0])
def test_fit_sirens_stays_on_its_device(target_psnr):
    cfg = replace(INRConfig(), steps=3, target_psnr=target_psnr)
    targets, coords = torch.rand(4, 64, 1), image_grid(8, 8)
    w, psnr = fit_sirens(targets, coords, [0, 1, 2, 3], cfg, device=META)
    assert psnr.device == META and all(t.device == META for t in w.values())
    assert w["net.0.weight"].shape == (4, 32, 2)


# methods whose arithmetic has no branch on values (the others ask the host once per
# tensor: a zero-sum check, a convergence test, a sampled threshold)
ON_DEVICE = [
    m
    for m in METHODS
    if m
    not in (
        "linear",
        "karcher",
        "sce",
        "multislerp",
        "dare_linear",
        "dare_ties",
        "della",
        "della_linear",
    )  # fmt: skip
]


@pytest.mark.parametrize("method", ON_DEVICE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_methods_stay_on_their_device(method, dtype):
    m = METHODS[method]
    base = torch.empty(6, 5, device=META, dtype=dtype)
    n = m.n_models or 2
    xs = [torch.empty(6, 5, device=META, dtype=dtype) for _ in range(n)]
    params = {"t": 0.3} if method in ("slerp", "nearswap") else {}
    out = merge_tensor(method, "w", xs, base if m.needs_base else None, params=params,
                       compute_dtype=dtype)  # fmt: skip
    assert out.device == META and out.dtype == dtype and out.shape == (6, 5)


def _mlp_space():
    from converters import from_state_dict

    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    return from_state_dict(model.state_dict(), "mlp")


@pytest.mark.parametrize("kind", ["unf", "flat", "statnn"])
def test_metanetworks_forward_and_backward_stay_on_their_device(kind):
    """Forward and backward on the meta device. (StatNN made its quantile levels on the
    CPU: on a GPU it failed; this test found it.) GMN and the graph transformer read sizes
    from their inputs' values (``.item()``), which the meta device cannot follow."""
    from metanet.nn import UNFLinear
    from metanet.nn.baselines import FlatMLP, StatNN

    space = _mlp_space()
    if kind == "unf":
        layer = UNFLinear(space, 1, 2).to(META)
        w = {n: torch.empty(2, 1, *t.shape, device=META) for n, t in space.tensors.items()}
        out = layer(w)
        loss = sum(v.sum() for v in out.values())
        assert all(v.device == META for v in out.values())
    else:
        net = (FlatMLP if kind == "flat" else StatNN)(space, out_features=2).to(META)
        w = {n: torch.empty(2, *t.shape, device=META) for n, t in space.tensors.items()}
        loss = net(w).sum()
    loss.backward()
    assert loss.device == META


@pytest.fixture(scope="module")
def tiny_inrs(tmp_path_factory):
    from tasks.datasets.inr import make_dataset

    root = tmp_path_factory.mktemp("inrs")
    make_dataset(root, per_image=1, cfg=replace(INRConfig(), steps=2, target_psnr=None),
                 num_shards=1, progress=False)  # fmt: skip
    return root


@pytest.mark.parametrize("kind", ["unf", "nfn", "statnn", "flat"])
@pytest.mark.parametrize("regress", [False, True])
def test_one_training_step_stays_on_its_device(tiny_inrs, kind, regress):
    """``tasks.learn.train``'s step on the meta device: the batch copied by ``_to``, the
    forward, the loss, the backward and Adam's update never touch a CPU tensor, and the
    loss comes back detached on the device (it is summed there, read once an epoch)."""
    from tasks.datasets.inr import WeightDataset
    from tasks.learn.train import _batches, _step, _to, build_model

    ds = WeightDataset(tiny_inrs, "train", "weights", standardize=True)
    x, y = _batches(ds, kind, list(range(8)))
    if regress:
        y = y.float()
    model = build_model(kind, ds.space, 1 if regress else 10, hidden=8).to(META)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = _step(model, opt, None, _to(x, META), _to(y, META), regress)
    assert loss.device == META and not loss.requires_grad
    assert all(p.device == META for p in model.parameters())


def test_zoo_training_stays_on_its_device():
    """The batched CNN trainer of ``metanet zoo make`` on the meta device: weights, Adam's
    moments, batches and labels on the device; the batch draws and which models still
    train stay on the host (their values are not needed there)."""
    from dataclasses import replace as with_

    from tasks.datasets import digits, zoo

    hps = [with_(zoo.sample_hparams(i), batch_size=8, steps=3 + i) for i in range(3)]
    w = zoo.train_cnns(hps, digits.load(0.25, seed=0), device=META)
    assert all(t.device == META and t.shape[0] == 3 for t in w.values())


@pytest.mark.parametrize("net", ["unf", "mlp"])
@pytest.mark.parametrize("fam", ["mlp", "cnn", "lm"])
def test_learned_optimizer_unroll_stays_on_its_device(net, fam):
    """Meta-training's inner loop on the meta device: the task (model, data) and its
    weights moved by ``Task.to``, batches indexed there, the rule's update and the
    differentiable meta-loss on the device. (The per-meta-step finiteness check reads
    the loss on the host: the meta device cannot follow that part.)"""
    from tasks.optim.learned_opt.families import family
    from tasks.optim.learned_opt.meta import unroll
    from tasks.optim.learned_opt.rule import PerParameterMLP, UNFUpdate, UpdateRule, init_state

    task = family(fam).task(3, {"mlp": 8, "cnn": 4, "lm": 8}[fam]).to(META)
    rule = UpdateRule(UNFUpdate(task.space) if net == "unf" else PerParameterMLP()).to(META)
    w = task.init()
    assert all(v.device == META for v in w.values())
    loss, w, state = unroll(rule, task, w, init_state(w), 0, 2, differentiable=True)
    loss.backward()
    assert loss.device == META and all(v.device == META for v in w.values())
    assert all(p.grad is not None and p.grad.device == META for p in rule.parameters())


@pytest.mark.parametrize("name", ["statnn", "unf+stats+probe", "none+stats+probe"])
def test_generalization_step_stays_on_its_device(name, tmp_path):
    """``generalization.fit``'s step on the meta device: the batch (weights, probe
    features) copied by ``_on``, the predictor's forward, the MSE and the backward.
    (Its epoch ends read the validation τ on the host, which meta cannot follow.)"""
    from metanet.probe import probe_space
    from tasks.datasets.zoo import make_zoo
    from tasks.learn.generalization import _call, _on, _Split, build_predictor, zoo_probe_features

    make_zoo(tmp_path, 12, max_steps=2, num_shards=1, progress=False)
    probe = zoo_probe_features(tmp_path, 4) if "probe" in name else None
    split = _Split(tmp_path, "train", probe, graphs=False)
    probes = probe_space(split.space, {k: v[0] for k, v in probe.items()}) if probe else None
    model = build_predictor(name, split.space, 8, probes=probes).to(META)
    x = _on(split.batch(torch.arange(4)), META)
    loss = torch.nn.functional.mse_loss(_call(model, x).reshape(-1), split.y[:4].to(META))
    loss.backward()
    assert loss.device == META
    assert all(p.grad is None or p.grad.device == META for p in model.parameters())


@pytest.mark.parametrize("kind", ["unf", "flat"])
def test_inr_editor_step_stays_on_its_device(kind):
    """``inr_edit.train_editor``'s step on the meta device: the pairs moved by
    ``EditPairs.to``, the editor's scalers and core, the render and the image loss.
    (The GMN editor reads graph sizes from values, which the meta device cannot follow.)"""
    from tasks.learn.inr_edit import _loss, build_editor, make_edit_pairs

    pairs = make_edit_pairs(cfg=INRConfig(hidden=8, steps=1), limit=8)
    editor = build_editor(kind, pairs, 8, pairs.indices("train")).to(META)
    loss = _loss(editor, pairs.to(META), torch.arange(4))
    loss.backward()
    assert loss.device == META
    assert all(p.grad is None or p.grad.device == META for p in editor.parameters())


@pytest.mark.parametrize("name", ["resnet", "vit"])
def test_mixed_zoo_training_stays_on_its_device(name):
    """``mixed_zoo.train_batched`` (the ResNet-like and ViT-like families) on the meta
    device: weights, Adam's moments, images, labels and rows on the device; the batch
    draws and which models still train on the host. (``fit_mixed`` trains a GMN, whose
    graph sizes the meta device cannot follow.)"""
    from tasks.datasets import digits
    from tasks.datasets.mixed_zoo import ARCHITECTURES, train_batched
    from tasks.datasets.zoo import sample_hparams

    arch = next(a for a in ARCHITECTURES if name in a.name)
    hps = [h for h in (sample_hparams(i, arch) for i in range(30)) if h.batch_size == 16][:3]
    hps = [type(h)(**{**h.__dict__, "steps": 2 + k}) for k, h in enumerate(hps)]
    w = train_batched(arch, hps, digits.load(0.25, seed=0), device=META)
    assert all(t.device == META and t.shape[0] == 3 for t in w.values())


def test_gpu_benchmark_script_runs_in_smoke_mode(tmp_path):
    """``benchmarks/gpu.py --smoke``: every job of the device script at toy sizes, the CPU
    standing in for the GPU, so the script a device session runs does not rot."""
    import importlib.util

    from tests.docs.test_readme import ROOT

    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks" / "gpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "gpu.md"
    bench.main(["--smoke", "--inr-steps", "2", "--data", str(tmp_path / "inrs"), "--out", str(out)])
    text = out.read_text()
    for job in ("INR fitting", "unf training epoch", "scalegmn training epoch", "GMN forward"):
        assert job in text, job
