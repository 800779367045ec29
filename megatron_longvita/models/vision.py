"""InternViT vision tower on megatron-core: conv patch embedding + class token + learned
position embedding, then pre-norm transformer layers with layer scale (ls1, ls2).

Bidirectional attention over one tile; the class token is dropped at the output. Under
sequence parallelism the tile sequence is padded to a multiple of the TP size and the pads
are masked out as keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock

from megatron_longvita.config.parallel import ParallelConfig
from megatron_longvita.models.specs import common_transformer_settings, vision_block_spec
from megatron_longvita.platform import Platform, current_platform


@dataclass(frozen=True)
class VisionConfig:
    """InternViT geometry; the defaults are InternViT-300M-448px."""

    num_layers: int = 24
    hidden_size: int = 1024
    ffn_hidden_size: int = 4096
    num_attention_heads: int = 16
    image_size: int = 448  # tile side the position embedding was trained for
    patch_size: int = 14
    num_channels: int = 3
    norm_epsilon: float = 1e-6
    qkv_bias: bool = True
    layer_scale_init: float = 0.1

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    def transformer_config(
        self,
        parallel: ParallelConfig,
        params_dtype: torch.dtype = torch.float32,
        recompute_num_layers: int = 0,
        platform: Optional[Platform] = None,
    ) -> TransformerConfig:
        """Same TP / SP as the LLM; no pipeline or context split (the tower lives on stage 0, whole).
        ``platform``: default the detected one."""
        return TransformerConfig(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size,
            num_attention_heads=self.num_attention_heads,
            kv_channels=self.hidden_size // self.num_attention_heads,
            add_bias_linear=True,
            add_qkv_bias=self.qkv_bias,
            gated_linear_unit=False,
            activation_func=F.gelu,
            normalization="LayerNorm",
            layernorm_epsilon=self.norm_epsilon,
            tensor_model_parallel_size=parallel.tensor_model_parallel_size,
            sequence_parallel=parallel.sequence_parallel,
            **common_transformer_settings(params_dtype, platform or current_platform(), recompute_num_layers),
        )


class InternViT(MegatronModule):
    """pixel_values [tiles, C, H, W] -> patch features [tiles, H/p, W/p, hidden] (class token dropped)."""

    def __init__(
        self,
        vision: VisionConfig,
        config: TransformerConfig,
        spec_name: Optional[str] = None,
        platform: Optional[Platform] = None,
    ) -> None:
        """``spec_name``: a vision layer spec (default: models.specs.select_layer_spec's choice);
        ``platform``: default the detected one."""
        super().__init__(config)
        self.vision = vision
        hidden, dtype = vision.hidden_size, config.params_dtype
        self.class_embedding = torch.nn.Parameter(torch.zeros(1, 1, hidden, dtype=dtype))
        self.patch_embedding = torch.nn.Conv2d(
            vision.num_channels, hidden, kernel_size=vision.patch_size, stride=vision.patch_size, dtype=dtype
        )
        self.position_embedding = torch.nn.Parameter(torch.zeros(1, vision.grid_size**2 + 1, hidden, dtype=dtype))
        block = vision_block_spec(config, platform or current_platform(), vision.layer_scale_init, spec_name)
        self.decoder = TransformerBlock(config, block, pre_process=True, post_process=False)

    def _position_embedding(self, rows: int, cols: int) -> torch.Tensor:
        """The learned table, bicubic-resized when the tile is not the trained size (as InternVL)."""
        grid = self.vision.grid_size
        if (rows, cols) == (grid, grid):
            return self.position_embedding
        class_pos, patch_pos = self.position_embedding[:, :1], self.position_embedding[:, 1:]
        patch_pos = patch_pos.reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, size=(rows, cols), mode="bicubic", align_corners=False)
        return torch.cat([class_pos, patch_pos.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)], dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        tiles, _, rows, cols = patches.shape
        tokens = torch.cat([self.class_embedding.expand(tiles, -1, -1), patches.flatten(2).transpose(1, 2)], dim=1)
        hidden = (tokens + self._position_embedding(rows, cols)).transpose(0, 1).contiguous()  # [s, tiles, h]
        seq_len = hidden.shape[0]
        mask = None
        if self.config.sequence_parallel:
            tp = parallel_state.get_tensor_model_parallel_world_size()
            padded = -(-seq_len // tp) * tp
            hidden = F.pad(hidden, (0, 0, 0, 0, 0, padded - seq_len))
            mask = (torch.arange(padded, device=hidden.device) >= seq_len).expand(tiles, 1, 1, padded)
            hidden = tensor_parallel.scatter_to_sequence_parallel_region(hidden)
        hidden = self.decoder(hidden, attention_mask=mask)
        if self.config.sequence_parallel:
            # Downstream (projector) grads are identical on every TP rank: split them, do not sum.
            hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        return hidden[1:seq_len].transpose(0, 1).reshape(tiles, rows, cols, -1)
