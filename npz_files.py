"""Safe .npz files: byte-deterministic uncompressed writes, pickle-free reads, memory mapping.

The encoders and the training file are plain zip archives of .npy members stored without
compression, with fixed timestamps, so the same arrays always give the same bytes. Because a
stored member is the .npy file verbatim, it can be memory-mapped where it lies inside the
archive (``np.load(mmap_mode=...)`` does that only for a bare .npy): a 20M-row training file
then opens in milliseconds and its pages are shared between processes that read it.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path
from typing import BinaryIO

import numpy as np

from atomic_files import atomic_write

# A zip local file header: signature, then fixed fields; the name and extra-field lengths sit
# at bytes 26..29 (APPNOTE.TXT 4.3.7).
LOCAL_HEADER = struct.Struct("<4s22xHH")
LOCAL_SIGNATURE = b"PK\x03\x04"


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Atomically write an uncompressed .npz whose bytes depend only on the arrays."""

    def write(file: BinaryIO) -> None:
        with zipfile.ZipFile(file, mode="w", compression=zipfile.ZIP_STORED) as archive:
            for name, array in arrays.items():
                info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                with archive.open(info, mode="w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.require(array, requirements="C"),
                                              allow_pickle=False)

    atomic_write(path, write)


def read_npz_arrays(path: Path, mmap: bool = False) -> dict[str, np.ndarray]:
    """Every array of an .npz file, never unpickling (an object array is a ValueError).

    With ``mmap``, non-empty members stored uncompressed are mapped copy-on-write (writes
    stay private to the process, the file is never changed) instead of read; the zip CRC is
    then not checked, so callers validate the arrays' contents as they do anyway.
    """
    path = Path(path)
    if not mmap:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    arrays: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as archive, path.open("rb") as file:
        for info in archive.infolist():
            name = info.filename.removesuffix(".npy")
            mapped = (_map_member(path, file, info)
                      if info.compress_type == zipfile.ZIP_STORED else None)
            if mapped is None:
                with archive.open(info) as member:
                    mapped = np.lib.format.read_array(member, allow_pickle=False)
            arrays[name] = mapped
    return arrays


def _map_member(path: Path, file: BinaryIO, info: zipfile.ZipInfo) -> np.ndarray | None:
    """A stored .npy member mapped in place, or None when it is empty (nothing to map)."""
    file.seek(info.header_offset)
    signature, name_length, extra_length = LOCAL_HEADER.unpack(file.read(LOCAL_HEADER.size))
    if signature != LOCAL_SIGNATURE:
        raise ValueError(f"{info.filename}: bad zip local header")
    start = info.header_offset + LOCAL_HEADER.size + name_length + extra_length
    file.seek(start)
    version = np.lib.format.read_magic(file)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(file)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(file)
    else:
        raise ValueError(f"{info.filename}: unsupported .npy version {version}")
    if dtype.hasobject:
        raise ValueError(f"{info.filename}: object arrays are refused (they need pickle)")
    offset = file.tell()
    count = int(np.prod(shape, dtype=np.int64))
    if offset + count * dtype.itemsize > start + info.file_size:
        raise ValueError(f"{info.filename}: array data runs past the member's end")
    if count == 0:
        return None
    mapped = np.memmap(path, dtype=dtype, mode="c", offset=offset, shape=shape,
                       order="F" if fortran else "C")
    return np.asarray(mapped)
