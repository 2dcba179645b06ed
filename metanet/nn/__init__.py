"""Metanetworks that read and write weights: UNF layers, graph metanetworks, baselines."""

from metanet.nn.baselines import FlatMLP, StatNN
from metanet.nn.gmn import GMN, FourierEncoding, GMNLayer, GraphInputs
from metanet.nn.scalegmn import ScaleEquivariant, ScaleGMN, ScaleGMNLayer
from metanet.nn.transformer import GraphTransformer, GraphTransformerLayer
from metanet.nn.unf import UNFLinear, UNFPointwise, UNFPool, basis_terms, pieces_of

__all__ = [
    "GMN",
    "FlatMLP",
    "FourierEncoding",
    "GMNLayer",
    "GraphInputs",
    "GraphTransformer",
    "GraphTransformerLayer",
    "ScaleEquivariant",
    "ScaleGMN",
    "ScaleGMNLayer",
    "StatNN",
    "UNFLinear",
    "UNFPointwise",
    "UNFPool",
    "basis_terms",
    "pieces_of",
]
