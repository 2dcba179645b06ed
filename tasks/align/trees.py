"""Soft tree ensembles as a weight space: their three symmetries, matching and barriers.

Kanoh & Sugiyama, "Linear Mode Connectivity in Differentiable Tree Ensembles" (ICLR 2025).

The model (:class:`SoftTreeEnsemble`): ``M`` perfect binary trees of depth ``D``. Every
internal node ``n`` of tree ``m`` has split weights ``w[m, n]`` (one per input feature)
and a bias ``b[m, n]``; a sample goes left with probability ``σ(w·x + b)`` and right with
``1 - σ(w·x + b)``, where ``σ`` is a soft step with ``σ(-c) = 1 - σ(c)`` (the logistic
sigmoid, or the paper's scaled error function ``½ erf(αc) + ½``). A leaf's probability
is the product of the routing probabilities on its path; the ensemble outputs
``Σ_m Σ_leaves P(leaf) · leaf[m, leaf]`` (``reduction="sum"``, the paper's form) or that
divided by ``M`` (``"mean"``, the default: the same function family with leaf values
``M`` times smaller, better scaled for training 256 trees). *Oblivious* trees (NODE)
share one split per level: level ``d`` of tree ``m`` uses ``w[m, d]``, ``b[m, d]``.

Tensor layout, fixed here and read by everything below:

* ``split_weight`` ``(M, N, F)``, ``split_bias`` ``(M, N)``, ``leaf`` ``(M, 2^D, C)``;
  ``N = 2^D - 1`` (non-oblivious, nodes in heap order: level ``d`` holds nodes
  ``2^d - 1 … 2^(d+1) - 2`` and position ``k`` of level ``d`` has its children at
  positions ``2k`` (left) and ``2k + 1`` (right) of level ``d + 1``) or ``N = D``
  (oblivious, one split per level).
* leaf ``l`` is the path ``c_0 c_1 … c_(D-1)`` read as a binary number (``c_d = 0``: left
  at level ``d``, most significant bit first).

The symmetries (every one keeps the function exactly, up to rounding):

1. **tree permutation** (``S_M``): reorder the trees. An ordinary
   :class:`~metanet.WeightSpace` group on axis 0 of the three tensors, which
   :func:`converters.from_module` finds by tracing the module (no rule needed), so
   :func:`tasks.align.weight_matching`, ``metanet align`` and ``metanet merge`` work on
   tree checkpoints with it as they do on any network.
2. **subtree flip** (one bit per internal node: ``M·(2^D - 1)`` bits, ``M·D`` for
   oblivious trees): negate the node's ``(w, b)`` and swap its two subtrees (their nodes
   and leaves), since ``σ(-c) = 1 - σ(c)``. For oblivious trees a flip acts on a level:
   negate its split and reflect bit ``d`` of every leaf index.
3. **splitting order** (oblivious trees only, ``D!`` per tree): permute the levels and
   reindex the leaves by the same permutation of the path bits.

Why 2 and 3 are not WeightSpace groups: a WeightSpace element is a set of permutations,
and it acts by gathering along axis factors. A flip negates values (no gather does) and
the subtree it swaps depends on the bits above it (the tree's automorphism group
``Z2 ≀ Z2 ≀ … ≀ Z2``, nested ``D`` deep where ``Group(within=...)`` allows one level); a
level order permutes the *bits* of the leaf index, not the values of one factor. Both
would need a new kind of element that ``apply``/``invert``/``compose``, the JSON schema
and every consumer (matching views, canonicalization, graphs, the checkpoint engine)
understand. So they live here, as an extension: :class:`TreeSpace` wraps the traced
WeightSpace (the tree permutation stays an ordinary group there) and adds the flips and
orders. A :class:`TreeSpace` element is a WeightSpace element (group -> permutation)
with two extra entries per ensemble, ``"<split_weight>:flip"`` (bool ``(M, N)``) and,
for oblivious trees, ``"<split_weight>:order"`` (``(M, D)`` level permutations); the
WeightSpace itself ignores those keys (it would apply the tree permutation only).

Convention (as in :mod:`metanet.space`): ``apply(w, g)`` first moves tree ``g[group][i]``
to position ``i``, then transforms tree ``i`` by its own flips/order, which are written
in the frame of the result: ``flip[i, n]`` says that node ``n`` of the new tree ``i`` is
the negated image of its source node and that its children are swapped; ``order[i, d]``
is the source level of new level ``d`` (negated when ``flip[i, d]``).

Matching (:func:`match_trees`, the paper's weight matching): for every pair (tree ``i``
of a, tree ``j`` of b) the best inner product ``<a_i, T(b_j)>`` over the transforms ``T``
allowed (all flip patterns, all level orders), then one linear assignment over the trees
(``scipy.optimize.linear_sum_assignment``). For oblivious trees the ``D!·2^D`` patterns are
enumerated, as in the paper; for non-oblivious trees the ``2^(2^D - 1)`` flip patterns
are solved exactly by a dynamic program over the tree (the similarity is a sum over
nodes and leaves, and a flip only exchanges which subtrees face each other), with the
paper's enumeration kept as ``method="enumerate"`` (the two agree; a test checks).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from metanet.space import Element, WeightSpace, WeightSpaceError

__all__ = [
    "STEPS",
    "SYMMETRIES",
    "SoftTreeEnsemble",
    "TreeLayout",
    "TreeSpace",
    "tree_similarity",
    "match_trees",
    "TABULAR",
    "Tabular",
    "load_tabular",
    "mlp",
    "train",
    "interpolation",
]

STEPS = ("sigmoid", "erf")
"""Soft steps with ``σ(-c) = 1 - σ(c)``: logistic ``σ(αc)``, scaled error function
``½ erf(αc) + ½``."""

SYMMETRIES = ("flip", "order")
"""The tree symmetries :func:`match_trees` may use besides the tree permutation."""


# --------------------------------------------------------------------------- the model
def soft_step(z: Tensor, step: str = "sigmoid", alpha: float = 1.0) -> Tensor:
    """The routing probability of going left; ``soft_step(-z) = 1 - soft_step(z)``."""
    if step == "sigmoid":
        return torch.sigmoid(alpha * z)
    if step == "erf":
        return 0.5 * torch.erf(alpha * z) + 0.5
    raise ValueError(f"step={step!r}: expected one of {STEPS}")


class SoftTreeEnsemble(nn.Module):
    """``n_trees`` soft perfect binary trees of ``depth``, summed or averaged.

    Args:
        in_features, out_features: ``F`` and ``C``.
        n_trees: ``M``.
        depth: ``D >= 1``.
        oblivious: one split per level (NODE-style) instead of one per node.
        step: ``"sigmoid"`` or ``"erf"`` (see :data:`STEPS`); ``alpha`` its sharpness.
        reduction: ``"mean"`` (default) or ``"sum"`` over the trees.
        split_init: ``"uniform"`` (default: ``±1/sqrt(F)``, as ``nn.Linear``) or
            ``"normal"`` (``N(0, 1)``, the NTK-style initialization of the soft-tree
            literature: sharp splits from the start).

    Parameters are ``split_weight`` ``(M, N, F)``, ``split_bias`` ``(M, N)`` and ``leaf``
    ``(M, 2^D, C)`` (layout in the module docstring). Leaves start standard normal.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        n_trees: int = 256,
        depth: int = 2,
        *,
        oblivious: bool = False,
        step: str = "sigmoid",
        alpha: float = 1.0,
        reduction: str = "mean",
        split_init: str = "uniform",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if depth < 1 or n_trees < 1 or in_features < 1 or out_features < 1:
            raise ValueError("depth, n_trees, in_features and out_features must be >= 1")
        if step not in STEPS:
            raise ValueError(f"step={step!r}: expected one of {STEPS}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction={reduction!r}: expected 'mean' or 'sum'")
        if split_init not in ("uniform", "normal"):
            raise ValueError(f"split_init={split_init!r}: expected 'uniform' or 'normal'")
        self.split_init = split_init
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.n_trees, self.depth, self.oblivious = int(n_trees), int(depth), bool(oblivious)
        self.step, self.alpha, self.reduction = step, float(alpha), reduction
        kw = {"dtype": dtype, "device": device}
        n = self.n_splits
        self.split_weight = nn.Parameter(torch.empty(n_trees, n, in_features, **kw))
        self.split_bias = nn.Parameter(torch.empty(n_trees, n, **kw))
        self.leaf = nn.Parameter(torch.empty(n_trees, 2**depth, out_features, **kw))
        self.reset_parameters()

    @property
    def n_splits(self) -> int:
        """Split parameters per tree: ``D`` (oblivious) or ``2^D - 1``."""
        return self.depth if self.oblivious else 2**self.depth - 1

    @property
    def n_leaves(self) -> int:
        return 2**self.depth

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        bound = 1.0 / math.sqrt(self.in_features)
        with torch.no_grad():
            for p in (self.split_weight, self.split_bias):
                if self.split_init == "normal":
                    p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype))
                else:
                    p.copy_(torch.rand(p.shape, generator=generator, dtype=p.dtype) * 2 - 1)
                    p.mul_(bound)
            self.leaf.copy_(
                torch.randn(self.leaf.shape, generator=generator, dtype=self.leaf.dtype)
            )

    def leaf_probabilities(self, x: Tensor) -> Tensor:
        """``(batch, M, 2^D)``: the probability that each tree sends each sample to each leaf."""
        m, n = self.n_trees, self.n_splits
        # matmuls, not einsum: einsum's path search costs milliseconds per call
        z = (x @ self.split_weight.reshape(m * n, -1).T).reshape(-1, m, n) + self.split_bias
        s = soft_step(z, self.step, self.alpha)
        # split/unbind, not slices: the tracer then reads the node axis as fixed segments
        if self.oblivious:
            levels = [v.unsqueeze(-1) for v in s.unbind(-1)]
        else:
            levels = list(s.split([2**d for d in range(self.depth)], -1))
        p = x.new_ones((x.shape[0], self.n_trees, 1))
        for sd in levels:  # children of position k at 2k (left) and 2k + 1 (right)
            p = torch.stack([p * sd, p * (1 - sd)], -1).flatten(-2)
        return p

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        p = self.leaf_probabilities(x.reshape(-1, self.in_features))
        out = p.flatten(1) @ self.leaf.flatten(0, 1)
        if self.reduction == "mean":
            out = out / self.n_trees
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        kind = "oblivious" if self.oblivious else "non-oblivious"
        return (
            f"{self.in_features} -> {self.out_features}, {self.n_trees} {kind} trees of depth "
            f"{self.depth}, step={self.step}(alpha={self.alpha:g}), reduction={self.reduction}"
        )


# --------------------------------------------------------------------------- symmetry maps
def _path_bits(depth: int) -> Tensor:
    """``(2^D, D)``: leaf ``l``'s path, bit ``d`` = direction at level ``d`` (MSB first)."""
    leaves = torch.arange(2**depth)
    return (leaves[:, None] >> (depth - 1 - torch.arange(depth))) & 1


def _flip_maps(flip: Tensor, depth: int) -> tuple[Tensor, Tensor]:
    """Non-oblivious flips ``(K, 2^D - 1)`` bool (result frame) -> source node of every
    result node ``(K, 2^D - 1)`` and source leaf of every result leaf ``(K, 2^D)``."""
    k = flip.shape[0]
    src = torch.zeros(k, 1, dtype=torch.long, device=flip.device)  # level-0 positions
    nodes = []
    two = torch.arange(2, device=flip.device)
    for d in range(depth):
        nodes.append(src + (2**d - 1))
        f = flip[:, 2**d - 1 : 2 ** (d + 1) - 1].long()
        # result child 2k + c comes from source child 2·src[k] + (c xor flip[k])
        src = (2 * src.unsqueeze(-1) + (two ^ f.unsqueeze(-1))).flatten(-2)
    return torch.cat(nodes, -1), src


def _oblivious_leaf_map(flip: Tensor, order: Tensor, depth: int) -> Tensor:
    """Oblivious flips ``(K, D)`` bool and orders ``(K, D)`` -> source leaf ``(K, 2^D)``:
    result level ``d`` is source level ``order[d]``, its direction reflected when
    ``flip[d]``."""
    bits = _path_bits(depth).to(flip.device)  # (L, D)
    src_bits = bits[None] ^ flip[:, None, :].long()  # (K, L, D): bit of source level order[d]
    value = 2 ** (depth - 1 - order)  # (K, D): place value of source level order[d]
    return (src_bits * value[:, None, :]).sum(-1)


def _gather_rows(t: Tensor, index: Tensor) -> Tensor:
    """``t (…, M, n, K)`` gathered along its ``n`` axis with ``index (M, n')``, the same
    index for every leading batch axis."""
    idx = index.to(t.device)[..., None].expand(*t.shape[:-3], *index.shape, t.shape[-1])
    return torch.gather(t, t.dim() - 2, idx)


def _transform(
    w: Tensor, b: Tensor, v: Tensor, node_src: Tensor, flip: Tensor, leaf_src: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-tree relabelling: node ``n`` <- source node ``node_src[n]``, negated where
    ``flip[n]``; leaf ``l`` <- source leaf ``leaf_src[l]``. ``w (…, M, N, F)``, ``b (…, M,
    N)``, ``v (…, M, L, C)``; the index tensors are ``(M, ·)``."""
    flip = flip.to(w.device)
    w2 = _gather_rows(w, node_src)
    w2 = torch.where(flip[..., None], -w2, w2)
    b2 = torch.gather(b, b.dim() - 1, node_src.to(b.device).expand(*b.shape[:-2], *node_src.shape))
    b2 = torch.where(flip, -b2, b2)
    return w2, b2, _gather_rows(v, leaf_src)


# --------------------------------------------------------------------------- the space
@dataclass(frozen=True)
class TreeLayout:
    """One soft tree ensemble inside a model: its tensors, shape and tree group."""

    weight: str
    bias: str
    leaf: str
    n_trees: int
    depth: int
    oblivious: bool
    group: str | None  # the WeightSpace group permuting the trees (None: one tree)

    @property
    def n_splits(self) -> int:
        return self.depth if self.oblivious else 2**self.depth - 1

    @property
    def flip_key(self) -> str:
        return f"{self.weight}:flip"

    @property
    def order_key(self) -> str:
        return f"{self.weight}:order"

    @property
    def has_order(self) -> bool:
        """Level orders exist (oblivious trees deeper than 1)."""
        return self.oblivious and self.depth > 1

    def counts(self) -> dict[str, int]:
        """The hand count of the three symmetries."""
        return {
            "trees": self.n_trees,
            "flip_bits": self.n_trees * self.n_splits,
            "level_orders_per_tree": math.factorial(self.depth) if self.oblivious else 1,
        }

    def order_log10(self) -> float:
        """log10 of the order of the whole symmetry group of this ensemble."""
        m = self.n_trees
        per_tree = self.n_splits * math.log10(2)
        if self.oblivious:
            per_tree += math.lgamma(self.depth + 1) / math.log(10)
        return math.lgamma(m + 1) / math.log(10) + m * per_tree


def _layout_from_shapes(
    space: WeightSpace, weight: str, bias: str, leaf: str, depth: int | None = None,
    oblivious: bool | None = None,
) -> TreeLayout:  # fmt: skip
    ws, bs, ls = (space.tensors[n].shape for n in (weight, bias, leaf))
    if len(ws) != 3 or len(bs) != 2 or len(ls) != 3 or ws[:2] != bs or ls[0] != ws[0]:
        raise WeightSpaceError(
            f"{weight} {ws}, {bias} {bs}, {leaf} {ls} are not a soft tree ensemble's "
            "(M, N, F), (M, N), (M, 2^D, C)"
        )
    m, n, n_leaves = ws[0], ws[1], ls[1]
    if n_leaves < 2 or n_leaves & (n_leaves - 1):
        raise WeightSpaceError(f"{leaf}: {n_leaves} leaves is not a power of two >= 2")
    d = n_leaves.bit_length() - 1
    if oblivious is None:
        if n == n_leaves - 1:
            oblivious = False  # (depth 1: both readings are the same tree)
        elif n == d:
            oblivious = True
        else:
            raise WeightSpaceError(
                f"{weight}: {n} splits per tree fit neither {n_leaves - 1} (non-oblivious) "
                f"nor {d} (oblivious) for {n_leaves} leaves"
            )
    if depth is not None and depth != d:
        raise WeightSpaceError(f"{leaf}: {n_leaves} leaves, but depth {depth}")
    if n != (d if oblivious else n_leaves - 1):
        raise WeightSpaceError(
            f"{weight}: {n} splits per tree for depth {d} (oblivious={oblivious})"
        )
    groups = [space.tensors[t].axes[0].groups for t in (weight, bias, leaf)]
    if m > 1:
        if not all(len(g) == 1 for g in groups) or len({g[0] for g in groups}) != 1:
            raise WeightSpaceError(
                f"the tree axis of {weight}, {bias}, {leaf} is not one shared group in the "
                f"WeightSpace ({groups}); was it fixed by the tracer?"
            )
        group = groups[0][0]
        others = [t for t in space.tensors_of(group) if t not in (weight, bias, leaf)]
        if others:
            raise WeightSpaceError(
                f"tree group {group!r} also acts on {others}: not a plain tree ensemble"
            )
        if any(space.tensors[t].axes[1].groups for t in (weight, bias, leaf)):
            raise WeightSpaceError(f"{weight}: the node/leaf axis carries a group; expected fixed")
    else:
        group = None
    return TreeLayout(weight, bias, leaf, m, d, bool(oblivious), group)


@dataclass
class TreeSpace:
    """A WeightSpace plus the flips and level orders of its soft tree ensembles.

    Build it with :meth:`from_module` (traces the model with
    :func:`converters.from_module` and reads each :class:`SoftTreeEnsemble`'s layout) or
    :meth:`from_space` (a WeightSpace alone, e.g. from a checkpoint: ensembles are found
    by their tensor names ``…split_weight``/``…split_bias``/``…leaf`` and shapes).

    Elements are plain dicts (:data:`metanet.space.Element` plus ``"<weight>:flip"`` and
    ``"<weight>:order"`` entries, see the module docstring). ``apply``, ``invert``,
    ``compose``, ``identity`` and ``random_element`` mirror :class:`WeightSpace`'s.
    """

    space: WeightSpace
    layouts: tuple[TreeLayout, ...]

    def __post_init__(self) -> None:
        self.layouts = tuple(self.layouts)
        if not self.layouts:
            raise WeightSpaceError("a TreeSpace needs at least one tree ensemble")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_module(cls, model: nn.Module, example_inputs: tuple | Tensor) -> TreeSpace:
        from converters import from_module

        space = from_module(model, example_inputs)
        layouts = []
        for name, mod in model.named_modules():
            if isinstance(mod, SoftTreeEnsemble):
                p = f"{name}." if name else ""
                layouts.append(
                    _layout_from_shapes(
                        space,
                        f"{p}split_weight",
                        f"{p}split_bias",
                        f"{p}leaf",
                        mod.depth,
                        mod.oblivious,
                    )  # fmt: skip
                )
        if not layouts:
            raise WeightSpaceError(f"{type(model).__name__} holds no SoftTreeEnsemble")
        return cls(space, tuple(layouts))

    @classmethod
    def from_space(cls, space: WeightSpace) -> TreeSpace:
        layouts = []
        for name in space.tensors:
            if not name.endswith("split_weight"):
                continue
            base = name[: -len("split_weight")]
            bias, leaf = f"{base}split_bias", f"{base}leaf"
            if bias in space.tensors and leaf in space.tensors:
                layouts.append(_layout_from_shapes(space, name, bias, leaf))
        if not layouts:
            raise WeightSpaceError("no tree ensemble (…split_weight, …split_bias, …leaf) found")
        return cls(space, tuple(layouts))

    # ------------------------------------------------------------------ counts
    def counts(self) -> dict[str, dict[str, int]]:
        return {lay.weight: lay.counts() for lay in self.layouts}

    def group_order_log10(self) -> float:
        """log10 of the whole group's order: the WeightSpace's groups (the tree
        permutations included) and every flip and level order."""
        tree_groups = {lay.group for lay in self.layouts}
        other = sum(
            self.space.group_order_log10(g) for g in self.space.groups if g not in tree_groups
        )
        return other + sum(lay.order_log10() for lay in self.layouts)

    def summary(self) -> str:
        lines = [self.space.summary(), "  tree symmetries (tasks.align.trees extension):"]
        for lay in self.layouts:
            c = lay.counts()
            kind = "oblivious" if lay.oblivious else "non-oblivious"
            lines.append(
                f"    {lay.weight}: {c['trees']} {kind} trees of depth {lay.depth} permuted by "
                f"{lay.group!r}; {c['flip_bits']} flip bits"
                + (f"; {c['level_orders_per_tree']} level orders per tree" if lay.oblivious else "")
                + f" (log10 |G| = {lay.order_log10():.1f})"
            )
        return "\n".join(lines)

    # ------------------------------------------------------------------ elements
    def _tree_perm(self, element: Mapping[str, Tensor], lay: TreeLayout) -> Tensor:
        if lay.group is None:
            return torch.zeros(1, dtype=torch.long)
        return element[lay.group]

    def identity(self) -> Element:
        out = self.space.identity()
        for lay in self.layouts:
            out[lay.flip_key] = torch.zeros(lay.n_trees, lay.n_splits, dtype=torch.bool)
            if lay.has_order:
                out[lay.order_key] = torch.arange(lay.depth).repeat(lay.n_trees, 1)
        return out

    def random_element(
        self, generator: torch.Generator | None = None, symmetries: Iterable[str] = SYMMETRIES
    ) -> Element:
        """A uniformly random element (of the subgroup without the symmetries left out)."""
        sym = _check_symmetries(symmetries)
        out = self.space.random_element(generator)
        for lay in self.layouts:
            shape = (lay.n_trees, lay.n_splits)
            out[lay.flip_key] = (
                torch.randint(0, 2, shape, generator=generator).bool()
                if "flip" in sym
                else torch.zeros(shape, dtype=torch.bool)
            )
            if lay.has_order:
                out[lay.order_key] = (
                    torch.rand(lay.n_trees, lay.depth, generator=generator).argsort(1)
                    if "order" in sym
                    else torch.arange(lay.depth).repeat(lay.n_trees, 1)
                )
        return out

    def check_element(self, element: Mapping[str, Tensor]) -> None:
        self.space._check_element(element)
        for lay in self.layouts:
            f = element.get(lay.flip_key)
            if f is None:
                raise WeightSpaceError(f"element has no {lay.flip_key!r} (flip bits)")
            if f.dtype != torch.bool or tuple(f.shape) != (lay.n_trees, lay.n_splits):
                raise WeightSpaceError(
                    f"element[{lay.flip_key!r}] must be bool ({lay.n_trees}, {lay.n_splits}), "
                    f"got {f.dtype} {tuple(f.shape)}"
                )
            if lay.has_order:
                o = element.get(lay.order_key)
                if o is None:
                    raise WeightSpaceError(f"element has no {lay.order_key!r} (level orders)")
                if o.dtype.is_floating_point or o.dtype == torch.bool or tuple(o.shape) != (
                    lay.n_trees, lay.depth
                ):  # fmt: skip
                    raise WeightSpaceError(
                        f"element[{lay.order_key!r}] must be integer ({lay.n_trees}, {lay.depth})"
                    )
                ok = torch.equal(o.sort(1).values, torch.arange(lay.depth).expand_as(o))
                if not ok:
                    raise WeightSpaceError(
                        f"element[{lay.order_key!r}]: a row is not a permutation of the levels"
                    )

    def _maps(self, element: Mapping[str, Tensor], lay: TreeLayout) -> tuple[Tensor, Tensor]:
        """(node_src (M, N), leaf_src (M, L)) of the per-tree part."""
        flip = element[lay.flip_key]
        if not lay.oblivious:
            return _flip_maps(flip, lay.depth)
        order = (
            element[lay.order_key].long()
            if lay.has_order
            else torch.zeros(lay.n_trees, 1, dtype=torch.long)
        )
        return order, _oblivious_leaf_map(flip, order, lay.depth)

    def apply(
        self, weights: Mapping[str, Tensor], element: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """Trees permuted (the WeightSpace's groups), then every tree flipped/reordered.
        Tensors may carry leading batch axes, as in :meth:`WeightSpace.apply`."""
        self.check_element(element)
        out = self.space.apply(weights, element)
        for lay in self.layouts:
            node_src, leaf_src = self._maps(element, lay)
            out[lay.weight], out[lay.bias], out[lay.leaf] = _transform(
                out[lay.weight], out[lay.bias], out[lay.leaf], node_src,
                element[lay.flip_key], leaf_src,
            )  # fmt: skip
        return out

    def invert(self, element: Mapping[str, Tensor]) -> Element:
        """``apply(apply(w, g), invert(g)) == w``."""
        self.check_element(element)
        out = self.space.invert(element)
        for lay in self.layouts:
            back = self._tree_perm(out, lay)  # new tree j came from position back[j]
            flip = element[lay.flip_key][back]
            if lay.oblivious:
                order = (
                    element[lay.order_key][back].long()
                    if lay.has_order
                    else torch.zeros(lay.n_trees, 1, dtype=torch.long)
                )
                inv = order.argsort(1)
                out[lay.flip_key] = torch.gather(flip, 1, inv)
                if lay.has_order:
                    out[lay.order_key] = inv
            else:
                node_src, _ = _flip_maps(flip, lay.depth)
                out[lay.flip_key] = torch.zeros_like(flip).scatter(1, node_src, flip)
        return out

    def compose(self, first: Mapping[str, Tensor], then: Mapping[str, Tensor]) -> Element:
        """The element acting as ``first`` followed by ``then``."""
        self.check_element(first)
        self.check_element(then)
        out = self.space.compose(first, then)
        for lay in self.layouts:
            via = self._tree_perm(then, lay)  # then's tree i came from first's result via[i]
            g_flip, h_flip = first[lay.flip_key][via], then[lay.flip_key]
            if lay.oblivious:
                if lay.has_order:
                    g_ord, h_ord = first[lay.order_key][via].long(), then[lay.order_key].long()
                    out[lay.order_key] = torch.gather(g_ord, 1, h_ord)
                    out[lay.flip_key] = h_flip ^ torch.gather(g_flip, 1, h_ord)
                else:
                    out[lay.flip_key] = h_flip ^ g_flip
            else:
                node_src, _ = _flip_maps(h_flip, lay.depth)
                out[lay.flip_key] = h_flip ^ torch.gather(g_flip, 1, node_src)
        return out


def _check_symmetries(symmetries: Iterable[str]) -> set[str]:
    sym = set(symmetries)
    bad = sym - set(SYMMETRIES)
    if bad:
        raise ValueError(
            f"unknown tree symmetries {sorted(bad)}: expected a subset of {SYMMETRIES}"
        )
    return sym


# --------------------------------------------------------------------------- matching
def _flat(lay: TreeLayout, w: Mapping[str, Tensor]) -> Tensor:
    """``(M, params per tree)``: a tree's split weights, biases and leaves."""
    m = lay.n_trees
    return torch.cat(
        [w[lay.weight].reshape(m, -1), w[lay.bias].reshape(m, -1), w[lay.leaf].reshape(m, -1)], 1
    )


def _oblivious_patterns(depth: int, sym: set[str]) -> tuple[Tensor, Tensor]:
    """Every (flip, order) pattern allowed: ``(P, D)`` bool and ``(P, D)`` long."""
    orders = list(itertools.permutations(range(depth))) if "order" in sym else [tuple(range(depth))]
    flips = list(itertools.product((0, 1), repeat=depth)) if "flip" in sym else [(0,) * depth]
    pairs = [(f, o) for o in orders for f in flips]
    return (
        torch.tensor([f for f, _ in pairs], dtype=torch.bool),
        torch.tensor([o for _, o in pairs], dtype=torch.long),
    )


def _flip_patterns(depth: int) -> Tensor:
    """All ``2^(2^D - 1)`` flip patterns of a non-oblivious tree (``method="enumerate"``)."""
    n = 2**depth - 1
    if n > 20:
        raise ValueError(f"depth {depth}: 2^{n} flip patterns are too many to enumerate")
    return torch.tensor(list(itertools.product((0, 1), repeat=n)), dtype=torch.bool)


def _level_sims(lay, a, b, rows, cols, d: int) -> Tensor:
    """Node similarities at level ``d`` for tree pairs: cross ``(R, C, n, n)`` when
    ``cols`` is None (every a tree in ``rows`` against every b tree), else paired
    ``(R, n, n)``."""
    sl = slice(2**d - 1, 2 ** (d + 1) - 1)
    wa, ba = a[lay.weight][rows, sl], a[lay.bias][rows, sl]
    if cols is None:
        wb, bb = b[lay.weight][:, sl], b[lay.bias][:, sl]
        return torch.einsum("ikf,jqf->ijkq", wa, wb) + ba[:, None, :, None] * bb[None, :, None, :]
    wb, bb = b[lay.weight][cols, sl], b[lay.bias][cols, sl]
    return torch.einsum("ikf,iqf->ikq", wa, wb) + ba[:, :, None] * bb[:, None, :]


def _leaf_sims(lay, a, b, rows, cols) -> Tensor:
    va = a[lay.leaf][rows]
    if cols is None:
        return torch.einsum("ilc,jqc->ijlq", va, b[lay.leaf])
    return torch.einsum("ilc,iqc->ilq", va, b[lay.leaf][cols])


def _flip_dp(lay, a, b, rows, cols) -> tuple[Tensor, list[Tensor]]:
    """Best similarity over all flip patterns by dynamic programming, bottom up.

    ``best(k, q)`` = best match of the subtree at result position ``k`` against the source
    subtree at ``q`` (same level): keep (children face children) or flip (negate the node,
    children cross). Returns the root values and, per level, where flipping won."""
    best = _leaf_sims(lay, a, b, rows, cols)
    choices: list[Tensor] = [None] * lay.depth  # type: ignore[list-item]
    for d in reversed(range(lay.depth)):
        sim = _level_sims(lay, a, b, rows, cols, d)
        n = 2**d
        bb = best.reshape(*best.shape[:-2], n, 2, n, 2)
        keep = sim + bb[..., :, 0, :, 0] + bb[..., :, 1, :, 1]
        flip = -sim + bb[..., :, 0, :, 1] + bb[..., :, 1, :, 0]
        choices[d] = flip > keep
        best = torch.maximum(keep, flip)
    return best[..., 0, 0], choices


def _trace_flips(choices: list[Tensor], depth: int) -> Tensor:
    """Flip bits ``(P, 2^D - 1)`` (result frame) from paired DP choices."""
    p = choices[0].shape[0]
    src = torch.zeros(p, 1, dtype=torch.long)
    bits = []
    two = torch.arange(2)
    for d in range(depth):
        # result position k faces source position src[k]
        f = torch.gather(choices[d], 2, src.unsqueeze(-1)).squeeze(-1)  # (P, 2^d)
        bits.append(f)
        src = (2 * src.unsqueeze(-1) + (two ^ f.long().unsqueeze(-1))).flatten(-2)
    return torch.cat(bits, -1)


def tree_similarity(
    lay: TreeLayout,
    weights_a: Mapping[str, Tensor],
    weights_b: Mapping[str, Tensor],
    symmetries: Iterable[str] = SYMMETRIES,
    method: str = "dp",
    block: int = 1 << 22,
) -> tuple[Tensor, Tensor | None]:
    """``S[i, j]`` = the best ``<a_i, T(b_j)>`` over the per-tree transforms ``T`` allowed,
    and for oblivious trees the index of the best (flip, order) pattern (else None).

    ``method``: ``"dp"`` (default) or ``"enumerate"`` (the paper's exhaustive search over
    the flip patterns of non-oblivious trees; the same optimum). ``block`` bounds the
    number of similarity values held at once."""
    sym = _check_symmetries(symmetries)
    a = {k: weights_a[k].detach() for k in (lay.weight, lay.bias, lay.leaf)}
    b = {k: weights_b[k].detach().to(a[k].dtype) for k in (lay.weight, lay.bias, lay.leaf)}
    m = lay.n_trees
    if "flip" not in sym and not (lay.has_order and "order" in sym):
        return _flat(lay, a) @ _flat(lay, b).T, None
    if lay.oblivious:
        flips, orders = _oblivious_patterns(lay.depth, sym)
        leaf_maps = _oblivious_leaf_map(flips, orders, lay.depth)  # (P, L)
        fa = _flat(lay, a)
        best = torch.full((m, m), -math.inf, dtype=fa.dtype)
        arg = torch.zeros((m, m), dtype=torch.long)
        for p in range(len(flips)):
            tb = _transform(
                b[lay.weight], b[lay.bias], b[lay.leaf], orders[p].expand(m, -1),
                flips[p].expand(m, -1), leaf_maps[p].expand(m, -1),
            )  # fmt: skip
            s = fa @ _flat(lay, dict(zip((lay.weight, lay.bias, lay.leaf), tb))).T
            better = s > best
            best = torch.where(better, s, best)
            arg[better] = p
        return best, arg
    if method == "enumerate":
        pats = _flip_patterns(lay.depth)
        fa = _flat(lay, a)
        best = torch.full((m, m), -math.inf, dtype=fa.dtype)
        for f in pats:
            node_src, leaf_src = _flip_maps(f[None], lay.depth)
            tb = _transform(b[lay.weight], b[lay.bias], b[lay.leaf], node_src.expand(m, -1),
                            f.expand(m, -1), leaf_src.expand(m, -1))  # fmt: skip
            s = fa @ _flat(lay, dict(zip((lay.weight, lay.bias, lay.leaf), tb))).T
            best = torch.maximum(best, s)
        return best, None
    if method != "dp":
        raise ValueError(f"method={method!r}: expected 'dp' or 'enumerate'")
    rows_per = max(1, block // max(1, m * 4**lay.depth))
    parts = []
    for r0 in range(0, m, rows_per):
        rows = torch.arange(r0, min(m, r0 + rows_per))
        parts.append(_flip_dp(lay, a, b, rows, None)[0])
    return torch.cat(parts, 0), None


def match_trees(
    tspace: TreeSpace,
    weights_a: Mapping[str, Tensor],
    weights_b: Mapping[str, Tensor],
    symmetries: Iterable[str] = SYMMETRIES,
    method: str = "dp",
) -> Element:
    """Weight matching for tree ensembles: ``g`` with ``tspace.apply(b, g) ≈ a``.

    Per ensemble: :func:`tree_similarity` (each tree pair at its best flip pattern / level
    order among ``symmetries``), then one ``linear_sum_assignment`` over the trees; the
    per-tree transforms are those of the assigned pairs. ``symmetries=()`` is permutation
    only (the answer :func:`tasks.align.weight_matching` gives on the WeightSpace). Other
    groups of the WeightSpace (if the model has more than trees) are left at the identity.
    """
    sym = _check_symmetries(symmetries)
    g = tspace.identity()
    for lay in tspace.layouts:
        s, arg = tree_similarity(lay, weights_a, weights_b, sym, method)
        rows, cols = linear_sum_assignment(s.double().cpu().numpy(), maximize=True)
        perm = torch.as_tensor(cols[np.argsort(rows)], dtype=torch.long)
        if lay.group is not None:
            g[lay.group] = perm
        idx = torch.arange(lay.n_trees)
        if lay.oblivious and arg is not None:
            flips, orders = _oblivious_patterns(lay.depth, sym)
            chosen = arg[idx, perm]
            g[lay.flip_key] = flips[chosen].clone()
            if lay.has_order:
                g[lay.order_key] = orders[chosen].clone()
        elif not lay.oblivious and "flip" in sym:
            a = {k: weights_a[k].detach() for k in (lay.weight, lay.bias, lay.leaf)}
            b = {k: weights_b[k].detach().to(a[k].dtype) for k in (lay.weight, lay.bias, lay.leaf)}
            _, choices = _flip_dp(lay, a, b, idx, perm)
            g[lay.flip_key] = _trace_flips(choices, lay.depth)
    return g


# --------------------------------------------------------------------------- tabular data
TABULAR = ("breast_cancer", "wine", "iris", "diabetes", "digits", "linnerud")
"""The real tabular datasets scikit-learn ships (nothing downloads). ``diabetes`` is
binarized at the training split's median target (above: class 1); ``linnerud`` (20
samples, 3 targets) is a regression (MSE on standardized targets)."""


@dataclass
class Tabular:
    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    task: str  # "classification" or "regression"
    n_out: int
    x_val: Tensor | None = None  # early-stopping split (carved from the training split)
    y_val: Tensor | None = None


def load_tabular(
    name: str,
    seed: int = 0,
    test_fraction: float = 0.25,
    val_fraction: float = 0.0,
    dtype: torch.dtype = torch.float32,
) -> Tabular:
    """A scikit-learn dataset split by ``seed`` (stratified for classes) into train and
    test, and ``val_fraction`` of the training part held out for early stopping; features
    standardized with the training part's statistics."""
    import sklearn.datasets as ds
    from sklearn.model_selection import train_test_split

    if name not in TABULAR:
        raise ValueError(f"unknown dataset {name!r}: expected one of {TABULAR}")
    d = getattr(ds, f"load_{name}")()
    x, y = np.asarray(d.data, dtype=np.float64), np.asarray(d.target)
    task = "regression" if name == "linnerud" else "classification"
    strat = y if task == "classification" and name != "diabetes" else None
    idx_train, idx_test = train_test_split(
        np.arange(len(x)), test_size=test_fraction, random_state=seed, stratify=strat
    )
    if name == "diabetes":
        y = (y > np.median(y[idx_train])).astype(np.int64)
        strat = y
    idx_val = np.arange(0)
    if val_fraction > 0:
        idx_train, idx_val = train_test_split(
            idx_train,
            test_size=val_fraction,
            random_state=seed,
            stratify=None if strat is None else strat[idx_train],
        )
    mean, std = x[idx_train].mean(0), x[idx_train].std(0)
    # a feature constant on the training part (digits' border pixels) is only centred:
    # dividing by its ~0 spread would blow its rare test values up
    x = (x - mean) / np.where(std > 1e-8, std, 1.0)
    if task == "regression":
        y = np.asarray(y, dtype=np.float64)
        y = (y - y[idx_train].mean(0)) / (y[idx_train].std(0) + 1e-8)
        yt = torch.tensor(y, dtype=dtype)
        n_out = y.shape[1]
    else:
        yt = torch.tensor(y, dtype=torch.long)
        n_out = int(y.max()) + 1
    xt = torch.tensor(x, dtype=dtype)
    i_tr, i_te, i_va = (torch.as_tensor(i) for i in (idx_train, idx_test, idx_val))
    val = (xt[i_va], yt[i_va]) if len(idx_val) else (None, None)
    return Tabular(name, xt[i_tr], yt[i_tr], xt[i_te], yt[i_te], task, n_out, *val)


def mlp(
    in_features: int, out_features: int, hidden: Sequence[int] = (256, 256), dtype=None
) -> nn.Sequential:
    """A ReLU MLP (the paper's neural-network comparison)."""
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(in_features, h, dtype=dtype), nn.ReLU()]
        in_features = h
    layers.append(nn.Linear(in_features, out_features, dtype=dtype))
    return nn.Sequential(*layers)


def _loss(task: str):
    return nn.functional.cross_entropy if task == "classification" else nn.functional.mse_loss


def train(
    model: nn.Module,
    data: Tabular,
    *,
    epochs: int = 100,
    lr: float = 1e-2,
    batch_size: int = 64,
    seed: int = 0,
    patience: int | None = None,
) -> nn.Module:
    """Adam on minibatches, order seeded by ``seed``; returns the model (in eval mode).

    With a validation split (``load_tabular(val_fraction=...)``) the weights of the epoch
    with the lowest validation loss are kept (early stopping; training ends after
    ``patience`` epochs without improvement, if given)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = _loss(data.task)
    n = len(data.y_train)
    best, best_state, since = math.inf, None, 0
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(data.x_train[idx]), data.y_train[idx]).backward()
            opt.step()
        if data.x_val is None:
            continue
        model.eval()
        with torch.no_grad():
            val = float(loss_fn(model(data.x_val), data.y_val))
        if val < best:
            best, since = val, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            since += 1
            if patience is not None and since >= patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    return model.eval()


@torch.no_grad()
def interpolation(
    model: nn.Module,
    weights_a: Mapping[str, Tensor],
    weights_b: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    task: str,
    alphas: int = 21,
) -> dict[str, list[float] | float]:
    """Loss (and accuracy) along ``(1 - λ) a + λ b`` and the barriers.

    ``loss_barrier = max_λ [L(λ) - ((1 - λ) L(0) + λ L(1))]``; ``acc_barrier`` the same
    for accuracy with the sign turned (``max_λ [((1 - λ) A(0) + λ A(1)) - A(λ)]``, in
    percentage points); ``*_mid`` the same at ``λ = 0.5`` (``alphas`` odd)."""
    from torch.func import functional_call

    from tasks.merge import interpolate

    grid = np.linspace(0, 1, alphas)
    loss_fn = _loss(task)
    losses, accs = [], []
    for lam in grid:
        w = interpolate(weights_a, weights_b, float(lam))
        out = functional_call(model, w, (x,))
        losses.append(float(loss_fn(out, y)))
        if task == "classification":
            accs.append(100.0 * float((out.argmax(-1) == y).double().mean()))
    lin = lambda v: [(1 - t) * v[0] + t * v[-1] for t in grid]  # noqa: E731
    mid = int(np.argmin(np.abs(grid - 0.5)))
    res: dict = {"alphas": [float(t) for t in grid], "loss": losses}
    excess = [lo - li for lo, li in zip(losses, lin(losses))]
    res["loss_barrier"], res["loss_mid"] = max(excess), excess[mid]
    if accs:
        drop = [li - ac for ac, li in zip(accs, lin(accs))]
        res["acc"] = accs
        res["acc_barrier"], res["acc_mid"] = max(drop), drop[mid]
    return res
