"""Universal neural functionals: permutation-equivariant linear layers for any WeightSpace.

Zhou, Finn & Harrison, "Universal Neural Functionals" (2024). Every tensor of the space is
cut into *pieces*, one per choice of segment on each axis; a piece's axes are the factors
of its segments. Fixed factors carry no symmetry, so they are folded into the channels
(a dense map acts across them); permuted factors are the piece's *indices*, each labelled
by its group.

For an output piece with indices :math:`o_1..o_m` and an input piece with indices
:math:`i_1..i_n`, the equivariant linear maps are spanned by the set partitions
:math:`\\pi` of :math:`\\{o_1..o_m, i_1..i_n\\}` whose blocks hold indices of one group:

.. math::

    Y_{o} \\mathrel{+}= W_\\pi \\cdot
        \\operatorname*{mean}_{\\text{blocks of } \\pi \\text{ without outputs}}
        X_{i}\\,\\big|_{\\text{indices in one block equal}}

placed on the output diagonal of each block (indices in one block equal) and broadcast
over blocks without inputs. The number of terms for a pair is the product over groups of
Bell numbers :math:`B(m_g + n_g)`. For a group indexed by another (head_dim within heads,
a wreath product) a block may join inner indices only when their outer indices share a
block. ``basis="nfn"`` keeps the cheaper NFN subset: at most one input and one output index
per block (no diagonals within a tensor).

Inputs and outputs are weight-feature dicts ``{name: Tensor(batch, channels, *shape)}``;
only floating tensors are weight features (:func:`metanet.graph.is_feature`): integer and
bool buffers (``num_batches_tracked``, ``relative_position_index``) are not read, and pass
through unchanged when given (so outputs still cover the whole space).

**Large spaces.** Three things keep a layer's size and build time in proportion to the
*symmetric* structure of a real network (ImageNet ViTs, DenseNets):

* *bounded folds.* A piece whose fixed factors hold ``fold > max_fold`` values (a logit
  layer's 1000 classes, a patch conv's ``3 * 16 * 16`` taps, a tensor with no permuted axis
  at all) is encoded along them by at most ``max_fold`` cosines: the first rows of a DCT-II basis
  on each fixed axis, their tensor product over several (a vocabulary × width embedding is
  never one dense basis over its values: each new cosine goes to the axis with the most
  values per cosine, and the encoding runs axis by axis),
  :math:`P \\in \\mathbb{R}^{K \\times f}` before the layer and decoded by :math:`P^\\top`
  after it; a per-position channel map :math:`A \\in \\mathbb{R}^{C_o \\times C_i}` keeps
  full resolution there. The group does not act on fixed factors, so this is exactly
  equivariant (the encoding commutes with every permutation of the indices):

  .. math::

      Y_p = \\operatorname{dec}_p\\big(\\mathrm{UNF}(\\operatorname{enc}(X))_p\\big) + A_p X_p.

* *piece pairs by signature.* Only terms in which an output and an input index share a
  block need the pair to share a group; they are enumerated over the pairs found through
  each group's pieces (never all pairs), with the partitions cached per pair signature
  (the pattern of equal groups). Terms with no shared block read a whole-piece reduction
  (a mean, or a mean along an input diagonal) and write a broadcast pattern: for every
  pair they are the product of the output's patterns and the input's reductions.
* *the invariant pathway.* Those terms are one linear map from the concatenated
  reductions :math:`v \\in \\mathbb{R}^D` of all pieces to all output patterns
  :math:`\\mathbb{R}^R`, factored as :math:`U V` (rank ``invariant_rank`` per channel)
  where that has fewer parameters than :math:`R \\times D` (any linear map of invariants
  is equivariant).

:class:`UNFLinear` batches the terms twice: terms that write the same pattern into the
same output piece form a group, one block of weights over the concatenation of what they
read; groups that read the same concatenation share one matmul, their blocks stacked.
Each input piece's reads (the piece and its means) are one autograd op whose backward
writes the piece's gradient once, and each output piece's terms are added with one
full-size write.
"""

from __future__ import annotations

import itertools
import math
import string
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from metanet.graph import is_feature
from metanet.space import WeightSpace, WeightSpaceError

__all__ = [
    "UNFLinear",
    "UNFPool",
    "UNFPointwise",
    "Piece",
    "pieces_of",
    "basis_terms",
]


@dataclass(frozen=True)
class Piece:
    """One block of a tensor: a choice of segment per axis.

    ``slices``: per tensor axis ``(start, stop)``; ``factors``: per axis the factor
    ``(group or None, size)`` list; ``index_groups``: the groups of the permuted factors
    in order; ``outer``: for each permuted factor, the position (in ``index_groups``) of
    the factor of its outer group, or -1.
    """

    tensor: str
    slices: tuple[tuple[int, int], ...]
    factors: tuple[tuple[tuple[str | None, int], ...], ...]
    index_groups: tuple[str, ...]
    index_sizes: tuple[int, ...]
    outer: tuple[int, ...]
    fold: int  # product of the fixed factor sizes (folded into channels)

    @property
    def num_indices(self) -> int:
        return len(self.index_groups)


def pieces_of(space: WeightSpace) -> list[Piece]:
    """Every weight-feature tensor cut into pieces (see :class:`Piece`), in space order
    (integer and bool buffers have none)."""
    out: list[Piece] = []
    for t in space.tensors.values():
        if not is_feature(t):
            continue
        for ranges, segs in t.blocks():
            factors = tuple(tuple((f.group, f.size) for f in seg) for seg in segs)
            flat = [f for fs in factors for f in fs]
            groups = [g for g, _ in flat if g is not None]
            sizes = [n for g, n in flat if g is not None]
            outer = []
            for g in groups:
                o = space.groups[g].within
                pos = [k for k, h in enumerate(groups) if h == o]
                if o is not None and len(pos) != 1:
                    raise WeightSpaceError(
                        f"tensor {t.name!r}: group {g!r} is indexed by {o!r}, which must occur "
                        "exactly once in each piece"
                    )
                outer.append(pos[0] if o is not None else -1)
            fold = math.prod(n for g, n in flat if g is None)
            out.append(
                Piece(
                    t.name,
                    ranges,
                    factors,
                    tuple(groups),
                    tuple(sizes),
                    tuple(outer),
                    fold,
                )
            )
    return out


def _product(lists: list[list]) -> Iterator[tuple]:
    if not lists:
        yield ()
        return
    for head in lists[0]:
        for rest in _product(lists[1:]):
            yield (head, *rest)


_NO_INDICES = Piece("", (), (), (), (), (), 1)
"""A piece without indices: the other side of a term that writes or reads one piece alone."""


def _signature(out: Piece, inp: Piece) -> tuple:
    """What :func:`basis_terms` depends on: which indices share a group (groups renamed by
    first appearance) and the outer-group links."""
    names: dict[str, int] = {}
    head = tuple([names.setdefault(g, len(names)) for g in out.index_groups]), out.outer
    tail = tuple([names.setdefault(g, len(names)) for g in inp.index_groups])
    return head, tail, inp.outer


def _cosine_basis(k: int, n: int) -> Tensor:
    r"""The first ``k`` rows of the DCT-II basis on ``n`` points, ``(k, n)``:
    :math:`c_r \cos(\pi r (2j + 1) / 2n)` with :math:`c_0 = 1`, :math:`c_{r>0} = \sqrt 2`
    (row 0 is all ones, every row has mean square 1, the rows are orthogonal)."""
    j = torch.arange(n, dtype=torch.float64)
    rows = torch.cos(
        math.pi * torch.arange(k, dtype=torch.float64)[:, None] * (2 * j + 1) / (2 * n)
    )
    rows[1:] *= math.sqrt(2)
    return rows.float()


def fixed_sizes(piece: Piece) -> tuple[int, ...]:
    """The sizes of a piece's fixed factors, in the order they are folded into channels."""
    return tuple(n for fs in piece.factors for g, n in fs if g is None)


def cosine_ranks(sizes: Sequence[int], max_fold: int) -> tuple[int, ...]:
    """How many cosines each fixed axis of a piece gets: all of its values when the piece
    has at most ``max_fold``; else a tensor-product basis of at most ``max_fold`` rows,
    each new cosine going to the axis with the coarsest resolution (most values per
    cosine). A single axis gets ``max_fold``."""
    if math.prod(sizes) <= max_fold:
        return tuple(sizes)
    ranks = [1] * len(sizes)
    while True:
        order = sorted(range(len(sizes)), key=lambda i: -sizes[i] / ranks[i])
        for i in order:
            grown = math.prod(ranks) // ranks[i] * (ranks[i] + 1)
            if ranks[i] < sizes[i] and grown <= max_fold:
                ranks[i] += 1
                break
        else:
            return tuple(ranks)


def _encode(x: Tensor, bases: Sequence[Tensor], sizes: Sequence[int]) -> Tensor:
    """``(B, C * fold, *idx)`` -> ``(B, C * K, *idx)``: each channel's fixed values replaced
    by their means against a tensor-product cosine basis (``bases[i]``: ``(k_i, n_i)`` for
    fixed axis ``i``; ``K`` the product of the ``k_i``; the first row: the plain mean). One
    axis at a time, so no ``K × fold`` matrix is ever formed."""
    b, _, *idx = x.shape
    z = x.reshape(b, -1, *sizes, math.prod(idx))
    for i, basis in enumerate(bases):
        z = torch.tensordot(z, basis.to(x.dtype) / sizes[i], dims=([2 + i], [1])).movedim(-1, 2 + i)
    return z.reshape(b, -1, *idx)


def _decode(y: Tensor, bases: Sequence[Tensor], sizes: Sequence[int]) -> Tensor:
    """``(B, C * K, *idx)`` -> ``(B, C * fold, *idx)``: the cosine series of the ``K``
    coefficients at every fixed position (adjoint of :func:`_encode` up to scale)."""
    b, _, *idx = y.shape
    z = y.reshape(b, -1, *[basis.shape[0] for basis in bases], math.prod(idx))
    for i, basis in enumerate(bases):
        z = torch.tensordot(z, basis.to(y.dtype), dims=([2 + i], [0])).movedim(-1, 2 + i)
    return z.reshape(b, -1, *idx)


class _Cosines(nn.Module):
    """The per-axis cosine bases of the projected pieces, each ``(k, n)`` built once and
    shared (buffers, not saved: they are a function of the sizes)."""

    def __init__(self, pieces: Sequence[Piece], max_fold: int):
        super().__init__()
        self.plan: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        for i, p in enumerate(pieces):
            if p.fold <= max_fold:
                continue
            sizes = fixed_sizes(p)
            ranks = cosine_ranks(sizes, max_fold)
            self.plan[i] = sizes, ranks
            for k, n in zip(ranks, sizes):
                if not hasattr(self, f"c{k}_{n}"):
                    self.register_buffer(f"c{k}_{n}", _cosine_basis(k, n), persistent=False)

    def width(self, i: int, piece: Piece) -> int:
        return math.prod(self.plan[i][1]) if i in self.plan else piece.fold

    def bases(self, i: int) -> list[Tensor]:
        sizes, ranks = self.plan[i]
        return [getattr(self, f"c{k}_{n}") for k, n in zip(ranks, sizes)]

    def encode(self, i: int, x: Tensor) -> Tensor:
        return _encode(x, self.bases(i), self.plan[i][0])

    def decode(self, i: int, y: Tensor) -> Tensor:
        return _decode(y, self.bases(i), self.plan[i][0])


def _set_partitions(items: list[int]) -> Iterator[list[list[int]]]:
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _set_partitions(rest):
        for i in range(len(part)):
            yield part[:i] + [[first, *part[i]]] + part[i + 1 :]
        yield [[first], *part]


def basis_terms(out: Piece, inp: Piece, basis: str = "full") -> list[list[list[int]]]:
    """The valid partitions for a piece pair. Indices ``0..m-1`` are the output's,
    ``m..m+n-1`` the input's. Returns a list of partitions (lists of blocks)."""
    m = out.num_indices
    groups = list(out.index_groups) + list(inp.index_groups)
    outer = list(out.outer) + [o + m if o >= 0 else -1 for o in inp.outer]
    by_group: dict[str, list[int]] = {}
    for k, g in enumerate(groups):
        by_group.setdefault(g, []).append(k)
    per_group = [list(_set_partitions(ks)) for ks in by_group.values()]
    terms = []
    for choice in _product(per_group):
        blocks = [b for part in choice for b in part]
        block_of = {k: bi for bi, b in enumerate(blocks) for k in b}
        ok = True
        for b in blocks:
            if basis == "nfn" and (sum(k < m for k in b) > 1 or sum(k >= m for k in b) > 1):
                ok = False
                break
            outers = {block_of[outer[k]] for k in b if outer[k] >= 0}
            if len(outers) > 1:
                ok = False
                break
        if ok:
            terms.append(sorted((sorted(b) for b in blocks), key=lambda b: b[0]))
    return terms


def _split_piece(x: Tensor, piece: Piece) -> Tensor:
    """``(B, C, *tensor shape)`` -> ``(B, C * fold, *index sizes)``: a view of ``x`` unless
    fixed factors have to move into the channels."""
    b, c = x.shape[:2]
    for ax, (lo, hi) in enumerate(piece.slices):
        if hi - lo != x.shape[2 + ax]:
            x = x.narrow(2 + ax, lo, hi - lo)
    flat = [f for fs in piece.factors for f in fs]
    if len(flat) != len(piece.factors):
        x = x.reshape(b, c, *[n for _, n in flat])
    fixed = [2 + k for k, (g, _) in enumerate(flat) if g is None]
    perm = [2 + k for k, (g, _) in enumerate(flat) if g is not None]
    order = [0, 1, *fixed, *perm]
    if order != sorted(order):
        x = x.permute(order)
    shape = (b, c * piece.fold, *piece.index_sizes)
    return x if x.shape == shape else x.reshape(shape)


def _unsplit(y: Tensor, piece: Piece, b: int, c: int) -> Tensor:
    """Inverse of :func:`_split_piece`: ``(B, C * fold, *idx)`` -> ``(B, C, *piece shape)``."""
    flat = [f for fs in piece.factors for f in fs]
    order = [k for k, (g, _) in enumerate(flat) if g is None] + [
        k for k, (g, _) in enumerate(flat) if g is not None
    ]
    split = (b, c, *[flat[k][1] for k in order])
    if y.shape != split:
        y = y.reshape(split)
    if order != sorted(order):
        inv = sorted(range(len(order)), key=lambda pos: order[pos])
        y = y.permute(0, 1, *[2 + pos for pos in inv])
    shape = (b, c, *[hi - lo for lo, hi in piece.slices])
    return y if y.shape == shape else y.reshape(shape)


def _assemble(
    space: WeightSpace, pieces: list[Piece], ys: list[Tensor], b: int, c: int
) -> dict[str, Tensor]:
    """Put every tensor back together from its pieces."""
    by_tensor: dict[str, list[tuple[tuple[tuple[int, int], ...], Tensor]]] = {}
    for p, y in zip(pieces, ys):
        by_tensor.setdefault(p.tensor, []).append((p.slices, _unsplit(y, p, b, c)))
    return {name: _concat_grid(parts, 0) for name, parts in by_tensor.items()}


def _concat_grid(parts: list[tuple[tuple[tuple[int, int], ...], Tensor]], axis: int) -> Tensor:
    """Pieces tiling a tensor (their slices form a grid) concatenated, axis by axis."""
    if len(parts) == 1:
        return parts[0][1]
    rows: dict[tuple[int, int], list] = {}
    for slices, y in sorted(parts, key=lambda part: part[0][axis]):
        rows.setdefault(slices[axis], []).append((slices, y))
    if len(rows) == 1:
        return _concat_grid(parts, axis + 1)
    return torch.cat([_concat_grid(row, axis + 1) for row in rows.values()], dim=2 + axis)


def _canonical(sub: str) -> str:
    """Letters renamed by first appearance: the same diagonal pattern, the same key."""
    names: dict[str, str] = {}
    return "".join(
        ch if not ch.isalpha() else names.setdefault(ch, string.ascii_letters[len(names)])
        for ch in sub
    )


class _Term:
    """One basis term: what it reads (a reduction of an input piece) and where it writes
    (a pattern over the output piece). It depends on the pair's signature only, not on
    the sizes, so one term object serves every pair of that signature."""

    def __init__(self, partition: list[list[int]], out: Piece, inp: Piece):
        m = out.num_indices
        letters = iter(ch for ch in string.ascii_letters if ch not in "ocz")
        block_letter = {bi: next(letters) for bi in range(len(partition))}
        block_of = {k: bi for bi, b in enumerate(partition) for k in b}
        self.in_sub = "".join(block_letter[block_of[m + k]] for k in range(inp.num_indices))
        kept = [
            bi for bi, b in enumerate(partition) if any(k < m for k in b) and any(k >= m for k in b)
        ]
        self.kept_sub = "".join(block_letter[bi] for bi in kept)
        self._summed = [b[0] - m for b in partition if all(k >= m for k in b)]
        # no input diagonal: the reduction is a plain mean over the input-only indices,
        # and ``kept_in`` lists the input index of each shared block
        self.diagonal = len(set(self.in_sub)) < len(self.in_sub)
        self.kept_in = [next(k - m for k in partition[bi] if k >= m) for bi in kept]
        self.kept_sorted = tuple(sorted(self.kept_in))
        out_blocks = kept + [bi for bi, b in enumerate(partition) if all(k < m for k in b)]
        self.out_blocks = [[k for k in partition[bi] if k < m] for bi in out_blocks]
        self.n_kept = len(kept)
        self.out_key = (tuple(map(tuple, self.out_blocks)), self.n_kept)
        # terms with the same key read the same reduction of the same input piece
        self.reduction_key = _canonical(f"{self.in_sub}>{self.kept_sub}")

    def scale(self, inp: Piece) -> float:
        """The mean's normalisation on input piece ``inp``: 1 / the sizes of the input-only
        blocks."""
        return 1.0 / math.prod(inp.index_sizes[k] for k in self._summed)

    def source(self, piece: int) -> tuple:
        """The key of the reduction this term reads in :meth:`UNFLinear.forward`."""
        if self.diagonal:
            return (piece, self.reduction_key)
        return (piece, self.kept_sorted)

    def read(self, reduced: Tensor) -> Tensor:
        """The input reduction ``(B, Cin, *shared blocks)`` in this term's block order: a
        mean keeps its indices in input order."""
        if self.diagonal or self.kept_in == sorted(self.kept_in):
            return reduced
        pos = sorted(self.kept_in)
        return reduced.permute(0, 1, *[2 + pos.index(k) for k in self.kept_in])

    @property
    def is_broadcast(self) -> bool:
        """Writes its values broadcast over the output, no diagonal."""
        return all(len(b) == 1 for b in self.out_blocks)

    def place(self, y: Tensor, out_shape: tuple[int, ...]) -> Tensor:
        """``y`` (B, Cout, *shared blocks) placed into the output's shape: broadcast over
        output-only blocks (a view with size-1 axes), and onto the diagonal of blocks
        holding several output indices (written out)."""
        if len(self.out_blocks) > self.n_kept:
            y = y.reshape(*y.shape, *[1] * (len(self.out_blocks) - self.n_kept))
        if self.is_broadcast:
            order = [b[0] for b in self.out_blocks]
            if order == sorted(order):
                return y
            return y.permute(0, 1, *[2 + order.index(k) for k in range(len(order))])
        size = [out_shape[0], out_shape[1], *[out_shape[2 + b[0]] for b in self.out_blocks]]
        out = y.new_zeros(out_shape)
        strides = out.stride()
        stride = [strides[0], strides[1]] + [
            sum(strides[2 + k] for k in b) for b in self.out_blocks
        ]
        out.as_strided(size, stride).copy_(y.expand(size))
        return out


class _BroadcastSum(torch.autograd.Function):
    """The sum of broadcastable terms with one full-size write. Small terms (a row, a
    column, a constant) add up at their own size first; the result is allocated once and
    the remaining terms are added into it in place. The backward sums the gradient down
    to each term's shape: the adjoint of :class:`_PieceReads`."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*terms: Tensor) -> Tensor:
        shape = torch.broadcast_shapes(*(t.shape for t in terms))
        out = partial = None
        for t in sorted(terms, key=Tensor.numel):
            if partial is None:
                partial = t
            elif torch.broadcast_shapes(partial.shape, t.shape) != shape:
                partial = partial + t
            elif out is None:
                out, partial = partial + t, None
            else:
                out, partial = out.add_(partial).add_(t), None
        return out if partial is None else out.add_(partial)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.shapes = [t.shape for t in inputs]

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, ...]:
        return tuple(grad.sum_to_size(shape) for shape in ctx.shapes)

    @staticmethod
    def jvp(ctx, *tangents: Tensor) -> Tensor:
        return _BroadcastSum.forward(*tangents)  # linear


def _broadcast_sum(terms: list[Tensor]) -> Tensor:
    """The sum of broadcastable terms (see :class:`_BroadcastSum`)."""
    return terms[0] if len(terms) == 1 else _BroadcastSum.apply(*terms)


class _PieceReads(torch.autograd.Function):
    """A piece ``x`` (B, C, *idx) as the terms read it: itself, and its means over several
    sets of its indices (as size-1 axes). ``plan``: per mean, the earlier mean it
    averages further (-1: ``x``) and the axes.

    Autograd would write a full-size gradient of ``x`` per read and add them up; here the
    incoming gradients are summed broadcast (:class:`_BroadcastSum`), with one full-size
    write."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, plan: tuple[tuple[int, tuple[int, ...]], ...]) -> tuple[Tensor, ...]:
        means: list[Tensor] = []
        for src, dims in plan:
            means.append((x if src < 0 else means[src]).mean(dims, keepdim=True))
        return (x, *means)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.shape, ctx.plan = inputs[0].shape, inputs[1]

    @staticmethod
    def backward(ctx, grad: Tensor, *grads: Tensor) -> tuple[Tensor, None]:
        n = math.prod(ctx.shape[2:])
        return _broadcast_sum([grad, *(g * (math.prod(g.shape[2:]) / n) for g in grads)]), None

    @staticmethod
    def jvp(ctx, tangent: Tensor, _) -> tuple[Tensor, ...]:
        _, *means = _PieceReads.forward(tangent, ctx.plan)  # linear
        return (tangent.view_as(tangent), *means)  # the piece is returned as-is: a view


def _plan_means(
    sizes: tuple[int, ...], kept: list[tuple[int, ...]]
) -> tuple[list[tuple[int, ...]], tuple[tuple[int, tuple[int, ...]], ...]]:
    """The means keeping each of ``kept`` (sorted index tuples), reordered, and their
    :class:`_PieceReads` plan: each from the smallest earlier mean that keeps a superset (e.g.
    a matrix's full mean from its row means), else from the piece."""
    order = sorted(kept, key=len, reverse=True)
    plan = []
    for i, k in enumerate(order):
        src, src_kept = -1, tuple(range(len(sizes)))
        for j, other in enumerate(order[:i]):
            smaller = math.prod(sizes[a] for a in other) < math.prod(sizes[a] for a in src_kept)
            if set(k) < set(other) and smaller:
                src, src_kept = j, other
        plan.append((src, tuple(2 + a for a in src_kept if a not in k)))
    return order, tuple(plan)


def _channel_map(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``(B, C, *idx)`` -> ``(B, O, *idx)``: one ``(O, C)`` matrix applied at every index."""
    if x.dim() == 2:
        return F.linear(x, weight, bias)
    b, c, *idx = x.shape
    o = weight.shape[0]
    flat = x.reshape(b, c, -1)
    if o <= flat.shape[2]:
        # a GEMM per sample against the shared weight: x is read in place, and the weight's
        # gradient passes through a (B, O, C) buffer no larger than x
        w = weight.expand(b, o, c)
        y = torch.bmm(w, flat) if bias is None else torch.baddbmm(bias[:, None], w, flat)
    else:
        # a wide weight: a 1x1 convolution (oneDNN's GEMM over all (sample, index)
        # columns), with no per-sample weight-gradient buffer
        y = F.conv1d(flat, weight[:, :, None], bias)
    return y.reshape(b, o, *idx)


@dataclass
class _Group:
    """Terms that write the same pattern into output piece ``out``, reading ``reads``
    (input piece, term): one ``(out rows, concatenated reductions)`` block of weights."""

    out: int
    pattern: _Term
    reads: list[tuple[int, _Term]] = field(default_factory=list)

    @property
    def input_key(self) -> tuple:
        """Groups with the same key read the same concatenation."""
        return tuple((ii, term.reduction_key) for ii, term in self.reads)


@dataclass
class _Map:
    """Groups that read the same concatenation: one channel map, whose weight stacks the
    groups' blocks by rows (``rows``: each group's range)."""

    groups: list[_Group]
    rows: list[tuple[int, int]]

    @property
    def reads(self) -> list[tuple[int, _Term]]:
        return self.groups[0].reads


class UNFLinear(nn.Module):
    """Equivariant linear map between weight-feature dicts of one WeightSpace.

    Args:
        space: the weight space (inputs and outputs share it).
        in_channels: channels of the input features.
        out_channels: channels of the output features.
        basis: ``"full"`` (every valid partition) or ``"nfn"`` (the NFN subset).
        bias: add a learned per-channel constant to every output piece.
        max_fold: fixed values per piece kept as they are; pieces with more are encoded
            by that many cosines (see the module docstring).
        invariant_rank: rank of the invariant pathway's map per channel (times
            ``min(in_channels, out_channels)``), used where the factored map is smaller than
            the full one (``None``: always full).

    Shapes:
        input ``{name: (B, in_channels, *shape)}`` -> output
        ``{name: (B, out_channels, *shape)}`` for every floating tensor; integer and
        bool tensors in the input are returned as they are.

    Parameters: ``weights``, one matrix per set of groups reading the same input (their
    blocks stacked by rows), then the invariant pathway's output matrix (``U``, or the
    whole map), then each encoded piece's per-position map ``A``; ``invariant_in``
    (``V``, when factored); ``bias``, ``out_channels * min(fold, max_fold)`` per piece,
    concatenated.
    """

    def __init__(
        self,
        space: WeightSpace,
        in_channels: int,
        out_channels: int,
        basis: str = "full",
        bias: bool = True,
        max_fold: int = 64,
        invariant_rank: int | None = 64,
    ):
        super().__init__()
        if basis not in ("full", "nfn"):
            raise ValueError(f"basis must be 'full' or 'nfn', got {basis!r}")
        if max_fold < 1:
            raise ValueError(f"max_fold must be >= 1, got {max_fold}")
        self.space, self.in_channels, self.out_channels, self.basis = (
            space,
            in_channels,
            out_channels,
            basis,
        )
        self.pieces = pieces_of(space)
        self._bookkeeping = [n for n, t in space.tensors.items() if not is_feature(t)]
        self.cosines = _Cosines(self.pieces, max_fold)
        self.widths = [self.cosines.width(i, p) for i, p in enumerate(self.pieces)]
        self._projected = [i for i, p in enumerate(self.pieces) if p.fold > max_fold]

        cache: dict[tuple, list[list[list[int]]]] = {}

        def partitions(po: Piece, pi: Piece) -> list[list[list[int]]]:
            sig = _signature(po, pi)
            if sig not in cache:
                cache[sig] = basis_terms(po, pi, basis)
            return cache[sig]

        # Terms in which an output and an input index share a block exist only for pieces
        # that share a group: found through each group's pieces, never over all pairs,
        # and built once per pair signature. Terms that write the same
        # pattern into the same output piece (same output blocks, same blocks shared with
        # the input) differ only in what they read: each reads a reduction of some input
        # piece (means over its input-only blocks, its diagonals) shaped like the shared
        # blocks. So they run as one matmul over the concatenated reductions, and each
        # reduction is computed once per forward.
        shared: dict[tuple, list[_Term]] = {}
        by_group: dict[str, list[int]] = {}
        for ii, p in enumerate(self.pieces):
            for g in dict.fromkeys(p.index_groups):
                by_group.setdefault(g, []).append(ii)
        groups: dict[tuple, _Group] = {}
        n_terms = 0
        for oi, po in enumerate(self.pieces):
            partners = sorted({ii for g in set(po.index_groups) for ii in by_group[g]})
            # the pair signature (as _signature), with the output's part computed once
            own: dict[str, int] = {}
            head = tuple([own.setdefault(g, len(own)) for g in po.index_groups]), po.outer
            for ii in partners:
                pi = self.pieces[ii]
                names = dict(own)
                tail = tuple([names.setdefault(g, len(names)) for g in pi.index_groups])
                sig = head, tail, pi.outer
                terms = shared.get(sig)
                if terms is None:
                    m = po.num_indices
                    terms = shared[sig] = [
                        _Term(part, po, pi)
                        for part in partitions(po, pi)
                        if any(b[0] < m <= b[-1] for b in part)  # else: invariant pathway
                    ]
                n_terms += len(terms)
                for term in terms:
                    group = groups.get((oi, term.out_key))
                    if group is None:
                        group = groups[(oi, term.out_key)] = _Group(oi, term)
                    group.reads.append((ii, term))
        # The invariant pathway: every output piece's patterns (broadcasts, output
        # diagonals) read every input piece's whole-piece reductions. The broadcast rows
        # come first, one per piece in order: they take the bias.
        patterns = [
            [_Term(part, po, _NO_INDICES) for part in partitions(po, _NO_INDICES)]
            for po in self.pieces
        ]
        reductions = [
            sorted(
                (_Term(part, _NO_INDICES, pi) for part in partitions(_NO_INDICES, pi)),
                key=lambda term: term.reduction_key,
            )
            for pi in self.pieces
        ]
        n_terms += sum(map(len, patterns)) * sum(map(len, reductions))
        self._num_terms = n_terms
        out_rows = [(oi, t) for oi, ts in enumerate(patterns) for t in ts if t.is_broadcast]
        out_rows += [(oi, t) for oi, ts in enumerate(patterns) for t in ts if not t.is_broadcast]
        heights = [out_channels * self.widths[oi] for oi, _ in out_rows]
        ends = list(itertools.accumulate(heights))
        self._inv_out = [(oi, t, e - h, e) for (oi, t), e, h in zip(out_rows, ends, heights)]
        self._inv_in = [(ii, t) for ii, ts in enumerate(reductions) for t in ts]

        # the reductions the terms read: each input piece itself and its means (one
        # _PieceReads per piece), and einsums for those along an input diagonal
        means: dict[int, dict[tuple[int, ...], None]] = {}
        self._diagonals: dict[tuple, tuple[str, float]] = {}
        reads = [r for g in groups.values() for r in g.reads] + self._inv_in
        for ii, term in reads:
            if term.diagonal:
                einsum = f"zc{term.in_sub}->zc{term.kept_sub}"
                self._diagonals[(ii, term.reduction_key)] = (einsum, term.scale(self.pieces[ii]))
            elif len(term.kept_in) < self.pieces[ii].num_indices:
                means.setdefault(ii, {})[term.kept_sorted] = None
        self._piece_reads = [
            (ii, *_plan_means(self.pieces[ii].index_sizes, list(kept)))
            for ii, kept in means.items()
        ]
        # Groups that read the same reductions (e.g. an MLP's weights into and out of a
        # hidden layer and its bias, which all read what is indexed by its neurons) share
        # one matmul.
        by_input: dict[tuple, list[_Group]] = {}
        for g in groups.values():
            g.reads.sort(key=lambda read: (read[0], read[1].reduction_key))
            by_input.setdefault(g.input_key, []).append(g)
        self._maps = []
        for own in by_input.values():
            hs = [out_channels * self.widths[g.out] for g in own]
            es = list(itertools.accumulate(hs))
            self._maps.append(_Map(own, [(e - h, e) for e, h in zip(es, hs)]))
        shapes = [
            (m.rows[-1][1], sum(in_channels * self.widths[ii] for ii, _ in m.reads))
            for m in self._maps
        ]
        rows = ends[-1] if ends else 0
        cols = sum(in_channels * self.widths[ii] for ii, _ in self._inv_in)
        rank = (invariant_rank or 0) * min(in_channels, out_channels)
        factored = invariant_rank is not None and rank * (rows + cols) < rows * cols
        self._rank = rank if factored else None
        shapes.append((rows, rank if factored else cols))
        shapes += [(out_channels, in_channels)] * len(self._projected)
        self.weights = nn.ParameterList(nn.Parameter(torch.empty(shape)) for shape in shapes)
        self.invariant_in = nn.Parameter(torch.empty(rank, cols)) if factored else None
        height = sum(out_channels * w for w in self.widths)
        self.bias = nn.Parameter(torch.zeros(height)) if bias else None
        self.reset_parameters()

    @property
    def num_terms(self) -> int:
        """Basis terms (valid partitions) over all piece pairs."""
        return self._num_terms

    def reset_parameters(self) -> None:
        """Uniform weights, bounded by ``1 / sqrt(fan-in)`` of each output piece (the
        factored invariant map ``U V`` with the same variance); zero bias."""
        n_maps = len(self._maps)
        cols = sum(self.in_channels * self.widths[ii] for ii, _ in self._inv_in)
        fan_in = [cols] * len(self.pieces)
        for m, w in zip(self._maps, self.weights):
            for g in m.groups:
                fan_in[g.out] += w.shape[1]
        for i in self._projected:
            fan_in[i] += self.in_channels
        with torch.no_grad():
            for m, w in zip(self._maps, self.weights):
                for g, (lo, hi) in zip(m.groups, m.rows):
                    bound = 1 / math.sqrt(fan_in[g.out])
                    w[lo:hi].uniform_(-bound, bound)
            inv = self.weights[n_maps]
            if self.invariant_in is not None:
                # Var(U V) = rank Var(U) Var(V) = 1 / (3 fan-in), with Var(V) = 1 / (3 D)
                self.invariant_in.uniform_(-1 / math.sqrt(cols), 1 / math.sqrt(cols))
            for oi, _, lo, hi in self._inv_out:
                bound = 1 / math.sqrt(fan_in[oi])
                if self.invariant_in is not None:
                    bound *= math.sqrt(cols / self._rank)
                inv[lo:hi].uniform_(-bound, bound)
            for i, w in zip(self._projected, self.weights[n_maps + 1 :]):
                bound = 1 / math.sqrt(fan_in[i])
                w.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        full = [_split_piece(features[p.tensor], p) for p in self.pieces]
        xs = list(full)
        for i in self._projected:
            xs[i] = self.cosines.encode(i, full[i])
        b = next(iter(features.values())).shape[0]
        # every input piece reduced to the shared blocks the terms keep, keyed by
        # (piece, kept indices in input order) for means (all of them: the piece itself),
        # (piece, reduction key) for diagonals
        reduced: dict[tuple, Tensor] = {}
        for ii, x in enumerate(xs):
            reduced[(ii, tuple(range(x.dim() - 2)))] = x
        for ii, kepts, plan in self._piece_reads:
            x, *means = _PieceReads.apply(xs[ii], plan)
            reduced[(ii, tuple(range(x.dim() - 2)))] = x
            for kept, mean in zip(kepts, means):
                reduced[(ii, kept)] = mean.view(*x.shape[:2], *[x.shape[2 + k] for k in kept])
        for (ii, key), (einsum, scale) in self._diagonals.items():
            reduced[(ii, key)] = torch.einsum(einsum, xs[ii]) * scale
        shapes = [
            (b, self.out_channels * w, *p.index_sizes) for p, w in zip(self.pieces, self.widths)
        ]
        terms: list[list[Tensor]] = [[] for _ in self.pieces]
        for m, weight in zip(self._maps, self.weights):
            parts = [term.read(reduced[term.source(ii)]) for ii, term in m.reads]
            x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
            y = _channel_map(x, weight, None)
            for g, (lo, hi) in zip(m.groups, m.rows):
                block = y if len(m.groups) == 1 else y.narrow(1, lo, hi - lo)
                terms[g.out].append(g.pattern.place(block, shapes[g.out]))
        if self._inv_out:
            v = torch.cat([reduced[t.source(ii)].reshape(b, -1) for ii, t in self._inv_in], 1)
            inv = self.weights[len(self._maps)]
            if self.invariant_in is not None:
                v = v @ self.invariant_in.t()
            y = v @ inv.t()
            if self.bias is not None:
                y = torch.cat([y[:, : self.bias.numel()] + self.bias, y[:, self.bias.numel() :]], 1)
            for oi, t, lo, hi in self._inv_out:
                terms[oi].append(t.place(y[:, lo:hi], shapes[oi]))
        # full-size: every piece has the identity term (each output index paired with
        # the same input index), except pieces without indices
        ys = [_broadcast_sum(ts).expand(shape) for ts, shape in zip(terms, shapes)]
        for i, a in zip(self._projected, self.weights[len(self._maps) + 1 :]):
            p = self.pieces[i]
            local = _channel_map(full[i].reshape(b, self.in_channels, -1), a, None)
            ys[i] = self.cosines.decode(i, ys[i]) + local.reshape(
                b, self.out_channels * p.fold, *p.index_sizes
            )
        out = _assemble(self.space, self.pieces, ys, b, self.out_channels)
        return out | {n: features[n] for n in self._bookkeeping if n in features}

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, pieces={len(self.pieces)}, "
            f"terms={self.num_terms}, basis={self.basis!r}"
        )


class UNFPool(nn.Module):
    """Invariant pooling: the mean of every piece over its permuted indices, concatenated;
    a piece with more than ``max_fold`` fixed values is encoded by that many cosines (as in
    :class:`UNFLinear`).

    Output ``(B, channels * sum of min(fold, max_fold))``; ``out_features`` gives that width.
    """

    def __init__(self, space: WeightSpace, channels: int, max_fold: int = 64):
        super().__init__()
        self.space, self.channels, self.max_fold = space, channels, max_fold
        self.pieces = pieces_of(space)
        self.cosines = _Cosines(self.pieces, max_fold)
        self.out_features = channels * sum(
            self.cosines.width(i, p) for i, p in enumerate(self.pieces)
        )

    def forward(self, features: Mapping[str, Tensor]) -> Tensor:
        outs = []
        for i, p in enumerate(self.pieces):
            x = _split_piece(features[p.tensor], p)
            x = x.mean(dim=tuple(range(2, x.dim()))) if x.dim() > 2 else x
            if p.fold > self.max_fold:
                x = self.cosines.encode(i, x)
            outs.append(x)
        return torch.cat(outs, dim=1)


class UNFPointwise(nn.Module):
    """A nonlinearity applied elementwise to every feature (equivariant)."""

    def __init__(self, fn: nn.Module | None = None):
        super().__init__()
        self.fn = fn if fn is not None else nn.ReLU()

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {k: self.fn(v) for k, v in features.items()}
