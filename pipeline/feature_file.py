"""One feature shard's Parquet file: its columns, its layout and reading it back.

    key, shard, row, caption, metadata   snappy; shard, caption, metadata dictionary-encoded
    feature        fixed_size_binary(k * itemsize): row-major float16|float32 (field metadata
                   `dtype`), PLAIN, no compression, no dictionary: decodes at memory-copy speed
    feature_norm   float32 ||phi_i||_2 of the stored values (the screen's error bound)
    feature_pad    layout only: puts the feature page's values on an ALIGN-byte boundary, so
                   the scan views them in place (`pipeline.scan.pages`)

Files of older stores hold `feature` as fixed_size_list<float16|float32>[k] without
`feature_norm`; `feature_view` reads both layouts. The store's paths, markers and checks are
`pipeline.store`'s.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import StoreCorruptError

FEATURE_COLUMNS = ("feature", "feature_norm")  # written PLAIN: no dictionary, no compression
UNIQUE_COLUMNS = ("key", "row")  # one value per row: a dictionary would only cost
UNCOMPRESSED_COLUMNS = ("row", *FEATURE_COLUMNS)  # read in place by the scan (pipeline.scan.pages)


def feature_table(shard: str, columns: dict, features: np.ndarray) -> pa.Table:
    """columns {row (n,), key, caption, metadata (n,)} + features (n, k) stored dtype -> table:
    feature fixed_size_binary(k * itemsize) (n,) + feature_norm (n,) float32."""
    n, k = features.shape
    phi = np.ascontiguousarray(features)
    width = k * phi.dtype.itemsize
    feature = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(width), n, [None, pa.py_buffer(phi.reshape(-1).view(np.uint8))]
    )
    norms = np.linalg.norm(phi.astype(np.float64), axis=1).astype(np.float32)  # (n,)
    schema = pa.schema(
        [
            ("key", pa.string()),
            ("shard", pa.string()),
            pa.field("row", pa.int64(), False),
            ("caption", pa.string()),
            ("metadata", pa.string()),
            pa.field("feature", pa.binary(width), False, {"dtype": phi.dtype.name}),
            pa.field("feature_norm", pa.float32(), False),
        ]
    )
    arrays = [
        pa.array(list(columns["key"]), pa.string()),
        pa.array([shard] * n, pa.string()),
        pa.array(columns["row"], pa.int64()),
        pa.array(list(columns["caption"]), pa.string()),
        pa.array(list(columns["metadata"]), pa.string()),
        feature,
        pa.array(norms),
    ]
    return pa.Table.from_arrays(arrays, schema=schema)


def feature_view(table: pa.Table | pa.RecordBatch) -> np.ndarray:
    """The `feature` column -> (n, k) read-only array in the stored dtype: a zero-copy view of
    the fixed_size_binary layout (of one chunk; several are combined first), or the values of
    an older store's fixed_size_list column."""
    column = table.column("feature")
    if isinstance(column, pa.ChunkedArray):
        column = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    if pa.types.is_fixed_size_list(column.type):  # older stores
        k = column.type.list_size
        values = column.flatten().to_numpy(zero_copy_only=False)  # honours slices
        return values.reshape(-1, k)
    field = table.schema.field("feature")
    dtype = (field.metadata or {}).get(b"dtype")
    if not pa.types.is_fixed_size_binary(column.type) or dtype is None or column.null_count:
        raise StoreCorruptError(
            f"the feature column ({column.type}, metadata {field.metadata}, "
            f"{column.null_count} nulls) is not a feature-store layout: expected "
            "fixed_size_binary with field metadata `dtype` and no nulls, or "
            "fixed_size_list<float16|float32>; delete the shard's done-marker and run "
            "`ctrak reindex` to rewrite it"
        )
    dtype = np.dtype(dtype.decode())
    n, width = len(column), column.type.byte_width
    data = column.buffers()[1]
    if n == 0 or data is None:
        return np.empty((n, width // dtype.itemsize), dtype)
    view = np.frombuffer(data, dtype, n * width // dtype.itemsize, column.offset * width)
    return view.reshape(n, width // dtype.itemsize)


def table_features(table: pa.Table | pa.RecordBatch) -> np.ndarray:
    """The `feature` column -> (n, k) array in the stored dtype (a writable copy; both
    layouts)."""
    return feature_view(table).copy()


def feature_norms(table: pa.Table | pa.RecordBatch) -> np.ndarray | None:
    """||phi_i||_2 (n,) float32 as stored, or None for an older store without the column."""
    if "feature_norm" not in table.schema.names:
        return None
    return np.asarray(table.column("feature_norm"), np.float32)


PAD_COLUMN = "feature_pad"  # layout only: shifts the feature page onto a cache line
ALIGN = 64  # bytes: where the feature page's values start, so the scan can view them in place
PAGE_BYTES = 1 << 30  # one data page per column chunk up to this size


def _write_parquet(table: pa.Table) -> bytes:
    names = table.column_names
    raw = (*UNCOMPRESSED_COLUMNS, PAD_COLUMN)
    buffer = io.BytesIO()
    pq.write_table(
        table,
        buffer,
        use_dictionary=[c for c in names if c not in FEATURE_COLUMNS + UNIQUE_COLUMNS],
        compression={c: "none" if c in raw else "snappy" for c in names},
        write_statistics=[c for c in names if c not in (*FEATURE_COLUMNS, PAD_COLUMN)],
        data_page_size=PAGE_BYTES,
        max_rows_per_page=1 << 24,
    )
    return buffer.getvalue()


def _feature_misalignment(data: bytes) -> int | None:
    """Where the first `feature` page's values start, modulo ALIGN (None: no such page)."""
    from pipeline.scan.pages import column_views

    (views,) = column_views(data, pq.ParquetFile(pa.BufferReader(data)), "feature")
    if not views:
        return None
    return (views[0].ctypes.data - np.frombuffer(data, np.uint8).ctypes.data) % ALIGN


def parquet_bytes(table: pa.Table) -> bytes:
    """Parquet bytes: FEATURE_COLUMNS PLAIN (no dictionary, compression or statistics: float16
    bytes are incompressible and so decode at memory-copy speed), `row` PLAIN and uncompressed
    too (the scan reads it in place), `key` snappy, the rest snappy and dictionary-encoded
    (falls back to plain where values do not repeat).

    A feature table is written with one data page per column chunk (up to PAGE_BYTES) and a
    PAD_COLUMN just before `feature`: one repeated value of zero bytes (in its dictionary
    page; under 2 ALIGN bytes), its length chosen so that the feature values start on an
    ALIGN-byte boundary of the file and a scan can view them in place (`pipeline.scan.pages`).
    Readers drop it (`FeatureStore.read_features`); it carries no data."""
    names = table.column_names
    if "feature" not in names or table.num_rows == 0:
        return _write_parquet(table)
    where = names.index("feature")
    pad, data = 0, b""
    for _ in range(8):  # the pad's header grows a byte at times: move on by what is left
        padded = table.add_column(
            where, pa.field(PAD_COLUMN, pa.binary(), False), pa.repeat(b"\0" * pad, len(table))
        )
        data = _write_parquet(padded)
        miss = _feature_misalignment(data)
        if not miss:  # aligned, or not a layout the scan reads in place anyway
            break
        pad += ALIGN - miss
    return data


def parquet_batches(data: bytes | pa.Buffer, rows: int) -> Iterator[pa.RecordBatch]:
    """A feature file's bytes -> record batches of up to `rows` rows, each decoded when asked
    for, in this thread (a scan's working set stays in cache), `shard` as a dictionary (one
    value per file); one empty batch for a file without rows."""
    parquet = pq.ParquetFile(pa.BufferReader(data), read_dictionary=["shard"])
    if parquet.metadata.num_rows == 0:
        yield pa.RecordBatch.from_pylist([], schema=parquet.schema_arrow)
        return
    yield from parquet.iter_batches(batch_size=rows, use_threads=False)
