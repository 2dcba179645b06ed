"""Time and peak memory of ``converters.from_module`` at real sizes.

GPT-2 small (124M parameters, random init, Hugging Face ``GPT2LMHeadModel``) and
ResNet-50 (25.6M, written here: bottleneck blocks, BatchNorm, downsampling shortcuts).
Each conversion runs in a fresh process; the baseline in the same run is
``torch.export.export`` alone on the same model (the tracing step every rule-based
converter needs), so the ratio says what our propagation and space building add.
Peak memory is the resident-set high-water mark above the model's own footprint.

    python benchmarks/convert.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings

import torch
from _memory import reset_peak, rss_bytes
from torch import nn


class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class ResNet50(nn.Module):
    def __init__(self, classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        )
        blocks, cin = [], 64
        for width, n, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for i in range(n):
                blocks.append(Bottleneck(cin, width, stride if i == 0 else 1))
                cin = width * 4
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def build(name: str):
    torch.manual_seed(0)
    if name == "gpt2-small":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(use_cache=False)
        cfg._attn_implementation = "eager"
        return GPT2LMHeadModel(cfg).eval(), (torch.randint(0, 50257, (1, 16)),)
    return ResNet50().eval(), (torch.randn(1, 3, 64, 64),)


def worker(name: str, method: str, repeats: int) -> dict:
    from converters import from_module

    model, inputs = build(name)
    params = sum(p.numel() for p in model.parameters())
    times, peaks, free = [], [], None
    for _ in range(repeats):
        base = rss_bytes("VmRSS")
        reset_peak()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            if method == "metanet":
                space = from_module(model, inputs)
                free = space.free_dims()
            else:
                torch.export.export(model, inputs, strict=False)
            times.append(time.perf_counter() - t0)
        peaks.append(rss_bytes("VmHWM") - base)
    return {
        "model": name,
        "method": method,
        "params": params,
        "seconds": min(times),
        "first": times[0],
        "peak": max(peaks),
        "free_dims": free,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.repeats)))
        return
    rows = []
    for name in ("gpt2-small", "resnet50"):
        for method in ("metanet", "export-only"):
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                name,
                method,
                "--repeats",
                str(args.repeats),
            ]
            res = subprocess.run(cmd, check=True, capture_output=True, text=True)
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    print(
        f"torch {torch.__version__}, {os.cpu_count()} cores; best of {args.repeats} (first call in brackets)"
    )
    print(
        "| model | params | method | time (s) | peak memory above model (MiB) | free dims found |"
    )
    print("|---|---:|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['method']} | {r['seconds']:.2f} "
            f"({r['first']:.2f}) | {r['peak'] / 2**20:.0f} | {r['free_dims'] or '–'} |"
        )
    for name in ("gpt2-small", "resnet50"):
        ours, base = (
            next(r for r in rows if r["model"] == name and r["method"] == m)
            for m in ("metanet", "export-only")
        )
        print(f"{name}: from_module / export alone = {ours['seconds'] / base['seconds']:.2f}×")


if __name__ == "__main__":
    main()
