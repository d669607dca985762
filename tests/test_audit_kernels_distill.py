"""The teacher stores (``beacon_llm.distill``): a stored file that cannot be read, or holds other tensors, is computed
again and replaced instead of failing deep inside safetensors."""

import pytest
import torch
from safetensors.torch import save_file

from beacon_llm.distill import TailReferenceStore, TeacherStore
from beacon_llm.testing import tiny_base_model

IDS = list(range(5, 25))
START = 10


@pytest.fixture(scope="module")
def teacher():
    return tiny_base_model()


def _damage(path, how):
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:40])
    elif how == "empty":
        path.write_bytes(b"")
    else:  # a valid file holding other tensors
        save_file({"indices": torch.zeros(3, 4, dtype=torch.int32)}, str(path))


@pytest.mark.parametrize("how", ["truncated", "empty", "other tensors"])
def test_a_damaged_teacher_file_is_computed_again_and_replaced(teacher, tmp_path, how):
    store = TeacherStore(teacher, tmp_path, k=4)
    want_indices, want_logprobs = store.get(IDS, START)
    (path,) = tmp_path.glob("*.safetensors")
    _damage(path, how)
    indices, logprobs = store.get(IDS, START)
    assert torch.equal(indices, want_indices) and torch.equal(logprobs, want_logprobs)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # replaced, no temporary file left
    again = TeacherStore(teacher, tmp_path, k=4).get(IDS, START)  # and read back from the store
    assert torch.equal(again[1], want_logprobs)


@pytest.mark.parametrize("how", ["truncated", "other tensors"])
def test_a_damaged_tail_reference_file_is_computed_again(teacher, tmp_path, how):
    indices, _ = TeacherStore(teacher, tmp_path / "teacher", k=4).get(IDS, START)
    store = TailReferenceStore(teacher, tmp_path / "tail", context=2)
    want = store.get(IDS, START, indices)
    (path,) = (tmp_path / "tail").glob("*.safetensors")
    _damage(path, how)
    assert torch.equal(store.get(IDS, START, indices), want)
