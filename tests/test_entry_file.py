"""A cache entry's file (storage/entry_file.py): what it writes numpy reads back as it was,
what it reads is exactly what was written, and no damaged byte yields a different array."""
from __future__ import annotations

import io

import numpy as np
import pytest

from diagql.storage import entry_file


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "rows": rng.standard_normal((300, 7)).astype(np.float32),
        "wide": rng.standard_normal((5, 1000)),
        "fortran": np.asfortranarray(rng.standard_normal((9, 4))),
        "strided": np.arange(40, dtype=np.int64)[::3],
        "scalar": np.array(3.5),
        "empty": np.zeros((0, 5), np.float32),
        "flags": np.array([True, False, True]),
        "header": np.array('{"kind": "profile", "ü": 1}'),
        "small": np.arange(3, dtype=np.uint8),
        "half": np.ones(6, np.float16),
    }


def _written(arrays) -> bytes:
    out = io.BytesIO()
    entry_file.write(out, arrays)
    return out.getvalue()


def _same(got: dict, want: dict) -> bool:
    return sorted(got) == sorted(want) and all(
        got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
        and np.array_equal(got[k], want[k]) for k in want)


def test_numpy_reads_what_it_writes_unchanged():
    arrays = _arrays()
    with np.load(io.BytesIO(_written(arrays))) as npz:
        assert _same({name: npz[name] for name in npz.files}, arrays)


@pytest.mark.parametrize("mapped", [False, True])
def test_it_reads_back_exactly_what_was_written_each_array_aligned(tmp_path, monkeypatch,
                                                                    mapped):
    """From memory, and from a file mapped copy-on-write (arrays stay writable, and writing
    to one changes neither the file nor another read of it)."""
    arrays = _arrays()
    path = tmp_path / "entry.npz"
    path.write_bytes(_written(arrays))
    monkeypatch.setattr(entry_file, "MAP_BYTES", 0 if mapped else 1 << 40)
    with open(path, "rb", buffering=0) as file:
        got = entry_file.read(file)
    assert _same(got, arrays)
    for name, array in got.items():
        assert array.flags.aligned and array.flags.writeable, name
        if array.size and array.ndim:
            # A view of the file's one buffer, not a copy per array (what makes it fast).
            assert array.base is not None, name
    got["rows"][0, 0] = 123.0
    with open(path, "rb", buffering=0) as file:
        assert _same(entry_file.read(file), arrays)


def test_an_npz_written_by_numpy_is_still_read():
    arrays = _arrays()
    out = io.BytesIO()
    np.savez(out, **arrays)
    assert _same(entry_file.read(io.BytesIO(out.getvalue())), arrays)


def test_object_arrays_are_refused_both_ways():
    with pytest.raises(ValueError, match="pickle"):
        _written({"objects": np.array([{"a": 1}], dtype=object)})
    out = io.BytesIO()
    np.savez(out, objects=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError):
        entry_file.read(io.BytesIO(out.getvalue()))


def test_no_flipped_bit_anywhere_yields_a_different_array():
    """Every bit flip of every byte either fails the read or leaves every array as written
    (a flip in a zip field the reader never uses, such as a date, is harmless)."""
    arrays = {"labels": np.arange(7, dtype=np.int64),
              "latents": np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4),
              "__diagql__": np.array('{"format": 1}')}
    raw = _written(arrays)
    detected = 0
    for position in range(len(raw)):
        for bit in (0, 7):  # the lowest and the highest bit: a small and a large change
            damaged = bytearray(raw)
            damaged[position] ^= 1 << bit
            try:
                got = entry_file.read(io.BytesIO(bytes(damaged)))
            except Exception:  # noqa: BLE001 - any failure is a detection
                detected += 1
                continue
            assert _same(got, arrays), (position, bit)
    assert detected > len(raw)  # most bytes matter: the data, names, sizes, digests


@pytest.mark.parametrize("cut", [0, 1, 100, -1])
def test_a_truncated_file_fails(cut):
    raw = _written(_arrays())
    with pytest.raises(Exception):  # noqa: B017 - whichever the zip reader raises
        entry_file.read(io.BytesIO(raw[:cut]))
