"""The HF <-> megatron-core tensor rows and the named tensor transforms (docs/design.md, "Checkpoint names").

Each row says which HF tensors make one megatron tensor and by which transform; both
directions run from the same row. Megatron names are those of the unsharded (TP=1) local-spec
model; tensor-parallel splits are not in the table because torch_dist checkpoints are saved
whole-tensor-addressed and megatron's dist_checkpointing reshards them on load.

The rows are building blocks: each registered checkpoint format (checkpoint/formats.py) puts
them under its own prefixes as `Part`s, one list of parts per on-disk layout it reads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_longvita.models.presets import ModelConfig

Tensor = torch.Tensor


@dataclass(frozen=True)
class Transform:
    """n HF tensors <-> one megatron tensor; the two functions are exact inverses."""

    to_mcore: Callable[[Sequence[Tensor]], Tensor]
    to_hf: Callable[[Tensor], list[Tensor]]


def _copy() -> Transform:
    return Transform(lambda hf: hf[0], lambda mc: [mc])


def _qkv(heads: int, groups: int, head_dim: int) -> Transform:
    """Separate q, k, v -> per query group [q x heads/groups, k, v] x head_dim (weights and biases)."""
    q_rows = heads // groups * head_dim

    def to_mcore(hf: Sequence[Tensor]) -> Tensor:
        q, k, v = hf
        rest = q.shape[1:]
        per_group = [
            q.reshape(groups, q_rows, *rest),
            k.reshape(groups, head_dim, *rest),
            v.reshape(groups, head_dim, *rest),
        ]
        return torch.cat(per_group, dim=1).reshape(-1, *rest)

    def to_hf(mc: Tensor) -> list[Tensor]:
        rest = mc.shape[1:]
        parts = mc.reshape(groups, q_rows + 2 * head_dim, *rest).split([q_rows, head_dim, head_dim], dim=1)
        return [part.reshape(-1, *rest).contiguous() for part in parts]

    return Transform(to_mcore, to_hf)


def _fused_qkv(heads: int, head_dim: int) -> Transform:
    """InternViT's stacked [q; k; v] -> per head [q, k, v]."""
    per_head = _qkv(heads, heads, head_dim)
    return Transform(
        lambda hf: per_head.to_mcore(hf[0].chunk(3, dim=0)), lambda mc: [torch.cat(per_head.to_hf(mc), dim=0)]
    )


def _gated_mlp() -> Transform:
    """gate_proj, up_proj -> linear_fc1 = [gate; up]."""
    return Transform(lambda hf: torch.cat(list(hf), dim=0), lambda mc: [half.contiguous() for half in mc.chunk(2)])


def _vocab(vocab_size: int, padded_size: int) -> Transform:
    """Vocabulary rows padded with zeros for TP divisibility; the padding is dropped going back."""

    def to_mcore(hf: Sequence[Tensor]) -> Tensor:
        table = hf[0]
        return torch.cat([table, table.new_zeros(padded_size - table.shape[0], *table.shape[1:])])

    return Transform(to_mcore, lambda mc: [mc[:vocab_size].contiguous()])


def transforms(config: ModelConfig) -> dict[str, Transform]:
    decoder, vision = config.decoder, config.vision
    vision_head_dim = vision.hidden_size // vision.num_attention_heads
    return {
        "copy": _copy(),
        "qkv": _qkv(
            decoder.num_attention_heads, decoder.num_query_groups, decoder.hidden_size // decoder.num_attention_heads
        ),
        "vision_qkv": _qkv(vision.num_attention_heads, vision.num_attention_heads, vision_head_dim),
        "vision_fused_qkv": _fused_qkv(vision.num_attention_heads, vision_head_dim),
        "gated_mlp": _gated_mlp(),
        "vocab": _vocab(decoder.vocab_size, decoder.padded_vocab_size(1)),
    }


# (megatron name, HF names, transform). `{i}` is the layer index; `{p}` the part's HF prefix;
# `*` expands to weight and bias.
Row = tuple[str, tuple[str, ...], str]

LANGUAGE_ROWS: list[Row] = [
    ("embedding.word_embeddings.weight", ("{p}embed_tokens.weight",), "vocab"),
    ("decoder.layers.{i}.input_layernorm.weight", ("{p}layers.{i}.input_layernorm.weight",), "copy"),
    (
        "decoder.layers.{i}.self_attention.linear_qkv.*",
        ("{p}layers.{i}.self_attn.q_proj.*", "{p}layers.{i}.self_attn.k_proj.*", "{p}layers.{i}.self_attn.v_proj.*"),
        "qkv",
    ),
    ("decoder.layers.{i}.self_attention.linear_proj.weight", ("{p}layers.{i}.self_attn.o_proj.weight",), "copy"),
    ("decoder.layers.{i}.pre_mlp_layernorm.weight", ("{p}layers.{i}.post_attention_layernorm.weight",), "copy"),
    (
        "decoder.layers.{i}.mlp.linear_fc1.weight",
        ("{p}layers.{i}.mlp.gate_proj.weight", "{p}layers.{i}.mlp.up_proj.weight"),
        "gated_mlp",
    ),
    ("decoder.layers.{i}.mlp.linear_fc2.weight", ("{p}layers.{i}.mlp.down_proj.weight",), "copy"),
    ("decoder.final_layernorm.weight", ("{p}norm.weight",), "copy"),
]
HEAD_ROWS: list[Row] = [("output_layer.weight", ("{p}lm_head.weight",), "vocab")]

VISION_ROWS: dict[str, list[Row]] = {
    "internvl": [  # transformers' InternVLVisionModel
        ("class_embedding", ("{p}embeddings.cls_token",), "copy"),
        ("position_embedding", ("{p}embeddings.position_embeddings",), "copy"),
        ("patch_embedding.*", ("{p}embeddings.patch_embeddings.projection.*",), "copy"),
        ("decoder.layers.{i}.input_layernorm.*", ("{p}encoder.layer.{i}.layernorm_before.*",), "copy"),
        (
            "decoder.layers.{i}.self_attention.linear_qkv.*",
            (
                "{p}encoder.layer.{i}.attention.q_proj.*",
                "{p}encoder.layer.{i}.attention.k_proj.*",
                "{p}encoder.layer.{i}.attention.v_proj.*",
            ),
            "vision_qkv",
        ),
        (
            "decoder.layers.{i}.self_attention.linear_proj.*",
            ("{p}encoder.layer.{i}.attention.projection_layer.*",),
            "copy",
        ),
        ("decoder.layers.{i}.ls1", ("{p}encoder.layer.{i}.lambda_1",), "copy"),
        ("decoder.layers.{i}.pre_mlp_layernorm.*", ("{p}encoder.layer.{i}.layernorm_after.*",), "copy"),
        ("decoder.layers.{i}.mlp.linear_fc1.*", ("{p}encoder.layer.{i}.mlp.fc1.*",), "copy"),
        ("decoder.layers.{i}.mlp.linear_fc2.*", ("{p}encoder.layer.{i}.mlp.fc2.*",), "copy"),
        ("decoder.layers.{i}.ls2", ("{p}encoder.layer.{i}.lambda_2",), "copy"),
    ],
    "internvit": [  # OpenGVLab InternViT, as inside Long-VITA's HF release
        ("class_embedding", ("{p}embeddings.class_embedding",), "copy"),
        ("position_embedding", ("{p}embeddings.position_embedding",), "copy"),
        ("patch_embedding.*", ("{p}embeddings.patch_embedding.*",), "copy"),
        ("decoder.layers.{i}.input_layernorm.*", ("{p}encoder.layers.{i}.norm1.*",), "copy"),
        ("decoder.layers.{i}.self_attention.linear_qkv.*", ("{p}encoder.layers.{i}.attn.qkv.*",), "vision_fused_qkv"),
        ("decoder.layers.{i}.self_attention.linear_proj.*", ("{p}encoder.layers.{i}.attn.proj.*",), "copy"),
        ("decoder.layers.{i}.ls1", ("{p}encoder.layers.{i}.ls1",), "copy"),
        ("decoder.layers.{i}.pre_mlp_layernorm.*", ("{p}encoder.layers.{i}.norm2.*",), "copy"),
        ("decoder.layers.{i}.mlp.linear_fc1.*", ("{p}encoder.layers.{i}.mlp.fc1.*",), "copy"),
        ("decoder.layers.{i}.mlp.linear_fc2.*", ("{p}encoder.layers.{i}.mlp.fc2.*",), "copy"),
        ("decoder.layers.{i}.ls2", ("{p}encoder.layers.{i}.ls2",), "copy"),
    ],
}

PROJECTOR_ROWS: dict[str, list[Row]] = {
    "internvl": [
        ("layer_norm.*", ("{p}layer_norm.*",), "copy"),
        ("linear_fc1.*", ("{p}linear_1.*",), "copy"),
        ("linear_fc2.*", ("{p}linear_2.*",), "copy"),
    ],
    "longvita": [
        ("layer_norm.*", ("{p}pre_proj_layernorm.*",), "copy"),
        ("linear_fc1.*", ("{p}mlp.0.*",), "copy"),
        ("linear_fc2.*", ("{p}mlp.2.*",), "copy"),
    ],
}


@dataclass(frozen=True)
class Part:
    """One model part inside an HF layout: which rows, under which megatron / HF prefix."""

    mcore_prefix: str
    rows: list[Row]
    hf_prefix: str


def multimodal_parts(vision: list[Row], projector: list[Row], prefixes: tuple[str, str, str, str]) -> list[Part]:
    """Vision tower, projector, LLM and output layer under the given HF prefixes."""
    return [
        Part("vision.", vision, prefixes[0]),
        Part("projector.", projector, prefixes[1]),
        Part("language_model.", LANGUAGE_ROWS, prefixes[2]),
        Part("language_model.", HEAD_ROWS, prefixes[3]),
    ]


@dataclass(frozen=True)
class Mapping:
    """One concrete row: megatron tensor <- HF tensors by transform."""

    mcore: str
    hf: tuple[str, ...]
    transform: Transform


def _expand(parts: list[Part], config: ModelConfig, wanted: set[str], named: dict[str, Transform]) -> list[Mapping]:
    result: list[Mapping] = []
    for part in parts:
        num_layers = config.vision.num_layers if part.mcore_prefix == "vision." else config.decoder.num_layers
        for mcore, hf, transform in part.rows:
            for suffix in ("weight", "bias") if mcore.endswith("*") else ("",):
                for i in range(num_layers) if "{i}" in mcore else (0,):
                    name = part.mcore_prefix + mcore.replace("*", suffix).format(i=i)
                    if name in wanted:
                        hf_names = tuple(h.replace("*", suffix).format(p=part.hf_prefix, i=i) for h in hf)
                        result.append(Mapping(name, hf_names, named[transform]))
    return result


def mappings(
    layouts: list[list[Part]], config: ModelConfig, mcore_names: Sequence[str], hf_names: Optional[Sequence[str]] = None
) -> list[Mapping]:
    """A format's rows, expanded over layers and weight/bias, restricted to `mcore_names`.

    The model decides which tensors exist (e.g. projector biases); every one of them under
    the format's parts must be covered by a row, or the table is incomplete. With `hf_names`
    (reading), the layout that names most of them is used; else the first layout.
    """
    named = transforms(config)
    wanted = set(mcore_names)
    expanded = [_expand(parts, config, wanted, named) for parts in layouts]
    present = set(hf_names or ())
    result = max(expanded, key=lambda rows: sum(name in present for row in rows for name in row.hf))
    covered = {row.mcore for row in result}
    prefixes = {part.mcore_prefix for part in layouts[0]}
    uncovered = sorted(n for n in wanted if n.startswith(tuple(prefixes)) and n not in covered)
    if uncovered:
        raise KeyError(f"the table has no row for megatron tensor(s) {', '.join(uncovered)}")
    return result
