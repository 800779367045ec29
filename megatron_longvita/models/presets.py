"""ModelConfig (LLM + vision tower + projector) and the named presets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from megatron_longvita.config.parallel import ConfigError
from megatron_longvita.config.tokens import CONTEXT_TOKENS, SPECIAL_TOKENS
from megatron_longvita.models.decoder import DecoderConfig
from megatron_longvita.models.projector import ProjectorConfig
from megatron_longvita.models.vision import VisionConfig
from megatron_longvita.registry import Registry

@dataclass(frozen=True)
class ModelConfig:
    decoder: DecoderConfig
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    # id of <IMG_CONTEXT> (transformers' InternVL `image_token_id`); the other placeholders follow it
    image_token_id: int = 151667

    def __post_init__(self) -> None:
        if max(self.context_token_ids) >= self.decoder.vocab_size:
            raise ValueError(f"context token ids {self.context_token_ids} lie outside the vocabulary "
                             f"({self.decoder.vocab_size}); check image_token_id")

    def validate_parallel(self, tensor_model_parallel_size: int, pipeline_model_parallel_size: int) -> None:
        """Fail early, naming the flag, for a layout megatron cannot build this model at."""
        tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
        decoder, vision = self.decoder, self.vision
        split_by_tp = {"LLM attention heads": decoder.num_attention_heads, "LLM query groups": decoder.num_query_groups,
                       "LLM FFN size": decoder.ffn_hidden_size, "vision attention heads": vision.num_attention_heads,
                       "vision FFN size": vision.ffn_hidden_size, "projector width (LLM hidden)": decoder.hidden_size}
        for what, size in split_by_tp.items():
            if size % tp:
                raise ConfigError(f"--tensor-model-parallel-size {tp} does not divide the {what} ({size})")
        if decoder.num_layers % pp:
            raise ConfigError(f"--pipeline-model-parallel-size {pp} does not divide the "
                              f"{decoder.num_layers} LLM layers")

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
    def context_token_ids(self) -> tuple[int, ...]:
        """Placeholder ids the vision embeddings replace: image, patch and video context."""
        base = SPECIAL_TOKENS.index("<IMG_CONTEXT>")
        return tuple(self.image_token_id + SPECIAL_TOKENS.index(token) - base for token in CONTEXT_TOKENS)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        return cls(decoder=DecoderConfig(**data["decoder"]), vision=VisionConfig(**data["vision"]),
                   projector=ProjectorConfig(**data["projector"]), image_token_id=data["image_token_id"])


PRESETS: Registry = Registry("model preset")


def _qwen25(num_layers: int, hidden: int, ffn: int, heads: int, groups: int) -> ModelConfig:
    # Qwen2.5 configs: vocab 152064 (151,665 tokens + Qwen's padding), RoPE 1e6, RMSNorm 1e-6.
    decoder = DecoderConfig(num_layers=num_layers, hidden_size=hidden, ffn_hidden_size=ffn, num_attention_heads=heads,
                            num_query_groups=groups, vocab_size=152064, max_position_embeddings=32768)
    return ModelConfig(decoder=decoder, vision=VisionConfig(), projector=ProjectorConfig(bias=False))


PRESETS.register("qwen2.5-7b")(_qwen25(28, 3584, 18944, 28, 4))
PRESETS.register("qwen2.5-14b")(_qwen25(48, 5120, 13824, 40, 8))
PRESETS.register("qwen2.5-72b")(_qwen25(80, 8192, 29568, 64, 8))
# CPU tests: vocab 300 is not a multiple of 128 x TP (exercises padding); 56 px tiles -> 4 tokens per tile.
PRESETS.register("tiny")(ModelConfig(
    decoder=DecoderConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                          num_query_groups=2, vocab_size=300, max_position_embeddings=512),
    vision=VisionConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=2, image_size=56),
    projector=ProjectorConfig(bias=True),
    image_token_id=280,
))


def get_preset(name: str) -> ModelConfig:
    return PRESETS.get(name)
