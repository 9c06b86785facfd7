"""One cache entry's file: a plain ``.npz`` archive that reads back at memory speed.

Any numpy opens it (``np.load``), but DiagQL writes it so that it need not be read that way:
every member is stored uncompressed, its data aligned to 64 bytes in the file (a padding extra
field, as Android's zipalign does), and its XXH3-128 digest is the member's zip comment. A read
maps the whole file (``_contents``), each array a view of it checked against its digest: many
times faster than ``np.load``'s chunked copies and zip CRCs (docs/ARCHITECTURE.md, "Storage"),
with the same guarantee that a damaged byte of an array is never trusted.
A file without digests (written by an older DiagQL, or by hand) is read by ``np.load``.
"""
from __future__ import annotations

import io
import mmap
import struct
import sys
import zipfile

import numpy as np
import xxhash

ALIGN = 64  # numpy pads an .npy header to a multiple of 64 bytes, so the data lands aligned too
_DIGEST = b"xxh3-128:"
_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # zipfile's own layout of a local file header
_LOCAL_SIGNATURE = b"PK\003\004"
_PADDING_ID = 0xD935  # the extra field id zipalign pads with; readers skip unknown ids
_ZIP64_EXTRA = 20  # what zipfile adds to a local header's extra for a zip64 member
# Files this large are mapped (``_contents``): below, zero-filling a fresh buffer costs a few ms.
MAP_BYTES = 4 * 1024 ** 2


def write(file, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to the seekable binary ``file`` as an aligned, digested ``.npz``."""
    with zipfile.ZipFile(file, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, value in arrays.items():
            array = np.asarray(value)
            if array.dtype.hasobject:
                raise ValueError(f"cannot store {name!r}: object arrays need pickle")
            if not array.flags.c_contiguous:  # (ascontiguousarray would make a 0-d array 1-d)
                array = array.copy(order="C")
            header = _npy_header(array)
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            info.file_size = len(header) + array.nbytes
            zip64 = info.file_size * 1.05 > zipfile.ZIP64_LIMIT  # zipfile's own rule
            start = archive.fp.tell()
            fixed = (_LOCAL_HEADER.size + len(info.filename.encode("utf-8")) + 4
                     + (_ZIP64_EXTRA if zip64 else 0))
            pad = -(start + fixed) % ALIGN
            info.extra = struct.pack("<HH", _PADDING_ID, pad) + bytes(pad)
            data = memoryview(array.reshape(-1)).cast("B") if array.size else b""
            digest = _digest(info.filename, header)  # the member's name and .npy header too
            digest.update(data)
            info.comment = _DIGEST + digest.hexdigest().encode()
            with archive.open(info, "w", force_zip64=zip64) as member:
                member.write(header)
                member.write(data)


def read(file) -> dict[str, np.ndarray]:
    """Every array of the open binary ``file``; raises (any exception) when it is damaged.

    The directory is read from the same open file as the data, so an entry renamed into
    place meanwhile by another session cannot mix two files' bytes."""
    with zipfile.ZipFile(file) as archive:
        members = archive.infolist()
    if not all(info.comment.startswith(_DIGEST) for info in members):
        return _read_plain(file)  # np.load reads it: no need to read it here first
    buffer = _contents(file)
    size = len(buffer)
    view = memoryview(buffer)
    arrays = {}
    for info in members:
        if not info.filename.endswith(".npy") or info.compress_type != zipfile.ZIP_STORED:
            raise ValueError(f"unexpected member {info.filename!r}")
        start = _data_start(buffer, info)
        end = start + info.file_size
        if end > size:
            raise ValueError(f"member {info.filename!r} runs past the end of the file")
        digest = _digest(info.filename, view[start:end]).hexdigest().encode()
        if info.comment[len(_DIGEST):] != digest:
            raise ValueError(f"member {info.filename!r} does not match its digest")
        arrays[info.filename[:-4]] = _array(buffer, start, end)
    return arrays


def _contents(file) -> np.ndarray:
    """The whole file as uint8: mapped copy-on-write where the platform allows, so its pages
    are the page cache's own until an array is written to (a fresh buffer's zero-filled pages
    cost a new process as much as the copy: 0.14 s for a 47 MB entry); else read into memory.
    The mapping outlives a rename or an unlink of the file, which is all the cache ever does
    to an entry (Windows cannot unlink a mapped file, so there it is read). Only files of
    MAP_BYTES or more: a mapping holds a file descriptor while its arrays live, and a session's
    many small entries (samples, catalogs) gain nothing from one."""
    size = file.seek(0, 2)
    if sys.platform != "win32" and size >= MAP_BYTES:
        try:
            mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
        except (OSError, ValueError, io.UnsupportedOperation):  # empty, a pipe, an in-memory file
            pass
        else:
            return np.frombuffer(mapped, np.uint8)
    file.seek(0)
    buffer = np.empty(size, np.uint8)
    view = memoryview(buffer)
    done = 0
    while done < size:
        got = file.readinto(view[done:])
        if not got:
            raise ValueError("the file ended early")
        done += got
    return buffer


def _digest(name: str, data) -> xxhash.xxh3_128:
    digest = xxhash.xxh3_128(name.encode("utf-8") + b"\0")
    digest.update(data)
    return digest


def _npy_header(array: np.ndarray) -> bytes:
    fields = np.lib.format.header_data_from_array_1_0(array)
    out = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(out, fields)
    except ValueError:  # a header over 64 KiB (a huge structured dtype): format 2.0
        out = io.BytesIO()
        np.lib.format.write_array_header_2_0(out, fields)
    return out.getvalue()


def _data_start(buffer: np.ndarray, info: zipfile.ZipInfo) -> int:
    offset = info.header_offset
    fields = _LOCAL_HEADER.unpack(buffer[offset:offset + _LOCAL_HEADER.size].tobytes())
    if fields[0] != _LOCAL_SIGNATURE:
        raise ValueError(f"member {info.filename!r} has no local header")
    name_length, extra_length = fields[-2], fields[-1]
    return offset + _LOCAL_HEADER.size + name_length + extra_length


def _array(buffer: np.ndarray, start: int, end: int) -> np.ndarray:
    """The array an .npy member holds, as a view of ``buffer`` where its data is aligned."""
    stream = io.BytesIO(buffer[start:min(end, start + 65536 + 16)].tobytes())
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version in ((2, 0), (3, 0)):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        raise ValueError(f"unknown .npy version {version}")
    if dtype.hasobject:
        raise ValueError("object arrays are not read: they would need pickle")
    data = start + stream.tell()
    count = int(np.prod(shape, dtype=np.int64))
    if data + count * dtype.itemsize != end:
        raise ValueError("an array's size does not match its member")
    array = np.frombuffer(buffer, dtype, count=count, offset=data)
    if not array.flags.aligned:  # written by another tool: a copy makes it aligned
        array = array.copy()
    return array.reshape(shape, order="F" if fortran else "C")


def _read_plain(file) -> dict[str, np.ndarray]:
    """An .npz without digests, read in full so that its zip CRCs are checked."""
    file.seek(0)
    npz = np.load(file, allow_pickle=False)
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ValueError("not an .npz archive")
    with npz:
        return {name: npz[name] for name in npz.files}
