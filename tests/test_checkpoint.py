"""Generic checkpoint I/O: plain reads equal the safetensors library's, bad files are refused in one line."""

import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from rectiflux.weights.checkpoint import CheckpointError, advise_mapped, file_backed, read_state_dict, save_state_dict


def test_plain_reads_equal_safetensors_and_are_aligned(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g).to(torch.bfloat16),
               "c": torch.randn(2, 2, generator=g).to(torch.float8_e4m3fn), "d": torch.tensor(3.5),
               "e": torch.arange(6, dtype=torch.int8).reshape(2, 3), "f": torch.zeros(0, 4)}
    save_file(tensors, tmp_path / "x.safetensors")
    reference = load_file(tmp_path / "x.safetensors")
    for mmap in (False, True):
        got = read_state_dict(tmp_path / "x.safetensors", mmap=mmap)
        assert got.keys() == reference.keys()
        for k, v in reference.items():
            assert got[k].dtype == v.dtype and got[k].shape == v.shape
            assert torch.equal(got[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8))
    plain = read_state_dict(tmp_path / "x.safetensors", mmap=False).values()
    assert all(t.data_ptr() % 64 == 0 for t in plain if t.numel())  # fresh allocations


def test_truncated_and_foreign_files_are_refused(tmp_path):
    save_state_dict({"w": torch.randn(64, 64)}, tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="cannot read|truncated") as e:
        read_state_dict(tmp_path / "cut.safetensors", mmap=False)
    assert "\n" not in str(e.value)
    (tmp_path / "model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(CheckpointError, match=r"not a safetensors file \(\.safetensors or \.sft; pickled"):
        read_state_dict(tmp_path / "model.bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no .safetensors"):
        read_state_dict(tmp_path / "empty")


def resident_kib(file) -> int:
    """This process's resident memory in the mappings of `file`, from /proc/self/smaps."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            inside = len(fields) >= 6 and fields[5] == str(file)
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total


@pytest.mark.skipif(sys.platform != "linux", reason="madvise on file mappings is Linux's")
def test_dropped_mapped_pages_leave_this_process_and_come_back_unchanged(tmp_path):
    file = tmp_path / "w.safetensors"
    weight = torch.randn(1024, 1024)  # 4 MiB
    save_file({"small": torch.randn(3), "weight": weight}, file)
    mapped = read_state_dict(file)["weight"]
    assert file_backed([mapped]) and not file_backed([mapped, weight]) and not file_backed([weight.clone()])
    assert torch.equal(mapped, weight)  # touches every page
    assert resident_kib(file) >= 4000
    advise_mapped([mapped], "drop")
    assert resident_kib(file) < 100  # at most the pages the tensor shares with the header and its neighbour
    assert torch.equal(mapped, weight)  # mapped again, from the page cache
    advise_mapped([mapped], "drop")
    advise_mapped([mapped], "populate")
    assert resident_kib(file) >= 4000
