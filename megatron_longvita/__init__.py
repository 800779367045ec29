"""megatron-longvita: Long-VITA-style long-context VLMs on megatron-core.

The package is layered; a module imports only from its own layer and the layers before it
(tests/unit/test_layering.py enforces it, function-level imports included, and forbids
import cycles). ``patches`` is ``megatron_longvita.patches``, installed from the repository's
``patches/``; ``tools`` are the repository's ``tools/`` scripts. A new sub-package or
top-level module must be declared here.
"""

__version__ = "0.1.0"

LAYERS: tuple[tuple[str, ...], ...] = (
    ("config", "registry", "platform", "patches"),
    ("parallel", "data"),
    ("models",),
    ("checkpoint",),
    ("training", "inference"),
    ("train", "generate", "serve", "eval", "plan", "tools"),  # entry points
)
