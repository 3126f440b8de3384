"""Forward FLOPs (2 × multiply-adds) of our transformers, counted from their shapes: the compute axis
of NDP's quality-vs-compute curve. Matrix products only (norms, activations and softmax are < 1 %)."""

from __future__ import annotations


def transformer_flops(depth: int, C: int, mlp_hidden: int, n_query: int, n_key: int) -> float:
    """`depth` AdaLN blocks over n_query new tokens attending to n_key keys (n_key ≥ n_query with a KV
    cache): q/k/v and output projections, scores and their weighted sum, the MLP, the AdaLN modulation."""
    per_block = (2 * n_query * C * 4 * C  # mat_qkv (3C) + proj (C)
                 + 2 * 2 * n_query * n_key * C  # q·kᵀ and attn·v
                 + 2 * 2 * n_query * C * mlp_hidden  # fc1, fc2
                 + 2 * C * 6 * C)  # ada_lin, once per image
    return float(depth * per_block + 2 * C * 2 * C)  # + the head's AdaLN


def cart_sample_flops(cfg: object, detail_fraction: float = 1.0) -> float:
    """One image sampled by the block-causal transformer (`transformer.TransformerConfig`): map by map
    with a KV cache, every map's tokens attending to all earlier ones; no CFG (×2 with it). The detail
    dial runs only `detail_fraction` of each detail map's positions."""
    total, prefix = 0.0, 0
    C, hidden = cfg.C, round(cfg.C * cfg.mlp_ratio)
    n_base = cfg.n_base if getattr(cfg, "n_base", None) else len(cfg.sides)
    for k, side in enumerate(cfg.sides):
        n = side * side if k < n_base else round(side * side * detail_fraction)
        prefix += n
        total += transformer_flops(cfg.depth, C, hidden, n, prefix) + 2 * n * C * cfg.vocab_size
        if k:
            total += 2 * n * cfg.cvae * C  # word_embed of f̂
    return total
