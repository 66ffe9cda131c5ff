"""Row files written in shards by Ray workers and merged, streaming, into the data folder's files.

With ``engine=ray`` the per-user rows of a set (the warm-up and alignment SFT rows, the RL
training / validation rows, the evaluation rows) are written by the workers that make them: one
parquet shard per user partition (:func:`write_shard`, rows in the local engine's order within the
partition). Neither the driver nor any one process holds those rows: each shard's *runs* (merge key
-> row count, in shard order; the key is the user, or (cutoff, user) for the RL rows: O(users x
cutoffs)) are collected by one task, and :func:`merge_shards` (run by the task that writes the data
folder, ``data_prep.steps.write_files``) writes the folder's single file by a k-way merge of the
shards on that key, reading each shard forward in row groups and renumbering ``extra_info.index``.
The local engine writes its rows through the same :class:`RowWriter`, so both engines write
byte-identical files (same rows, same row groups).

Memory of the merge: one shard row group (:data:`SHARD_GROUP_ROWS`) per shard being merged plus
one output row group (:data:`ROW_GROUP_ROWS`), whatever the number of rows; it grows with the
number of shards (one per user partition with rows, each an open file while merging), not with
the rows.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from conrec_verl.data_prep.errors import DataPrepError

#: rows per row group of every file written through :class:`RowWriter` (and of the shards)
ROW_GROUP_ROWS = 16_384
#: rows per row group of a worker's shard (read back one group at a time per shard while merging:
#: small groups keep the merge's memory low; a shard's layout does not reach the data folder)
SHARD_GROUP_ROWS = 2_048


class RowWriter:
    """Writes rows to one parquet file in row groups of exactly :data:`ROW_GROUP_ROWS` rows (the last
    one shorter), renumbering ``extra_info.index`` 0, 1, 2, ... when ``renumber``; the file's bytes
    depend only on the rows, not on how they were handed in."""

    def __init__(self, path: Path, schema: pa.Schema, renumber: bool = False, rows_per_group: int | None = None,
                 start: int = 0):
        """``start``: the first ``extra_info.index`` when renumbering (a file that is a slice of
        another keeps that file's numbers)."""
        self.path, self.schema, self.renumber, self.start = Path(path), schema, renumber, int(start)
        self.rows_per_group = int(rows_per_group or ROW_GROUP_ROWS)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer: pq.ParquetWriter | None = None
        self._pending: list[pa.Table] = []
        self._n_pending = 0
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self._pending.append(table)
        self._n_pending += table.num_rows
        while self._n_pending >= self.rows_per_group:
            self._flush(self.rows_per_group)

    def write_records(self, records: Sequence[dict]) -> None:
        for start in range(0, len(records), self.rows_per_group):
            self.write(pa.Table.from_pylist(list(records[start:start + self.rows_per_group]), schema=self.schema))

    def _flush(self, n: int) -> None:
        table = pa.concat_tables(self._pending)
        chunk, rest = table.slice(0, n), table.slice(n)
        self._pending, self._n_pending = ([rest] if rest.num_rows else []), rest.num_rows
        chunk = chunk.combine_chunks()
        if self.renumber:
            chunk = _with_index(chunk, self.start + self.rows)
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.path, self.schema)
        self._writer.write_table(chunk)
        self.rows += chunk.num_rows

    def close(self) -> int:
        """Write what is left (an empty file with the schema when no row came) and return the row count."""
        if self._n_pending:
            self._flush(self._n_pending)
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.path, self.schema)
        self._writer.close()
        return self.rows


def _with_index(table: pa.Table, start: int) -> pa.Table:
    """``table`` with ``extra_info.index`` = start, start + 1, ..."""
    col = table.column("extra_info").combine_chunks()
    struct_type = col.type
    children = [col.field(i) for i in range(struct_type.num_fields)]
    names = [struct_type.field(i).name for i in range(struct_type.num_fields)]
    children[names.index("index")] = pa.array(np.arange(start, start + table.num_rows, dtype=np.int64), pa.int64())
    fixed = pa.StructArray.from_arrays(children, fields=[struct_type.field(i) for i in range(struct_type.num_fields)])
    return table.set_column(table.schema.get_field_index("extra_info"), table.schema.field("extra_info"), fixed)


def write_records(records: Sequence[dict], schema: pa.Schema, path: Path, renumber: bool = False,
                  start: int = 0) -> int:
    """``records`` to ``path`` through :class:`RowWriter` (``extra_info.index`` renumbered from
    ``start`` when ``renumber``); returns the row count."""
    writer = RowWriter(path, schema, renumber, start=start)
    writer.write_records(records)
    return writer.close()


# -- shards ------------------------------------------------------------------------------------------


@dataclass
class ShardedRows:
    """Rows of one set left in shards by the workers: ``shards[i]`` a parquet file whose rows are in
    merge-key order, ``runs[i]`` its ``(key, rows)`` in file order (keys of different shards never
    tie: every key holds a user, and a user's rows are in one shard)."""

    schema: pa.Schema
    shards: list[Path] = field(default_factory=list)
    runs: list[list[tuple[str, int]]] = field(default_factory=list)
    #: positions (in the merged order) that go to a held-out file (:func:`merge_shards_split`)
    held_out: set | None = None

    def __len__(self) -> int:
        return sum(n for runs in self.runs for _, n in runs)

    def add(self, shard: Path | None, runs: list[tuple[str, int]]) -> None:
        if shard is not None and runs:
            self.shards.append(Path(shard))
            self.runs.append(list(runs))


def key_runs(keys: Sequence) -> list[tuple]:
    """``(key, rows)`` of consecutive equal keys, in order."""
    runs: list[tuple] = []
    for key in keys:
        if runs and runs[-1][0] == key:
            runs[-1] = (key, runs[-1][1] + 1)
        else:
            runs.append((key, 1))
    return runs


def write_shard(records: Sequence[dict], schema: pa.Schema, path: Path,
                keys: Sequence | None = None) -> tuple[Path | None, list[tuple]]:
    """A worker's rows to one shard under ``path.parent.parent`` (the staging folder, inside the
    build's output folder, which must exist: a worker that cannot see it is on a node without the
    driver's storage); returns ``(path, runs)``, ``(None, [])`` when there are no rows. ``keys``: each
    row's merge key (default: its user), the rows grouped by key in sorted order."""
    if not records:
        return None, []
    build = Path(path).parent.parent.parent
    if not build.is_dir():
        raise DataPrepError(f"{build}: the build's output folder is not visible on this Ray worker; with a Ray "
                         "cluster out_dir must be on storage every node can write (a shared filesystem)")
    if keys is None:
        keys = [str(r["extra_info"]["user_id"]) for r in records]
    if len(keys) != len(records):
        raise ValueError(f"{path}: {len(keys)} merge keys for {len(records)} rows")
    runs = key_runs(keys)
    heads = [k for k, _ in runs]
    if any(a >= b for a, b in zip(heads, heads[1:])):
        raise ValueError(f"{path}: a shard's rows must be grouped by user in sorted order (by their merge key)")
    writer = RowWriter(path, schema, rows_per_group=SHARD_GROUP_ROWS)
    writer.write_records(records)
    writer.close()
    return Path(path), runs


class _Cursor:
    """Reads one shard forward, ``take(n)`` rows at a time, a row group at a time."""

    def __init__(self, path: Path):
        if not Path(path).is_file():
            raise DataPrepError(f"{path}: a worker's shard is not there; with a Ray cluster out_dir must be on storage "
                             "every node can write (a shared filesystem)")
        self.path = path
        self._batches = pq.ParquetFile(path).iter_batches(batch_size=SHARD_GROUP_ROWS)
        self._buf: pa.Table | None = None

    def take(self, n: int) -> pa.Table:
        parts = []
        while n > 0:
            if self._buf is None or self._buf.num_rows == 0:
                batch = next(self._batches, None)
                if batch is None:
                    raise DataPrepError(f"{self.path}: the shard ends before the rows its worker reported")
                self._buf = pa.Table.from_batches([batch])
            part = self._buf.slice(0, n)
            self._buf = self._buf.slice(part.num_rows)
            parts.append(part)
            n -= part.num_rows
        return pa.concat_tables(parts)


def _merged(rows: ShardedRows):
    """The rows of every shard as tables of about :data:`ROW_GROUP_ROWS` rows, in merge-key order (a
    key's rows are all in one shard, in their shard order). Per table: the keys it holds are a
    contiguous range of each shard, so it is one slice per shard, put in order with one ``take``."""
    cursors = [_Cursor(p) for p in rows.shards]
    order: Iterable = heapq.merge(*[[(u, i, n) for u, n in runs] for i, runs in enumerate(rows.runs)])
    block: list[tuple[int, int]] = []
    size = 0
    for _, i, n in order:
        block.append((i, n))
        size += n
        if size >= ROW_GROUP_ROWS:
            yield _take_block(cursors, block)
            block, size = [], 0
    if block:
        yield _take_block(cursors, block)


def _take_block(cursors: list[_Cursor], block: list[tuple[int, int]]) -> pa.Table:
    """The runs ``block`` = ``[(shard, rows), ...]`` (in output order) as one table."""
    shards = np.asarray([i for i, _ in block], dtype=np.int64)
    lengths = np.asarray([n for _, n in block], dtype=np.int64)
    used = sorted(set(shards.tolist()))
    per_shard = {i: int(lengths[shards == i].sum()) for i in used}
    pieces = [cursors[i].take(per_shard[i]) for i in used]
    if len(pieces) == 1:
        return pieces[0]
    base = dict(zip(used, np.cumsum([0] + [p.num_rows for p in pieces[:-1]]).tolist()))
    # where each run starts in the concatenated pieces: its shard's base + the rows of earlier runs
    # of the same shard in this block
    starts = np.empty(len(block), dtype=np.int64)
    seen = {i: 0 for i in used}
    for k, (i, n) in enumerate(block):
        starts[k] = base[i] + seen[i]
        seen[i] += n
    ends = np.cumsum(lengths)
    index = np.arange(int(ends[-1]), dtype=np.int64) - np.repeat(ends - lengths - starts, lengths)
    return pa.concat_tables(pieces).take(pa.array(index))


def row_tables(rows, schema: pa.Schema) -> Iterable[pa.Table]:
    """The rows of a set in file order as tables of at most :data:`ROW_GROUP_ROWS` rows: ``rows`` a
    list of records (the local engine), or :class:`ShardedRows` the workers wrote (merged)."""
    if isinstance(rows, ShardedRows):
        yield from _merged(rows)
        return
    for start in range(0, len(rows), ROW_GROUP_ROWS):
        yield pa.Table.from_pylist(list(rows[start:start + ROW_GROUP_ROWS]), schema=schema)


def write_rows(rows, schema: pa.Schema, path: Path, start: int = 0) -> int:
    """A set's rows to ``path`` in file order, ``extra_info.index`` renumbered from ``start``; returns
    the row count. ``rows``: a list of records (the local engine) or :class:`ShardedRows` the workers
    wrote (merged by key, streaming); the same rows give the same bytes either way."""
    writer = RowWriter(path, schema, renumber=True, start=start)
    for table in row_tables(rows, schema):
        writer.write(table)
    return writer.close()


def merge_shards(rows: ShardedRows, path: Path, start: int = 0) -> int:
    """:func:`write_rows` of the workers' shards (the local engine writes the same rows to the same
    bytes with :func:`write_records`)."""
    return write_rows(rows, rows.schema, path, start)


def merge_shards_split(rows: ShardedRows, kept_path: Path, held_path: Path, held: set[int]) -> tuple[int, int]:
    """:func:`merge_shards` into two files: the rows whose position in the merged order is in ``held``
    go to ``held_path``, the others to ``kept_path``, each numbered from 0 (as
    :func:`data_prep.sft.split_heldout` splits a list); returns both row counts."""
    kept, out = RowWriter(kept_path, rows.schema, renumber=True), RowWriter(held_path, rows.schema, renumber=True)
    held_sorted = np.asarray(sorted(held), dtype=np.int64)
    start = 0
    for table in _merged(rows):
        positions = np.arange(start, start + table.num_rows, dtype=np.int64)
        mask = np.isin(positions, held_sorted)
        if mask.any():
            out.write(table.filter(pa.array(mask)))
        if not mask.all():
            kept.write(table.filter(pa.array(~mask)))
        start += table.num_rows
    return kept.close(), out.close()
