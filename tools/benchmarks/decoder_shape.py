"""The decoder-shape flags the decoder benchmarks share, and the DecoderConfig they describe."""

from __future__ import annotations

import argparse

SHAPE_FLAGS = ("layers", "hidden", "ffn", "heads", "kv_heads", "vocab")


def add_decoder_shape_arguments(
    parser: argparse.ArgumentParser, *, layers: int, hidden: int, ffn: int, heads: int, kv_heads: int, vocab: int
) -> None:
    """--layers --hidden --ffn --heads --kv-heads --vocab, with each benchmark's own defaults."""
    defaults = dict(layers=layers, hidden=hidden, ffn=ffn, heads=heads, kv_heads=kv_heads, vocab=vocab)
    for name in SHAPE_FLAGS:
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=defaults[name])


def decoder_config(args: argparse.Namespace):
    """The DecoderConfig of those flags, positions up to ``args.seq_length``."""
    from megatron_longvita.models.decoder import DecoderConfig

    return DecoderConfig(
        num_layers=args.layers,
        hidden_size=args.hidden,
        ffn_hidden_size=args.ffn,
        num_attention_heads=args.heads,
        num_query_groups=args.kv_heads,
        vocab_size=args.vocab,
        max_position_embeddings=args.seq_length,
    )
