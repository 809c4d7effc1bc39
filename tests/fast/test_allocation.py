"""Big output arrays on base pages (aevae.allocation): ordinary arrays to their users, without NumPy's
huge-page advice, released with their last view."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from aevae import allocation

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the mapping and its flags are Linux's")


def _mapping_flags(array: np.ndarray) -> list[str] | None:
    """The VmFlags of the mapping holding the middle of the array's data (/proc/self/smaps; NumPy advises
    from the first page boundary on), or None when no mapping holds it."""
    address = array.__array_interface__["data"][0] + array.nbytes // 2
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= address < end
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    return None


@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_a_big_array_is_an_ordinary_writable_array(dtype: str) -> None:
    shape = (allocation.MAPPED_FROM_BYTES // (1024 * np.dtype(dtype).itemsize) + 3, 32, 32)  # just over
    out = allocation.empty(shape, dtype)
    assert out.shape == shape and out.dtype == np.dtype(dtype)
    assert out.flags.c_contiguous and out.flags.writeable
    values = (np.arange(out.size, dtype=np.uint32) % 251).astype(dtype).reshape(shape)
    out[...] = values
    np.testing.assert_array_equal(out, values)
    np.testing.assert_array_equal(out[1000:1010], values[1000:1010])


def test_an_impossible_size_raises_memory_error_as_numpy_does() -> None:
    with pytest.raises(MemoryError, match=r"unable to allocate .* GiB .*shape \(1000000000000, 32, 32\)"):
        allocation.empty((10**12, 32, 32), np.float32)


def test_a_small_array_is_numpy_s_own() -> None:
    out = allocation.empty((3, 4), np.float32)
    assert out.base is None and out.shape == (3, 4)


@linux
def test_a_big_array_has_no_huge_page_advice_and_is_released() -> None:
    out = allocation.empty((allocation.MAPPED_FROM_BYTES // 4096, 32, 32), np.float32)
    out[len(out) // 2] = 1.0
    flags = _mapping_flags(out)
    assert flags is not None and "hg" not in flags  # "hg": madvise(MADV_HUGEPAGE)
    view = out[len(out) // 2:]
    del out
    assert _mapping_flags(view) is not None  # a view keeps the mapping
    address = view.__array_interface__["data"][0]
    del view
    with open("/proc/self/maps") as maps:
        ranges = [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in maps]
    assert not any(start <= address < end for start, end in ranges)


@linux
def test_numpy_advises_huge_pages_where_it_is_replaced() -> None:
    """The reason for the module: if NumPy stops advising huge pages for big arrays, it can go."""
    if not np._core.multiarray._get_madvise_hugepage():  # type: ignore[attr-defined]
        pytest.skip("NumPy's huge-page advice is off here (NUMPY_MADVISE_HUGEPAGE=0 or an old kernel)")
    plain = np.empty((allocation.MAPPED_FROM_BYTES // 4096, 32, 32), np.float32)
    plain[len(plain) // 2] = 1.0
    flags = _mapping_flags(plain)
    assert flags is not None and "hg" in flags
