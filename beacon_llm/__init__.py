"""beacon-llm: Activation Beacon (Zhang et al., arXiv 2401.03462) on transformers 5."""

from .cache import BeaconCache, StepTrace
from .config import BeaconConfig
from .documents import BUNDLED_BOOK, DocumentError, read_document
from .engine import BeaconEngine, Completion, ReadCancelled, Usage, check_timeout
from .generation import GenerateOutput, check_sampling_options, normalize_stop
from .layers import beacon_state_dict, is_beacon_parameter, mark_only_beacon_trainable
from .loading import capacity_from_files, get_engine, load, unload
from .model import BeaconModel, BeaconOutput
from .serialization import from_pretrained, load_adapter, load_cache, save_adapter, save_cache

__all__ = [
    "BUNDLED_BOOK",
    "BeaconEngine",
    "Completion",
    "DocumentError",
    "GenerateOutput",
    "ReadCancelled",
    "Usage",
    "capacity_from_files",
    "check_sampling_options",
    "check_timeout",
    "get_engine",
    "load",
    "normalize_stop",
    "read_document",
    "BeaconCache",
    "BeaconConfig",
    "BeaconModel",
    "BeaconOutput",
    "StepTrace",
    "beacon_state_dict",
    "from_pretrained",
    "is_beacon_parameter",
    "load_adapter",
    "load_cache",
    "mark_only_beacon_trainable",
    "save_adapter",
    "save_cache",
    "unload",
]

__version__ = "0.1.0"
