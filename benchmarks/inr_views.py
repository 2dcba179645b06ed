"""More INRs of the training images: one INR dataset from a base set and extra views.

Weight-space classifiers overfit small INR sets (real MNIST here: 3,500 training images);
fitting several INRs to each *training* image (other fitting seeds: other weights, the
same image) is the data augmentation of Shamsian et al. 2024 ("Improved generalization of
weight space networks via augmentations"). Validation and test keep one INR per image, so
their numbers stay comparable with the base set's.

Usage (the views are fitted from the base set's training images only)::

    python benchmarks/inr_views.py images out/inr-mnist out/mnist5000.npz out/train-images.npz
    python benchmarks/inr_views.py fit out/inr-mnist out/train-images.npz out/views \
        --per-image 2 --seed 1 [--shard I/N --num-shards N]
    python benchmarks/inr_views.py join out/inr-mnist out/views out/train-images.npz out/joined

``images`` writes the base set's training images (``index``: their position in the
source). ``fit`` fits ``--per-image`` INRs to each of them with the base's recipe and
other fitting seeds (``--seed``, not the base's), all in the training split; shards run
in parallel processes as with ``metanet inr make``. ``join`` writes a dataset whose
training split is the base's plus every view (each row's ``image`` mapped back to the
source's index, split ``train``); the views must be fitted with the base's INR recipe and
space, of training images only. The base's render ceiling is kept (it is the images' own:
one render per image).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.datasets.inr import INDEX_KEY, WeightDataset, _save_shard, _shard_path  # noqa: E402


def images(base: Path, source: Path, out: Path) -> None:
    rows = WeightDataset(base, "train").rows
    index = np.array(sorted({r["image"] for r in rows}))
    data = np.load(source)
    np.savez(out, images=data["images"][index], labels=data["labels"][index], index=index)
    print(f"wrote {out}: {len(index)} training images of {base}")


def fit(base: Path, image_file: Path, out: Path, per_image: int, seed: int, shard, num_shards):
    from tasks.datasets.inr import INRConfig, make_dataset

    meta = json.loads((base / "dataset.json").read_text())
    if seed == meta.get("seed", 0):
        raise SystemExit(f"--seed {seed} is {base}'s own: the views would repeat its INRs")
    make_dataset(
        out,
        per_image=per_image,
        cfg=INRConfig(**meta["config"]),
        images=image_file,
        resolution=meta["resolution"],
        shard=shard,
        num_shards=num_shards,
        seed=seed,
        val=0.0,
        test=0.0,
        progress=False,
    )


def join(base: Path, views: Path, index_file: Path, out: Path) -> None:
    from safetensors import safe_open

    meta_b = json.loads((base / "dataset.json").read_text())
    meta_v = json.loads((views / "dataset.json").read_text())
    if meta_b["config"] != meta_v["config"]:
        raise SystemExit(
            f"{views}: INR recipe {meta_v['config']} is not {base}'s {meta_b['config']}"
        )
    if (base / "space.json").read_text() != (views / "space.json").read_text():
        raise SystemExit(f"{views}: another WeightSpace than {base}'s")
    index = np.load(index_file)["index"]
    train = {r["image"] for r in WeightDataset(base, "train").rows}
    if out.exists():
        raise SystemExit(f"{out} exists")
    nb, nv = meta_b["num_shards"], meta_v["num_shards"]
    n = nb + nv
    shards, seeds = [], set()
    for i in range(nv):  # every row checked before anything is written
        path = _shard_path(views, i, nv)
        with safe_open(str(path), framework="pt") as f:
            rows = json.loads(f.metadata()[INDEX_KEY])
        for r in rows:
            r["image"] = int(index[r["image"]])
            if r["image"] not in train:
                raise SystemExit(f"{path}: image {r['image']} is not in {base}'s training split")
            r["split"] = "train"
            seeds.add(r["seed"])
        shards.append((path, rows))
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for i in range(nb):
        shutil.copyfile(_shard_path(base, i, nb), _shard_path(tmp, i, n))
    for i, (path, rows) in enumerate(shards):
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        _save_shard(_shard_path(tmp, nb + i, n), tensors, rows)
    shutil.copyfile(base / "space.json", tmp / "space.json")
    if (base / "render_ceiling.json").exists():
        shutil.copyfile(base / "render_ceiling.json", tmp / "render_ceiling.json")
    per = meta_v["per_image"]
    meta = {
        **meta_b,
        "num_shards": n,
        "per_image": f"{1 + per} (train), 1 (val/test)",
        "views": {"from": str(views), "per_image": per, "seed": meta_v["seed"]},
    }
    (tmp / "dataset.json").write_text(json.dumps(meta, indent=1))
    WeightDataset(tmp)  # it reads back as one dataset
    tmp.rename(out)
    full = WeightDataset(out)
    counts = {s: sum(r["split"] == s for r in full.rows) for s in ("train", "val", "test")}
    print(f"wrote {out}: {counts} INRs ({len(seeds)} new fitting seeds)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("images")
    a.add_argument("base", type=Path)
    a.add_argument("source", type=Path)
    a.add_argument("out", type=Path)
    f = sub.add_parser("fit")
    f.add_argument("base", type=Path)
    f.add_argument("images", type=Path)
    f.add_argument("out", type=Path)
    f.add_argument("--per-image", type=int, default=2)
    f.add_argument("--seed", type=int, default=1)
    f.add_argument("--shard", default=None, help="I/N: only shard I")
    f.add_argument("--num-shards", type=int, default=8)
    b = sub.add_parser("join")
    b.add_argument("base", type=Path)
    b.add_argument("views", type=Path)
    b.add_argument("index", type=Path)
    b.add_argument("out", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.cmd == "images":
        images(args.base, args.source, args.out)
    elif args.cmd == "fit":
        shard = tuple(int(v) for v in args.shard.split("/")) if args.shard else None
        fit(args.base, args.images, args.out, args.per_image, args.seed, shard, args.num_shards)
    else:
        join(args.base, args.views, args.index, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
