"""The platform names, written once: the platform layer detects one, the patch set is declared per name."""

PLATFORM_NAMES = ("cpu", "cuda", "npu")
