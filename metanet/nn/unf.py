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

Inputs and outputs are weight-feature dicts ``{name: Tensor(batch, channels, *shape)}``.
"""

from __future__ import annotations

import math
import string
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

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
    """Every tensor cut into pieces (see :class:`Piece`), in space order."""
    out: list[Piece] = []
    for t in space.tensors.values():
        per_axis = []
        for axis in t.axes:
            opts, start = [], 0
            for seg in axis.segments:
                n = math.prod(f.size for f in seg)
                opts.append(((start, start + n), tuple((f.group, f.size) for f in seg)))
                start += n
            per_axis.append(opts)
        for combo in _product(per_axis):
            factors = tuple(c[1] for c in combo)
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
                    tuple(c[0] for c in combo),
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
    """``(B, C, *tensor shape)`` -> ``(B, C * fold, *index sizes)``."""
    b, c = x.shape[:2]
    for ax, (lo, hi) in enumerate(piece.slices):
        x = x.narrow(2 + ax, lo, hi - lo)
    flat = [f for fs in piece.factors for f in fs]
    x = x.reshape(b, c, *[n for _, n in flat])
    fixed = [2 + k for k, (g, _) in enumerate(flat) if g is None]
    perm = [2 + k for k, (g, _) in enumerate(flat) if g is not None]
    x = x.permute(0, 1, *fixed, *perm)
    return x.reshape(b, c * piece.fold, *piece.index_sizes)


def _unsplit(y: Tensor, piece: Piece, b: int, c: int) -> Tensor:
    """Inverse of :func:`_split_piece`: ``(B, C * fold, *idx)`` -> ``(B, C, *piece shape)``."""
    flat = [f for fs in piece.factors for f in fs]
    order = [k for k, (g, _) in enumerate(flat) if g is None] + [
        k for k, (g, _) in enumerate(flat) if g is not None
    ]
    y = y.reshape(b, c, *[flat[k][1] for k in order])
    inv = sorted(range(len(order)), key=lambda pos: order[pos])
    y = y.permute(0, 1, *[2 + pos for pos in inv])
    return y.reshape(b, c, *[hi - lo for lo, hi in piece.slices])


def _assemble(
    space: WeightSpace, pieces: list[Piece], ys: list[Tensor], b: int, c: int
) -> dict[str, Tensor]:
    """Put every tensor back together from its pieces."""
    by_tensor: dict[str, list[tuple[Piece, Tensor]]] = {}
    for p, y in zip(pieces, ys):
        by_tensor.setdefault(p.tensor, []).append((p, _unsplit(y, p, b, c)))
    out = {}
    for name, parts in by_tensor.items():
        if len(parts) == 1:
            out[name] = parts[0][1]
            continue
        full = parts[0][1].new_zeros(b, c, *space.tensors[name].shape)
        for piece, y in parts:
            view = full
            for ax, (lo, hi) in enumerate(piece.slices):
                view = view.narrow(2 + ax, lo, hi - lo)
            view.copy_(y)
        out[name] = full
    return out


def _canonical(sub: str) -> str:
    """Letters renamed by first appearance: the same diagonal pattern, the same key."""
    names: dict[str, str] = {}
    return "".join(
        ch if not ch.isalpha() else names.setdefault(ch, string.ascii_letters[len(names)])
        for ch in sub
    )


class _Term:
    """One basis term: an einsum that reduces the input and a strided write-out."""

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
        self.summed_sizes = [inp.index_sizes[b[0] - m] for b in partition if all(k >= m for k in b)]
        out_blocks = kept + [bi for bi, b in enumerate(partition) if all(k < m for k in b)]
        self.out_blocks = [[k for k in partition[bi] if k < m] for bi in out_blocks]
        self.block_sizes = [out.index_sizes[b[0]] for b in self.out_blocks]
        self.n_kept = len(kept)
        self.scale = 1.0 / math.prod(self.summed_sizes) if self.summed_sizes else 1.0
        self.reduction_key = _canonical(f"{self.in_sub}>{self.kept_sub}")

    def reduce(self, x: Tensor) -> Tensor:
        """The input side: ``(B, Cin, *shared blocks)``, the mean over input-only blocks
        of the input's block diagonals."""
        if self.in_sub == self.kept_sub:
            return x
        y = torch.einsum(f"zc{self.in_sub}->zc{self.kept_sub}", x)
        return y * self.scale if self.scale != 1.0 else y

    def expand(self, y: Tensor, out_shape: tuple[int, ...]) -> Tensor:
        """``y`` (B, Cout, *shared blocks) placed into the output's shape: broadcast over
        output-only blocks, and onto the diagonal of blocks holding several output
        indices."""
        y = y.reshape(*y.shape, *[1] * (len(self.out_blocks) - self.n_kept))
        size = [out_shape[0], out_shape[1], *self.block_sizes]
        if all(len(b) == 1 for b in self.out_blocks):
            order = [b[0] for b in self.out_blocks]
            perm = [0, 1] + [2 + order.index(k) for k in range(len(order))]
            return y.expand(size).permute(perm)
        out = y.new_zeros(out_shape)
        strides = out.stride()
        stride = [strides[0], strides[1]] + [
            sum(strides[2 + k] for k in b) for b in self.out_blocks
        ]
        out.as_strided(size, stride).copy_(y.expand(size))
        return out


class UNFLinear(nn.Module):
    """Equivariant linear map between weight-feature dicts of one WeightSpace.

    Args:
        space: the weight space (inputs and outputs share it).
        in_channels: channels of the input features.
        out_channels: channels of the output features.
        basis: ``"full"`` (every valid partition) or ``"nfn"`` (the NFN subset).
        bias: add a learned per-channel constant to every output piece.

    Shapes:
        input ``{name: (B, in_channels, *shape)}`` -> output
        ``{name: (B, out_channels, *shape)}``.
    """

    def __init__(
        self,
        space: WeightSpace,
        in_channels: int,
        out_channels: int,
        basis: str = "full",
        bias: bool = True,
    ):
        super().__init__()
        if basis not in ("full", "nfn"):
            raise ValueError(f"basis must be 'full' or 'nfn', got {basis!r}")
        self.space, self.in_channels, self.out_channels, self.basis = (
            space,
            in_channels,
            out_channels,
            basis,
        )
        self.pieces = pieces_of(space)
        # Terms that write the same pattern into the same output piece (same output
        # blocks, same blocks shared with the input) differ only in what they read: each
        # reads a reduction of some input piece (means over its input-only blocks, its
        # diagonals) shaped like the shared blocks. So they run as one matmul over the
        # concatenated reductions, and each reduction is computed once per forward.
        groups: dict[tuple, list[tuple[int, _Term]]] = {}
        n_terms = 0
        for oi, po in enumerate(self.pieces):
            for ii, pi in enumerate(self.pieces):
                for part in basis_terms(po, pi, basis):
                    term = _Term(part, po, pi)
                    n_terms += 1
                    key = (oi, tuple(map(tuple, term.out_blocks)), term.n_kept)
                    groups.setdefault(key, []).append((ii, term))
        self._num_terms = n_terms
        self._groups = [(key[0], contribs) for key, contribs in groups.items()]
        shapes = []
        for oi, contribs in self._groups:
            width = sum(in_channels * self.pieces[ii].fold for ii, _ in contribs)
            shapes.append((out_channels * self.pieces[oi].fold, width))
        # one flat parameter; each group's (out, in) block is read as a view
        self._shapes = shapes
        self._offsets = [0]
        for a, c in shapes:
            self._offsets.append(self._offsets[-1] + a * c)
        self.weight = nn.Parameter(torch.empty(self._offsets[-1]))
        bias_sizes = [out_channels * p.fold for p in self.pieces]
        self._bias_offsets = [0]
        for n in bias_sizes:
            self._bias_offsets.append(self._bias_offsets[-1] + n)
        self.bias = nn.Parameter(torch.zeros(self._bias_offsets[-1])) if bias else None
        self.reset_parameters()

    def _block(self, k: int) -> Tensor:
        return self.weight[self._offsets[k] : self._offsets[k + 1]].view(self._shapes[k])

    @property
    def num_terms(self) -> int:
        """Basis terms (valid partitions) over all piece pairs."""
        return self._num_terms

    def reset_parameters(self) -> None:
        fan_in = [0] * len(self.pieces)
        for (oi, _), (_, width) in zip(self._groups, self._shapes):
            fan_in[oi] += width
        with torch.no_grad():
            for k, (oi, _) in enumerate(self._groups):
                bound = 1 / math.sqrt(fan_in[oi])
                self._block(k).uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        xs = [_split_piece(features[p.tensor], p) for p in self.pieces]
        ref = xs[0] if xs else next(iter(features.values()))
        b = ref.shape[0]
        shapes = [(b, self.out_channels * p.fold, *p.index_sizes) for p in self.pieces]
        ys: list[Tensor | None] = [None] * len(self.pieces)
        cache: dict[tuple[int, str], Tensor] = {}
        for k, (oi, contribs) in enumerate(self._groups):
            parts = []
            for ii, term in contribs:
                key = (ii, term.reduction_key)
                if key not in cache:
                    cache[key] = term.reduce(xs[ii])
                parts.append(cache[key])
            reduced = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
            y = torch.einsum("oc,zc...->zo...", self._block(k), reduced)
            y = contribs[0][1].expand(y, shapes[oi])
            ys[oi] = y if ys[oi] is None else ys[oi] + y
        ys = [y if y is not None else ref.new_zeros(shape) for y, shape in zip(ys, shapes)]
        if self.bias is not None:
            for i, y in enumerate(ys):
                bias = self.bias[self._bias_offsets[i] : self._bias_offsets[i + 1]]
                ys[i] = y + bias.view(1, -1, *[1] * (y.dim() - 2))
        return _assemble(self.space, self.pieces, ys, b, self.out_channels)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, pieces={len(self.pieces)}, "
            f"terms={self.num_terms}, basis={self.basis!r}"
        )


class UNFPool(nn.Module):
    """Invariant pooling: the mean of every piece over its permuted indices, concatenated.

    Output ``(B, channels * sum of folds)``; ``out_features`` gives that width.
    """

    def __init__(self, space: WeightSpace, channels: int):
        super().__init__()
        self.space, self.channels = space, channels
        self.pieces = pieces_of(space)
        self.out_features = channels * sum(p.fold for p in self.pieces)

    def forward(self, features: Mapping[str, Tensor]) -> Tensor:
        outs = []
        for p in self.pieces:
            x = _split_piece(features[p.tensor], p)
            outs.append(x.mean(dim=tuple(range(2, x.dim()))) if x.dim() > 2 else x)
        return torch.cat(outs, dim=1)


class UNFPointwise(nn.Module):
    """A nonlinearity applied elementwise to every feature (equivariant)."""

    def __init__(self, fn: nn.Module | None = None):
        super().__init__()
        self.fn = fn if fn is not None else nn.ReLU()

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {k: self.fn(v) for k, v in features.items()}
