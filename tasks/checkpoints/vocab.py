"""Vocabularies of a merge: ``tokenizer_source`` and the ``tokenizer:`` block, as mergekit.

When the models' tokenizers differ, their embedding rows (input embeddings and the LM
head) do not mean the same tokens, so they are reindexed into the output vocabulary
before they are merged:

* the output tokenizer is the base model's (``base``; the first model without a base),
  a named model's, or the **union**: the base's vocabulary, then every other model's
  tokens it lacks, then the added (special) tokens of all of them;
* each model's embedding becomes one row per output token: its own row where it has the
  token; else a default: the one model that has it, the base's row where the base has
  it, or the mean over the models that have it (zero where none does);
* ``tokenizer: {tokens: {tok: {source: ..., force: ...}}}`` sets a token's default: a
  model's row for that token, a model's row for another token (``kind: model_token``)
  or zeros (``kind: zero``); ``force`` uses it in every model, own rows included;
* ``pad_to_multiple_of`` rounds the row count up, new rows set to the mean embedding.

Tensors are recognized as embeddings by name (``embed_tokens``, ``wte``, ``lm_head``...)
and by having one row per token of their model's ``vocab_size``. Models whose
tokenizers agree token for token are left alone (the tokenizer files are copied).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field

import torch
from torch import Tensor

from metanet.io import CheckpointError
from tasks.checkpoints.checkpoint import Checkpoint

__all__ = ["TokenSource", "TokenizerSpec", "Vocab", "build_vocab", "is_embedding"]

# the last parts of the names of embedding and LM-head weights across architectures
_EMBED_NAMES = (
    "embed_tokens.weight",
    "wte.weight",
    "word_embeddings.weight",
    "embed_in.weight",
    "embed_out.weight",
    "lm_head.weight",
    "shared.weight",
    "tok_embeddings.weight",
    "output.weight",
)


@dataclass(frozen=True)
class TokenSource:
    """Where one token's default embedding comes from (``tokenizer.tokens`` entry)."""

    kind: str  # "model" (its row for this token), "model_token" (a given token's), "zero"
    model: str | None = None
    token: str | None = None
    token_id: int | None = None
    force: bool = False


@dataclass(frozen=True)
class TokenizerSpec:
    """``tokenizer_source`` / the ``tokenizer:`` block: ``source`` is ``union``, ``base``
    or a model reference."""

    source: str
    tokens: dict[str, TokenSource] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None


def _vocab_size(ck: Checkpoint) -> int | None:
    cfg = ck.config or {}
    for key in ("vocab_size", "n_vocab", "padded_vocab_size"):
        if isinstance(cfg.get(key), int):
            return cfg[key]
    sub = cfg.get("text_config")
    if isinstance(sub, dict) and isinstance(sub.get("vocab_size"), int):
        return sub["vocab_size"]
    return None


def is_embedding(name: str, ck: Checkpoint) -> bool:
    """Whether tensor ``name`` of ``ck`` has one row per token of its vocabulary."""
    size = _vocab_size(ck)
    shape = ck.shape(name)
    return (
        size is not None
        and len(shape) == 2
        and shape[0] == size
        and (name in _EMBED_NAMES or name.endswith(tuple("." + n for n in _EMBED_NAMES)))
    )


def _tokenizer(ck: Checkpoint):
    from transformers import AutoTokenizer

    if not ck.hf:
        raise CheckpointError(f"{ck.ref}: tokenizer_source needs Hugging Face folders")
    try:
        return AutoTokenizer.from_pretrained(str(ck.path), use_fast=True)
    except Exception as e:  # noqa: BLE001 - transformers' loaders raise many kinds
        raise CheckpointError(f"{ck.ref}: its tokenizer does not load ({e})") from None


def _union(base_tok, toks: dict, sizes: dict):
    """The base tokenizer plus every other model's tokens it lacks, then the added ones."""
    from transformers import AutoTokenizer

    vocab: dict[str, int] = {}
    added: dict[str, object] = {}
    for ref, tok in toks.items():
        size = sizes[ref]
        decoder = tok.added_tokens_decoder
        specials = {info.content for info in decoder.values()}
        # in the model's own order (a tokenizer's dict order is its hash map's)
        for token, idx in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if idx < size and token not in specials and token not in vocab:
                vocab[token] = len(vocab)
        for idx, info in sorted(decoder.items()):
            if idx < size and info.content not in added:
                added[info.content] = info
    with tempfile.TemporaryDirectory() as tmp:  # a copy: the base's tokenizer stays as it is
        base_tok.save_pretrained(tmp)
        out = AutoTokenizer.from_pretrained(tmp, use_fast=True)
    have = base_tok.get_vocab()
    for token in vocab:
        if token not in added and token not in have:
            out.add_tokens(token)
    for info in added.values():
        out.add_tokens(info)
    return out


@dataclass
class Vocab:
    """The output vocabulary and, per model, each output token's row in its embedding."""

    tokenizer: object
    size: int  # rows written (padded)
    tokens: int  # rows with a token
    rows: dict[str, Tensor]  # model ref -> (tokens,) long: its row, -1 where it lacks it
    base: str | None
    spec: TokenizerSpec
    original: dict[str, dict[str, int]]  # model ref -> its tokenizer's vocabulary

    @property
    def identity(self) -> bool:
        """Every model has every output token at the same row, and nothing is padded or
        forced: the embeddings need no reindexing."""
        ident = torch.arange(self.tokens)
        return (
            self.size == self.tokens
            and not self.spec.tokens
            and all(torch.equal(r, ident) for r in self.rows.values())
        )

    def reindex(self, name: str, refs: list[str], values: list[Tensor]) -> list[Tensor]:
        """Each model's embedding ``values[i]`` (model ``refs[i]``) with one row per output
        token (mergekit's rules, see the module docstring)."""
        hidden = {v.shape[1] for v in values}
        if len(hidden) != 1:
            raise CheckpointError(f"tensor {name!r}: embedding widths differ ({sorted(hidden)})")
        width = hidden.pop()
        dtype, device = values[0].dtype, values[0].device
        present, own = {}, {}
        for ref, v in zip(refs, values):
            r = self.rows[ref].to(device)
            has = (r >= 0) & (r < v.shape[0])
            rows = torch.zeros(self.tokens, width, dtype=dtype, device=device)
            rows[has] = v[r[has]]
            present[ref], own[ref] = has, rows
        # the default row of each token, by mergekit's precedence
        count = torch.stack([present[r] for r in refs]).sum(0)
        default = torch.stack([own[r] for r in refs]).sum(0) / count.clamp_min(1).unsqueeze(1)
        default[count == 0] = 0
        single = count == 1
        for ref in refs:  # a token only one model has: that model's row
            take = single & present[ref]
            default[take] = own[ref][take]
        if self.base is not None and self.base in present:
            take = (count > 1) & present[self.base]
            default[take] = own[self.base][take]
        forced = torch.zeros(self.tokens, dtype=torch.bool, device=device)
        vocab = self.tokenizer.get_vocab()
        for token, src in self.spec.tokens.items():
            if token not in vocab:
                raise CheckpointError(
                    f"tokenizer.tokens: {token!r} is not in the output vocabulary"
                )
            i = vocab[token]
            if src.kind == "zero":
                default[i] = 0
            elif src.kind == "model":
                if src.model not in own or not present[src.model][i]:
                    raise CheckpointError(
                        f"tokenizer.tokens: {token!r}: {src.model} is not merged or lacks it"
                    )
                default[i] = own[src.model][i]
            else:  # model_token: a row of that model's own vocabulary
                if src.model not in own:
                    raise CheckpointError(f"tokenizer.tokens: {token!r}: {src.model} is not merged")
                j = src.token_id
                if j is None:
                    j = self.original[src.model].get(src.token)
                    if j is None:
                        raise CheckpointError(
                            f"tokenizer.tokens: {token!r}: {src.model} has no token {src.token!r}"
                        )
                v = values[refs.index(src.model)]
                if not 0 <= j < v.shape[0]:
                    raise CheckpointError(
                        f"tokenizer.tokens: {token!r}: token id {j} is outside {src.model}'s "
                        f"{v.shape[0]} rows"
                    )
                default[i] = v[j]
            forced[i] = src.force
        out = []
        for ref in refs:
            mine = present[ref] & ~forced
            rows = torch.where(mine.unsqueeze(1), own[ref], default)
            if self.size > self.tokens:  # padding rows: the mean embedding
                pad = rows.mean(0, keepdim=True).expand(self.size - self.tokens, width)
                rows = torch.cat([rows, pad])
            out.append(rows)
        return out


def build_vocab(
    spec: TokenizerSpec, sources: dict[str, Checkpoint], base: str | None
) -> Vocab | None:
    """The output tokenizer of ``spec`` over the merge's models (``sources``: reference
    -> checkpoint; ``base`` the base model or None), and each model's rows. None when
    ``spec`` keeps one model's tokenizer and the models' tokenizers do not load."""
    refs = list(sources)
    base_ref = base if base is not None else refs[0]
    try:
        toks = {ref: _tokenizer(sources[ref]) for ref in refs}
    except CheckpointError:
        if spec.source == "union" or spec.tokens:
            raise
        return None  # no vocabularies to compare: the chosen model's tokenizer files are copied
    sizes = {}
    for ref in refs:
        size = _vocab_size(sources[ref])
        sizes[ref] = size if size is not None else len(toks[ref])
    if spec.source == "base":
        out = toks[base_ref]
    elif spec.source == "union":
        ordered = {base_ref: toks[base_ref], **{r: t for r, t in toks.items() if r != base_ref}}
        out = _union(toks[base_ref], ordered, sizes)
    else:
        from tasks.checkpoints.checkpoint import open_checkpoint

        out = toks.get(spec.source) or _tokenizer(open_checkpoint(spec.source))
    vocab = out.get_vocab()
    tokens = len(vocab)
    if sorted(vocab.values()) != list(range(tokens)):
        raise CheckpointError(
            f"tokenizer_source: {spec.source}: the tokenizer's ids are not 0..{tokens - 1}"
        )
    size = tokens
    pad = spec.pad_to_multiple_of
    if pad and size % pad:
        size = (size // pad + 1) * pad
    rows = {}
    for ref in refs:
        theirs = toks[ref].get_vocab()
        r = torch.full((tokens,), -1, dtype=torch.long)
        for token, i in vocab.items():
            j = theirs.get(token)
            if j is not None and j < sizes[ref]:
                r[i] = j
        rows[ref] = r
    for token, src in spec.tokens.items():
        if src.model is not None and src.model not in sources:
            raise CheckpointError(f"tokenizer.tokens: {token!r}: {src.model} is not merged")
    return Vocab(out, size, tokens, rows, base, spec, {r: t.get_vocab() for r, t in toks.items()})
