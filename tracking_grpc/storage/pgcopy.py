"""PostgreSQL binary COPY rows built and read with numpy, without a loop per row.

Every column is fixed width and never NULL (NaN stands for a missing float), so a
whole COPY stream is one numpy structured array: a 2-byte field count, then per
field a 4-byte length and the big-endian value.

>>> data = encode_rows([(np.array([1, 2]), ">i8"), (np.array([0.5, 1.5]), ">f8")])
>>> decode_rows(data, [">i8", ">f8"])["f0"].tolist()
[1, 2]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
HEADER = SIGNATURE + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")
TRAILER = (-1).to_bytes(2, "big", signed=True)


def row_dtype(types: Sequence[str]) -> np.dtype:
    """The structured dtype of one binary COPY tuple with the given field types."""
    fields: list[tuple[str, str]] = [("count", ">i2")]
    for i, kind in enumerate(types):
        fields += [(f"len{i}", ">i4"), (f"f{i}", kind)]
    return np.dtype(fields)


def encode_rows(columns: Sequence[tuple[np.ndarray, str]]) -> bytes:
    """A complete binary COPY stream (header, tuples, trailer) of the columns."""
    dtype = row_dtype([kind for _, kind in columns])
    n = len(columns[0][0]) if columns else 0
    rows = np.empty(n, dtype=dtype)
    rows["count"] = len(columns)
    for i, (values, kind) in enumerate(columns):
        rows[f"len{i}"] = np.dtype(kind).itemsize
        rows[f"f{i}"] = values
    return HEADER + rows.tobytes() + TRAILER


def decode_rows(data: bytes, types: Sequence[str]) -> np.ndarray:
    """Tuples of a binary COPY TO stream as a structured array (fields f0, f1, ...)."""
    if not data.startswith(SIGNATURE):
        raise ValueError("not a binary COPY stream")
    extension = int.from_bytes(data[15:19], "big")
    start = len(HEADER) + extension
    body = data[start : len(data) - len(TRAILER)]
    dtype = row_dtype(types)
    if len(body) % dtype.itemsize:
        raise ValueError("COPY stream has a NULL or variable-width field")
    return np.frombuffer(body, dtype=dtype)
