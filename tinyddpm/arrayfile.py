"""Array files from outside, read without trusting them; files written atomically.

An .npz is a zip archive of .npy files, and every .npy starts with a short
text header declaring its array's dtype and shape. `np.load` believes that
header: it allocates what the header declares and inflates whatever the zip
member holds, so a 1 KB file can ask for a 4 TiB array and a small member can
inflate to gigabytes. Reading here takes two steps instead:

1. `ArrayFile(path)` opens the archive and reads only the header of each
   member (inflating its first few hundred bytes): every entry's dtype and
   shape, and no data.
2. The caller checks those against what it expects (names, dtypes, shapes,
   sizes), and only then reads the entries it wants: whole with `read`, or a
   block of rows at a time with `read_rows`. Each read must match the size
   the header declared and the zip member's checksum.

Nothing is unpickled: a dtype that holds Python objects is refused from its
header. Every problem is an `ArrayFileError` whose one-line message does not
name the file, so that each reader can add the path and its own error type.

`write_atomically` writes any file through a temporary one in the same
folder, renamed over the target only when complete.
"""
from __future__ import annotations

import io
import math
import os
import secrets
import socket
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["ArrayFileError", "ArrayInfo", "ArrayFile", "write_atomically"]

NPY_MAGIC = b"\x93NUMPY"
MAX_HEADER_BYTES = 10_000                      # numpy's own limit on an .npy header
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")   # a zip with members, an empty zip
# What the members of a hostile zip can make these libraries raise while
# they are read, besides OSError: each becomes an ArrayFileError.
_DAMAGE = (zipfile.BadZipFile, zlib.error, EOFError, ValueError, TypeError, SyntaxError,
           RecursionError, OverflowError, struct.error, NotImplementedError, KeyError)


class ArrayFileError(ValueError):
    """A .npy/.npz file that cannot be read as declared; the message is one line without the path."""


@dataclass(frozen=True)
class ArrayInfo:
    """What a .npy header declares: nothing of the data has been read."""

    dtype: np.dtype
    shape: tuple
    fortran_order: bool

    @property
    def size(self):
        return math.prod(self.shape)

    @property
    def nbytes(self):
        return self.size * self.dtype.itemsize


def _read_header(f):
    """The ArrayInfo of the .npy stream `f`, leaving `f` at the first byte of the data."""
    start = f.read(len(NPY_MAGIC) + 2)            # the magic string, then the format version
    if len(start) < len(NPY_MAGIC) + 2 or not start.startswith(NPY_MAGIC):
        raise ArrayFileError("not an .npy array")
    version = (start[-2], start[-1])
    # Version 3 only adds UTF-8 names of structured fields, which no reader here accepts.
    readers = {(1, 0): (2, np.lib.format.read_array_header_1_0),
               (2, 0): (4, np.lib.format.read_array_header_2_0)}
    if version not in readers:
        raise ArrayFileError(f"unsupported .npy format version {version[0]}.{version[1]}")
    length_bytes, parse = readers[version]
    length = f.read(length_bytes)
    header_bytes = int.from_bytes(length, "little")
    # Checked before the header is read: a version 2 header may declare 4 GB.
    if len(length) < length_bytes or header_bytes > MAX_HEADER_BYTES:
        raise ArrayFileError(f"damaged .npy header (declares {header_bytes:,} bytes)")
    header = f.read(header_bytes)
    if len(header) < header_bytes:
        raise ArrayFileError("truncated .npy header")
    try:
        shape, fortran_order, dtype = parse(io.BytesIO(length + header))
    except Exception as exc:  # noqa: BLE001
        # NumPy parses the header's text with ast and, for headers written by Python 2,
        # tokenize: on hostile text those raise more kinds of errors than ValueError
        # (SyntaxError, tokenize.TokenError, ...). Each means a damaged header.
        raise ArrayFileError(f"damaged .npy header ({type(exc).__name__}: {_first_line(exc)})") from None
    if dtype.hasobject:
        raise ArrayFileError(f"holds Python objects (dtype {dtype}), which are refused: "
                             "loading them would run pickle")
    if dtype.itemsize == 0:
        raise ArrayFileError(f"dtype {dtype} has no size")
    if any(n < 0 for n in shape):
        raise ArrayFileError(f"declares the impossible shape {shape}")
    return ArrayInfo(dtype, tuple(shape), fortran_order)


class ArrayFile:
    """An open .npz archive (or, with allow_npy, a single .npy file), its entries known, no data read.

    source: a path, or a seekable binary file (e.g. io.BytesIO), which is
    then closed with this. `entries` maps each name (the member's name
    without ".npy") to its ArrayInfo, in the archive's order; a plain .npy
    holds one entry, "arr_0", the name np.savez gives an unnamed array. Use
    as a context manager.
    """

    def __init__(self, source, allow_npy=False, max_entries=10_000):
        self._zip = None
        self.members = {}                  # name -> the zip member holding it
        if hasattr(source, "read"):
            self._file = source
        else:
            try:
                self._file = open(source, "rb")
            except OSError as exc:
                raise ArrayFileError(exc.strerror or str(exc)) from None
        try:
            self.entries = self._read_entries(allow_npy, max_entries)
        except BaseException:
            self.close()
            raise

    def _read_entries(self, allow_npy, max_entries):
        start = self._file.read(len(NPY_MAGIC))
        self._file.seek(0)
        if start.startswith(NPY_MAGIC) and allow_npy:
            try:
                info = _read_header(self._file)
            except OSError as exc:
                raise ArrayFileError(f"cannot read the file ({_first_line(exc)})") from None
            self._data_start = self._file.tell()
            held = self._file.seek(0, os.SEEK_END) - self._data_start
            _check_size(info, held)
            return {"arr_0": info}
        if start.startswith(NPY_MAGIC):
            raise ArrayFileError("an .npy array, not an .npz archive")
        if not start.startswith(ZIP_MAGICS):
            raise ArrayFileError("not an .npz archive (a zip of .npy arrays)")
        try:
            self._zip = zipfile.ZipFile(self._file)
            members = self._zip.infolist()
        except (OSError, *_DAMAGE) as exc:
            raise ArrayFileError(f"damaged zip archive ({_first_line(exc)})") from None
        if len(members) > max_entries:
            raise ArrayFileError(f"holds {len(members)} entries, more than the {max_entries} expected")
        entries = {}
        for member in members:
            name = member.filename
            if not name.endswith(".npy"):
                raise ArrayFileError(f"entry {name!r} is not an .npy array")
            name = name[:-len(".npy")]
            if name in entries:
                raise ArrayFileError(f"entry {name!r} appears twice")
            # numpy writes only these two; others (bzip2, lzma) could inflate without a bound.
            if member.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise ArrayFileError(f"entry {name!r} uses zip compression method {member.compress_type}; "
                                     "only stored and deflated entries are read")
            if member.flag_bits & 0x1:
                raise ArrayFileError(f"entry {name!r} is encrypted")
            try:
                with self._zip.open(member) as f:
                    info = _read_header(f)
                    header_bytes = f.tell()
            except ArrayFileError as exc:
                raise ArrayFileError(f"entry {name!r}: {exc}") from None
            except (OSError, *_DAMAGE) as exc:
                raise ArrayFileError(f"entry {name!r} is damaged ({_first_line(exc)})") from None
            try:
                _check_size(info, member.file_size - header_bytes)
            except ArrayFileError as exc:
                raise ArrayFileError(f"entry {name!r}: {exc}") from None
            entries[name] = info
            self.members[name] = member
        return entries

    def read(self, name):
        """The whole array `name`, after its data proved to be what the header declared.

        Allocates the declared size at once: check `entries[name]` against what you expect first.
        """
        info = self.entries[name]
        with self._open_data(name) as f:
            data = _read_exactly(f, info.nbytes, name)
            _check_end(f, name)
        order = "F" if info.fortran_order else "C"
        return np.frombuffer(data, dtype=info.dtype).reshape(info.shape, order=order)

    def read_rows(self, name, rows):
        """The array `name` in blocks of at most `rows` rows (along axis 0), read one at a time.

        Memory stays at one block whatever the array's size. Needs C order,
        the order np.save writes unless handed a Fortran-ordered array.
        """
        info = self.entries[name]
        if info.fortran_order or not info.shape:
            raise ArrayFileError(f"entry {name!r} is not stored row by row (Fortran order or a scalar); "
                                 "save it with np.ascontiguousarray")
        row_shape = info.shape[1:]
        row_bytes = math.prod(row_shape) * info.dtype.itemsize
        with self._open_data(name) as f:
            for start in range(0, info.shape[0], rows):
                count = min(rows, info.shape[0] - start)
                data = _read_exactly(f, count * row_bytes, name)
                yield np.frombuffer(data, dtype=info.dtype).reshape((count, *row_shape))
            _check_end(f, name)

    def _open_data(self, name):
        """A stream positioned at the first data byte of entry `name`."""
        if self._zip is None:
            self._file.seek(self._data_start)
            return _Borrowed(self._file)
        try:
            f = self._zip.open(self.members[name])
            _read_header(f)
        except ArrayFileError:
            raise
        except (OSError, *_DAMAGE) as exc:
            raise ArrayFileError(f"entry {name!r} is damaged ({_first_line(exc)})") from None
        return f

    def close(self):
        if self._zip is not None:
            self._zip.close()
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Borrowed:
    """The archive's own file, handed out by _open_data: leaving the `with` must not close it."""

    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self.f

    def __exit__(self, *exc):
        pass


def _check_size(info, held):
    if held != info.nbytes:
        raise ArrayFileError(f"the header declares {info.dtype} {info.shape} ({info.nbytes:,} bytes) "
                             f"but {held:,} bytes of data follow")


def _read_exactly(f, count, name):
    """count bytes of f as a writable buffer; a short read is a damaged entry."""
    data = bytearray(count)
    view = memoryview(data)
    got = 0
    try:
        while got < count:
            n = f.readinto(view[got:])
            if not n:
                break
            got += n
    except (OSError, *_DAMAGE) as exc:
        raise ArrayFileError(f"entry {name!r} is damaged ({_first_line(exc)})") from None
    if got != count:
        raise ArrayFileError(f"entry {name!r} is truncated: {got:,} of {count:,} bytes")
    return data


def _check_end(f, name):
    """Read past the last byte: this is when zipfile compares the member's CRC-32."""
    try:
        extra = f.read(1)
    except (OSError, *_DAMAGE) as exc:
        raise ArrayFileError(f"entry {name!r} is damaged ({_first_line(exc)})") from None
    if extra:
        raise ArrayFileError(f"entry {name!r} has bytes after its declared data")


def _first_line(exc, limit=200):
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


# =============================================================================
# Writing
# =============================================================================

def write_atomically(path, write):
    """Write `path` through a temporary file in its folder, renamed over it once complete.

    write(f) writes the contents to the binary file f. The rename is atomic,
    so a crash or Ctrl-C leaves either the old file or the new one, never a
    mix. The data and the rename are fsynced, so a power cut does not undo
    them. The file gets the mode that open() would give it (0o666 less the
    umask). After a successful write, temporary files of `path` that killed
    writers left behind are removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, fd = _create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Also on KeyboardInterrupt: the old file is untouched; drop the partial one.
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    remove_stale_temporaries(path)


# A temporary file is named .NAME.PID@HOST.RANDOM.tmp: the writer's process
# id and machine let a later writer tell whether it is still being written
# (the folder may be shared between machines, whose process ids differ). Its
# name does not end in the target's suffix, so nothing takes it for the file.

def _temporary_prefix(path):
    return f".{path.name}."


def _create_temporary(path):
    owner = f"{os.getpid()}@{socket.gethostname()}"
    while True:
        tmp = path.with_name(f"{_temporary_prefix(path)}{owner}.{secrets.token_hex(4)}.tmp")
        try:
            # O_EXCL: never write into a file that someone else created under this name.
            return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue


def remove_stale_temporaries(path):
    """Delete the temporary files of `path` whose writer, on this machine, has died."""
    path = Path(path)
    prefix = _temporary_prefix(path)
    host = socket.gethostname()
    for tmp in path.parent.glob(f"{prefix}*.tmp"):
        owner = tmp.name[len(prefix):-len(".tmp")].rpartition(".")[0]
        pid, _, its_host = owner.partition("@")
        if pid.isdigit() and its_host == host and int(pid) != os.getpid() and not _is_running(int(pid)):
            tmp.unlink(missing_ok=True)


def _is_running(pid):
    if pid <= 0:
        return True   # not a process id: os.kill would signal a whole group; leave the file
    try:
        os.kill(pid, 0)                # signal 0 only asks whether the process exists
    except ProcessLookupError:
        return False
    except OSError:
        return True                    # it exists but belongs to someone else (EPERM)
    return True


def _fsync_directory(directory):
    """Make a rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
