"""Symmetry teleportation (``tasks.optim.teleport.Teleport``): optimizer steps to a target loss.

Two tasks, small ReLU MLPs (``tasks.datasets.digits.mlp(32, 3)``: three hidden layers of 32):

* ``digits`` — scikit-learn's 8×8 digits (1,347 train / 450 test), cross-entropy,
  target full-training-set loss 0.05, test accuracy reported.
* ``teacher`` — regression like the papers': 8-d Gaussian inputs, 4-d targets from a
  random two-hidden-layer tanh teacher (standardized, + N(0, 0.1²) noise), generated
  here with a fixed seed (1,024 train / 2,048 test), MSE, target training MSE 0.1,
  test MSE reported.

Protocol (per task and optimizer, plain SGD and Adam, minibatches of 64):

1. Learning-rate grid without teleportation, ``--seeds`` seeds each: the tuned lr is the
   one with the smallest median steps to target (a run that does not reach it counts as
   the cap). The same grid is run with teleportation too and reported beside it.
2. At the tuned lr, baseline and teleport runs go on to a fixed budget (4× the tuned
   baseline's median steps to target): loss curves, test metric at the step the target
   was reached and at the budget.

Seed ``s`` fixes the initialization and the minibatch order (its own generator), so a
baseline and its teleport run see the same batches; the teleport run differs only by
``Teleport(opt, model, space, every=25, steps=10, lr=0.1, max_ratio=1.5)`` (grad-norm
ascent on the positive-scaling group of every hidden layer, found from the WeightSpace),
teleporting on the current minibatch during the first 250 optimizer steps, then
``step(None)``. One config for every task, optimizer and seed; ``--sensitivity`` adds a
small table of other configs on both tasks with SGD. ``--sharpness`` (on by default)
runs a second method on the whole SGD grid: the *flattening* teleport, which lowers the
top Hessian eigenvalue (``objective="sharpness"``) on 512 training samples every 10 steps
of the first 500, with small group moves (ascent lr 0.01), and compares each method at its
own best lr. Steps to target = first optimizer
step, checked every 10, at which the full-training-set loss is ≤ the target; capped at
3,000 ("not reached" is said so). Teleport ascent steps are not optimizer steps: their
cost is reported separately, as the share of training wall time spent teleporting.

Writes ``benchmarks/results/teleport.md`` and ``teleport_curves.png``.

    python benchmarks/teleport.py                 # about 30 minutes at one thread
    python benchmarks/teleport.py --quick         # 3 seeds, the tuned lrs only, ~2 minutes
    python benchmarks/teleport.py --ceiling       # the best start point of the orbit, ~7 minutes
    python benchmarks/teleport.py --gl            # LeakyReLU MLPs, data-dependent GL teleports
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from converters import from_module  # noqa: E402
from tasks.datasets import digits  # noqa: E402
from tasks.optim.teleport import Teleport, act, group_actions  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GRID = {"sgd": (0.03, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0), "adam": (1e-3, 3e-3, 1e-2, 2e-2, 3e-2)}
# the flattening teleport: minimize the top Hessian eigenvalue on 512 training samples every
# 10 steps, small group moves (a neuron scaled down by s gets a 1/s² larger effective lr)
SHARP = dict(objective="sharpness", every=10, steps=10, lr=0.01, max_ratio=None, until=500,
             batch=512)  # fmt: skip
CAP, CHECK, BATCH = 3000, 10, 64
_T0 = time.perf_counter()


def _progress(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.0f} s] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- tasks
@dataclass
class Task:
    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    loss_fn: object
    target: float
    metric: str  # "test acc" or "test MSE"
    inputs: int
    outputs: int

    def model(self, seed: int, leaky: bool = False) -> nn.Sequential:
        torch.manual_seed(seed)
        if not leaky:
            return digits.mlp(32, 3, inputs=self.inputs, classes=self.outputs)
        layers: list[nn.Module] = []
        prev = self.inputs
        for _ in range(3):
            layers += [nn.Linear(prev, 32), nn.LeakyReLU(0.1)]
            prev = 32
        return nn.Sequential(*layers, nn.Linear(prev, self.outputs))

    @torch.no_grad()
    def train_loss(self, model) -> float:
        return float(self.loss_fn(model(self.x_train), self.y_train))

    @torch.no_grad()
    def test_metric(self, model) -> float:
        out = model(self.x_test)
        if self.metric == "test acc":
            return float((out.argmax(1) == self.y_test).float().mean())
        return float(self.loss_fn(out, self.y_test))


def digits_task() -> Task:
    d = digits.load().flat()
    return Task(
        "digits", d.x_train, d.y_train, d.x_test, d.y_test,
        nn.functional.cross_entropy, 0.05, "test acc", 64, 10,
    )  # fmt: skip


def teacher_task(n_train: int = 1024, n_test: int = 2048, seed: int = 12345) -> Task:
    """Random tanh teacher 8 → 32 → 32 → 4, standardized outputs, noise std 0.1."""
    g = torch.Generator().manual_seed(seed)
    w1 = 1.5 * torch.randn(32, 8, generator=g) / 8**0.5
    w2 = 1.5 * torch.randn(32, 32, generator=g) / 32**0.5
    w3 = torch.randn(4, 32, generator=g) / 32**0.5
    x = torch.randn(n_train + n_test, 8, generator=g)
    y = torch.tanh(torch.tanh(x @ w1.T) @ w2.T) @ w3.T
    y = (y - y.mean(0)) / y.std(0)
    y = y + 0.1 * torch.randn(y.shape, generator=g)
    return Task(
        "teacher", x[:n_train], y[:n_train], x[n_train:], y[n_train:],
        nn.functional.mse_loss, 0.1, "test MSE", 8, 4,
    )  # fmt: skip


# --------------------------------------------------------------------------- runs
@dataclass
class Config:
    every: int = 25
    steps: int = 10
    lr: float = 0.1
    max_ratio: float | None = 1.5
    until: int = 250
    objective: str = "grad_norm"
    batch: int | None = None  # teleport batch: None = the current minibatch, else a sample
    kinds: tuple[str, ...] = ("scale", "gl")  # group actions (``group_actions(kinds=)``)

    def __str__(self) -> str:
        return (
            f"objective={self.objective}, every={self.every}, steps={self.steps}, lr={self.lr}, "
            f"max_ratio={self.max_ratio}, first {self.until} steps"
            + (f", on {self.batch} training samples" if self.batch else "")
            + (f", actions {'+'.join(self.kinds)}" if self.kinds != ("scale", "gl") else "")
        )


@dataclass
class Run:
    hit: int | None  # optimizer steps to target, None: not reached within the cap
    metric_at_hit: float | None
    metric_end: float
    steps_run: int
    curve: list[float] = field(default_factory=list)  # train loss every CHECK steps
    train_s: float = 0.0  # wall time in forward/backward/step (evaluation excluded)
    teleport_s: float = 0.0  # of which inside teleports
    teleports: int = 0
    accepted: int = 0
    ratios: list[float] = field(default_factory=list)  # objective after / before
    drift: float = 0.0  # max |batch loss after - before| over accepted teleports
    diverged: bool = False


def _space(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return from_module(model, x[:2])


_SCALE_ACTIONS: dict[str, list] = {}  # per task: the MLP's scaling actions (one architecture)


def _rescale(model: nn.Module, task: Task, scales: tuple[float, ...]) -> None:
    """Apply one layer-wise element of the positive-scaling group in place: every neuron
    of hidden layer ``i`` scaled by ``scales[i]`` (incoming weights and bias × s, outgoing
    weights × 1/s). The function is unchanged; only the point on the orbit moves."""
    actions = _SCALE_ACTIONS.get(task.name)
    if actions is None:
        x = task.x_train
        actions = list(group_actions(model, _space(model, x), x[:8], kinds=("scale",)))
        _SCALE_ACTIONS[task.name] = actions
    if len(actions) != len(scales):
        raise ValueError(f"{len(scales)} scales for {len(actions)} scaling groups")
    w = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for a, s in zip(actions, scales):
        w = act(w, a, torch.full((a.size,), math.log(s)))
    with torch.no_grad():
        for k, p in model.state_dict().items():
            p.copy_(w[k])


def run(
    task: Task, opt_name: str, lr: float, seed: int, cfg: Config | None, budget=None,
    scales: tuple[float, ...] | None = None, cap: int = CAP, leaky: bool = False,
) -> Run:  # fmt: skip
    """Train until the target is reached (or ``cap``), or to ``budget`` steps if given
    (then also past the target, and on to the target if the budget ends before it).
    ``scales``: start from a layer-wise rescaled point of the same orbit (``_rescale``).
    ``leaky``: the same MLP with LeakyReLU(0.1), whose layers also have the papers'
    data-dependent GL action."""
    model = task.model(seed, leaky)
    if scales is not None:
        if leaky:
            raise ValueError("scales: the start-point search is for the ReLU MLPs")
        _rescale(model, task, scales)
    params = model.parameters()
    opt = torch.optim.SGD(params, lr=lr) if opt_name == "sgd" else torch.optim.Adam(params, lr=lr)
    tp = None
    if cfg is not None:
        space = _space(model, task.x_train)
        tp = Teleport(
            opt, model, space, every=cfg.every, steps=cfg.steps,
            actions=group_actions(model, space, task.x_train[:8], kinds=cfg.kinds),
            lr=cfg.lr, max_ratio=cfg.max_ratio, loss_fn=task.loss_fn,
            objective=cfg.objective,
        )  # fmt: skip
    gen = torch.Generator().manual_seed(10_000 + seed)
    tgen = torch.Generator().manual_seed(20_000 + seed)  # teleport batches, own stream
    n = len(task.y_train)
    perm, pos = torch.randperm(n, generator=gen), 0
    r = Run(None, None, float("nan"), 0)
    step = 0
    while step < cap:
        if pos + BATCH > n:  # drop the last partial batch of each epoch
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos : pos + BATCH]
        pos += BATCH
        x, y = task.x_train[idx], task.y_train[idx]
        t0 = time.perf_counter()
        loss = task.loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        if tp is None:
            opt.step()
        else:
            before = len(tp.log)
            t1 = time.perf_counter()
            tb = (x, y)
            if cfg.batch is not None and step < cfg.until and (step + 1) % cfg.every == 0:
                sel = torch.randperm(n, generator=tgen)[: cfg.batch]
                tb = (task.x_train[sel], task.y_train[sel])
            tp.step(tb if step < cfg.until else None)
            if len(tp.log) > before:
                r.teleport_s += time.perf_counter() - t1
        r.train_s += time.perf_counter() - t0
        step += 1
        if step % CHECK:
            continue
        full = task.train_loss(model)
        r.curve.append(full)
        if not math.isfinite(full) or full > 1e4:
            r.diverged = True
            break
        if r.hit is None and full <= task.target:
            r.hit, r.metric_at_hit = step, task.test_metric(model)
        if r.hit is not None and (budget is None or step >= budget):
            break
    r.steps_run = step
    r.metric_end = task.test_metric(model)
    if tp is not None:
        r.teleports = len(tp.log)
        r.accepted = sum(e["accepted"] for e in tp.log)
        r.ratios = [e["objective_after"] / e["objective_before"] for e in tp.log if e["accepted"]]
        drifts = [abs(e["loss_after"] - e["loss_before"]) for e in tp.log if e["accepted"]]
        r.drift = max(drifts, default=0.0)
    return r


# --------------------------------------------------------------------------- stats
def _steps(r: Run) -> int:
    return r.hit if r.hit is not None else CAP


def _q(xs, p):
    xs = sorted(xs)
    k = (len(xs) - 1) * p
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _steps_cell(runs: list[Run]) -> str:
    reached = sum(r.hit is not None for r in runs)
    s = [_steps(r) for r in runs]
    med = statistics.median(s)
    cell = f"{med:.0f} [{min(s)}–{max(s)}]"
    if reached < len(runs):
        div = sum(r.diverged for r in runs)
        cell += f" ({len(runs) - reached} not reached" + (f", {div} diverged" if div else "") + ")"
        if med >= CAP:
            cell = f"> {CAP} " + cell[cell.index("[") :]
    return cell


def _speedups(base: list[Run], tele: list[Run]) -> list[float]:
    """Per seed (paired): baseline steps / teleport steps; a miss counts as the cap."""
    return [_steps(b) / _steps(t) for b, t in zip(base, tele) if b.hit or t.hit]


def _speed_cell(sp: list[float], iqr: bool = True) -> str:
    if not sp:
        return "– (target missed with and without)"
    med = statistics.median(sp)
    spread = f"IQR {_q(sp, 0.25):.2f}–{_q(sp, 0.75):.2f}; " if iqr else ""
    return f"{med:.2f}× ({spread}min–max {min(sp):.2f}–{max(sp):.2f})"


def _metric_cell(task: Task, vals: list[float | None]) -> str:
    got = [v for v in vals if v is not None]
    if not got:
        return "–"
    med = statistics.median(got)
    miss = f" (n={len(got)})" if len(got) < len(vals) else ""
    if task.metric == "test acc":
        return f"{100 * med:.1f}% [{100 * min(got):.1f}–{100 * max(got):.1f}]{miss}"
    return f"{med:.4f} [{min(got):.4f}–{max(got):.4f}]{miss}"


def _equal(task: Task, base: list[Run], tele: list[Run]) -> tuple[bool, str]:
    """Median test metric at the target step: within 1 point of accuracy / 5% of MSE."""
    b = [r.metric_at_hit for r in base if r.metric_at_hit is not None]
    t = [r.metric_at_hit for r in tele if r.metric_at_hit is not None]
    if not b or not t:
        return False, "not comparable (target missed)"
    mb, mt = statistics.median(b), statistics.median(t)
    if task.metric == "test acc":
        d = 100 * (mt - mb)
        return abs(d) <= 1.0, f"{100 * mb:.1f}% → {100 * mt:.1f}% ({d:+.1f} points, equal ≤ 1)"
    d = (mt - mb) / mb
    return abs(d) <= 0.05, f"{mb:.4f} → {mt:.4f} ({100 * d:+.1f}%, equal ≤ 5%)"


def _write(out: Path, name: str, lines: list[str]) -> None:
    text = "\n".join(lines)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(text + "\n")


# --------------------------------------------------------------------------- ceiling
SCALES = (0.5, 0.71, 1.0, 1.41, 2.0)  # per hidden layer: 5³ = 125 points of the orbit
SEARCH_SEEDS, HOLDOUT_SEEDS = range(3), range(100, 110)


def _lookahead(task: Task, lr: float, seed: int, scales: tuple[float, ...], k: int) -> float:
    """Full-training loss after ``k`` SGD steps from the rescaled start, on minibatches
    of a stream of its own (not the run's)."""
    model = task.model(seed)
    _rescale(model, task, scales)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(30_000 + seed)
    for _ in range(k):
        idx = torch.randint(0, len(task.y_train), (BATCH,), generator=gen)
        loss = task.loss_fn(model(task.x_train[idx]), task.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    full = task.train_loss(model)
    return full if math.isfinite(full) else math.inf


def ceiling(out: Path) -> None:
    """How much can a start point on the scaling orbit buy SGD at its tuned lr?

    Exhaustive search over layer-wise group elements applied at step 0 (each hidden
    layer's neurons scaled by one of ``SCALES``: 125 points, the identity included), at
    the tuned lr and the next lr up, picked by median steps on 3 search seeds — the
    outcome itself, in hindsight, which no choice among these points can beat on those
    seeds (per-neuron elements and later teleports are not searched exhaustively).
    The 3 best are rerun on 10 held-out seeds beside the baseline and the two single
    teleports of the sensitivity table (the closest the teleports came), and a search
    that needs no hindsight: per held-out seed, the start point whose loss after a short
    lookahead (1/8 of the baseline's steps, own minibatches) is lowest. Writes
    ``teleport_ceiling.md``.
    """
    import itertools

    tasks = [digits_task(), teacher_task()]
    # the tuned lr (the grid's pick at 10 seeds; on digits 0.3 and 0.5 are level) and the
    # next one up
    lrs = {"digits": (0.3, 0.5), "teacher": (0.7, 1.0)}
    singles = {
        "grad-norm teleport after step 1": Config(1, 10, 0.1, 1.5, 1),
        "flattening teleport after step 1": Config(1, 100, 0.03, None, 1, "sharpness", 512),
    }
    wall0 = time.perf_counter()
    lines = [
        f"torch {torch.__version__}, 1 thread; SGD, minibatch {BATCH}; search: every "
        f"layer-wise scaling in {{{', '.join(f'{x:g}' for x in SCALES)}}}³ applied at step 0, "
        f"at the tuned lr and the next one up, on seeds {SEARCH_SEEDS.start}–"
        f"{SEARCH_SEEDS.stop - 1} (runs slower than 2× the baseline are cut there); the 3 best "
        f"by median steps, rerun on held-out seeds {HOLDOUT_SEEDS.start}–{HOLDOUT_SEEDS.stop - 1}.",
        "",
        "| task | start point (layer scales) | lr | search seeds: steps | search speedup | "
        "held-out: steps | held-out speedup | held-out test at target |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for task in tasks:
        tuned = lrs[task.name][0]
        base_s = [run(task, "sgd", tuned, s, None) for s in SEARCH_SEEDS]
        cap = int(math.ceil(2 * statistics.median(map(_steps, base_s)) / CHECK)) * CHECK
        found = []
        for lr in lrs[task.name]:
            for sc in itertools.product(SCALES, repeat=3):
                runs = [run(task, "sgd", lr, s, None, scales=sc, cap=cap) for s in SEARCH_SEEDS]
                found.append((statistics.median(map(_steps, runs)), lr, sc, runs))
            _progress(f"ceiling search {task.name} lr={lr:g}")
        found.sort(key=lambda f: (f[0], sum(map(_steps, f[3]))))
        base_h = [run(task, "sgd", tuned, s, None) for s in HOLDOUT_SEEDS]
        rows = [("none (baseline)", tuned, base_s, base_h)]
        for _, lr, sc, runs in found[:3]:
            held = [run(task, "sgd", lr, s, None, scales=sc) for s in HOLDOUT_SEEDS]
            rows.append(("(" + ", ".join(f"{x:g}" for x in sc) + ")", lr, runs, held))
        for label, c in singles.items():
            held = [run(task, "sgd", tuned, s, c) for s in HOLDOUT_SEEDS]
            rows.append((label, tuned, None, held))
        k = max(CHECK, round(statistics.median(map(_steps, base_s)) / 8 / CHECK) * CHECK)
        points = list(itertools.product(SCALES, repeat=3))
        picked = [
            min(points, key=lambda sc: _lookahead(task, tuned, s, sc, k)) for s in HOLDOUT_SEEDS
        ]
        held = [run(task, "sgd", tuned, s, None, scales=sc) for s, sc in zip(HOLDOUT_SEEDS, picked)]
        rows.append(
            (f"per seed, lowest loss after a {k}-step lookahead (125 tried)", tuned, None, held)
        )
        _progress(f"ceiling held-out {task.name}")
        for label, lr, runs, held in rows:
            search = (
                (_steps_cell(runs), _speed_cell(_speedups(base_s, runs), iqr=False))
                if runs is not None
                else ("–", "–")
            )
            lines.append(
                f"| {task.name} | {label} | {lr:g} | {search[0]} | {search[1]} | "
                f"{_steps_cell(held)} | {_speed_cell(_speedups(base_h, held), iqr=False)} | "
                f"{_metric_cell(task, [r.metric_at_hit for r in held])} |"
            )
    lines += ["", f"Total run time {(time.perf_counter() - wall0) / 60:.1f} min."]
    _write(out, "teleport_ceiling.md", lines)


# --------------------------------------------------------------------------- GL
GL = dict(every=25, steps=10, lr=3e-4, max_ratio=1.5, until=250, batch=32, kinds=("data",))


def gl_grid(out: Path, seeds: range) -> None:
    """The papers' GL teleport: the MLPs with LeakyReLU(0.1), the data-dependent GL(32)
    action on every hidden layer (exact on a teleport batch of 32 = the width), grad-norm
    ascent; SGD on its lr grid with and without. Writes ``teleport_gl.md``."""
    cfg = Config(**GL)
    lrs = (0.1, 0.2, 0.3, 0.5, 0.7)
    wall0 = time.perf_counter()
    lines = [
        f"torch {torch.__version__}, 1 thread; {len(seeds)} seeds; SGD, minibatch {BATCH}; "
        f"MLP in-32-32-32-out LeakyReLU(0.1); teleport: {cfg}. **bold**: the tuned lr "
        "without teleport.",
        "",
        "| task (target) | lr | steps, no teleport | steps, GL teleport | speedup | "
        "test at target: without → with | teleports accepted |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    for task in (digits_task(), teacher_task()):
        rows = {}
        for lr in lrs:
            b = [run(task, "sgd", lr, s, None, leaky=True) for s in seeds]
            t = [run(task, "sgd", lr, s, cfg, leaky=True) for s in seeds]
            rows[lr] = (b, t)
            _progress(f"gl {task.name} lr={lr:g}")
        best = min(lrs, key=lambda lr: statistics.median(map(_steps, rows[lr][0])))
        for lr, (b, t) in rows.items():
            mark = "**" if lr == best else ""
            lines.append(
                f"| {task.name} ({task.target}) | {mark}{lr:g}{mark} | {_steps_cell(b)} | "
                f"{_steps_cell(t)} | {_speed_cell(_speedups(b, t), iqr=False)} | "
                f"{_metric_cell(task, [r.metric_at_hit for r in b])} → "
                f"{_metric_cell(task, [r.metric_at_hit for r in t])} | "
                f"{sum(r.accepted for r in t)}/{sum(r.teleports for r in t)} |"
            )
    lines += ["", f"Total run time {(time.perf_counter() - wall0) / 60:.1f} min."]
    _write(out, "teleport_gl.md", lines)


# --------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="3 seeds, tuned lrs only")
    ap.add_argument("--sensitivity", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument(
        "--sharpness", action=argparse.BooleanOptionalAction, default=True,
        help="also run the flattening (top-eigenvalue) teleport on the SGD grid",
    )  # fmt: skip
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--tp-steps", type=int, default=10)
    ap.add_argument("--tp-lr", type=float, default=0.1)
    ap.add_argument("--max-ratio", type=float, default=1.5)
    ap.add_argument("--until", type=int, default=250)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument(
        "--ceiling", action="store_true",
        help="only the orbit search: the best start point of the scaling orbit, in hindsight",
    )  # fmt: skip
    ap.add_argument(
        "--gl", action="store_true",
        help="only the LeakyReLU MLPs with the papers' data-dependent GL teleport, SGD lr grid",
    )  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.ceiling:
        ceiling(args.out)
        return
    if args.gl:
        gl_grid(args.out, range(args.seeds))
        return
    seeds = range(3 if args.quick else args.seeds)
    cfg = Config(args.every, args.tp_steps, args.tp_lr, args.max_ratio, args.until)
    tasks = [digits_task(), teacher_task()]
    # --quick: the lrs the full grid picks (benchmarks/results/teleport.md)
    tuned = {"sgd": {"digits": 0.3, "teacher": 0.7}, "adam": {"digits": 2e-2, "teacher": 2e-2}}
    wall0 = time.perf_counter()

    # 1. lr grid, with and without teleport
    grid: dict[tuple, list[Run]] = {}
    best: dict[tuple, float] = {}
    for task in tasks:
        for opt_name, lrs in GRID.items():
            lrs = (tuned[opt_name][task.name],) if args.quick else lrs
            for lr in lrs:
                for tele in (None, cfg):
                    grid[task.name, opt_name, lr, tele is not None] = [
                        run(task, opt_name, lr, s, tele) for s in seeds
                    ]
                _progress(f"grid {task.name} {opt_name} lr={lr:g}")
            best[task.name, opt_name] = min(
                lrs,
                key=lambda lr: statistics.median(map(_steps, grid[task.name, opt_name, lr, False])),
            )

    # 2. tuned lr: on to a fixed budget, curves
    main_runs: dict[tuple, tuple[int, list[Run], list[Run]]] = {}
    for task in tasks:
        for opt_name in GRID:
            lr = best[task.name, opt_name]
            med = statistics.median(map(_steps, grid[task.name, opt_name, lr, False]))
            budget = min(CAP, int(math.ceil(4 * med / CHECK)) * CHECK)
            base = [run(task, opt_name, lr, s, None, budget) for s in seeds]
            tele = [run(task, opt_name, lr, s, cfg, budget) for s in seeds]
            for b, g in zip(base, grid[task.name, opt_name, lr, False]):
                assert b.hit == g.hit, "runs are not deterministic"
            main_runs[task.name, opt_name] = (budget, base, tele)
            _progress(f"budget runs {task.name} {opt_name} lr={lr:g} budget={budget}")

    # 3. sensitivity (SGD, tuned lr)
    sens: list[tuple[Config, dict[str, list[float]]]] = []
    if args.sensitivity and not args.quick:
        others = [
            Config(25, 10, 0.1, 1.2, 250),
            Config(25, 10, 0.1, 2.0, 250),
            Config(50, 10, 0.1, 1.5, 250),
            Config(10, 10, 0.1, 1.5, 100),
            Config(25, 10, 0.1, None, 250),
            Config(25, 10, 0.01, 1.5, 250),  # small group moves (see SHARP)
            Config(1, 10, 0.1, 1.5, 1),  # one teleport, after the first step
            Config(1, 100, 0.03, None, 1, "sharpness", 512),  # one flattening teleport
        ]
        for c in [cfg, *others]:
            row = {}
            for task in tasks:
                lr = best[task.name, "sgd"]
                base = grid[task.name, "sgd", lr, False]
                tele = (
                    grid[task.name, "sgd", lr, True]
                    if c == cfg
                    else [run(task, "sgd", lr, s, c) for s in seeds]
                )
                row[task.name] = (_speedups(base, tele), tele)
            sens.append((c, row))
            _progress(f"sensitivity {c}")

    # 4. the flattening teleport on the SGD grid: does it keep larger lrs stable?
    sharp: dict[tuple, list[Run]] = {}
    if args.sharpness:
        sc = Config(**SHARP)
        for task in tasks:
            lrs = (best[task.name, "sgd"],) if args.quick else GRID["sgd"]
            for lr in lrs:
                sharp[task.name, lr] = [run(task, "sgd", lr, s, sc) for s in seeds]
                _progress(f"sharpness {task.name} sgd lr={lr:g}")
    wall = time.perf_counter() - wall0

    # --------------------------------------------------------------------- tables
    lines = [
        f"torch {torch.__version__}, 1 thread; {len(seeds)} seeds; minibatch {BATCH}; "
        f"MLP in-32-32-32-out ReLU; full-train loss checked every {CHECK} steps, cap {CAP}; "
        f"teleport: {cfg}; total run time {wall / 60:.1f} min.",
        "",
        "**Learning-rate grid** — optimizer steps to target, median [min–max] over seeds "
        "(a miss counts as the cap, so a speedup involving one is a bound); speedup = "
        "per-seed baseline/teleport steps, median (min–max). **bold**: the tuned lr (fewest median steps without teleport), used below.",
        "",
        "| task (target) | optimizer | lr | steps, no teleport | steps, teleport | speedup | "
        "test at target: without → with |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for task in tasks:
        for opt_name, lrs in GRID.items():
            for lr in lrs:
                key = (task.name, opt_name, lr)
                if (*key, False) not in grid:
                    continue
                b, t = grid[(*key, False)], grid[(*key, True)]
                mark = "**" if lr == best[task.name, opt_name] else ""
                lines.append(
                    f"| {task.name} ({task.target}) | {opt_name} | {mark}{lr:g}{mark} | "
                    f"{_steps_cell(b)} | {_steps_cell(t)} | "
                    f"{_speed_cell(_speedups(b, t), iqr=False)} | "
                    f"{_metric_cell(task, [r.metric_at_hit for r in b])} → "
                    f"{_metric_cell(task, [r.metric_at_hit for r in t])} |"
                )
    own = [
        "",
        "**Each tuned on its own grid** (the teleport runs' lr chosen by their own median "
        "steps; same seeds, per-seed ratio):",
        "",
        "| task | optimizer | best lr, no teleport | steps | best lr, teleport | steps | speedup |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    lines += [] if args.quick else own
    for task in tasks:
        for opt_name, lrs in GRID.items():
            lrs = [lr for lr in lrs if (task.name, opt_name, lr, True) in grid]
            if len(lrs) < 2:
                continue
            bl = best[task.name, opt_name]
            tl = min(
                lrs,
                key=lambda lr: statistics.median(map(_steps, grid[task.name, opt_name, lr, True])),
            )
            b, t = grid[task.name, opt_name, bl, False], grid[task.name, opt_name, tl, True]
            lines.append(
                f"| {task.name} | {opt_name} | {bl:g} | {_steps_cell(b)} | {tl:g} | "
                f"{_steps_cell(t)} | {_speed_cell(_speedups(b, t), iqr=False)} |"
            )
    lines += [
        "",
        "**Tuned lr** — steps to target, speedup median (IQR; min–max), the test metric of "
        "the same run at the step the target was reached and at the fixed budget "
        "(4× the baseline's median steps), teleports accepted, median objective "
        "(squared grad norm) growth per teleport, and the share of training wall time "
        "spent in teleport ascent (extra cost, not counted as steps).",
        "",
        "| task | optimizer | lr | steps, no teleport | steps, teleport | speedup | "
        "test at target, no teleport | test at target, teleport | budget | "
        "test at budget, no teleport | test at budget, teleport | teleports accepted | "
        "grad-norm² growth | teleport time share |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    verdict = []
    for task in tasks:
        for opt_name in GRID:
            budget, b, t = main_runs[task.name, opt_name]
            sp = _speedups(b, t)
            ratios = [x for r in t for x in r.ratios]
            share = sum(r.teleport_s for r in t) / sum(r.train_s for r in t)
            lines.append(
                f"| {task.name} | {opt_name} | {best[task.name, opt_name]:g} | {_steps_cell(b)} | "
                f"{_steps_cell(t)} | {_speed_cell(sp)} | "
                f"{_metric_cell(task, [r.metric_at_hit for r in b])} | "
                f"{_metric_cell(task, [r.metric_at_hit for r in t])} | {budget} | "
                f"{_metric_cell(task, [r.metric_end for r in b])} | "
                f"{_metric_cell(task, [r.metric_end for r in t])} | "
                f"{sum(r.accepted for r in t)}/{sum(r.teleports for r in t)} | "
                f"{statistics.median(ratios) if ratios else float('nan'):.2f}× | "
                f"{100 * share:.0f}% |"
            )
            if opt_name == "sgd":
                verdict.append((task, statistics.median(sp), _equal(task, b, t), "grad-norm"))
    if sharp:
        sc = Config(**SHARP)
        lines += [
            "",
            f"**Flattening teleport** (SGD; teleport: {sc}): steps to target per lr, and "
            "how many seeds reach it. Best vs best = "
            "each method at its own best lr (per-seed ratio), test metric at target.",
            "",
            "| task | lr | steps, no teleport | reached | steps, flattening teleport | reached |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for task in tasks:
            lrs = [lr for lr in GRID["sgd"] if (task.name, lr) in sharp]
            for lr in lrs:
                b, t = grid[task.name, "sgd", lr, False], sharp[task.name, lr]
                lines.append(
                    f"| {task.name} | {lr:g} | {_steps_cell(b)} | "
                    f"{sum(r.hit is not None for r in b)}/{len(b)} | {_steps_cell(t)} | "
                    f"{sum(r.hit is not None for r in t)}/{len(t)} |"
                )
        lines += [
            "",
            "| task | best lr, no teleport | steps | best lr, flattening | steps | speedup | "
            "test at target: without → with | teleport time share |",
            "|---|---:|---:|---:|---:|---:|---|---:|",
        ]
        for task in tasks:
            lrs = [lr for lr in GRID["sgd"] if (task.name, lr) in sharp]
            bl = best[task.name, "sgd"]
            tl = min(lrs, key=lambda lr: statistics.median(map(_steps, sharp[task.name, lr])))
            b, t = grid[task.name, "sgd", bl, False], sharp[task.name, tl]
            sp = _speedups(b, t)
            share = sum(r.teleport_s for r in t) / sum(r.train_s for r in t)
            lines.append(
                f"| {task.name} | {bl:g} | {_steps_cell(b)} | {tl:g} | {_steps_cell(t)} | "
                f"{_speed_cell(sp, iqr=False)} | "
                f"{_metric_cell(task, [r.metric_at_hit for r in b])} → "
                f"{_metric_cell(task, [r.metric_at_hit for r in t])} | {100 * share:.0f}% |"
            )
            verdict.append((task, statistics.median(sp), _equal(task, b, t), "flattening"))
    lines += ["", "Issue target (≥ 1.3× fewer SGD steps at equal test metric, tuned lr):"]
    for task, med, (equal, why), method in verdict:
        ok = med >= 1.3 and equal
        lines.append(
            f"- {task.name}, {method} teleport: median speedup {med:.2f}×, "
            f"test metric at target {why} → " + ("met" if ok else "**not met**")
        )
    lines += [
        "",
        "The same target at a fixed lr, both runs at that lr (the papers' protocol; "
        "not a tuned baseline):",
    ]
    for task in tasks:
        for lr in GRID["sgd"]:
            if (task.name, "sgd", lr, True) not in grid:
                continue
            b, t = grid[task.name, "sgd", lr, False], grid[task.name, "sgd", lr, True]
            sp = _speedups(b, t)
            if not sp or not all(r.hit for r in b + t):
                continue  # a miss on either side: no comparable steps or test metric
            med, (equal, why) = statistics.median(sp), _equal(task, b, t)
            lines.append(
                f"- {task.name}, lr {lr:g}: median speedup {med:.2f}× (min {min(sp):.2f}), "
                f"test metric at target {why} → " + ("met" if med >= 1.3 and equal else "not met")
            )
    if sens:
        lines += [
            "",
            "**Sensitivity** (SGD at the tuned lr, same seeds; per-seed speedup median "
            "(min–max), misses of the target in brackets).",
            "",
            "| teleport config | " + " | ".join(t.name for t in tasks) + " |",
            "|---|" + "---:|" * len(tasks),
        ]
        for c, row in sens:
            cells = []
            for task in tasks:
                sp, tele = row[task.name]
                miss = sum(r.hit is None for r in tele)
                cells.append(_speed_cell(sp, iqr=False) + (f" ({miss} missed)" if miss else ""))
            label = f"{c}" + (" (default)" if c == cfg else "")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    name = "teleport_quick" if args.quick else "teleport"
    _write(args.out, f"{name}.md", lines)
    _plot(tasks, main_runs, best, args.out / f"{name}_curves.png")


def _plot(tasks, main_runs, best, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(tasks), 2, figsize=(10, 4 * len(tasks)), squeeze=False)
    for i, task in enumerate(tasks):
        for j, opt_name in enumerate(GRID):
            ax = axes[i][j]
            budget, base, tele = main_runs[task.name, opt_name]
            for runs, label, color in ((base, "no teleport", "C0"), (tele, "teleport", "C3")):
                n = budget // CHECK
                curves = [
                    [v if math.isfinite(v) else 1e4 for v in r.curve[:n]]
                    + [r.curve[-1] if math.isfinite(r.curve[-1]) else 1e4] * (n - len(r.curve[:n]))
                    for r in runs
                ]
                cols = list(zip(*curves))
                xs = [CHECK * (k + 1) for k in range(n)]
                ax.plot(xs, [statistics.median(c) for c in cols], color=color, label=label)
                ax.fill_between(
                    xs, [_q(c, 0.25) for c in cols], [_q(c, 0.75) for c in cols],
                    color=color, alpha=0.25, linewidth=0,
                )  # fmt: skip
            ax.axhline(task.target, color="k", ls="--", lw=0.8, label="target")
            ax.set_yscale("log")
            ax.set_title(f"{task.name}, {opt_name} lr={best[task.name, opt_name]:g}")
            ax.set_xlabel("optimizer step")
            ax.set_ylabel("full training loss")
            ax.legend()
    fig.suptitle("median and interquartile band over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
