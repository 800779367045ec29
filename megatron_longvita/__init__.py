"""megatron-longvita: Long-VITA-style long-context VLMs on megatron-core."""

__version__ = "0.1.0"
