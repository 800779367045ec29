"""Independent references and shared fixtures' builders for the tests: one module, imported by
tests (tests do not import each other or tools/).

- the tiny random transformers InternVL checkpoint, its prompts and transformers' greedy
  generation (the model-parity reference for conversion, training and inference tests);
- naive full attention with an explicit (document) mask, the ring-attention reference;
- a dispatch-mode tracker of live tensor bytes (the output-head memory checks; the memory
  benchmarks under tools/benchmarks measure with it too: one implementation, here, since
  tests do not import tools/).
"""

from __future__ import annotations

import math
import os
import sys
import weakref
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# -- the tiny InternVL checkpoint ---------------------------------------------------------

VOCAB = 300
# Its tokenizer: 278 tokens, then the 17 Long-VITA tokens (<IMG_CONTEXT> 280, <VID_CONTEXT> 283,
# <PATCH_CONTEXT> 286); the converter finds them by their text.
TOKENIZER_SIZE = 295
IMAGE_TOKEN = 280
VIDEO_TOKEN = 283
PATCH_TOKEN = 286
TOKENS_PER_TILE = 4
STEPS = 8
TOLERANCE = 1e-4
OTHER_TILES = torch.randn(2, 3, 84, 84, generator=torch.Generator().manual_seed(2))


def save_tiny_internvl(directory: str) -> None:
    """Random (not default-initialised: zeros and constant layer scales would hide mistakes) weights."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    from megatron_longvita.config.tokens import SPECIAL_TOKENS
    from tests.hf_checkpoints import qwen_style_tokenizer

    qwen_style_tokenizer(directory, TOKENIZER_SIZE, SPECIAL_TOKENS)
    config = InternVLConfig(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=56,
            patch_size=14,
            attention_bias=True,
        ),
        text_config=dict(
            model_type="qwen2",
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=VOCAB,
            max_position_embeddings=512,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        ),
        image_token_id=IMAGE_TOKEN,
        image_seq_length=TOKENS_PER_TILE,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            is_norm_weight = "norm" in name and name.endswith("weight")
            param.copy_(torch.randn_like(param) * 0.2 + (1.0 if is_norm_weight else 0.0))
    model.save_pretrained(directory)


def hf2mcore_rank(hf_dir: str, save_dir: str) -> None:
    from megatron_longvita.checkpoint.convert import hf2mcore

    hf2mcore(hf_dir, save_dir)


def prompts() -> dict[str, tuple[list[int], np.ndarray | None]]:
    """An image of 3 tiles (thumbnail + 2 patches) inside text, and a text-only prompt."""
    generator = torch.Generator().manual_seed(1)

    def text(n: int) -> list[int]:
        return torch.randint(0, IMAGE_TOKEN - 10, (n,), generator=generator).tolist()

    image = (
        text(5)
        + [IMAGE_TOKEN] * TOKENS_PER_TILE
        + text(2)
        + [PATCH_TOKEN] * TOKENS_PER_TILE
        + text(1)
        + [PATCH_TOKEN] * TOKENS_PER_TILE
        + text(4)
    )
    pixel_values = torch.randn(3, 3, 56, 56, generator=generator).numpy()
    return {"image": (image, pixel_values), "text": (text(14), None)}


def transformers_greedy(hf_dir: str) -> dict[str, tuple[torch.Tensor, list[int]]]:
    from transformers import InternVLForConditionalGeneration

    model = InternVLForConditionalGeneration.from_pretrained(hf_dir).eval()
    results = {}
    for name, (ids, pixels) in prompts().items():
        # transformers knows one image token: our patch placeholders are its image placeholders.
        tokens = [IMAGE_TOKEN if t == PATCH_TOKEN else t for t in ids]
        generated, first = [], None
        with torch.no_grad():
            for _ in range(STEPS):
                pv = None if pixels is None else torch.from_numpy(pixels)
                logits = model(input_ids=torch.tensor([tokens]), pixel_values=pv).logits[0, -1]
                first = logits if first is None else first
                generated.append(int(logits.argmax()))
                tokens.append(generated[-1])
        results[name] = (first, generated)
    with torch.no_grad():  # a tile size the position embedding was not trained at: bicubic resize
        features = model.model.vision_tower(pixel_values=OTHER_TILES).last_hidden_state[:, 1:]
    results["vision_84px"] = features.reshape(len(OTHER_TILES), 6, 6, -1)
    return results


def comparable_tokens(tokens: list[int]) -> list[int]:
    """Tokens up to the first vision placeholder id: the engine never emits one (input-only),
    transformers' InternVL treats all but <IMG_CONTEXT> as text."""
    placeholders = (IMAGE_TOKEN, PATCH_TOKEN, VIDEO_TOKEN)
    return next((tokens[:i] for i, t in enumerate(tokens) if t in placeholders), tokens)


# -- attention -------------------------------------------------------------------------


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: Optional[Sequence[int]] = None
) -> torch.Tensor:
    """Causal (document-masked) attention over the full sequence with an explicit mask.

    q [S, b, hq, d], k/v [S, b, hkv, d]; GQA by repeating k/v (query head h -> kv head h // g).
    """
    positions = torch.arange(q.shape[0])
    visible = positions[None, :] <= positions[:, None]
    if cu_seqlens is not None:
        document = torch.bucketize(positions, torch.tensor(list(cu_seqlens)[1:]), right=True)
        visible &= document[:, None] == document[None, :]
    groups = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) / math.sqrt(q.shape[-1])
    probs = scores.masked_fill(~visible, -math.inf).softmax(-1)
    return torch.einsum("bhst,tbhd->sbhd", probs, v)


# -- memory ------------------------------------------------------------------------------


# Exact tensor memory of a step: an op's output storage that did not exist before is counted
# until it is freed, independent of the allocator (caching, RSS). Storages created inside a
# kernel that never reach Python (per-thread scratch of a fused kernel) are not seen. With
# ``where=True`` each storage is labelled with the op that made it, its shape and the innermost
# call site outside torch, and the live set at the peak is kept (``at_peak``): the benchmarks
# print what each buffer holds at the high-water mark.

_TORCH_DIR = str(Path(torch.__file__).parent)
MIB = 2**20


def _call_site() -> str:
    """file:line function of the innermost frame outside torch (and this module)."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if not name.startswith(_TORCH_DIR) and name != __file__ and "/contextlib.py" not in name:
            return f"{Path(name).name}:{frame.f_lineno} {frame.f_code.co_name}"
        frame = frame.f_back
    return "?"


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages created while the mode is active and still alive.

    ``inputs`` existed before: views of them (a weight's transpose) allocate nothing.
    ``phase`` (settable at any time) names the part of the step now running; ``phase_peaks``
    holds the high-water mark reached during each phase.
    """

    def __init__(self, inputs: Iterable[torch.Tensor] = (), where: bool = False) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.phase = "step"
        self.phase_peaks: dict[str, int] = {}
        self._where = where
        self._labels: dict[int, tuple[str, int]] = {}  # storage id -> (label, bytes), with ``where``
        self._at_peak: list[tuple[str, int]] = []
        self._seen: set[int] = {id(tensor.untyped_storage()) for tensor in inputs}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._track(tensor, func)
        return out

    def _track(self, tensor: torch.Tensor, func) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)  # storages keep their Python object while alive, so id() is stable
        if key in self._seen:  # views and in-place results share a storage
            return
        self._seen.add(key)
        nbytes = storage.nbytes()
        self.live += nbytes
        if self._where:
            label = f"{func.__name__} {tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')} @ {_call_site()}"
            self._labels[key] = (label, nbytes)
        if self.live > self.peak:
            self.peak = self.live
            if self._where:
                self._at_peak = list(self._labels.values())
        self.phase_peaks[self.phase] = max(self.phase_peaks.get(self.phase, 0), self.live)
        weakref.finalize(storage, self._free, key, nbytes)

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self._labels.pop(key, None)
        self.live -= nbytes

    def at_peak(self, top: Optional[int] = None, min_bytes: int = 0) -> list[dict]:
        """The storages live at the peak, grouped by label, largest first (needs ``where=True``)."""
        totals, counts = Counter(), Counter()
        for label, nbytes in self._at_peak:
            totals[label] += nbytes
            counts[label] += 1
        rows = [
            {"mib": round(nbytes / MIB, 3), "count": counts[label], "what": label}
            for label, nbytes in totals.most_common(top)
            if nbytes >= min_bytes
        ]
        return rows


def tiny_chat_tokenizer(directory: str) -> str:
    """A byte-level BPE of 278 tokens, so that the Long-VITA specials land on the tiny model's
    placeholder ids (<IMG_CONTEXT> = 280)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from megatron_longvita.data import ChatTokenizer
    from tests.unit.data.factories import WORDS

    rng = np.random.default_rng(0)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=278,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([" ".join(rng.choice(WORDS, size=12)) + "\n" for _ in range(400)], trainer)
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    assert ChatTokenizer.from_dir(directory).context_token_ids == (280, 286, 283)
    return directory
