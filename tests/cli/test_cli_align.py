"""``metanet align / merge / barrier`` on saved checkpoints: round trips and clean failures."""

from __future__ import annotations

import pytest
import torch

import metanet
from converters import from_module
from metanet.cli import main
from tasks.datasets import digits


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two small digit MLPs trained from different seeds, saved with their WeightSpace."""
    root = tmp_path_factory.mktemp("ckpt")
    d = digits.load().flat()
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = digits.train(digits.mlp(64, 2), d, epochs=10, lr=3e-3, batch_size=128, seed=seed)
        space = from_module(model, d.x_train[:2])
        paths.append(root / f"m{seed}.safetensors")
        metanet.save(paths[-1], model.state_dict(), space)
    return paths


def test_align_round_trip(pair, tmp_path, capsys):
    a, b = pair
    out = tmp_path / "b_aligned.safetensors"
    args = ["align", str(a), str(b), "-o", str(out), "--model", "tests.cli_models:digits_mlp"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "wrote" in captured.out and "same function" in captured.err
    wa, space = metanet.load(a)
    wb, _ = metanet.load(b)
    aligned, space2 = metanet.load(out)
    assert space2 == space
    # a relabelling of b (same multiset of rows) that is closer to a
    rows = torch.cdist(
        aligned["0.weight"], wb["0.weight"], compute_mode="donot_use_mm_for_euclid_dist"
    ).min(1)
    assert rows.values.max() == 0 and len(set(rows.indices.tolist())) == 64
    assert not torch.equal(rows.indices, torch.arange(64))  # something moved

    def dist(w):
        return sum(float((w[k] - wa[k]).pow(2).sum()) for k in wa)

    assert dist(aligned) < 0.8 * dist(wb)
    model = digits.mlp(64, 2).eval()
    x = torch.randn(16, 64)
    model.load_state_dict(wb)
    yb = model(x)
    model.load_state_dict(aligned)
    torch.testing.assert_close(model(x), yb, rtol=1e-5, atol=1e-5)


def test_merge_and_barrier(pair, tmp_path, capsys):
    a, b = pair
    out = tmp_path / "merged.safetensors"
    assert main(["merge", str(a), str(b), "-o", str(out), "-q"]) == 0
    merged, _ = metanet.load(out)
    wa, _ = metanet.load(a)
    assert set(merged) == set(wa) and not torch.equal(merged["0.weight"], wa["0.weight"])
    naive = tmp_path / "naive.safetensors"
    assert main(["merge", str(a), str(b), "-o", str(naive), "--method", "naive", "-q"]) == 0
    wb, _ = metanet.load(b)
    torch.testing.assert_close(
        metanet.load(naive)[0]["0.weight"], (wa["0.weight"] + wb["0.weight"]) / 2
    )
    three = tmp_path / "three.safetensors"
    assert main(["merge", str(a), str(b), str(a), "-o", str(three), "-q"]) == 0  # MergeMany
    capsys.readouterr()
    plot = tmp_path / "barrier.png"
    argv = [
        "barrier",
        str(a),
        str(b),
        "--model",
        "tests.cli_models:digits_mlp",
        "--data",
        "digits-flat",
        "--alphas",
        "5",
        "--plot",
        str(plot),
        "-q",
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    naive_b = float(text.split("naive: barrier ")[1].split()[0])
    aligned_b = float(text.split("aligned: barrier ")[1].split()[0])
    assert aligned_b < naive_b and plot.exists()


@pytest.mark.parametrize("match", ["activation", "ste"])
def test_align_by_activations_or_ste(pair, tmp_path, capsys, match):
    """``--match activation/ste`` gives exactly the library's element on the training split;
    without a model or data it says what to pass and writes nothing."""
    from tasks.align import activation_matching, ste_matching

    a, b = pair
    out = tmp_path / f"{match}.safetensors"
    model = ["--model", "tests.cli_models:digits_mlp"]
    argv = ["align", str(a), str(b), "-o", str(out), "--match", match]
    assert main([*argv, *model, "-q"]) == 2
    assert "--match-data" in capsys.readouterr().err and not out.exists()
    assert main([*argv, "--match-data", "digits-flat", "-q"]) == 2
    assert "--model" in capsys.readouterr().err and not out.exists()
    argv += [*model, "--match-data", "digits-flat", "--ste-epochs", "1"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert ("STE from activation matching" if match == "ste" else "activation matching") in err
    assert "same function" in err
    wa, space = metanet.load(a)
    wb, _ = metanet.load(b)
    d = digits.load().flat()
    train = digits.batches(d.x_train, d.y_train, 128)
    net = digits.mlp(64, 2).eval()
    if match == "ste":
        g = ste_matching(net, space, wa, wb, train, epochs=1, lr=1e-2, init="activation")
    else:
        ma, mb = digits.mlp(64, 2).eval(), digits.mlp(64, 2).eval()
        ma.load_state_dict(wa)
        mb.load_state_dict(wb)
        g = activation_matching(ma, mb, space, train)
    want = space.apply(wb, g)
    got, _ = metanet.load(out)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert not torch.equal(got["0.weight"], wb["0.weight"])


def test_mismatched_pair_and_corrupt_file_leave_no_output(pair, tmp_path, capsys):
    a, _ = pair
    torch.manual_seed(0)
    other = digits.mlp(32, 2)
    odd = tmp_path / "odd.safetensors"
    metanet.save(odd, other.state_dict(), from_module(other, torch.randn(2, 64)))
    out = tmp_path / "out.safetensors"
    assert main(["align", str(a), str(odd), "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert "0.weight" in err and "(32, 64)" in err and not out.exists()

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(a.read_bytes()[:-100])
    assert main(["align", str(a), str(corrupt), "-o", str(out), "-q"]) == 2
    assert "corrupt.safetensors" in capsys.readouterr().err and not out.exists()
    assert main(["merge", str(a), str(corrupt), "-o", str(out), "-q"]) == 2
    assert not out.exists()
    assert list(tmp_path.iterdir()) == sorted([odd, corrupt]) or set(tmp_path.iterdir()) == {
        odd,
        corrupt,
    }


def test_align_never_overwrites_an_input(pair, capsys):
    a, b = pair
    before = b.read_bytes()
    assert main(["align", str(a), str(b), "-o", str(b), "-q"]) == 2
    assert "is an input" in capsys.readouterr().err
    assert b.read_bytes() == before


def test_barrier_without_a_model_says_what_to_pass(pair, capsys):
    a, b = pair
    assert main(["barrier", str(a), str(b), "--data", "digits-flat", "-q"]) == 2
    assert "--model" in capsys.readouterr().err


def test_barrier_refuses_inputs_it_cannot_use(pair, tmp_path, capsys):
    """Integer weights (a barrier interpolates floats: it was a dtype traceback) and a
    --model factory with no example inputs and no --input-shape (a torch.export traceback
    naming NoneType): one line each, exit 2, naming the tensor or the flag."""
    from safetensors.torch import save_file

    from tests.helpers import refused

    a, b = pair
    ints = tmp_path / "int.safetensors"
    sd, space = metanet.load(a)
    metanet.save(ints, {k: (v * 10).round().long() for k, v in sd.items()}, space)
    argv = ["barrier", a, ints, "--data", "digits-flat", "--model"]
    refused([*argv, "tests.cli_models:digits_mlp"], capsys, tmp_path, str(ints), "int64", "float")
    plain = tmp_path / "plain.safetensors"  # no embedded space: the model is traced
    save_file({k: v.contiguous() for k, v in sd.items()}, str(plain))
    alone = ["--data", "digits-flat", "--model", "tests.cli_models:digits_mlp_alone"]
    refused(["barrier", a, plain, *alone], capsys, tmp_path, str(plain), "--input-shape")
    argv = [str(x) for x in ("barrier", a, plain, *alone)]
    assert main([*argv, "--input-shape", "2,64", "--alphas", "3", "-q"]) == 0
    # a metanet checkpoint carries its space: no example inputs needed
    assert main(["barrier", str(a), str(b), *alone, "--alphas", "3", "-q"]) == 0


@pytest.mark.requires("transformers")
def test_align_hugging_face_folders(tmp_path, capsys):
    """A relabelled copy of the real MiniLM checkpoint aligns back onto it, exactly."""
    import shutil
    import warnings

    from converters.pretrained import hf_model
    from tests.fixtures.architectures import minilm_dir

    src = minilm_dir()
    model, inputs = hf_model(src)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        space = from_module(model, inputs)
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(
        space.apply(original, space.random_element(torch.Generator().manual_seed(0)))
    )
    model.save_pretrained(tmp_path / "shuffled")
    shutil.copy2(src / "vocab.txt", tmp_path / "shuffled" / "vocab.txt")
    out = tmp_path / "aligned"
    assert main(["align", str(src), str(tmp_path / "shuffled"), "-o", str(out)]) == 0
    assert "same function" in capsys.readouterr().err
    assert (out / "config.json").exists() and (out / "vocab.txt").exists()
    back, _ = hf_model(out)
    for k, v in back.state_dict().items():
        assert torch.equal(v, original[k]), k


def test_merge_config_aligns_by_activations(pair, tmp_path, capsys):
    """``align: activation`` in a merge config runs the model on ``--match-data`` and merges
    the aligned weights with mergekit's method: exactly the library's element and merge;
    without data it says what to pass and writes nothing."""
    from tasks.align import activation_matching
    from tasks.merge.methods import merge_state_dicts

    a, b = pair
    cfg = tmp_path / "merge.yml"
    cfg.write_text(
        "merge_method: linear\n"
        "models:\n"
        f"  - model: {a}\n    parameters: {{weight: 0.4}}\n"
        f"  - model: {b}\n    parameters: {{weight: 0.6}}\n    align: activation\n"
    )
    out = tmp_path / "merged.safetensors"
    argv = ["merge", "--config", str(cfg), "-o", str(out), "-q"]
    model = ["--model", "tests.cli_models:digits_mlp"]
    assert main([*argv, *model]) == 2
    assert "--match-data" in capsys.readouterr().err and not out.exists()
    assert main([*argv, *model, "--match-data", "digits-flat"]) == 0
    wa, space = metanet.load(a)
    wb, _ = metanet.load(b)
    d = digits.load().flat()
    ma, mb = digits.mlp(64, 2).eval(), digits.mlp(64, 2).eval()
    ma.load_state_dict(wa)
    mb.load_state_dict(wb)
    g = activation_matching(ma, mb, space, digits.batches(d.x_train, d.y_train, 128))
    aligned = space.apply(wb, g)
    want = merge_state_dicts(
        "linear", [wa, aligned], model_params=[{"weight": 0.4}, {"weight": 0.6}]
    )
    got, _ = metanet.load(out)
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k].to(got[k].dtype), rtol=0, atol=1e-6)
    # the aligned model is a different point from B: the merge must differ from unaligned
    plain = merge_state_dicts("linear", [wa, wb], model_params=[{"weight": 0.4}, {"weight": 0.6}])
    assert any(not torch.allclose(got[k], plain[k]) for k in plain if plain[k].is_floating_point())


def test_merge_refuses_nonfinite_plain_state_dict(tmp_path, capsys):
    """The in-memory merge path (plain state dicts, --family) names a NaN tensor, exit 2."""
    sd = {"0.weight": torch.randn(4, 3), "0.bias": torch.zeros(4), "2.weight": torch.randn(2, 4)}
    bad = dict(sd, **{"0.bias": torch.tensor([0.0, float("nan"), 0.0, 0.0])})
    pa, pb = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save(sd, pa)
    torch.save(bad, pb)
    out = tmp_path / "m.safetensors"
    assert main(["merge", str(pa), str(pb), "--family", "mlp", "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert "'0.bias'" in err and "NaN" in err and not out.exists()
