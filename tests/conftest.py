import os

import pytest
import torch

torch.set_num_threads(1)

FIXTURES = os.environ.get("BEACON_PARITY_DIR") or os.path.join(os.path.dirname(__file__), "fixtures", "beacon_parity")


@pytest.fixture
def tiny():
    from beacon_llm.testing import tiny_beacon_model

    return tiny_beacon_model()


CLI_TEXT = "Dorothy lived in Kansas with Uncle Henry and Aunt Em. " * 8


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """Folders the CLI loads: ``base`` (a tiny base model with its tokenizer), ``adapter`` (beacons for it),
    ``adapter_fit`` (the same beacons saved with an inference mix, fit-16, as the shipped adapter is) and
    ``data.txt`` (a short training text)."""
    import json

    import beacon_llm
    from beacon_llm.testing import tiny_base_model, tiny_beacon_model

    root = tmp_path_factory.mktemp("tiny")
    bm = tiny_beacon_model()
    tiny_base_model().save_pretrained(root / "base")  # the same base weights, without beacons
    bm.tokenizer.save_pretrained(root / "base")
    beacon_llm.save_adapter(bm, str(root / "adapter"))
    beacon_llm.save_adapter(bm, str(root / "adapter_fit"))
    config = root / "adapter_fit" / "beacon_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "beacon_ratio_mix": "fit-16"}))
    (root / "data.txt").write_text(CLI_TEXT)
    return root
