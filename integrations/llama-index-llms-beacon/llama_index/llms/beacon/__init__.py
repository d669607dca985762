"""LlamaIndex integration of beacon-llm: ``BeaconLLM`` and the whole-document ``BeaconQueryEngine``."""

from llama_index.llms.beacon.base import BeaconCapacityError, BeaconLLM
from llama_index.llms.beacon.query_engine import BeaconQueryEngine

__all__ = ["BeaconCapacityError", "BeaconLLM", "BeaconQueryEngine"]
