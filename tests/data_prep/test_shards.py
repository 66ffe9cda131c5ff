"""Worker shards merged into one file: the same bytes as the local engine's single write, whatever
the partitioning, with the driver reading the shards forward in row groups."""

from __future__ import annotations

import random

import pyarrow.parquet as pq
import pytest

from conrec_verl.data_prep import shards as SH
from conrec_verl.data_prep.distributed import stable_partition
from conrec_verl.data_prep.steps import SFT_SCHEMAS


def records(n_users: int, seed: int = 0) -> list[dict]:
    """Warm-up-like rows, users in sorted (string) order, 0-30 rows each, numbered as the local engine does."""
    rnd = random.Random(seed)
    out = []
    for user in sorted(str(rnd.randrange(10**6)) for _ in range(n_users)):
        for j in range(rnd.randrange(0, 31)):
            text = " ".join(f"<a_{rnd.randrange(9)}>" for _ in range(rnd.randrange(1, 40)))
            out.append({"messages": [{"role": "user", "content": f"history {text}"},
                                     {"role": "assistant", "content": f"<a_{j % 9}>"}],
                        "extra_info": {"task": "warmup", "user_id": user, "cutoff_day": -1, "context": 1 + j % 3,
                                       "index": len(out)}})
    return out


@pytest.mark.parametrize("n_parts", [1, 3, 8])
@pytest.mark.parametrize("rows_per_group", [7, SH.ROW_GROUP_ROWS])
def test_merged_shards_are_the_local_engines_bytes(tmp_path, monkeypatch, n_parts, rows_per_group):
    monkeypatch.setattr(SH, "ROW_GROUP_ROWS", rows_per_group)  # small groups: merges cross many row groups
    rows = records(60)
    schema = SFT_SCHEMAS["warmup"]
    local = tmp_path / "local.parquet"
    assert SH.write_records(rows, schema, local, renumber=True) == len(rows)
    # the Ray engine: users partitioned by hash, each partition's rows written by "its worker"
    part = stable_partition([r["extra_info"]["user_id"] for r in rows], n_parts)
    sharded = SH.ShardedRows(schema)
    for p in range(n_parts):
        mine = [dict(r, extra_info=dict(r["extra_info"], index=-1)) for r, q in zip(rows, part) if q == p]
        sharded.add(*SH.write_shard(mine, schema, tmp_path / "shards" / f"part-{p:05d}.parquet"))
    assert len(sharded) == len(rows)
    merged = tmp_path / "merged.parquet"
    assert SH.merge_shards(sharded, merged) == len(rows)
    assert merged.read_bytes() == local.read_bytes()
    meta = pq.read_metadata(merged)
    assert meta.num_row_groups == -(-len(rows) // rows_per_group)
    assert pq.read_table(merged).to_pylist() == rows


def test_an_empty_set_is_a_file_with_the_schema(tmp_path):
    schema = SFT_SCHEMAS["warmup"]
    empty = SH.ShardedRows(schema)
    empty.add(*SH.write_shard([], schema, tmp_path / "never.parquet"))
    assert not empty and not (tmp_path / "never.parquet").exists()
    assert SH.merge_shards(empty, tmp_path / "m.parquet") == 0
    assert SH.write_records([], schema, tmp_path / "l.parquet") == 0
    assert (tmp_path / "m.parquet").read_bytes() == (tmp_path / "l.parquet").read_bytes()
    assert pq.read_schema(tmp_path / "m.parquet") == schema


def test_a_shard_must_be_in_user_order(tmp_path):
    rows = records(5, seed=3)
    rows = [r for r in rows if r["extra_info"]["user_id"] != rows[0]["extra_info"]["user_id"]] + rows[:1]
    with pytest.raises(ValueError, match="grouped by user in sorted order"):
        SH.write_shard(rows, SFT_SCHEMAS["warmup"], tmp_path / "bad.parquet")


def test_alignment_questions_of_a_user_partition_are_that_partitions_share(tmp_path):
    """Each user's questions are drawn from a generator of its own: partitions of the users, written
    as shards and merged with the held-out split, give exactly the local engine's two files."""
    from conrec_verl.data_prep.sft import alignment_from_pools, heldout_positions, split_heldout

    rnd = random.Random(5)
    items = [f"i{j}" for j in range(40)]
    sid_of = {it: f"<a_{j % 4}><b_{j // 4 % 4}><c_{j // 16}>" for j, it in enumerate(items)}
    users = [str(u) for u in rnd.sample(range(1000), 50)]
    neg_of = {u: sorted(rnd.sample(items, rnd.randrange(1, 6))) for u in users}
    pos_of = {u: sorted(rnd.sample(items, rnd.randrange(0, 8))) for u in users}
    cfg, seed, schema = {"max_per_user": 3}, 11, SFT_SCHEMAS["alignment"]
    whole = alignment_from_pools(neg_of, pos_of, sid_of, cfg, seed)
    kept, held = split_heldout([dict(r) for r in whole], 0.2, seed)
    assert len(held) == round(0.2 * len(whole)) > 0
    SH.write_records(kept, schema, tmp_path / "kept_local.parquet")
    SH.write_records(held, schema, tmp_path / "held_local.parquet")
    part = stable_partition(users, 4)
    sharded = SH.ShardedRows(schema)
    for p in range(4):
        mine = {u for u, q in zip(users, part) if q == p}
        rows = alignment_from_pools({u: v for u, v in neg_of.items() if u in mine}, pos_of, sid_of, cfg, seed)
        sharded.add(*SH.write_shard(rows, schema, tmp_path / f"part-{p}.parquet"))
    counts = SH.merge_shards_split(sharded, tmp_path / "kept.parquet", tmp_path / "held.parquet",
                                   heldout_positions(len(sharded), 0.2, seed))
    assert counts == (len(kept), len(held))
    for name in ("kept", "held"):
        assert (tmp_path / f"{name}.parquet").read_bytes() == (tmp_path / f"{name}_local.parquet").read_bytes()


def test_a_missing_or_short_shard_is_one_error_naming_it(tmp_path):
    from conrec_verl.data_prep.errors import DataPrepError

    schema = SFT_SCHEMAS["warmup"]
    rows = records(6, seed=2)
    staging = tmp_path / "build" / "_shards"
    staging.parent.mkdir()  # the build's output folder, made by the driver
    sharded = SH.ShardedRows(schema)
    sharded.add(*SH.write_shard(rows, schema, staging / "warmup" / "part-00000.parquet"))
    short = SH.ShardedRows(schema, sharded.shards, [sharded.runs[0] + [("999999999", 3)]])
    with pytest.raises(DataPrepError, match="part-00000.parquet: the shard ends before the rows its worker"):
        SH.merge_shards(short, tmp_path / "out.parquet")
    sharded.shards[0].unlink()
    with pytest.raises(DataPrepError, match="part-00000.parquet: a worker's shard is not there; with a Ray "
                                            "cluster out_dir must be on storage every node can write"):
        SH.merge_shards(sharded, tmp_path / "out.parquet")
    # a worker that cannot see the build's folder (another node without the shared storage)
    with pytest.raises(DataPrepError, match="not visible on this Ray worker"):
        SH.write_shard(rows, schema, tmp_path / "elsewhere" / "_shards" / "warmup" / "part-00001.parquet")
    assert not (tmp_path / "elsewhere").exists()
