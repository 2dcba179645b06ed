"""Channel-space algebra for the tracer: axis variables, unification, structure.

Every axis of every traced tensor carries a :class:`Var` (or ``None``: a wildcard, for
size-1 axes and tensors whose values are constant along the axis, such as ``zeros`` or an
``expand``ed axis; a wildcard imposes nothing). Variables are merged with union-find:

* a *leaf* is one potential permutation group (``fixed`` once anything pins its order);
* a *product* ``a × b`` is a row-major axis split (heads × head_dim, channels × taps);
* a *concat* ``a ⊕ b`` is a concatenation (fused qkv, LSTM gates, ``torch.cat``).

When two structured variables meet with incompatible structure, every leaf under both is
fixed and the conflict is recorded as a :class:`Conflict` (op, module, what was fixed, how
many free permutation dims were lost): never a silent wrong symmetry, nor a silent loss.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

__all__ = ["Var", "Algebra", "Conflict", "StructureConflict"]


class StructureConflict(Exception):
    """Two variables that must be equal have incompatible structure."""


@dataclass(frozen=True)
class Conflict:
    """Axes fixed because two structures met that no symmetry can satisfy both of.

    ``lost``: the free permutation points (sizes of the free leaves) fixed at that moment.
    """

    op: str
    module: str
    what: str
    lost: int

    def __str__(self) -> str:
        return (
            f"axes fixed at op {self.op!r} in module {self.module}: {self.what}; "
            f"{self.lost} free permutation dims lost"
        )


class Var:
    __slots__ = (
        "id",
        "size",
        "parent",
        "fixed",
        "kind",
        "children",
        "retired",
        "select_copies",
        "owner",
        "touched",
    )
    _ids = itertools.count()

    def __init__(
        self, size: int, kind: str = "leaf", children: tuple[Var, ...] = (), fixed: bool = False
    ):
        self.id = next(Var._ids)
        self.size = int(size)
        self.parent: Var | None = None
        self.fixed = fixed
        self.kind = kind
        self.children = tuple(children)
        # set on a product whose leading factor was selected from: it became a concat of
        # per-index copies; the old factors are retired
        self.retired = False
        self.select_copies: dict[int, dict[int, Var]] | None = None
        self.owner: Var | None = None  # for a retired factor: the product it left
        self.touched = False  # unified with anything since it was created

    def __repr__(self) -> str:
        if self.kind == "leaf":
            return f"v{self.id}:{self.size}{'!' if self.fixed else ''}"
        sep = "×" if self.kind == "prod" else "⊕"
        return "(" + sep.join(map(repr, self.children)) + ")"


def find(v: Var) -> Var:
    root = v
    while root.parent is not None:
        root = root.parent
    while v.parent is not None:
        v.parent, v = root, v.parent
    return root


class Algebra:
    """Creates and merges variables; collects conflicts as human-readable notes."""

    def __init__(self) -> None:
        self.conflicts: list[Conflict] = []
        # (op, module) of the rule running now, for the conflicts it records
        self.site: tuple[str, str] = ("?", "<top>")
        # leading factor id -> the product it leads (for the select rule)
        self.lead_of: dict[int, Var] = {}

    # ---------------------------------------------------------------- construction
    def leaf(self, size: int, fixed: bool = False) -> Var | None:
        return None if size == 1 else Var(size, fixed=fixed)

    def fixed(self, size: int) -> Var | None:
        return self.leaf(size, fixed=True)

    def prod(self, factors: list[Var | None]) -> Var | None:
        parts = [f for f in factors if f is not None]
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]
        return Var(math.prod(p.size for p in parts), "prod", tuple(parts))

    def concat(self, parts: list[Var | None], sizes: list[int]) -> Var | None:
        filled = [p if p is not None else self.leaf(n) for p, n in zip(parts, sizes)]
        filled = [p if p is not None else Var(1) for p in filled]  # size-1 segments keep position
        if len(filled) == 1:
            return filled[0]
        return Var(sum(sizes), "cat", tuple(filled))

    # ---------------------------------------------------------------- queries
    def root(self, v: Var | None) -> Var | None:
        return None if v is None else find(v)

    def leaves(self, v: Var | None) -> list[Var]:
        if v is None:
            return []
        r = find(v)
        if r.kind == "leaf":
            return [r]
        return [leaf for c in r.children for leaf in self.leaves(c)]

    def is_free(self, v: Var | None) -> bool:
        return any(not leaf.fixed and leaf.size > 1 for leaf in self.leaves(v))

    # ---------------------------------------------------------------- mutation
    def fix(self, v: Var | None) -> None:
        for leaf in self.leaves(v):
            leaf.fixed = True
            if leaf.retired and leaf.owner is not None:
                # a stale view of a split fused axis is pinned: pin what replaced it too
                owner, leaf.owner = leaf.owner, None
                self.fix(owner)

    def unify(self, a: Var | None, b: Var | None, where: str = "") -> Var | None:
        """Make ``a`` and ``b`` the same variable; returns the merged root."""
        if a is None:
            return self.root(b)
        if b is None:
            return self.root(a)
        ra, rb = find(a), find(b)
        if ra is rb:
            return ra
        ra.touched = rb.touched = True
        if ra.size != rb.size:
            self._conflict(ra, rb, f"sizes {ra.size} and {rb.size} {where}")
            return ra
        if ra.retired or rb.retired:
            self._conflict(ra, rb, f"a fused axis used again after it was split {where}")
            return ra
        if ra.kind == "leaf" and rb.kind == "leaf":
            rb.parent = ra
            ra.fixed = ra.fixed or rb.fixed
            return ra
        if ra.kind == "leaf" or rb.kind == "leaf":
            leaf, st = (ra, rb) if ra.kind == "leaf" else (rb, ra)
            leaf.parent = st
            if leaf.fixed:
                self.fix(st)
            return st
        if ra.kind == rb.kind and [find(c).size for c in ra.children] == [
            find(c).size for c in rb.children
        ]:
            rb.parent = ra
            for x, y in zip(ra.children, rb.children):
                self.unify(x, y, where)
            return ra
        if ra.kind == rb.kind == "prod":
            fa, fb = self._flat_prod(ra), self._flat_prod(rb)
            if [f.size for f in fa] == [f.size for f in fb]:
                rb.parent = ra
                for x, y in zip(fa, fb):
                    self.unify(x, y, where)
                return ra
            try:
                pieces_a = self.factorize(ra, [f.size for f in self._common(fa, fb)])
                pieces_b = self.factorize(rb, [p.size for p in pieces_a])
            except StructureConflict:
                pass
            else:
                rb.parent = ra
                for x, y in zip(pieces_a, pieces_b):
                    self.unify(x, y, where)
                return ra
        self._conflict(ra, rb, f"structures {ra!r} and {rb!r} {where}")
        return ra

    def _conflict(self, ra: Var, rb: Var, what: str) -> None:
        self.conflict(f"incompatible {what}".strip(), ra, rb)

    def conflict(self, what: str, *vs: Var | None) -> None:
        """Fix every leaf under ``vs`` and record the conflict with the dims it lost."""
        free = {leaf.id: leaf.size for v in vs for leaf in self.leaves(v) if not leaf.fixed}
        for v in vs:
            self.fix(v)
        lost = sum(n for n in free.values() if n > 1)
        self.conflicts.append(Conflict(*self.site, what, lost))

    def _flat_prod(self, v: Var) -> list[Var]:
        r = find(v)
        if r.kind != "prod":
            return [r]
        return [f for c in r.children for f in self._flat_prod(c)]

    @staticmethod
    def _common(fa: list[Var], fb: list[Var]) -> list[Var]:
        """Common refinement of two factor lists by size (boundaries of both)."""
        bounds = set()
        for fs in (fa, fb):
            acc = 1
            for f in fs:
                acc *= f.size
                bounds.add(acc)
        out, prev = [], 1
        for b in sorted(bounds):
            if b % prev:
                raise StructureConflict
            out.append(Var(b // prev))
            prev = b
        return out

    def factorize(self, v: Var | None, sizes: list[int]) -> list[Var | None]:
        """Split ``v`` into row-major factors of the given sizes (size-1 gives None)."""
        if v is None:
            return [self.leaf(n) for n in sizes]
        r = find(v)
        real = [n for n in sizes if n != 1]
        if len(real) <= 1:
            return [r if n != 1 else None for n in sizes]
        if r.kind == "cat" and self._cat_as_blocks(r, real[0]):
            return self.factorize(r, sizes)
        factors = self._flat_prod(r)
        out: list[Var] = []
        queue = list(factors)
        for n in real:
            group: list[Var] = []
            acc = 1
            while acc < n:
                if not queue:
                    raise StructureConflict
                f = queue.pop(0)
                if acc * f.size <= n:
                    group.append(f)
                    acc *= f.size
                    continue
                # a boundary falls inside f: split it (leaves only)
                need = n // acc
                if n % acc or f.size % need or f.kind != "leaf":
                    raise StructureConflict
                a, b = Var(need, fixed=f.fixed), Var(f.size // need, fixed=f.fixed)
                self.unify(f, Var(f.size, "prod", (a, b)))
                group.append(a)
                queue.insert(0, b)
                acc *= need
            if acc != n:
                raise StructureConflict
            out.append(group[0] if len(group) == 1 else Var(n, "prod", tuple(group)))
        if queue:
            raise StructureConflict
        if len(factors) == 1 and factors[0] is r and r.kind == "leaf":
            # a leaf split for the first time: it *is* the product of the new factors
            whole = Var(r.size, "prod", tuple(out))
            self.unify(r, whole)
            self.lead_of[out[0].id] = whole
        it = iter(out)
        return [next(it) if n != 1 else None for n in sizes]

    def _cat_as_blocks(self, r: Var, k: int) -> bool:
        """Read concat ``r`` of ``k`` equal segments as ``fixed(k) × X``, ``X`` the segments
        unified (one permutation for all of them): ShuffleNetV2's ``cat((x1, branch(x2)))``
        viewed as ``(2, c/2)`` by the channel shuffle. The segments' order stays fixed and
        each gets the same permutation, which is a subgroup of what the concat allowed:
        sound. Returns False (nothing changed) unless ``r`` has exactly ``k`` segments of
        equal size > 1."""
        segs = [find(c) for c in r.children]
        if k < 2 or len(segs) != k or len({c.size for c in segs}) != 1 or segs[0].size < 2:
            return False
        x = segs[0]
        for c in segs[1:]:
            x = self.unify(x, c, "(segments of a concatenation read as blocks)")
        if len({id(find(c)) for c in segs}) > 1:
            for c in segs:  # a segment that did not merge: no permutation may act on any
                self.fix(c)
        whole = Var(r.size, "prod", (Var(k, fixed=True), find(x)))
        whole.touched = True
        r.parent = whole  # cat(X, ..., X) is fixed(k) × X, index for index
        return True

    def split(self, v: Var | None, sizes: list[int]) -> list[Var | None]:
        """Split ``v`` into consecutive segments of the given sizes (concatenation)."""
        if v is None:
            return [None] * len(sizes)
        r = find(v)
        if len(sizes) == 1:
            return [r]
        if r.kind == "cat":
            segs = [find(c) for c in r.children]
            out, i = [], 0
            for n in sizes:
                acc, group = 0, []
                while acc < n and i < len(segs):
                    group.append(segs[i])
                    acc += segs[i].size
                    i += 1
                if acc != n:
                    raise StructureConflict
                out.append(group[0] if len(group) == 1 else Var(n, "cat", tuple(group)))
            return [o if o.size > 1 else None for o in out]
        if r.kind == "prod":
            lead = find(r.children[0])
            rest = r.size // lead.size
            if self.can_select_leading(r) and all(n % rest == 0 for n in sizes):
                # (n × rest) read in chunks of whole rest-blocks: per-block copies
                copies = self.select_leading(r)
                out, i = [], 0
                for n in sizes:
                    k = n // rest
                    parts = [copies[j] for j in range(i, i + k)]
                    out.append(parts[0] if k == 1 else Var(n, "cat", tuple(parts)))
                    i += k
                return out
            factors = self._flat_prod(r)
            rest = r.size // factors[0].size
            if factors[0].kind in ("leaf", "cat") and all(n % rest == 0 for n in sizes):
                # (F × R) read in chunks of whole R-blocks, F no longer fresh (a channel
                # shuffle's transposed axis, chunked by the next ShuffleNetV2 unit): refine
                # F into F_0 ⊕ F_1 ⊕ ... (each permuted within itself; sound) and let every
                # chunk be F_i × R with R shared: (F_0 ⊕ F_1) × R = F_0×R ⊕ F_1×R
                parts = self.split(factors[0], [n // rest for n in sizes])
                return [self.prod([p, *factors[1:]]) for p in parts]
            raise StructureConflict
        segs = [Var(n, fixed=r.fixed) for n in sizes]
        self.unify(r, Var(r.size, "cat", tuple(segs)))
        return [s if s.size > 1 else None for s in segs]

    def can_select_leading(self, p: Var) -> bool:
        """Whether product ``p`` may become per-index copies: its leading factor is a free
        leaf and none of its factors has been tied to anything since the reshape made
        them (a tie made before the split would not reach the copies)."""
        r = find(p)
        if r.kind != "prod":
            return False
        lead = find(r.children[0])
        if lead.kind != "leaf" or lead.fixed or lead.touched:
            return False
        return not any(
            leaf.touched or leaf.retired for c in r.children[1:] for leaf in self.leaves(c)
        )

    def select_leading(self, p: Var) -> list[Var]:
        """Turn product ``F × R`` (F a leaf of size n) into ``R_0 ⊕ ... ⊕ R_{n-1}``, fresh
        independent copies of R's structure, and return the copies (each of size |R|).

        This is the fused-projection pattern ``reshape(..., 3, heads, head_dim)`` followed
        by selecting q, k and v: each segment keeps its own symmetry.
        """
        r = find(p)
        if r.kind == "cat" and r.select_copies is not None:
            return [find(c) for c in r.children]
        if r.kind != "prod":
            raise StructureConflict
        lead, rest = find(r.children[0]), [find(c) for c in r.children[1:]]
        copies_map: dict[int, dict[int, Var]] = {}
        segs = []
        for i in range(lead.size):
            mapping: dict[int, Var] = {}
            seg_factors = [self._copy(c, mapping) for c in rest]
            seg = (
                seg_factors[0]
                if len(seg_factors) == 1
                else Var(math.prod(s.size for s in seg_factors), "prod", tuple(seg_factors))
            )
            copies_map[i] = mapping
            segs.append(seg)
        # r becomes the concat; its old factors are retired
        r.kind, r.children, r.select_copies = "cat", tuple(segs), copies_map
        lead.fixed = True
        for c in rest:
            for leaf in self.leaves(c):
                leaf.retired = True
                leaf.owner = r
        return segs

    def _copy(self, v: Var, mapping: dict[int, Var]) -> Var:
        r = find(v)
        if r.kind == "leaf":
            new = Var(r.size, fixed=r.fixed)
        else:
            new = Var(r.size, r.kind, tuple(self._copy(c, mapping) for c in r.children))
        mapping[r.id] = new
        return new
