"""Reading rows of tensors from a model directory's safetensors files without loading them:
the index (tensor name → file), each file's header, and plain reads of the bytes of some rows."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from pipeline.models.common import unreadable_weights
from pipeline.storage.errors import describe

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}
"""The safetensors dtype codes this reader knows, as torch dtypes."""


def safetensors_index(p: Path, what: str) -> dict[str, Path]:
    """Tensor name → the ``.safetensors`` file holding it (``model.safetensors`` or the files
    of ``model.safetensors.index.json``) of the ``what`` (student/teacher) in ``p``.

    Raises:
        FileNotFoundError: no safetensors weights in ``p``.
        ValueError: the weight file or the index is truncated or corrupt (named).
    """
    index = p / "model.safetensors.index.json"
    single = p / "model.safetensors"
    try:
        if index.is_file():
            return {name: p / f for name, f in json.loads(index.read_text())["weight_map"].items()}
        if not single.is_file():
            raise FileNotFoundError(f"no safetensors weights in {p}")
        from safetensors import safe_open

        with safe_open(str(single), "pt") as f:
            return {name: single for name in f.keys()}
    except FileNotFoundError:
        raise
    except Exception as e:  # SafetensorError (truncated header), JSONDecodeError, KeyError
        raise unreadable_weights(what, index if index.is_file() else single, describe(e)) from e


def _header(fh, file: Path, what: str) -> tuple[dict, int]:
    """The JSON header of an open ``.safetensors`` file and the byte offset where its data
    starts (format: little-endian u64 header length, the header, then the tensors' bytes,
    each at ``data_offsets`` relative to the data start; huggingface/safetensors README).

    Raises:
        ValueError: the header is truncated or not JSON, or the file ends before the last
            tensor's bytes (truncated); the ``what`` (student/teacher) and the file are named.
    """
    raw = fh.read(8)
    n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
    size = os.fstat(fh.fileno()).st_size
    if not 0 < n <= size - 8:
        raise unreadable_weights(what, file, f"header length {n}, file {size} bytes")
    try:
        header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        end = max((int(m["data_offsets"][1]) for m in header.values()), default=0)
    except (ValueError, UnicodeDecodeError, AttributeError, TypeError, KeyError, IndexError) as e:
        raise unreadable_weights(what, file, f"header: {type(e).__name__}: {e}") from None
    if 8 + n + end > size:
        raise unreadable_weights(what, file, f"tensor data ends at byte {8 + n + end}, file {size} bytes")
    return header, 8 + n


class CheckpointFiles:
    """The safetensors files of one model directory, opened for reading rows of their tensors
    (a context manager: the files are closed on exit).

    Every file's header is read and checked when the object is made (before any model is
    sharded); the tensors' bytes are read only by :meth:`read_rows`, one seek and one read per
    call, nothing memory-mapped (mapped pages would count against the rank's memory).

    Attributes:
        files: tensor name → its file.
    Raises (constructor):
        FileNotFoundError: no safetensors weights in the directory.
        ValueError: a truncated or corrupt file or index (named), a tensor of the index missing
            from its file (named).
    """

    def __init__(self, p: Path, what: str):
        self.what = what
        self.files = safetensors_index(p, what)
        self._headers: dict[Path, tuple[dict, int]] = {}
        self._handles: dict[Path, object] = {}
        for file in sorted(set(self.files.values())):
            with open(file, "rb") as fh:
                self._headers[file] = _header(fh, file, what)
        for name, file in self.files.items():
            if name not in self._headers[file][0]:
                raise unreadable_weights(what, file, f"tensor {name} of the index is not in the file")

    def __enter__(self) -> "CheckpointFiles":
        return self

    def __exit__(self, *exc) -> None:
        for fh in self._handles.values():
            fh.close()
        self._handles.clear()

    def shape(self, name: str) -> tuple[int, ...]:
        """The full shape of checkpoint tensor ``name``."""
        return tuple(self._headers[self.files[name]][0][name]["shape"])

    def read_rows(self, name: str, start: int, rows: int | None = None) -> torch.Tensor:
        """Rows ``[start, start + rows)`` along dim 0 of tensor ``name`` (all rows from
        ``start`` when ``rows`` is None; a 0-dim tensor whole), in the file's dtype.

        Raises:
            ValueError: an unknown dtype, rows outside the tensor, or the file ends before the
                rows (truncated); the file and the tensor are named.
        """
        file = self.files[name]
        header, data_start = self._headers[file]
        meta = header[name]
        dtype = SAFETENSORS_DTYPES.get(meta["dtype"])
        if dtype is None:
            raise ValueError(f"{self.what} {file}: tensor {name} has dtype {meta['dtype']}, not supported")
        full = list(meta["shape"])
        if not full:
            start, shape = 0, torch.Size([])
        else:
            rows = full[0] - start if rows is None else rows
            shape = torch.Size([rows, *full[1:]])
        row_bytes = dtype.itemsize * int(torch.Size(full[1:]).numel())
        begin, end = meta["data_offsets"]
        lo = begin + start * row_bytes
        n_bytes = int(shape.numel()) * dtype.itemsize
        if start < 0 or lo + n_bytes > end:
            raise ValueError(f"{self.what} {file}: tensor {name}: rows {start}..{start + shape[0]} outside its "
                             f"{full[0]} rows (a shard layout this loader does not know)")
        fh = self._handles.get(file)
        if fh is None:
            fh = self._handles[file] = open(file, "rb")
        fh.seek(data_start + lo)
        buf = bytearray(n_bytes)
        if fh.readinto(buf) != n_bytes:
            raise unreadable_weights(self.what, file, f"tensor {name} cut short")
        return torch.frombuffer(buf, dtype=dtype).reshape(shape) if n_bytes else torch.empty(shape, dtype=dtype)
