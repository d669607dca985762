"""LangChain integration of beacon-llm: ``ChatBeacon`` (chat model) and ``BeaconLLM`` (string LLM)."""

from .chat_models import ChatBeacon
from .llms import BeaconLLM

__all__ = ["BeaconLLM", "ChatBeacon", "__version__"]
__version__ = "0.1.0"
