"""Tensors are read out of the mapped file chunk by chunk into memory of their own (docs/checkpoints.md
"Loading"): the same values safetensors reads, cast on the way, across chunk boundaries, and a clear error when
the file changed under its index."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from sd35_flash.flash_core import checkpoint
from sd35_flash.flash_core.errors import CheckpointError


@pytest.fixture
def stored(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(37, 11, generator=gen).to(torch.float16),
               "b": torch.randn(5, generator=gen).to(torch.bfloat16),
               "empty": torch.zeros(0, 3),
               "ids": torch.arange(7, dtype=torch.int64),
               "scalar": torch.tensor(2.5)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("chunk", [8, 64, 1 << 20])  # bytes: many chunks, a few, one
@pytest.mark.parametrize("dtype", [None, torch.float32, torch.bfloat16])
def test_values_match_safetensors_across_chunks(stored, monkeypatch, chunk, dtype):
    monkeypatch.setattr(checkpoint, "READ_CHUNK", chunk)
    expected = load_file(str(stored))
    got = dict(checkpoint.iter_tensors(checkpoint.index_file(stored), dtype, keep_dtype={"b"}))
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        want = value.to(dtype) if dtype is not None and value.is_floating_point() and key != "b" else value
        assert got[key].dtype == want.dtype and torch.equal(got[key], want), key


def test_a_file_truncated_after_indexing_is_named(stored):
    refs = checkpoint.index_file(stored)
    stored.write_bytes(stored.read_bytes()[:-40])
    with pytest.raises(CheckpointError, match=r"cannot read key '\w+' of '.*t\.safetensors'"):
        dict(checkpoint.iter_tensors(refs))
