"""Device placement and full-precision Gram sums (engram_ray/devices.py, core/moments.py).

CPU tests run everywhere; the ``cuda`` tests need a GPU and are skipped without one. The
CUDA-against-CPU oracle: the same tiny Llama extracted on both devices, every engram within
1e-5 relative (float32 activations differ in the last bits between the two; Σ is float64).
"""

from __future__ import annotations

import pytest
import torch

from engram_ray.config import ConfigError, ParallelConfig
from engram_ray.core.batch import Batch
from engram_ray.core.moments import Moments, _gram, partition
from engram_ray.devices import batch_to, module_device, no_tf32, resolve_device

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_resolve_device_names():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")  # no GPUs asked for: the CPU
    assert resolve_device("auto", 0.0) == torch.device("cpu")
    for bad in ("gpu", "cuda:x", "", None, "CPU"):
        with pytest.raises(ValueError, match="parallel.device must be auto, cpu, cuda"):
            resolve_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answers")
def test_resolve_device_without_gpu():
    assert resolve_device("auto", 1.0) == torch.device("cpu")
    with pytest.raises(ValueError, match="parallel.device is 'cuda' but torch sees no CUDA"):
        resolve_device("cuda")


def test_config_device_key():
    assert ParallelConfig().device == "auto"
    assert ParallelConfig(device="cuda:1").device == "cuda:1"
    with pytest.raises(ConfigError, match="parallel.device must be auto, cpu, cuda or cuda:N"):
        ParallelConfig(device="gpu0")


def test_no_tf32_restores_the_process_setting():
    matmul = torch.backends.cuda.matmul
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")  # what training code often sets
        with no_tf32():
            if hasattr(matmul, "fp32_precision"):
                assert matmul.fp32_precision == "ieee"
            else:
                assert not matmul.allow_tf32
        # the legacy getters stay readable (torch ≥ 2.9 raises on a mixed-API state)
        assert torch.get_float32_matmul_precision() == "high"
        assert matmul.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before)


def test_batch_to_and_module_device():
    b = Batch(inputs={"input_ids": torch.ones(2, 3, dtype=torch.long)}, concepts=["a", None])
    assert batch_to(b, "cpu") is b
    assert module_device(torch.nn.Linear(2, 2)) == torch.device("cpu")
    assert module_device(torch.nn.Module()) == torch.device("cpu")


def test_partition_equals_one_nonzero_per_concept():
    g = torch.Generator().manual_seed(3)
    for n in (0, 1, 7, 50):
        index = torch.randint(-1, 5, (n,), generator=g)
        want = [(k, (index == k).nonzero().squeeze(1))
                for k in torch.unique(index).tolist() if k >= 0]
        got = partition(index)
        assert [k for k, _ in got] == [k for k, _ in want]
        for (_, a), (_, b) in zip(got, want):
            assert torch.equal(a, b)


def _add_oracle(m: Moments, x, index, names, dtype):
    """Moments.add as written before the index gather (a boolean mask of the rest)."""
    x = x.float()
    gram_rows = []
    for k, idx in partition(index):
        name = names[k]
        rows = x[idx]
        n = m.counts.get(name, 0) + rows.shape[0]
        m.counts[name] = n
        if name not in m.concepts and n <= m.max_rows:
            old = m.rows.get(name)
            m.rows[name] = rows if old is None else torch.cat([old, rows])
            continue
        g = _gram(rows, dtype)
        m.total += g
        gram_rows.append(idx)
        if name in m.rows:
            g = g + _gram(m.rows.pop(name), dtype)
        m.concepts[name] = m.concepts[name] + g if name in m.concepts else g
    if not gram_rows:
        m.total += _gram(x, dtype)
    else:
        rest = torch.ones(x.shape[0], dtype=torch.bool)
        rest[torch.cat(gram_rows)] = False
        if rest.any():
            m.total += _gram(x[rest], dtype)
    m.n_total += x.shape[0]


@pytest.mark.parametrize("gram_dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, cuda])])
def test_add_gathers_the_rest_exactly(gram_dtype, device):
    """The index gather of the tokens outside concept blocks gives bit for bit the sums of
    the boolean mask it replaced, over batches that fold rows into blocks, keep rows, and
    have unlabelled tokens or none; and Σ_total equals xᵀx over all tokens (float64)."""
    g = torch.Generator().manual_seed(0)
    names = ["a", "b", "c"]
    ours = Moments.zeros(8, device=device, max_rows=6)
    ref = Moments.zeros(8, max_rows=6)
    seen = []
    for n, labels in [(7, [0, 0, 1, -1, 2, -1, 0]), (5, [1, 1, 1, 1, 2]),
                      (6, [-1, -1, -1, -1, -1, -1]), (9, [0, 2, 2, 2, 2, 2, 1, -1, 0]),
                      (4, [2, 2, 0, 1]), (3, [2, 2, 2])]:
        x = torch.randn(n, 8, generator=g)
        index = torch.tensor(labels)
        given = (index < 0).nonzero().squeeze(1)
        ours.add(x.to(device), index.to(device), names, gram_dtype,
                 parts=[(k, i.to(device)) for k, i in partition(index)],
                 unlabelled=given.to(device) if n % 2 else None)
        _add_oracle(ref, x, index, names, gram_dtype)
        seen.append(x)
    # CUDA's products sum in another order: float64 agrees to ~1e-16, float32 to ~1e-7
    tol = {"rtol": 1e-12, "atol": 1e-10} if gram_dtype == torch.float64 else \
        {"rtol": 1e-5, "atol": 1e-5}
    same = torch.equal if device == "cpu" else (lambda a, b: torch.allclose(a, b, **tol))
    assert same(ours.total.cpu(), ref.total)
    assert ours.counts == ref.counts and ours.n_total == ref.n_total
    assert sorted(ours.concepts) == sorted(ref.concepts) and sorted(ours.rows) == sorted(ref.rows)
    for c in ref.concepts:
        assert same(ours.concepts[c].cpu(), ref.concepts[c])
    for c in ref.rows:
        assert torch.equal(ours.rows[c].cpu(), ref.rows[c])
    if gram_dtype == torch.float64:
        x = torch.cat(seen).double()
        torch.testing.assert_close(ours.total.cpu(), x.T @ x, rtol=1e-12, atol=1e-12)


@pytest.mark.cuda
@cuda
def test_float32_gram_is_ieee_on_cuda_even_with_tf32_on():
    before = torch.get_float32_matmul_precision()
    x = torch.randn(4096, 512, device="cuda")
    exact = (x.double().T @ x.double())
    try:
        torch.set_float32_matmul_precision("high")  # TF32 for the process's own matmuls
        got = _gram(x, torch.float32)
    finally:
        torch.set_float32_matmul_precision(before)
    rel = ((got - exact).norm() / exact.norm()).item()
    assert rel < 1e-5, rel  # TF32 (10-bit mantissa) is ~1e-3 here


@pytest.mark.cuda
@cuda
def test_cuda_capture_flags_non_finite_input():
    from engram_ray.core.capture import Capture

    lin = torch.nn.Linear(4, 3).cuda()
    with Capture({"lin": lin}) as cap, pytest.raises(ValueError, match="entering module 'lin'"):
        x = torch.randn(2, 4, device="cuda")
        x[1, 2] = float("nan")
        cap.accumulate(lin, Batch(inputs=x, concepts=["a", "b"]))


@pytest.mark.cuda
@cuda
def test_cuda_engrams_equal_cpu_engrams(tmp_path):
    from engram_ray.local import extract
    from engram_ray.models.tiny import tiny_llama

    # float64 weights: the two devices' activations agree to ~1e-15 before the capture casts
    # them to float32, so what is compared is the engine (Σ, eigh) on each device
    model = tiny_llama(vocab_size=64, hidden=32, layers=2).double()
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(6):
        ids = torch.randint(3, 64, (4, 12), generator=g)
        mask = torch.zeros(4, 12, dtype=torch.bool)
        mask[:, 5:] = True
        batches.append(Batch(inputs={"input_ids": ids}, concepts=["a", "b", None, "c"][: 4],
                             mask=mask))
    import copy

    import engram_ray

    gpu_model = copy.deepcopy(model).cuda()
    extract(model, batches, uri=str(tmp_path / "cpu"))
    gpu = extract(gpu_model, batches, uri=str(tmp_path / "gpu"))
    assert gpu.info.get("device", "cuda:0").startswith("cuda")
    # both runs' engrams formed from the same host weights: what differs is Σ and its
    # eigendecomposition, computed on the GPU for one of them
    cpu_run = engram_ray.open_run(str(tmp_path / "cpu"), model=model)
    gpu_run = engram_ray.open_run(str(tmp_path / "gpu"), model=model)
    worst = 0.0
    for c in cpu_run.concepts:
        for m in cpu_run.modules:
            a, b = cpu_run.engram(c, m), gpu_run.engram(c, m)
            worst = max(worst, ((a - b).norm() / a.norm().clamp_min(1e-30)).item())
    assert worst <= 1e-5, worst


def _config_run(tmp_path, parallel: dict):
    """``extract_from_config`` (the ``--local`` path) on a tiny Llama directory and a Parquet
    file of QA rows, with ``parallel`` settings; returns (run, model directory)."""
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    from engram_ray.config import ExtractConfig
    from engram_ray.local import extract_from_config
    from engram_ray.models.tiny import save_tiny_llama

    words = "who wrote the sea book river town born award".split()
    g = torch.Generator().manual_seed(0)
    pick = lambda: " ".join(words[i] for i in torch.randint(0, len(words), (5,), generator=g))  # noqa: E731
    rows = [{"author": ["ada", "bo", None][i % 3], "question": pick(), "answer": pick()}
            for i in range(18)]
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), data / "part-0.parquet")
    model_dir = str(tmp_path / "model")
    if not os.path.exists(model_dir):
        save_tiny_llama(model_dir, corpus=words, hidden=32, layers=2)
    name = "-".join(f"{k}{v}" for k, v in sorted(parallel.items())).replace(":", "")
    cfg = ExtractConfig.from_dict({
        "model": {"path": model_dir},
        "data": {"paths": [str(data)], "concept_column": "author", "prompt_column": "question",
                 "answer_column": "answer", "max_length": 32},
        "parallel": {**parallel, "progress_interval_s": None},
        "store": {"uri": str(tmp_path / "runs"), "run_id": name or "default"},
    })
    return extract_from_config(cfg, log=open(os.devnull, "w")), model_dir


def test_config_auto_stays_on_the_cpu_without_gpus_asked(tmp_path):
    run, _ = _config_run(tmp_path, {})
    assert run.info["device"] == "cpu"
    run, _ = _config_run(tmp_path, {"device": "cpu", "num_gpus": 1.0})
    assert run.info["device"] == "cpu"


@pytest.mark.cuda
@cuda
def test_config_device_cuda_equals_cpu(tmp_path):
    import engram_ray

    f64 = {"dtype": "float64"}  # the engine compared, not the devices' float32 kernels
    cpu, model_dir = _config_run(tmp_path, {**f64, "device": "cpu"})
    gpu, _ = _config_run(tmp_path, {**f64, "device": "cuda"})
    auto, _ = _config_run(tmp_path, {**f64, "num_gpus": 1.0})
    assert gpu.info["device"].startswith("cuda") and auto.info["device"].startswith("cuda")
    cpu = engram_ray.open_run(cpu.uri, model=model_dir)
    gpu = engram_ray.open_run(gpu.uri, model=model_dir)
    worst = max(((cpu.engram(c, m) - gpu.engram(c, m)).norm()
                 / cpu.engram(c, m).norm().clamp_min(1e-30)).item()
                for c in cpu.concepts for m in cpu.modules)
    assert worst <= 1e-5, worst
