"""metanet's pipelines on a GPU beside the same jobs on the CPU, in one script.

Made for the lent device machine: ``PYTHONPATH=. python benchmarks/gpu.py`` with what is
preinstalled there (torch, transformers, scipy), no downloads, a few minutes. Each job
runs on the CPU (one thread, the figure README's tables are made with) and on the GPU, on
the same inputs, and the table gives both rates and their ratio:

* **INR fitting**: SIRENs 2-32-32-1 (the DWSNets recipe) fitted to generated 8×8 images,
  a fixed number of Adam steps (no early stop, so both sides do the same work);
  ``tasks.datasets.inr.fit_sirens(device=)``;
* **weight matching**: two random-init Llama blocks at TinyLlama-1.1B's widths (hidden
  2048, MLP 5632, 32 heads of 64; 2 layers), one sweep over every group;
  ``tasks.align.weight_matching(device=)``: cost matrices on the device, each assignment
  on the CPU (scipy), so the GPU shortens only the first part;
* **merge**: TIES over three 5632 × 2048 tensors (base + two fine-tunes), the per-tensor
  rule the checkpoint engine runs with ``--device cuda``; in bfloat16 (mergekit's
  ``dtype: bfloat16``) and float32.

* **metanetwork epochs**: one training epoch (and its val/test evaluation) of UNF, GMN,
  the graph transformer and ScaleGMN on a digits INR set made here (1,797 SIRENs, 100
  steps each), ``tasks.learn.train.train(device=)``;
* **GMN on ViT-B/16**: forward and backward of a GMN (hidden 16, 3 layers) on the
  parameter graphs of two ViT-B/16s (86M edges each, edge-chunked) on the GPU; the CPU
  column is README's figure (1,074 s on 2 cores): 18 minutes do not fit this script.

Not measured yet: learned-optimizer meta-training. ``--smoke`` runs every job at toy
sizes with the CPU standing in for the GPU (a test runs it, so the script does not rot
between the sessions that have a GPU).

    PYTHONPATH=. python benchmarks/gpu.py --out benchmarks/results/gpu.md
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat: int = 1) -> float:
    """Median wall seconds of ``fn()`` over ``repeat`` runs (after one warm-up on a GPU)."""
    if device.type == "cuda":
        fn()
        _sync(device)
    times = []
    for _ in range(repeat):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def inr_fitting(device: torch.device, n: int, steps: int) -> float:
    """INRs fitted per second (``steps`` Adam steps each)."""
    from tasks.datasets.inr import INRConfig, fit_sirens, image_grid

    g = torch.Generator().manual_seed(0)
    # smooth generated images: a few random Gaussian bumps each
    coords = image_grid(8, 8)
    centers = torch.rand(n, 3, 2, generator=g) * 2 - 1
    d = ((coords[None, :, None, :] - centers[:, None, :, :]) ** 2).sum(-1)
    targets = torch.exp(-4 * d).sum(-1, keepdim=True).clamp(0, 1)
    cfg = replace(INRConfig(), steps=steps, target_psnr=None)
    seconds = timed(lambda: fit_sirens(targets, coords, list(range(n)), cfg, device=device), device)
    return n / seconds


def llama_pair():
    import transformers

    from converters import from_module

    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=2048, intermediate_size=5632, num_hidden_layers=2,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=64,
        use_cache=False,
    )  # fmt: skip
    cfg._attn_implementation = "eager"  # as converters.pretrained builds HF models
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(transformers.LlamaForCausalLM(cfg).eval())
    space = from_module(models[0], (torch.randint(0, 256, (1, 8)),))
    return space, [{k: v.detach() for k, v in m.state_dict().items()} for m in models]


def matching_seconds(space, a, b, device: torch.device) -> float:
    from tasks.align import weight_matching

    return timed(lambda: weight_matching(space, a, b, max_sweeps=1, device=device), device)


def merge_rate(device: torch.device, dtype: torch.dtype, repeat: int = 5) -> float:
    """TIES merges of one 5632 × 2048 tensor per second."""
    from tasks.merge.methods import merge_tensor

    g = torch.Generator().manual_seed(0)
    base = torch.randn(5632, 2048, generator=g)
    xs = [base + 0.01 * torch.randn(5632, 2048, generator=g) for _ in range(2)]
    base, xs = base.to(device, dtype), [x.to(device, dtype) for x in xs]
    mp = [{"weight": 0.5, "density": 0.3}] * 2

    def run():
        merge_tensor("ties", "w", xs, base, model_params=mp, compute_dtype=dtype)

    return 1 / timed(run, device, repeat)


def epoch_seconds(kind: str, root: Path, device: torch.device, batch: int = 64) -> float:
    """Seconds of one training epoch of ``kind`` on the INR set at ``root`` (with its
    val/test evaluation, as ``metanet train`` runs it)."""
    from tasks.learn.train import train

    def run():
        train(kind, root, epochs=1, batch_size=batch, hidden=16, progress=False, device=device)

    return timed(run, device)


def inr_set(root: Path, steps: int, smoke: bool = False) -> Path:
    """A digits INR set (made once): SIRENs of ``steps`` Adam steps (``smoke``: 80
    generated 8×8 images instead of the digits)."""
    from tasks.datasets.inr import INRConfig, make_dataset

    if not (root / "dataset.json").exists():
        cfg = replace(INRConfig(), steps=steps, target_psnr=None)
        images = None
        if smoke:
            import numpy as np

            g = np.random.default_rng(0)
            images = root.parent / f"{root.name}-images.npz"
            images.parent.mkdir(parents=True, exist_ok=True)
            np.savez(images, images=g.random((80, 8, 8)), labels=np.arange(80) % 10)
        make_dataset(root, per_image=1, cfg=cfg, images=images, num_shards=1, progress=False)
    return root


def vit_gmn_seconds(device: torch.device, smoke: bool = False) -> float:
    """GMN forward+backward on a batch of two ViT-B/16 parameter graphs (a 2-block
    ViT-tiny with ``smoke``)."""
    from torch_geometric.data import Batch

    from converters import from_module
    from metanet import to_graph
    from metanet.nn import GMN

    if smoke:
        from tests.fixtures.architectures import vit_tiny as build

        x = torch.randn(1, 3, 16, 16)
    else:
        from tests.fixtures.large import vit_b_16 as build

        x = torch.randn(1, 3, 224, 224)
    models = [build(seed) for seed in (0, 1)]
    space = from_module(models[0], x)
    graphs = [to_graph(space, m.state_dict()) for m in models]
    batch = Batch.from_data_list(graphs).to(device)
    del graphs, models
    torch.manual_seed(0)
    gmn = GMN(batch.x.shape[1], batch.edge_attr.shape[1], hidden=16, layers=3).to(device)

    def run():
        gmn.zero_grad()
        gmn(batch).sum().backward()

    return timed(run, device)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu.md"))
    ap.add_argument("--inr-steps", type=int, default=200)
    ap.add_argument(
        "--skip", nargs="*", default=[], help="jobs to leave out: inr match merge epoch vit"
    )
    ap.add_argument("--data", default=str(ROOT / "out" / "gpu-inrs"), help="INR set for epochs")
    ap.add_argument(
        "--smoke", action="store_true", help="toy sizes, the CPU standing in for the GPU"
    )
    args = ap.parse_args(argv)
    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py: no CUDA device here")
    cpu = torch.device("cpu")
    gpu = cpu if smoke else torch.device("cuda")
    torch.set_num_threads(1)
    name = "CPU (--smoke)" if smoke else torch.cuda.get_device_name(0)
    rows = []

    def row(job, unit, on_cpu, on_gpu, higher_is_better=True):
        ratio = on_gpu / on_cpu if higher_is_better else on_cpu / on_gpu
        rows.append(f"| {job} | {on_cpu:,.3g} {unit} | {on_gpu:,.3g} {unit} | **{ratio:,.0f}×** |")
        print(rows[-1], flush=True)

    if "inr" not in args.skip:
        cpu_rate = inr_fitting(cpu, 8 if smoke else 256, args.inr_steps)
        gpu_rate = inr_fitting(gpu, 8 if smoke else 16384, args.inr_steps)
        row(f"INR fitting (2-32-32-1, {args.inr_steps} steps)", "INRs/s", cpu_rate, gpu_rate)
    if "match" not in args.skip and not smoke:
        space, (a, b) = llama_pair()
        cpu_s = matching_seconds(space, a, b, cpu)
        gpu_s = matching_seconds(space, a, b, gpu)
        row("weight matching, 2 Llama blocks at 1.1B widths, 1 sweep", "s", cpu_s, gpu_s,
            higher_is_better=False)  # fmt: skip
    if "merge" not in args.skip and not smoke:
        for dtype in (torch.bfloat16, torch.float32):
            label = str(dtype).removeprefix("torch.")
            row(f"TIES merge, 5632 × 2048 tensor, {label}", "tensors/s",
                merge_rate(cpu, dtype, 3), merge_rate(gpu, dtype))  # fmt: skip
    if "epoch" not in args.skip:
        root = inr_set(Path(args.data), 2 if smoke else 100, smoke)
        for kind in ("unf", "gmn", "transformer", "scalegmn"):
            b = 16 if smoke else 64
            row(f"{kind} training epoch, digits INRs", "s", epoch_seconds(kind, root, cpu, b),
                epoch_seconds(kind, root, gpu, b), higher_is_better=False)  # fmt: skip
    if "vit" not in args.skip:
        on_gpu = vit_gmn_seconds(gpu, smoke)
        on_cpu = vit_gmn_seconds(cpu, smoke) if smoke else 1074.0
        label = "ViT-tiny (--smoke)" if smoke else "ViT-B/16 (CPU: README's 1,074 s, 2 cores)"
        row(f"GMN forward+backward, 2 × {label}", "s", on_cpu, on_gpu, higher_is_better=False)
    lines = [
        f"{name} (torch {torch.__version__}) beside the CPU of the same machine "
        f"({platform.processor() or platform.machine()}, one torch thread); "
        "`PYTHONPATH=. python benchmarks/gpu.py`.",
        "",
        "| job | CPU, 1 thread | GPU | GPU vs CPU |",
        "|---|---:|---:|---:|",
        *rows,
    ]
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
