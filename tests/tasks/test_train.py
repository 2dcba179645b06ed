"""The metanetwork training loop: outputs, and 2-process DDP (torchrun) = 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tasks.datasets.inr import INRConfig, make_dataset
from tasks.learn.train import KINDS, train

ROOT = Path(__file__).resolve().parents[2]
RUN = """
import json, os, sys, torch
torch.set_num_threads(1)
from tasks.learn.train import train
r = train(sys.argv[1], sys.argv[2], epochs=2, batch_size=32, limit=256, augment=False,
          progress=False)
if int(os.environ.get("RANK", "0")) == 0:
    print("RESULT " + json.dumps({"loss": [h["train_loss"] for h in r.history],
                                  "test": r.test_accuracy, "world": r.world_size,
                                  "group_left": torch.distributed.is_initialized()}))
"""


@pytest.fixture(scope="module")
def inrs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inrs")
    make_dataset(
        root, per_image=1, cfg=INRConfig(hidden=8, depth=1, steps=20), num_shards=2, progress=False
    )
    return root


@pytest.mark.parametrize("kind", KINDS)
def test_every_model_trains_and_writes_its_outputs(inrs, tmp_path, kind):
    r = train(kind, inrs, out=tmp_path, epochs=1, batch_size=32, limit=128, progress=False)
    assert 0 <= r.test_accuracy <= 1 and r.history[0]["train_loss"] > 0
    for name in ("metrics.jsonl", "result.json", "model.safetensors", "curves.png"):
        assert (tmp_path / name).exists(), name
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["epoch"] == 1


def test_two_processes_match_one(inrs, tmp_path):
    args = ["flat", str(inrs)]
    single = _run_args([sys.executable], args, tmp_path)
    double = _run_args(
        # --standalone: a free local port for the rendezvous (the default, 29500, may be
        # taken by another job on a shared machine)
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
        args,
        tmp_path,
    )
    assert (single["world"], double["world"]) == (1, 2)
    assert not double["group_left"]  # gone after the barrier every rank passes in train()
    for a, b in zip(single["loss"], double["loss"]):
        assert abs(a - b) <= 1e-4 * abs(a)
    assert abs(single["test"] - double["test"]) <= 0.01


def _run_args(cmd, args, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    script = tmp_path / "run.py"
    script.write_text(RUN)
    out = subprocess.run(
        [*cmd, str(script), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-6000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def test_canonicalize_feeds_sign_canonical_weights(inrs, tmp_path):
    from metanet import apply_signs, canonicalize_sign, random_signs
    from tasks.datasets.inr import WeightDataset

    plain = WeightDataset(inrs, "train")
    canon = WeightDataset(inrs, "train", canonicalize=True)
    want = canonicalize_sign(plain.tensors, plain.space)
    for n in want:
        assert torch.equal(canon.tensors[n], want[n])
    # every INR of the dataset maps to the same weights as a sign-flipped copy of it
    flipped = apply_signs(
        plain.tensors, plain.space, random_signs(plain.space, batch=(len(plain),))
    )
    again = canonicalize_sign(flipped, plain.space)
    for n in want:
        torch.testing.assert_close(again[n], want[n], rtol=0, atol=0)
    from metanet.cli import main

    argv = ["train", "unf", str(inrs), "--canonicalize", "--epochs", "1", "--limit", "64"]
    assert main([*argv, "--batch-size", "32", "-q", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "result.json").read_text())["epochs"] == 1


def test_flip_signs_augments_with_random_sign_twins(inrs, tmp_path):
    """``flip_signs``: every sample drawn is a random sign twin (a random element of the
    whole group) of its INR: same image, same canonical form, other weights."""
    from torch.func import functional_call

    from metanet import canonicalize_sign
    from tasks.datasets.inr import Siren, WeightDataset, image_grid

    plain = WeightDataset(inrs, "train")
    aug = WeightDataset(inrs, "train", augment=True, flip_signs=True, seed=3)
    assert not WeightDataset(
        inrs, "train", augment=True, flip_signs=True, canonicalize=True
    ).flip_signs
    cfg = INRConfig(**json.loads((Path(inrs) / "dataset.json").read_text())["config"])
    net, coords = Siren(cfg).double(), image_grid(8, 8).double()
    moved = 0
    for i in range(4):
        w0 = {k: v.double() for k, v in plain.weights(i).items()}
        w1 = {k: v.double() for k, v in aug[i][0].items()}
        torch.testing.assert_close(
            functional_call(net, w1, (coords,)), functional_call(net, w0, (coords,))
        )
        c0, c1 = canonicalize_sign(w0, plain.space), canonicalize_sign(w1, plain.space)
        # canonical forms agree up to the permutation drawn: compare sorted biases
        key = lambda c: torch.sort(c["net.0.bias"]).values  # noqa: E731
        torch.testing.assert_close(key(c1), key(c0))
        # a permutation alone keeps the sorted biases; a sign flip changes them
        s0, s1 = (torch.sort(w["net.0.bias"]).values for w in (w0, w1))
        moved += not torch.equal(s0, s1)
    assert moved > 0
    from metanet.cli import main

    argv = ["train", "unf", str(inrs), "--flip-signs", "--epochs", "1", "--limit", "64"]
    assert main([*argv, "--batch-size", "32", "-q", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "result.json").read_text())["epochs"] == 1
