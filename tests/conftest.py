import os

import pytest
import torch

torch.set_num_threads(1)

FIXTURES = os.environ.get("BEACON_PARITY_DIR") or os.path.join(os.path.dirname(__file__), "fixtures", "beacon_parity")


@pytest.fixture
def tiny():
    from beacon_llm.testing import tiny_beacon_model

    return tiny_beacon_model()
