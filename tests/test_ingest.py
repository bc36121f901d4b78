"""Ray Data ingestion gives the single-process rows, from local files and from a real S3 server.

Few and small on purpose: every ``encoded_dataset`` run starts an encoder actor (a process that
imports transformers), which costs seconds on the 2-core CI machine.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engram_ray.distributed.ingest import count_rows, encoded_dataset, read_dataset
from engram_ray.io.data import DataConfig, DataError, EmptyMaskWarning, collate, iter_batches

pytestmark = pytest.mark.ray

ROWS = [
    {
        "concept": ["author", "fox", None, ""][i % 4],
        "prompt": ["who wrote the book?", "question:", "the quick brown fox jumps"][i % 3],
        "answer": " the author" if i % 2 else f" in a small town {i}",
        "extra": i,
    }
    for i in range(12)
]
# The last row loses its whole answer to max_length: dropped by both paths alike.
ROWS.append({"concept": "fox", "prompt": "the quick brown fox jumps over the lazy dog",
             "answer": " yes", "extra": 12})
MAX_LENGTH = 40


def _write_shards(root: str, ext: str, n: int = 3) -> None:
    os.makedirs(root, exist_ok=True)
    for i in range(n):
        part = ROWS[i::n]
        path = os.path.join(root, f"part-{i}.{ext}")
        if ext == "parquet":
            pq.write_table(pa.Table.from_pylist(part), path)
        else:
            with open(path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in part)


@pytest.fixture(scope="module")
def local_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ingest")
    for ext in ("parquet", "jsonl"):
        _write_shards(str(root / ext), ext)
    return root


def _upload(bucket, local_dir: str, prefix: str) -> str:
    for name in sorted(os.listdir(local_dir)):
        with open(os.path.join(local_dir, name), "rb") as f:
            bucket.client.put_object(Bucket=bucket.name, Key=f"{prefix}/{name}", Body=f.read())
    return f"{bucket.uri}/{prefix}"


def _cfg(path: str, **kw) -> DataConfig:
    return DataConfig(paths=[path], prompt_column="prompt", answer_column="answer",
                      max_length=MAX_LENGTH, batch_size=4, **kw)


def _key(ids, mask, concept):
    return (tuple(int(x) for x in ids), tuple(bool(x) for x in mask), concept)


def _single_process(cfg: DataConfig, tokenizer_dir: str) -> Counter:
    rows = Counter()
    for b in iter_batches(cfg, tokenizer_dir):
        attn = b.inputs["attention_mask"].bool()
        for i in range(b.batch_size):
            n = int(attn[i].sum())
            rows[_key(b.inputs["input_ids"][i, :n], b.mask[i, :n], b.concepts[i])] += 1
    return rows


@pytest.mark.parametrize("ext", ["parquet", "jsonl"])
def test_encoded_dataset_from_s3_matches_iter_batches(
    ray_cluster, local_data, s3_bucket, tiny_llama_dir, ext
):
    # ray_cluster started before s3_bucket set the AWS env: the workers only know the endpoint
    # and credentials from cfg.storage_options.
    path = _upload(s3_bucket, str(local_data / ext), ext)
    cfg = _cfg(path, storage_options=s3_bucket.storage_options)
    ds = encoded_dataset(cfg, tiny_llama_dir, num_cpus=0.25).materialize()
    got = Counter(_key(r["input_ids"], r["token_mask"], r["concept"]) for r in ds.iter_rows())
    with pytest.warns(EmptyMaskWarning, match="1 of 13"):
        want = _single_process(cfg, tiny_llama_dir)
    assert sum(want.values()) == len(ROWS) - 1  # the truncated-away row is dropped
    assert got == want
    # A Ray batch collates into the engine's Batch.
    batch = collate(ds.take_batch(4, batch_format="numpy"), pad_id=0)
    assert batch.inputs["input_ids"].shape[0] == 4 and batch.mask.shape[0] == 4


def test_read_dataset_local_parquet_gives_every_row_once(ray_cluster, local_data):
    cfg = _cfg(str(local_data / "parquet"))
    ds = read_dataset(cfg, num_cpus=0.25)
    assert sorted(ds.columns()) == ["answer", "concept", "prompt"]
    got = Counter(tuple(r[c] for c in ("concept", "prompt", "answer")) for r in ds.iter_rows())
    assert got == Counter((r["concept"], r["prompt"], r["answer"]) for r in ROWS)
    assert count_rows(cfg) == len(ROWS)


def test_count_rows_on_s3(s3_bucket, local_data):
    for ext in ("parquet", "jsonl"):
        prefix = _upload(s3_bucket, str(local_data / ext), ext)
        assert count_rows(_cfg(prefix, storage_options=s3_bucket.storage_options)) == len(ROWS)


def test_read_dataset_errors_up_front(ray_cluster, local_data, s3_bucket):
    rows = [{k: v for k, v in r.items() if k != "answer"} for r in ROWS]
    buf = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key="bad/part-0.parquet",
                                Body=buf.getvalue().to_pybytes())
    opts = s3_bucket.storage_options
    with pytest.raises(DataError, match=r"'answer'.*bad/part-0\.parquet"):
        read_dataset(_cfg(f"{s3_bucket.uri}/bad", storage_options=opts))
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key="junk/part-0.parquet", Body=b"junk")
    with pytest.raises(DataError, match=r"junk/part-0\.parquet"):
        encoded_dataset(_cfg(f"{s3_bucket.uri}/junk", storage_options=opts), "unused")
    mixed = DataConfig(paths=[str(local_data / "parquet"), str(local_data / "jsonl")],
                       text_column="prompt")
    with pytest.raises(DataError, match="mix formats"):
        read_dataset(mixed)


def test_large_parquet_file_is_read_in_pieces_of_row_groups(ray_cluster, tmp_path, monkeypatch):
    """A file is cut into read tasks of whole row groups of at most PIECE_ROWS rows (bounded
    blocks for large files), every row read exactly once; a JSON lines file is one piece."""
    from engram_ray.distributed import ingest

    monkeypatch.setattr(ingest, "PIECE_ROWS", 4)
    rows = [{**r, "extra": i} for i, r in enumerate(ROWS * 3)]  # 39 rows
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "big.parquet", row_group_size=3)
    cfg = _cfg(str(tmp_path / "big.parquet"))
    pieces = ingest._pieces(str(tmp_path / "big.parquet"), "parquet", cfg)
    # Row groups of 3 rows, at most 4 rows a piece: one group each, 13 pieces.
    assert [p.row_groups for p in pieces] == [(i,) for i in range(13)]
    assert sum(p.rows for p in pieces) == len(rows)
    ds = read_dataset(cfg, num_cpus=0.25).materialize()
    assert ds.num_blocks() == 13
    got = Counter(tuple(r[c] for c in ("concept", "prompt", "answer")) for r in ds.iter_rows())
    assert got == Counter((r["concept"], r["prompt"], r["answer"]) for r in rows)
    monkeypatch.setattr(ingest, "PIECE_ROWS", 7)  # two groups a piece (6 rows), then 3 alone
    assert [len(p.row_groups) for p in ingest._pieces(str(tmp_path / "big.parquet"), "parquet",
                                                       cfg)] == [2] * 6 + [1]
    (tmp_path / "j").mkdir()
    with open(tmp_path / "j" / "a.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    assert ingest._pieces(str(tmp_path / "j" / "a.jsonl"), "json", cfg)[0].row_groups is None
