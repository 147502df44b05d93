"""Zero-copy views of a feature file's `feature` column, straight from its Parquet pages.

The store writes `feature` as a required fixed_size_binary column, PLAIN and uncompressed
(`pipeline.feature_file.parquet_bytes`): every data page then holds its rows' float16 bytes
back to back after a small Thrift header, exactly the (rows, k) array the scan wants.
Decoding it through Arrow copies all of it once more; reading the page headers and viewing the
bytes in place does not.

`column_views` walks a column chunk's pages (Parquet format: each page is a Thrift
compact-protocol PageHeader followed by its body) and returns None - the caller decodes through
Arrow instead - for anything but that layout: a nullable column, a dictionary page, any
compression or encoding other than PLAIN, a page whose sizes do not add up. The views point into
the file's buffer (which they keep alive); a page body that is not aligned for its dtype is
viewed unaligned (numpy reads it; torch callers copy such a page).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

PLAIN = 0  # parquet Encoding
DATA_PAGE, DICTIONARY_PAGE, DATA_PAGE_V2 = 0, 2, 3  # parquet PageType


class _MalformedError(ValueError):
    """A header that does not parse: fall back to Arrow, which names the damage."""


class _Compact:
    """The few Thrift compact-protocol reads a PageHeader needs (and skips of the rest)."""

    def __init__(self, data: memoryview, pos: int, end: int) -> None:
        self.data, self.pos, self.end = data, pos, end

    def byte(self) -> int:
        if self.pos >= self.end:
            raise _MalformedError("header runs past the column chunk")
        value = self.data[self.pos]
        self.pos += 1
        return value

    def varint(self) -> int:
        shift = result = 0
        while True:
            b = self.byte()
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7
            if shift > 63:
                raise _MalformedError("varint longer than 64 bits")

    def zigzag(self) -> int:
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def skip(self, kind: int) -> None:
        if kind in (1, 2):  # bool: the value is in the type nibble
            return
        if kind == 3:
            self.byte()
        elif kind in (4, 5, 6):
            self.varint()
        elif kind == 7:
            self.pos += 8
        elif kind == 8:
            size = self.varint()  # read before moving: `pos += varint()` would lose the read
            self.pos += size
        elif kind in (9, 10):  # list, set
            head = self.byte()
            size = head >> 4 if head >> 4 != 15 else self.varint()
            for _ in range(size):
                self.skip_element(head & 0x0F)
        elif kind == 11:  # map
            size = self.varint()
            if size:
                types = self.byte()
                for _ in range(size):
                    self.skip_element(types >> 4)
                    self.skip_element(types & 0x0F)
        elif kind == 12:
            self.struct()
        else:
            raise _MalformedError(f"unknown Thrift type {kind}")
        if self.pos > self.end:
            raise _MalformedError("header runs past the column chunk")

    def skip_element(self, kind: int) -> None:
        if kind in (1, 2):  # a bool inside a collection takes one byte
            self.byte()
        else:
            self.skip(kind)

    def struct(self, wanted: dict[int, str] | None = None) -> dict[int, object]:
        """Read a struct: integer fields named in `wanted` (by id) and nested structs are
        returned by id; everything else is skipped."""
        fields: dict[int, object] = {}
        last = 0
        while True:
            head = self.byte()
            if head == 0:
                return fields
            kind, delta = head & 0x0F, head >> 4
            last = last + delta if delta else self.zigzag()
            if wanted is not None and last in wanted:
                if kind == 12:
                    fields[last] = self.struct(_NESTED[wanted[last]])
                elif kind in (4, 5, 6):
                    fields[last] = self.zigzag()
                elif kind in (1, 2):
                    fields[last] = kind == 1
                else:
                    self.skip(kind)
            else:
                self.skip(kind)


# field ids of the parts of PageHeader the scan reads (parquet.thrift)
_PAGE_HEADER = {1: "type", 2: "uncompressed", 3: "compressed", 5: "v1", 7: "dict", 8: "v2"}
_NESTED: dict[str, dict[int, str] | None] = {
    "v1": {1: "num_values", 2: "encoding"},
    "v2": {1: "num_values", 2: "num_nulls", 3: "num_rows", 4: "encoding", 5: "dl", 6: "rl", 7: "c"},
    "dict": None,
}


def _page_values(reader: _Compact, width: int) -> tuple[int, int, int]:
    """Parse one page header -> (body start, body size, rows) of a PLAIN required data page."""
    header = reader.struct(_PAGE_HEADER)
    kind, size = header.get(1), header.get(3)
    if header.get(2) != size or not isinstance(size, int) or size < 0:
        raise _MalformedError("compressed page")
    if kind == DATA_PAGE and isinstance(header.get(5), dict):
        info = header[5]
        rows, skip = info.get(1), 0
    elif kind == DATA_PAGE_V2 and isinstance(header.get(8), dict):
        info = header[8]
        rows = info.get(1)
        if info.get(2, 0) or info.get(3) != rows or info.get(7, True):
            raise _MalformedError("nulls, repeated values or a compressed v2 page")
        skip = info.get(5, 0) + info.get(6, 0)
    else:
        raise _MalformedError(f"page type {kind} in a dictionary-free column")
    if info.get(2 if kind == DATA_PAGE else 4) != PLAIN or not isinstance(rows, int):
        raise _MalformedError("not PLAIN")
    if skip != 0 or rows * width != size:
        raise _MalformedError("page body is not rows x width bytes")
    return reader.pos, size, rows


_FIXED = {pa.float32(): np.float32, pa.float64(): np.float64, pa.int64(): np.int64}


def _layout(field: pa.Field) -> tuple[np.dtype, int, int] | None:
    """(value dtype, bytes per row, values per row) of a column readable in place, or None."""
    if field.nullable:
        return None
    if pa.types.is_fixed_size_binary(field.type):
        dtype = (field.metadata or {}).get(b"dtype")
        if dtype is None:
            return None
        dtype, width = np.dtype(dtype.decode()), field.type.byte_width
        if width % dtype.itemsize:
            return None
        return dtype, width, width // dtype.itemsize
    if field.type in _FIXED:
        dtype = np.dtype(_FIXED[field.type])
        return dtype, dtype.itemsize, 1
    return None


def column_views(
    data: bytes | pa.Buffer, parquet: pq.ParquetFile, *names: str
) -> list[list[np.ndarray] | None]:
    """Per name, zero-copy views of that column of a Parquet file's bytes, one per data page in
    row order: (rows_i, k) for a fixed_size_binary column with field metadata `dtype`, (rows_i,)
    for float32/float64/int64. None - decode through Arrow instead - unless the column is
    required, PLAIN and uncompressed without a dictionary (the store's `feature`,
    `feature_norm` and `row`)."""
    schema, meta = parquet.schema_arrow, parquet.metadata
    paths = [meta.schema.column(j).path for j in range(meta.num_columns)]
    memory = memoryview(data).cast("B")
    return [_views(data, memory, meta, schema, paths, name) for name in names]


def _views(
    data: bytes | pa.Buffer,
    memory: memoryview,
    meta: pq.FileMetaData,
    schema: pa.Schema,
    paths: list[str],
    name: str,
) -> list[np.ndarray] | None:
    if name not in schema.names or paths.count(name) != 1:
        return None
    layout = _layout(schema.field(name))
    if layout is None:
        return None
    dtype, width, per_row = layout
    column = paths.index(name)
    views, total = [], 0
    try:
        for g in range(meta.num_row_groups):
            chunk = meta.row_group(g).column(column)
            if chunk.compression != "UNCOMPRESSED" or chunk.has_dictionary_page:
                return None
            start = chunk.data_page_offset
            end = start + chunk.total_compressed_size
            if start < 0 or end > len(memory):
                return None
            reader, rows_left = _Compact(memory, start, end), chunk.num_values
            while rows_left > 0:
                body, size, rows = _page_values(reader, width)
                if body + size > end or rows > rows_left:
                    return None
                if rows:
                    values = np.frombuffer(data, dtype, rows * per_row, body)
                    views.append(values.reshape(rows, per_row) if per_row > 1 else values)
                reader.pos, rows_left, total = body + size, rows_left - rows, total + rows
    except _MalformedError:
        return None
    return views if total == meta.num_rows else None
