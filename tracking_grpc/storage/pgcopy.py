"""PostgreSQL's binary formats built and read with numpy, without a loop per row:
binary COPY streams, and one-dimensional arrays sent as binary query parameters.

Every column is fixed width and never NULL (NaN stands for a missing float), so a
whole COPY stream is one numpy structured array: a 2-byte field count, then per
field a 4-byte length and the big-endian value. An array parameter is the same
idea with one field: a header, then a 4-byte length and the value per element.

>>> data = encode_rows([(np.array([1, 2]), ">i8"), (np.array([0.5, 1.5]), ">f8")])
>>> decode_rows(data, [">i8", ">f8"])["f0"].tolist()
[1, 2]
>>> BinaryArray.of(np.array([7, 8]), ">i4").oid  # integer[]
1007
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from psycopg import adapt, pq

SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
HEADER = SIGNATURE + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")
TRAILER = (-1).to_bytes(2, "big", signed=True)

# numpy kind -> (element type oid, array type oid) of the PostgreSQL type.
ARRAY_OIDS = {
    ">i2": (21, 1005),  # smallint
    ">i4": (23, 1007),  # integer
    ">i8": (20, 1016),  # bigint
    ">f4": (700, 1021),  # real
    ">f8": (701, 1022),  # double precision
}
ARRAY_HEADER = struct.Struct(">iiiii")  # dimensions, has nulls, element oid, n, lower


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


@dataclass(frozen=True, slots=True)
class BinaryArray:
    """A one-dimensional array query parameter, already in PostgreSQL's binary
    format; psycopg sends it as it is once :class:`BinaryArrayDumper` is
    registered on the connection."""

    data: bytes
    oid: int  # of the array type

    @classmethod
    def of(cls, values: np.ndarray, kind: str) -> BinaryArray:
        element_oid, array_oid = ARRAY_OIDS[kind]
        n = len(values)
        if n == 0:  # no dimensions at all
            return cls(ARRAY_HEADER.pack(0, 0, element_oid, 0, 0)[:12], array_oid)
        body = np.empty(n, dtype=[("len", ">i4"), ("value", kind)])
        body["len"] = np.dtype(kind).itemsize
        body["value"] = values
        head = ARRAY_HEADER.pack(1, 0, element_oid, n, 1)
        return cls(head + body.tobytes(), array_oid)


class BinaryArrayDumper(adapt.Dumper):
    """Dumps a :class:`BinaryArray` unchanged, typed with its own array oid."""

    format = pq.Format.BINARY

    def get_key(self, obj: BinaryArray, format: adapt.PyFormat) -> Any:
        return (BinaryArray, obj.oid)

    def upgrade(self, obj: BinaryArray, format: adapt.PyFormat) -> adapt.Dumper:
        dumper = BinaryArrayDumper(self.cls)
        dumper.connection = self.connection
        dumper.oid = obj.oid
        return dumper

    def dump(self, obj: BinaryArray) -> bytes:
        return obj.data
