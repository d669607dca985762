"""langchain-tests' standard chat-model suites, offline, on a tiny model."""

import pytest

pytest.importorskip("langchain_tests")

from langchain_beacon import ChatBeacon  # noqa: E402
from langchain_tests.integration_tests import ChatModelIntegrationTests  # noqa: E402
from langchain_tests.unit_tests import ChatModelUnitTests  # noqa: E402

from beacon_llm import BeaconEngine  # noqa: E402
from beacon_llm.testing import tiny_beacon_model  # noqa: E402

ENGINE = BeaconEngine(tiny_beacon_model())


class TestChatBeaconUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self):
        return ChatBeacon

    @property
    def chat_model_params(self):
        return {"engine": ENGINE}

    @property
    def supports_model_override(self):
        return False

    @property
    def has_tool_calling(self):
        return False  # bind_tools is overridden only to say so

    @property
    def has_structured_output(self):
        return False


class TestChatBeaconIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self):
        return ChatBeacon

    @property
    def chat_model_params(self):
        return {"engine": ENGINE}

    @property
    def supports_model_override(self):
        return False

    @property
    def has_tool_calling(self):
        return False  # bind_tools is overridden only to say so

    @property
    def has_structured_output(self):
        return False

    @property
    def supported_usage_metadata_details(self):
        return {"invoke": ["cache_read_input"], "stream": ["cache_read_input"]}

    def invoke_with_cache_read_input(self, *, stream: bool = False):
        """A second question about the same document reads the document from the condensed cache."""
        chat = ChatBeacon(engine=ENGINE, max_tokens=5)
        book = ("system", "The lighthouse keeper counted the ships every night. " * 30)
        chat.invoke([book, ("human", "How many ships?")])
        messages = [book, ("human", "Who counted?")]
        if stream:
            full = None
            for chunk in chat.stream(messages):
                full = chunk if full is None else full + chunk
            return full
        return chat.invoke(messages)
