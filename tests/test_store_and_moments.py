"""Run store round trips, tamper detection, commit protocol; Σ merge, packing, versions."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

import engram_ray
from engram_ray import Batch, open_run
from engram_ray.core.capture import collect_statistics
from engram_ray.core.layers import weight_matrix
from engram_ray.core.moments import Moments, pack_symmetric, unpack_symmetric
from engram_ray.core.solve import engram_matrix, pseudo_inverse
from engram_ray.io.store import RunWriter
from engram_ray.local import solve_statistics


def small_stats(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3, bias=False))
    x = torch.randn(40, 5)
    labels = ["a"] * 10 + ["b"] * 10 + [None] * 20
    return model, collect_statistics(model, [Batch(x, labels)])


def weights_of(model, stats):
    return {n: weight_matrix(model.get_submodule(n), i.bias) for n, i in stats.modules.items()}


def oracle(model, stats, concept, module):
    """W Σ_c Σ⁺ in float64 straight from the statistics (the formula, not the store)."""
    info = stats.modules[module]
    mom = stats.groups[info.group]
    w = weight_matrix(model.get_submodule(module), info.bias)
    return engram_matrix(w, mom.sigma(concept), pseudo_inverse(mom.total))


def as_matrix(run, concept, module, kind="linear"):
    w = run.engram(concept, module).double()
    w = w.T if kind == "conv1d" else w.reshape(w.shape[0], -1)
    b = run.bias(concept, module)
    return w if b is None else torch.cat([w, b.double()[:, None]], 1)


def rel(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def write_run(tmp_path, name="run", model_stats=None, keep=False):
    model, stats = model_stats or small_stats()
    uri = str(tmp_path / name)
    w = RunWriter(uri)
    rows = solve_statistics(stats, weights_of(model, stats), w)
    w.commit(rows, {"note": "test"})
    return uri, model, stats


def test_engrams_on_read_equal_the_formula(tmp_path):
    """Format 3 stores statistics; what a bound run forms on read is W Σ_c Σ⁺ within float32
    rounding, for every concept and module (bias included)."""
    uri, model, stats = write_run(tmp_path)
    run = open_run(uri, model=model)
    assert run.concepts == ["a", "b"] and run.modules == ["0", "2"]
    for c in run.concepts:
        for m in run.modules:
            assert rel(as_matrix(run, c, m), oracle(model, stats, c, m)) < 1e-6
    row = run.record("a", "0")
    assert row["n"] == 10 and row["N"] == 40 and row["shape"] == [6, 5] and row["layer"] is None
    assert len(row["sha256"]) == 64 and row["rel_norm"] > 0
    w0 = weight_matrix(model.get_submodule("0"))
    assert row["rel_norm"] == pytest.approx(
        float(torch.linalg.norm(oracle(model, stats, "a", "0")) / torch.linalg.norm(w0)))


def test_unbound_run_names_the_way_to_bind(tmp_path):
    uri, _, _ = write_run(tmp_path)
    with pytest.raises(ValueError, match="model"):
        open_run(uri).engram("a", "0")


@pytest.mark.parametrize("row_group_bytes", [1, 700, 1 << 30])
def test_row_groups_hold_several_concepts_and_each_reads_back(tmp_path, monkeypatch,
                                                              row_group_bytes):
    """A group's concepts are buffered into row groups of about ROW_GROUP_BYTES (one concept
    when larger); the manifest's (row_group, row) finds every concept, rows and blocks alike."""
    import engram_ray.io.store as store

    monkeypatch.setattr(store, "ROW_GROUP_BYTES", row_group_bytes)
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(12, 6), nn.Tanh(), nn.Linear(6, 3))
    labels = [f"c{i % 7}" for i in range(28)] + ["big"] * 30 + [None] * 12
    stats = collect_statistics(model, [Batch(torch.randn(70, 12), labels)])
    uri, _, _ = write_run(tmp_path, model_stats=(model, stats))
    run = open_run(uri, model=model)
    assert {run.record(c, "0")["form"] for c in run.concepts} == {"dense", "factored"}
    for c in run.concepts:
        for m in run.modules:
            assert rel(as_matrix(run, c, m), oracle(model, stats, c, m)) < 1e-6
    groups = pq.ParquetFile(os.path.join(uri, "payload", "0.parquet")).num_row_groups
    assert groups == {1: 8, 700: 3, 1 << 30: 1}[row_group_bytes]  # 208 B rows, a 728 B block


def test_manifest_has_one_row_per_concept_and_module(tmp_path):
    uri, _, _ = write_run(tmp_path)
    table = pq.read_table(os.path.join(uri, "manifest.parquet"))
    assert table.num_rows == 4  # 2 concepts × 2 modules
    for col in ("concept", "module", "layer", "shape", "n", "N", "rel_norm", "payload", "sha256",
                "spectrum", "spectrum_sha256", "weight_sha256", "dtype"):
        assert col in table.column_names


def _flip_first_float(path, column, concept):
    """Rewrite a payload file with one bit of the concept's ``column`` cell flipped."""
    import pyarrow as pa

    t = pq.read_table(path)
    pf = pq.ParquetFile(path)
    cells = t.column(column).to_pylist()
    i = t.column("concept").to_pylist().index(concept)
    raw = bytearray(cells[i])
    raw[-1] ^= 0x01  # one bit of the last value (rows or a packed float64 block alike)
    cells[i] = bytes(raw)
    t = t.set_column(t.schema.get_field_index(column), column, pa.array(cells, pa.binary()))
    writer = pq.ParquetWriter(path, pf.schema_arrow)
    start = 0
    for g in range(pf.num_row_groups):  # keep the row-group layout the manifest points into
        n = pf.metadata.row_group(g).num_rows
        writer.write_table(t.slice(start, n), row_group_size=n)
        start += n
    writer.close()


@pytest.mark.parametrize("form", ["dense", "factored"])
def test_tampered_payload_is_refused(tmp_path, form):
    model = nn.Sequential(nn.Linear(12, 6), nn.Tanh(), nn.Linear(6, 3))
    x = torch.randn(40, 12)
    n_a = 4 if form == "factored" else 10  # D = 13: up to 6 tokens stay rows
    stats = collect_statistics(model, [Batch(x, ["a"] * n_a + ["b"] * 20 + [None] * (20 - n_a))])
    uri, _, _ = write_run(tmp_path, model_stats=(model, stats))
    assert open_run(uri).record("a", "0")["form"] == form
    _flip_first_float(os.path.join(uri, "payload", "0.parquet"), "data", "a")
    run = open_run(uri, model=model)
    with pytest.raises(ValueError, match="sha256"):
        run.engram("a", "0")
    assert rel(as_matrix(run, "a", "2"), oracle(model, stats, "a", "2")) < 1e-6


def test_tampered_spectrum_is_refused(tmp_path):
    uri, model, _ = write_run(tmp_path)
    path = os.path.join(uri, "statistics", "0.safetensors")
    blob = bytearray(open(path, "rb").read())
    blob[-8:] = bytes(8)  # the last eigenvector entry
    open(path, "wb").write(bytes(blob))
    with pytest.raises(ValueError, match="0.safetensors fails its sha256 check"):
        open_run(uri, model=model).engram("a", "0")


def test_other_weights_are_refused_naming_the_module(tmp_path):
    uri, model, _ = write_run(tmp_path)
    other = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3, bias=False))
    with pytest.raises(ValueError, match="module '0' of the given model is not the weight"):
        open_run(uri, model=other).engram("a", "0")


def test_uncommitted_run_is_refused(tmp_path):
    uri, _, _ = write_run(tmp_path)
    os.remove(os.path.join(uri, "_COMMITTED"))
    with pytest.raises(FileNotFoundError, match="not a committed engram run"):
        open_run(uri)


def test_manifest_swapped_after_commit_is_refused(tmp_path):
    uri, _, _ = write_run(tmp_path)
    marker = os.path.join(uri, "_COMMITTED")
    m = json.load(open(marker))
    m["manifest_sha256"] = "0" * 64
    json.dump(m, open(marker, "w"))
    with pytest.raises(ValueError, match="does not match the commit marker"):
        open_run(uri)


def test_committed_run_is_never_overwritten(tmp_path):
    uri, _, _ = write_run(tmp_path)
    with pytest.raises(FileExistsError):
        RunWriter(uri)


def test_abort_leaves_nothing(tmp_path):
    model, stats = small_stats()
    uri = str(tmp_path / "aborted")
    w = RunWriter(uri)
    solve_statistics(stats, weights_of(model, stats), w)
    w.abort()
    assert not os.path.exists(uri)


def test_unknown_payload_version_is_refused(tmp_path):
    uri, _, _ = write_run(tmp_path)
    info_path = os.path.join(uri, "run.json")
    info = json.load(open(info_path))
    info["payload_format_version"] = 99
    json.dump(info, open(info_path, "w"))
    with pytest.raises(ValueError, match="payload format version 99"):
        open_run(uri)


def test_moments_merge_is_exact_and_order_independent():
    torch.manual_seed(2)
    parts = []
    for i in range(3):
        m = Moments.zeros(4)
        m.sources = frozenset({f"shard-{i}"})
        m.add(torch.randn(10, 4), torch.tensor([0] * 3 + [1] * 3 + [-1] * 4), ["a", "b"])
        parts.append(m)
    left = parts[0].merge(parts[1]).merge(parts[2])
    right = parts[2].merge(parts[0].merge(parts[1]))
    assert torch.equal(left.total, right.total) or torch.allclose(left.total, right.total, rtol=0, atol=1e-12)
    assert left.n_total == 30 and left.counts == {"a": 9, "b": 9}
    assert left.sources == {"shard-0", "shard-1", "shard-2"}
    with pytest.raises(ValueError, match="counted twice"):
        left.merge(parts[1])


def test_moments_serialization_round_trip_and_version():
    torch.manual_seed(3)
    m = Moments.zeros(5)  # max_rows = 2: "c" (6 tokens) is a Gram block, "s" (2) stays rows
    m.add(torch.randn(14, 5), torch.tensor([0] * 6 + [1] * 2 + [-1] * 6), ["c", "s"])
    m.counts["masked-out"] = 0
    assert set(m.concepts) == {"c"} and set(m.rows) == {"s"}
    blob = m.to_bytes()
    back = Moments.from_bytes(blob)
    assert torch.equal(back.total, m.total) and torch.equal(back.concepts["c"], m.concepts["c"])
    assert torch.equal(back.rows["s"], m.rows["s"]) and back.max_rows == 2
    assert back.counts == m.counts and back.n_total == 14
    bad = blob.replace(b'"format_version":"2"', b'"format_version":"7"')
    assert bad != blob
    with pytest.raises(ValueError, match="unknown statistics format version '7'"):
        Moments.from_bytes(bad)


def test_moments_version_1_blobs_still_read():
    from safetensors.torch import save

    from engram_ray.core.moments import pack_symmetric

    g = torch.randn(3, 3, dtype=torch.float64)
    g = g @ g.T
    meta = {"format_version": "1", "dim": "3", "n_total": "9", "concepts": '["c"]',
            "counts": '{"c": 4}', "sources": '["part-0"]'}
    back = Moments.from_bytes(save({"total": pack_symmetric(2 * g), "c0": pack_symmetric(g)},
                                   metadata=meta))
    assert torch.allclose(back.sigma("c"), g) and back.rows == {} and back.max_rows == 0
    assert back.sources == {"part-0"} and back.counts == {"c": 4}


def test_small_concepts_keep_rows_and_fold_into_gram_past_max_rows():
    """The form depends only on the final count; Σ_c and Σ_total equal the raw-row oracle
    whatever the batching, merge order or form."""
    torch.manual_seed(4)
    d = 6  # max_rows = 3
    x = torch.randn(40, d)
    labels = torch.tensor([0, 1, -1, 2] * 10)  # a, b, none, c: 10 tokens each
    labels[[0, 4]] = -1  # a: 8 tokens
    labels[[1, 5, 9, 13, 17, 21, 25]] = -1  # b: 3 tokens, stays rows
    names = ["a", "b", "c"]

    def oracle(k):
        rows = x[labels == k].double()
        return rows.T @ rows

    one = Moments.zeros(d)
    one.add(x, labels, names)
    parts = []
    for i, sl in enumerate((slice(0, 7), slice(7, 22), slice(22, 40))):
        p = Moments.zeros(d)
        p.sources = frozenset({f"s{i}"})
        for j in range(sl.start, sl.stop, 2):  # two-token batches: many crossings
            p.add(x[j:min(j + 2, sl.stop)], labels[j:min(j + 2, sl.stop)], names)
        parts.append(p)
    merged = [parts[0].merge(parts[1]).merge(parts[2]), parts[2].merge(parts[1].merge(parts[0]))]
    for m in (one, *merged):
        assert set(m.rows) == {"b"} and set(m.concepts) == {"a", "c"}
        assert m.counts == {"a": 8, "b": 3, "c": 10} and m.n_total == 40
        for k, c in enumerate(names):
            assert torch.allclose(m.sigma(c), oracle(k), rtol=0, atol=1e-12)
        assert torch.allclose(m.total, x.double().T @ x.double(), rtol=0, atol=1e-12)
    assert Moments.zeros(d, max_rows=0).max_rows == 0
    dense = Moments.zeros(d, max_rows=0)
    dense.add(x, labels, names)
    assert dense.rows == {} and torch.allclose(dense.sigma("b"), oracle(1), rtol=0, atol=1e-12)


def test_pack_unpack_symmetric():
    a = torch.randn(6, 6, dtype=torch.float64)
    s = a + a.T
    assert pack_symmetric(s).numel() == 21
    assert torch.equal(unpack_symmetric(pack_symmetric(s), 6), s)


def test_public_api_is_explicit():
    for name in engram_ray.__all__:
        assert hasattr(engram_ray, name), name
    for name in ("open_run", "extract", "plan_edit", "apply_edit", "SolverConfig", "Batch"):
        assert name in engram_ray.__all__


def test_kept_statistics_extend_a_run_without_rereading_old_shards(tmp_path):
    """Incremental Σ: old run's Σ + new shards' Σ, re-solved, equals one pass over all shards;
    merging statistics that cover a shard twice is refused."""
    from engram_ray import extract
    from engram_ray.core.capture import collect_statistics
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
    old = Batch(torch.randn(30, 5), ["a"] * 10 + [None] * 20)
    new = Batch(torch.randn(30, 5), ["b"] * 10 + ["a"] * 5 + [None] * 15)
    run = extract(model, [old], uri=str(tmp_path / "old"), keep_statistics=True,
                  sources=["shard-0"])
    kept = run.statistics()
    assert kept.groups["0"].sources == {"shard-0"} and kept.groups["0"].n_total == 30
    fresh = collect_statistics(model, [new])
    for m in fresh.groups.values():
        m.sources = frozenset({"shard-1"})
    merged = kept.merge(fresh)
    w = RunWriter(str(tmp_path / "extended"))
    weights = {n: weight_matrix(model.get_submodule(n), i.bias) for n, i in merged.modules.items()}
    w.commit(solve_statistics(merged, weights, w), {})
    extended = open_run(str(tmp_path / "extended"), model=model)
    both = extract(model, [old, new], uri=str(tmp_path / "both"))
    for c in ("a", "b"):
        for mod in ("0", "2"):
            a, b = extended.engram(c, mod).double(), both.engram(c, mod).double()
            assert torch.linalg.norm(a - b) <= 1e-6 * torch.linalg.norm(b)
    with pytest.raises(ValueError, match="counted twice"):
        merged.merge(kept)
    with pytest.raises(FileNotFoundError, match="keep_statistics"):
        open_run(str(tmp_path / "both")).statistics()


def test_manifest_norms_equal_the_formula_for_wide_narrow_and_block_modules(tmp_path):
    """rel_norm = ‖W Σ_c Σ⁺‖/‖W‖ by the Gram identities (W Xᵀ for modules narrower than D,
    X WᵀW Xᵀ for wider ones, ⟨WᵀW, P Pᵀ⟩ for blocks) equals the norm of the formed engram."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 3))  # wide, then narrow
    labels = ["r1"] * 2 + ["r2"] * 3 + ["blk"] * 9 + [None] * 16
    stats = collect_statistics(model, [Batch(torch.randn(30, 5), labels)])
    uri, _, _ = write_run(tmp_path, model_stats=(model, stats))
    run = open_run(uri, model=model)
    assert run.record("r1", "0")["form"] == "factored" and run.record("blk", "0")["form"] == "dense"
    for c in run.concepts:
        for m in run.modules:
            w = weight_matrix(model.get_submodule(m))
            want = float(torch.linalg.norm(oracle(model, stats, c, m)) / torch.linalg.norm(w))
            assert run.record(c, m)["rel_norm"] == pytest.approx(want, rel=1e-9), (c, m)
