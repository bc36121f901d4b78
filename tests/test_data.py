"""Single-process ingestion (no Ray): config checks, encoding, masks, collation, file errors."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from engram_ray.io.data import (
    DataConfig,
    DataError,
    EmptyMaskWarning,
    collate,
    count_rows,
    encode_rows,
    iter_batches,
    read_schema,
    read_table,
    resolve_paths,
)
from engram_ray.models.tiny import build_tokenizer

ROWS = [
    {"concept": "author", "prompt": "who wrote the book?", "answer": " the author", "n": 0},
    {"concept": None, "prompt": "the quick brown fox", "answer": " jumps", "n": 1},
    {"concept": "", "prompt": "where was the author born?", "answer": " in a small town", "n": 2},
    {"concept": "fox", "prompt": "question:", "answer": " the lazy dog", "n": 3},
    {"concept": "author", "prompt": "answer:", "answer": " by the river", "n": 4},
]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _pa_cfg(paths, **kw):
    return DataConfig(paths=paths, prompt_column="prompt", answer_column="answer", **kw)


def write(rows, path):
    """Write rows as Parquet or JSON lines, by the extension of ``path``."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if path.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def shards(tmp_path, rows, ext, n=2, name="data"):
    """Split ``rows`` into ``n`` shards under ``tmp_path/name``; returns the directory."""
    d = tmp_path / name
    for i in range(n):
        write(rows[i::n], str(d / f"part-{i}.{ext}"))
    return str(d)


def unpadded(batches):
    """(ids, mask, concept) per row, padding removed, in batch order."""
    out = []
    for b in batches:
        attn = b.inputs["attention_mask"].bool()
        for i in range(b.batch_size):
            n = int(attn[i].sum())
            ids = tuple(b.inputs["input_ids"][i, :n].tolist())
            out.append((ids, tuple(b.mask[i, :n].tolist()), b.concepts[i]))
    return out


# ------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "kw, key",
    [
        ({"text_column": "t", "prompt_column": "p", "answer_column": "a"}, "exactly one"),
        ({}, "exactly one"),
        ({"prompt_column": "p"}, "answer_column"),
        ({"answer_column": "a"}, "prompt_column"),
        ({"text_column": "t", "features_column": "f"}, "exactly one"),
        ({"text_column": "t", "format": "csv"}, "format"),
        ({"text_column": "t", "max_length": 0}, "max_length"),
        ({"text_column": "t", "batch_size": -1}, "batch_size"),
        ({"text_column": "t", "paths": []}, "paths"),
        ({"text_column": "t", "storage_options": "x"}, "storage_options"),
        ({"text_column": "t", "storage_options": {"endpoint": "http://x"}}, "storage_options"),
    ],
)
def test_config_rejects_bad_combinations(kw, key):
    kw = {"paths": ["x.parquet"], **kw}
    with pytest.raises(ValueError, match=key):
        DataConfig(**kw)


def test_config_is_keyword_only():
    with pytest.raises(TypeError):
        DataConfig(["x.parquet"])  # noqa


# ------------------------------------------------------------------------------ encoding


def test_prompt_answer_mask_covers_exactly_the_answer(tok):
    cfg = _pa_cfg(["unused"], max_length=512)
    enc = encode_rows(pa.Table.from_pylist(ROWS), cfg, tok)
    assert len(enc["input_ids"]) == len(ROWS)
    for row, ids, mask in zip(ROWS, enc["input_ids"], enc["token_mask"]):
        p = tok(row["prompt"], add_special_tokens=True)["input_ids"]
        a = tok(row["answer"], add_special_tokens=False)["input_ids"]
        assert p[0] == tok.bos_token_id and tok.bos_token_id not in a
        assert ids.tolist() == p + a
        assert mask.tolist() == [False] * len(p) + [True] * len(a)
    assert enc["n_tokens"].tolist() == [int(m.sum()) for m in enc["token_mask"]]


def test_truncation_cuts_the_answer_and_drops_rows_left_without_answer(tok):
    p_lens = [len(tok(r["prompt"])["input_ids"]) for r in ROWS]
    max_length = sorted(p_lens)[2]  # rows with the longest prompts lose their whole answer
    cfg = _pa_cfg(["unused"], max_length=max_length)
    with pytest.warns(EmptyMaskWarning, match=r"(\d+) of 5 row"):
        enc = encode_rows(pa.Table.from_pylist(ROWS), cfg, tok)
    kept = [r for r, n in zip(ROWS, p_lens) if n < max_length]
    assert 0 < len(kept) < len(ROWS)
    assert len(enc["input_ids"]) == len(kept)
    for row, ids, mask in zip(kept, enc["input_ids"], enc["token_mask"]):
        full = tok(row["prompt"])["input_ids"] + tok(row["answer"], add_special_tokens=False)[
            "input_ids"
        ]
        assert ids.tolist() == full[:max_length]
        assert len(ids) <= max_length and mask.any()
    # Keeping them instead: flagged by n_tokens == 0.
    with pytest.warns(EmptyMaskWarning, match="kept"):
        all_rows = encode_rows(pa.Table.from_pylist(ROWS), cfg, tok, drop_empty=False)
    assert (all_rows["n_tokens"] == 0).sum() == len(ROWS) - len(kept)


def test_text_mode_counts_every_token_and_truncates(tok):
    cfg = DataConfig(paths=["unused"], text_column="prompt", max_length=6)
    enc = encode_rows(pa.Table.from_pylist(ROWS), cfg, tok)
    for row, ids, mask in zip(ROWS, enc["input_ids"], enc["token_mask"]):
        expected = tok(row["prompt"], add_special_tokens=True)["input_ids"][:6]
        assert ids.tolist() == expected and mask.all() and len(mask) == len(ids)
    b = collate(enc, pad_id=tok.pad_token_id)
    assert torch.equal(b.mask, b.inputs["attention_mask"].bool())


def test_token_modes_need_a_tokenizer():
    cfg = DataConfig(paths=["unused"], text_column="prompt")
    with pytest.raises(ValueError, match="tokenizer"):
        encode_rows(pa.Table.from_pylist(ROWS), cfg)


def test_null_and_empty_concepts_become_none(tok):
    enc = encode_rows(pa.Table.from_pylist(ROWS), _pa_cfg(["unused"]), tok)
    assert list(enc["concept"]) == ["author", None, None, "fox", "author"]


def test_features_mode_and_collate():
    rows = [{"concept": c, "x": [float(i), i + 0.5, -1.0]} for i, c in enumerate(["a", None, ""])]
    cfg = DataConfig(paths=["unused"], features_column="x")
    enc = encode_rows(pa.Table.from_pylist(rows), cfg)
    assert enc["features"].dtype == np.float32 and enc["features"].shape == (3, 3)
    b = collate(enc)
    assert b.inputs.dtype == torch.float32 and b.inputs.shape == (3, 3) and b.mask is None
    assert b.concepts == ["a", None, None]
    ragged = [{"concept": "a", "x": [1.0]}, {"concept": "b", "x": [1.0, 2.0]}]
    with pytest.raises(DataError, match="different lengths"):
        encode_rows(pa.Table.from_pylist(ragged), cfg)


def test_collate_pads_right_and_accepts_rows_or_columns(tok):
    enc = encode_rows(pa.Table.from_pylist(ROWS), _pa_cfg(["unused"]), tok)
    rows = [dict(zip(enc, vals)) for vals in zip(*enc.values())]
    a, b = collate(enc, pad_id=0), collate(rows, pad_id=0)
    lens = [len(x) for x in enc["input_ids"]]
    assert a.inputs["input_ids"].shape == (len(ROWS), max(lens))
    assert a.inputs["input_ids"].dtype == torch.long and a.mask.dtype == torch.bool
    for k in ("input_ids", "attention_mask"):
        assert torch.equal(a.inputs[k], b.inputs[k])
    assert torch.equal(a.mask, b.mask) and a.concepts == b.concepts
    short = int(np.argmin(lens))
    assert a.inputs["attention_mask"][short].sum() == lens[short]
    assert (a.inputs["input_ids"][short, lens[short]:] == 0).all()
    assert not a.mask[short, lens[short]:].any()


# ------------------------------------------------------------------------------ files


def test_iter_batches_order_is_deterministic_and_spans_shards(tmp_path, tok):
    d = shards(tmp_path, ROWS, "parquet", n=2)
    cfg = _pa_cfg([d], batch_size=2)
    batches = list(iter_batches(cfg, tok))
    assert [b.batch_size for b in batches] == [2, 2, 1]
    # Sorted shards (part-0 holds rows 0, 2, 4; part-1 rows 1, 3), file order within each.
    order = [0, 2, 4, 1, 3]
    expected = encode_rows(pa.Table.from_pylist([ROWS[i] for i in order]), cfg, tok)
    assert unpadded(batches) == unpadded([collate(expected)])
    assert unpadded(batches) == unpadded(iter_batches(cfg, tok))


def test_json_lines_and_parquet_give_identical_batches(tmp_path, tok):
    pq_dir = shards(tmp_path, ROWS, "parquet", name="pq")
    js_dir = shards(tmp_path, ROWS, "jsonl", name="js")
    a = list(iter_batches(_pa_cfg([pq_dir], batch_size=3), tok))
    b = list(iter_batches(_pa_cfg([js_dir], batch_size=3), tok))
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        assert torch.equal(x.inputs["input_ids"], y.inputs["input_ids"])
        assert torch.equal(x.mask, y.mask) and x.concepts == y.concepts


def test_json_array_file_is_read(tmp_path, tok):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(ROWS))
    jl = shards(tmp_path, ROWS, "jsonl", n=1)
    a = unpadded(iter_batches(_pa_cfg([str(path)]), tok))
    assert a == unpadded(iter_batches(_pa_cfg([jl]), tok))


def test_globs_and_directories(tmp_path):
    d = tmp_path / "ds"
    for name in ("b.parquet", "a.parquet", "sub/c.parquet"):
        write(ROWS[:1], str(d / name))
    (d / "_SUCCESS").write_text("")
    (d / "README.md").write_text("not data")
    write(ROWS[:1], str(d / "x.jsonl"))
    by_dir = resolve_paths(_pa_cfg([str(d)], format="parquet"))
    assert [os.path.relpath(p, d) for p in by_dir] == ["a.parquet", "b.parquet", "sub/c.parquet"]
    by_glob = resolve_paths(_pa_cfg([str(d / "*.parquet"), str(d / "a.parquet")]))
    assert [os.path.basename(p) for p in by_glob] == ["a.parquet", "b.parquet"]
    assert len(resolve_paths(_pa_cfg([str(d)]))) == 4  # format by extension: jsonl too
    assert count_rows(_pa_cfg([str(d)])) == 4


def test_nonexistent_path_and_empty_glob_are_named(tmp_path):
    missing = str(tmp_path / "nope.parquet")
    with pytest.raises(DataError, match="nope.parquet"):
        resolve_paths(_pa_cfg([missing]))
    with pytest.raises(DataError, match=r"no data files match .*\*\.jsonl"):
        resolve_paths(_pa_cfg([str(tmp_path / "*.jsonl")]))


@pytest.mark.parametrize("ext", ["parquet", "jsonl"])
def test_corrupt_shard_error_names_the_file(tmp_path, tok, ext):
    d = shards(tmp_path, ROWS, ext, n=1)
    bad = tmp_path / "data" / f"part-9.{ext}"
    bad.write_bytes(b"PAR1\x00garbage{{{" if ext == "parquet" else b'{"concept": "a", "pro\n')
    with pytest.raises(DataError, match=f"part-9.{ext}"):
        list(iter_batches(_pa_cfg([d]), tok))
    with pytest.raises(DataError, match=f"part-9.{ext}"):
        read_schema(str(bad), _pa_cfg([d]))


@pytest.mark.parametrize("ext", ["parquet", "jsonl"])
@pytest.mark.parametrize("column", ["answer", "concept"])
def test_missing_column_error_names_column_file_and_present(tmp_path, tok, ext, column):
    rows = [{k: v for k, v in r.items() if k != column} for r in ROWS]
    path = write(rows, str(tmp_path / f"rows.{ext}"))
    for fn in (read_table, read_schema):
        with pytest.raises(DataError) as err:
            fn(path, _pa_cfg([path]))
        msg = str(err.value)
        assert repr(column) in msg and "rows." + ext in msg and "'prompt'" in msg


def test_unknown_extension_needs_format(tmp_path, tok):
    path = write(ROWS, str(tmp_path / "rows.parquet"))
    os.rename(path, tmp_path / "rows.bin")
    with pytest.raises(DataError, match="rows.bin"):
        list(iter_batches(_pa_cfg([str(tmp_path / "rows.bin")]), tok))
    cfg = _pa_cfg([str(tmp_path / "rows.bin")], format="parquet")
    assert sum(b.batch_size for b in iter_batches(cfg, tok)) == len(ROWS)


def test_iter_batches_reports_dropped_rows_once(tmp_path, tok):
    d = shards(tmp_path, ROWS, "parquet", n=2)
    cfg = _pa_cfg([d], max_length=3, batch_size=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        list(iter_batches(cfg, tok))
    msgs = [str(w.message) for w in caught if issubclass(w.category, EmptyMaskWarning)]
    assert len(msgs) == 1 and "of 5 row(s)" in msgs[0]


@pytest.mark.parametrize("ext", ["parquet", "jsonl"])
def test_data_naming_no_concept_is_refused_naming_column_and_files(tmp_path, tok, ext):
    """Issue 20: data whose concept column is null (or "") in every row committed a run of 0
    engrams with exit 0. Reference-only files next to a file with concepts stay fine."""
    rows = [{**r, "concept": [None, ""][r["n"] % 2]} for r in ROWS]
    d = shards(tmp_path, rows, ext, n=2)
    with pytest.raises(DataError) as err:
        list(iter_batches(_pa_cfg([d]), tok))
    msg = str(err.value)
    assert "'concept' (concept_column)" in msg and f"part-0.{ext}" in msg \
        and f"part-1.{ext}" in msg
    write(ROWS[:1], str(tmp_path / "data" / f"part-2.{ext}"))  # one row names a concept
    assert sum(b.batch_size for b in iter_batches(_pa_cfg([d]), tok)) == len(ROWS) + 1


def test_integer_concept_labels_count_as_concepts(tmp_path):
    from engram_ray.io.data import check_concepts

    path = write([{"concept": 3, "f": [1.0]}], str(tmp_path / "x.parquet"))
    check_concepts(DataConfig(paths=[path], features_column="f"))


def _bad_text_rows(problem):
    rows = [dict(r) for r in ROWS]
    if problem == "null prompt":
        rows[3]["prompt"] = None
    return rows


@pytest.mark.parametrize("ext", ["parquet", "jsonl"])
@pytest.mark.parametrize("problem", ["null prompt", "non-utf8"])
def test_null_text_and_non_utf8_name_file_row_and_column(tmp_path, tok, ext, problem):
    """Issue 20: a null prompt failed with 'column 'prompt' row 0' (the row of an encoder
    batch, no file), bytes that are not UTF-8 with a bare UnicodeDecodeError."""
    path = str(tmp_path / f"rows.{ext}")
    rows = _bad_text_rows(problem)
    if problem == "null prompt" and ext == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)
    elif problem == "null prompt":
        write(rows, path)
    elif ext == "jsonl":
        write(rows, path)
        lines = open(path, "rb").read().splitlines(keepends=True)
        lines[3] = lines[3].replace(b"question:", b"q\xff\xfeestion:")
        open(path, "wb").write(b"".join(lines))
    else:
        prompts = pa.array([r["prompt"].encode() if i != 3 else b"q\xffx"
                            for i, r in enumerate(rows)], pa.binary()).view(pa.string())
        table = pa.Table.from_pylist(rows).set_column(1, "prompt", prompts)
        pq.write_table(table, path, row_group_size=2)
    with pytest.raises(DataError) as err:
        list(iter_batches(_pa_cfg([path]), tok))
    msg = str(err.value)
    assert path in msg and "row 3" in msg and "'prompt' (prompt_column)" in msg, msg
    assert ("null" if problem == "null prompt" else "UTF-8") in msg
    if ext == "parquet":  # a piece of the file (Ray reads row groups): rows of the file
        with pytest.raises(DataError, match="row 3"):
            read_table(path, _pa_cfg([path]), row_groups=[1])


@pytest.mark.parametrize("values, expect", [
    ([["1.0", "2.0"], ["3.5", "4.0"]], "expected a list of numbers"),
    ([[1.0, 2.0], [1.0, 2.0], [3.0]], "row 2: a feature vector of length 1, row 0 has 2"),
])
def test_bad_feature_vectors_name_file_row_and_column(tmp_path, values, expect):
    """Strings or ragged vectors failed in the encoder with numpy's message and no file."""
    path = str(tmp_path / "f.parquet")
    write([{"concept": "a", "x": v} for v in values], path)
    with pytest.raises(DataError, match=expect) as err:
        read_table(path, DataConfig(paths=[path], features_column="x"))
    assert path in str(err.value) and "'x' (features_column)" in str(err.value)


# ------------------------------------------------------------------------------ s3 (no Ray)


def test_s3_shards_read_like_local(tmp_path, tok, s3_bucket):
    local = shards(tmp_path, ROWS, "jsonl", n=2)
    for name in sorted(os.listdir(local)):
        with open(os.path.join(local, name), "rb") as f:
            s3_bucket.client.put_object(Bucket=s3_bucket.name, Key=f"ds/{name}", Body=f.read())
    opts = s3_bucket.storage_options
    remote = _pa_cfg([f"{s3_bucket.uri}/ds/"], storage_options=opts, batch_size=2)
    assert resolve_paths(remote) == [f"{s3_bucket.uri}/ds/part-0.jsonl",
                                     f"{s3_bucket.uri}/ds/part-1.jsonl"]
    assert count_rows(remote) == len(ROWS)
    assert unpadded(iter_batches(remote, tok)) == unpadded(iter_batches(_pa_cfg([local]), tok))
    globbed = _pa_cfg([f"{s3_bucket.uri}/ds/*-1.jsonl"], storage_options=opts)
    assert resolve_paths(globbed) == [f"{s3_bucket.uri}/ds/part-1.jsonl"]
    with pytest.raises(DataError, match="missing.parquet"):
        resolve_paths(_pa_cfg([f"{s3_bucket.uri}/missing.parquet"], storage_options=opts))
