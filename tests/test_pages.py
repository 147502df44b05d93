"""Feature pages read in place (pipeline.scan.pages) equal Arrow's decode, bit for bit: the store's
own layout (one aligned page), several pages and row groups, page statistics and v2 pages;
other layouts are refused (None) rather than misread. The scan over such files
(`score_files`: in-place pages, a running top-k across files) equals a dense float64 top-k."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ctrak.kernel import scores
from ctrak.topk import topk
from pipeline.feature_file import ALIGN, PAD_COLUMN, feature_table, parquet_bytes, table_features
from pipeline.scan.pages import column_views
from pipeline.scan.scanner import Floor, gather, score_file, score_files


def _columns(shard: str, n: int, start: int = 0) -> dict:
    return {
        "row": list(range(start, start + 3 * n, 3)),  # gaps, as after rejected rows
        "key": [f"{shard}/{i}" for i in range(n)],
        "caption": ["a red circle", "a blue triangle"] * (n // 2) + ["c"] * (n % 2),
        "metadata": ["{}"] * n,
    }


def _open(data: bytes) -> pq.ParquetFile:
    return pq.ParquetFile(pa.BufferReader(data))


def _offset(view: np.ndarray, data: bytes) -> int:
    return view.ctypes.data - np.frombuffer(data, np.uint8).ctypes.data


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("n", [1, 2, 37, 1000, 4099])
def test_store_layout_is_one_aligned_page_read_in_place(dtype, n):
    phi = np.random.default_rng(n).standard_normal((n, 24)).astype(dtype)
    table = feature_table("00003", _columns("00003", n), phi)
    data = parquet_bytes(table)
    (pages, rows, norms) = column_views(data, _open(data), "feature", "row", "feature_norm")
    (page,) = pages
    assert _offset(page, data) % ALIGN == 0 and page.dtype == np.dtype(dtype)
    assert page.tobytes() == phi.tobytes()  # bit for bit
    assert np.concatenate(rows).tolist() == list(range(0, 3 * n, 3))
    np.testing.assert_array_equal(np.concatenate(norms), table.column("feature_norm").to_numpy())
    read = pq.read_table(pa.BufferReader(data))
    assert read.column(PAD_COLUMN).to_pylist() == [read.column(PAD_COLUMN)[0].as_py()] * n
    assert table_features(read).tobytes() == phi.tobytes()


@pytest.mark.parametrize("version", ["1.0", "2.0"])
def test_many_pages_row_groups_and_statistics_equal_arrow(version):
    """Small pages over several row groups, page statistics on `row` (binary fields in the
    header), v1 and v2 pages: the views, joined, are exactly what Arrow decodes."""
    n = 3000
    phi = np.random.default_rng(1).standard_normal((n, 16)).astype(np.float16)
    table = feature_table("00000", _columns("00000", n), phi)
    buffer = io.BytesIO()
    pq.write_table(
        table,
        buffer,
        row_group_size=1100,
        data_page_size=5000,
        max_rows_per_page=150,
        data_page_version=version,
        use_dictionary=False,
        compression="none",
        write_statistics=["row", "feature_norm"],
    )
    data = buffer.getvalue()
    pages, rows = column_views(data, _open(data), "feature", "row")
    assert len(pages) > 6  # several pages per row group
    assert np.concatenate(pages).tobytes() == phi.tobytes()
    assert np.concatenate(rows).tolist() == table.column("row").to_pylist()


def test_other_layouts_are_refused_not_misread():
    n = 50
    phi = np.random.default_rng(2).standard_normal((n, 8)).astype(np.float16)
    table = feature_table("00000", _columns("00000", n), phi)

    def written(t: pa.Table, **options) -> bytes:
        buffer = io.BytesIO()
        pq.write_table(t, buffer, **options)
        return buffer.getvalue()

    compressed = written(table, compression="snappy", use_dictionary=False)
    dictionary = written(table, compression="none", use_dictionary=True)
    nullable = table.cast(
        pa.schema([f.with_nullable(True) for f in table.schema], metadata=table.schema.metadata)
    )
    old = table.drop_columns(["feature"]).append_column(
        "feature", pa.FixedSizeListArray.from_arrays(pa.array(phi.reshape(-1)), 8)
    )
    for data, column in (
        (compressed, "feature"),
        (dictionary, "feature"),
        (written(nullable, compression="none", use_dictionary=False), "feature"),
        (written(old, compression="none", use_dictionary=False), "feature"),
        (written(table, compression="none", use_dictionary=False), "caption"),  # strings
        (written(table, compression="none", use_dictionary=False), "missing"),
    ):
        assert column_views(data, _open(data), column) == [None]


def _store(rng: np.random.Generator, sizes: dict[str, int]) -> tuple[list[bytes], list, list]:
    files, dense, keys = [], [], []
    for shard, n in sizes.items():
        phi = rng.standard_normal((n, 12)).astype(np.float16)
        files.append(parquet_bytes(feature_table(shard, _columns(shard, n), phi)))
        dense.append(phi)
        keys += [f"{shard}/{i}" for i in range(n)]
    return files, dense, keys


@pytest.mark.parametrize("queries", [1, 3])
def test_score_files_equals_dense_float64_topk(queries):
    """In-place pages, the float16 screen (1 query) or float32 (3), a running top-k that skips
    files which cannot enter it, an exact tie across files (the lower global id first), and one
    file in an older layout (decoded through Arrow): the dense float64 top-k exactly."""
    rng = np.random.default_rng(queries)
    sizes = {"00000": 300, "00001": 41, "00002": 700, "00003": 5}
    files, dense, keys = _store(rng, sizes)
    x = rng.standard_normal((queries, 12))
    best = int(np.argmax(dense[2].astype(np.float64) @ x[0]))
    dense[3][2] = dense[2][best]  # the same row in shards 2 and 3: shard 2's ranks first
    files[3] = parquet_bytes(feature_table("00003", _columns("00003", 5), dense[3]))
    old = pq.read_table(pa.BufferReader(files[1])).drop_columns([PAD_COLUMN])
    buffer = io.BytesIO()
    pq.write_table(old, buffer)  # snappy + dictionaries: not readable in place
    files[1] = buffer.getvalue()
    index = {s: i for i, s in enumerate(sizes)}
    hits = gather(score_files(iter(files), x=x, top_k=8, shard_index=index), queries, 8)
    reference = topk(scores(torch.from_numpy(np.concatenate(dense)), torch.from_numpy(x)), 8)
    for j in range(queries):
        assert [h["key"] for h in hits[j]] == [keys[i] for i in reference.indices[j]]
        np.testing.assert_allclose([h["score"] for h in hits[j]], reference.values[j], rtol=1e-12)
        assert all(h["row"] == 3 * int(h["key"].split("/")[1]) for h in hits[j])
        assert all(h["shard"] == h["key"].split("/")[0] for h in hits[j])
    assert [h["key"] for h in hits[0][:2]] == [f"00002/{best}", "00003/2"]


def test_a_file_below_the_floor_decodes_no_hits():
    """Against a running top-k it cannot enter, a file returns no rows (and decodes no hit
    columns); against an empty floor it returns its own top-k."""
    rng = np.random.default_rng(9)
    files, _, _ = _store(rng, {"00000": 200, "00001": 200})
    x = rng.standard_normal((1, 12))
    index = {"00000": 0, "00001": 1}
    first = score_file(files[0], x=x, top_k=5, shard_index=index)
    assert first.num_rows == 5 and first.column("shard").to_pylist() == ["00000"] * 5
    high = first.set_column(2, "score", pa.array(first.column("score").to_numpy() + 1e6))
    nothing = score_file(files[1], x=x, top_k=5, shard_index=index, floor=Floor.of(high, 1, 5))
    assert nothing.num_rows == 0 and nothing.schema == first.schema
