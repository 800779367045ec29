"""Long-VITA data pipeline: JSONL/JSON conversations with images and videos -> packed
micro-batches (see loader.py for the contract and the worker layout)."""

from megatron_longvita.config.data import DataConfig, MediaConfig

from .loader import PackedDataLoader, build_data_loader
from .mixture import MixtureGroup, MixtureStream, load_mixture
from .packing import BIN_PACKERS, PACKING_LAYOUTS
from .prompt import InferencePrompt, build_inference_prompt
from .schema import RECORD_FORMATS, Record, open_record_file, parse_record
from .skips import BadSampleError, SkipReason
from .template import SPECIAL_TOKENS, ChatTokenizer

__all__ = [
    "BIN_PACKERS",
    "PACKING_LAYOUTS",
    "RECORD_FORMATS",
    "SPECIAL_TOKENS",
    "BadSampleError",
    "ChatTokenizer",
    "DataConfig",
    "InferencePrompt",
    "MediaConfig",
    "MixtureGroup",
    "MixtureStream",
    "PackedDataLoader",
    "Record",
    "SkipReason",
    "build_data_loader",
    "build_inference_prompt",
    "load_mixture",
    "open_record_file",
    "parse_record",
]
