"""The Long-VITA special tokens: text only, no dependencies, so every layer can name them.

The order of SPECIAL_TOKENS fixes their ids when they are appended to a stock Qwen2.5 vocabulary;
released checkpoints depend on it (docs/design.md, "Token layout").
"""

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"

SPECIAL_TOKENS = (
    "<img>", "</img>", "<IMG_CONTEXT>",
    "<vid>", "</vid>", "<VID_CONTEXT>",
    "<patch>", "</patch>", "<PATCH_CONTEXT>",
    "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>",
    IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER,
)  # fmt: skip
# Placeholders the vision embeddings replace: image, patch and video context.
CONTEXT_TOKENS = ("<IMG_CONTEXT>", "<PATCH_CONTEXT>", "<VID_CONTEXT>")
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
PAD_TOKEN = "<|endoftext|>"
