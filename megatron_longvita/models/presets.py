"""ModelConfig (LLM + vision tower + projector) and the named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from megatron_longvita.config.parallel import ConfigError
from megatron_longvita.config.tokens import CONTEXT_TOKENS
from megatron_longvita.models.decoder import DecoderConfig
from megatron_longvita.models.projector import ProjectorConfig
from megatron_longvita.models.vision import VisionConfig
from megatron_longvita.registry import Registry

# ModelConfig field holding each vision placeholder's id, in CONTEXT_TOKENS order.
CONTEXT_TOKEN_FIELDS = dict(zip(CONTEXT_TOKENS, ("image_token_id", "patch_token_id", "video_token_id")))


@dataclass(frozen=True)
class ModelConfig:
    decoder: DecoderConfig
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    # Vision placeholder ids, resolved by token text from the checkpoint's tokenizer (defaults: the
    # Long-VITA tokens appended to stock Qwen2.5). None: the checkpoint defines no such token (an
    # InternVL model puts every tile and frame on <IMG_CONTEXT>), and what needs it is refused.
    image_token_id: int = 151667
    patch_token_id: Optional[int] = 151673
    video_token_id: Optional[int] = 151670

    def __post_init__(self) -> None:
        for token, name in CONTEXT_TOKEN_FIELDS.items():
            token_id = getattr(self, name)
            if token_id is not None and not 0 <= token_id < self.decoder.vocab_size:
                raise ValueError(f"{name} {token_id} ({token}) lies outside the vocabulary ({self.decoder.vocab_size})")

    def validate_parallel(self, tensor_model_parallel_size: int, pipeline_model_parallel_size: int) -> None:
        """Fail early, naming the flag, for a layout megatron cannot build this model at."""
        tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
        decoder, vision = self.decoder, self.vision
        split_by_tp = {
            "LLM attention heads": decoder.num_attention_heads,
            "LLM query groups": decoder.num_query_groups,
            "LLM FFN size": decoder.ffn_hidden_size,
            "vision attention heads": vision.num_attention_heads,
            "vision FFN size": vision.ffn_hidden_size,
            "projector width": self.projector.intermediate_size(decoder.hidden_size),
        }
        for what, size in split_by_tp.items():
            if size % tp:
                raise ConfigError(f"--tensor-model-parallel-size {tp} does not divide the {what} ({size})")
        if decoder.num_layers % pp:
            raise ConfigError(
                f"--pipeline-model-parallel-size {pp} does not divide the {decoder.num_layers} LLM layers"
            )

    # geometry, as MediaConfig.from_model_config reads it
    @property
    def image_size(self) -> int:
        return self.vision.image_size

    @property
    def patch_size(self) -> int:
        return self.vision.patch_size

    @property
    def downsample_ratio(self) -> float:
        return self.projector.downsample_ratio

    @property
    def tokens_per_tile(self) -> int:
        return int(self.vision.grid_size * self.downsample_ratio) ** 2

    @property
    def context_tokens(self) -> dict[str, int]:
        """The placeholders this model defines -> their ids (CONTEXT_TOKENS order)."""
        ids = {token: getattr(self, name) for token, name in CONTEXT_TOKEN_FIELDS.items()}
        return {token: token_id for token, token_id in ids.items() if token_id is not None}

    @property
    def context_token_ids(self) -> tuple[int, ...]:
        """Placeholder ids the vision embeddings replace: image, patch and video context (those defined)."""
        return tuple(self.context_tokens.values())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        missing = [name for name in CONTEXT_TOKEN_FIELDS.values() if name not in data]
        if missing:
            raise ConfigError(
                f"model config lacks {', '.join(missing)} (written by an older version): convert the checkpoint again"
            )
        tokens = {name: data[name] for name in CONTEXT_TOKEN_FIELDS.values()}
        return cls(
            decoder=DecoderConfig(**data["decoder"]),
            vision=VisionConfig(**data["vision"]),
            projector=ProjectorConfig(**data["projector"]),
            **tokens,
        )

    def differences(self, other: ModelConfig) -> dict[str, tuple[Any, Any]]:
        """Dotted field name -> (this value, the other's), for every field that differs."""
        mine, theirs = _flatten(dataclasses.asdict(self)), _flatten(dataclasses.asdict(other))
        return {
            key: (mine.get(key), theirs.get(key))
            for key in sorted(mine.keys() | theirs.keys())
            if mine.get(key) != theirs.get(key)
        }


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


PRESETS: Registry = Registry("model preset")


def _qwen25(num_layers: int, hidden: int, ffn: int, heads: int, groups: int) -> ModelConfig:
    # Qwen2.5 configs: vocab 152064 (151,665 tokens + Qwen's padding), RoPE 1e6, RMSNorm 1e-6.
    decoder = DecoderConfig(
        num_layers=num_layers,
        hidden_size=hidden,
        ffn_hidden_size=ffn,
        num_attention_heads=heads,
        num_query_groups=groups,
        vocab_size=152064,
        max_position_embeddings=32768,
    )
    vision = VisionConfig()
    # Long-VITA's projector: 4 x 1024 -> 1024 (the ViT width) -> LLM hidden, no biases
    return ModelConfig(
        decoder=decoder, vision=vision, projector=ProjectorConfig(bias=False, ffn_hidden_size=vision.hidden_size)
    )


PRESETS.register("qwen2.5-7b")(_qwen25(28, 3584, 18944, 28, 4))
PRESETS.register("qwen2.5-14b")(_qwen25(48, 5120, 13824, 40, 8))
PRESETS.register("qwen2.5-72b")(_qwen25(80, 8192, 29568, 64, 8))
# CPU tests: vocab 300 is not a multiple of 128 x TP (exercises padding); 56 px tiles -> 4 tokens per tile;
# the Long-VITA tokens appended to a 278-token vocabulary; Long-VITA's projector geometry.
PRESETS.register("tiny")(
    ModelConfig(
        decoder=DecoderConfig(
            num_layers=2,
            hidden_size=64,
            ffn_hidden_size=128,
            num_attention_heads=4,
            num_query_groups=2,
            vocab_size=300,
            max_position_embeddings=512,
        ),
        vision=VisionConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=2, image_size=56),
        projector=ProjectorConfig(bias=False, ffn_hidden_size=32),
        image_token_id=280,
        patch_token_id=286,
        video_token_id=283,
    )
)


def get_preset(name: str) -> ModelConfig:
    return PRESETS.get(name)
