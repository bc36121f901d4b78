"""Extraction and edits on a GPU (issue 22): one prepared command, one table.

    python3 benchmarks/gpu_check.py --out DIR             # the device run (an H200), ≤ 8 min
    python3 benchmarks/gpu_check.py --out DIR --cpu-smoke # the same, end to end, tiny, on CPU

Everything goes through the single-process public path (``engram_ray.local.extract``, the
run it commits, ``plan_edit`` / ``apply_edit`` / ``apply_run``): no Ray is imported.

(a) correctness: a small float32 Llama extracted on CUDA and on the CPU, every engram compared
    (≤ 1e-5 relative), and the same 2-author edit applied on each device.
(b) a Llama-3.2-1B-shaped model (16 layers, hidden 2048, intermediate 8192, 32/8 heads,
    vocab 128256, tied embeddings, bf16, random weights built in memory and saved with
    safetensors) on TOFU-sized synthetic data (4,000 QA rows, 200 authors, ~100 tokens a row,
    answer-token masks): a plain bf16 forward of the rows against our statistics pass
    (float64 and float32 Gram sums), extraction end to end for 5 and 20 concepts, solve
    seconds by group width, commit bytes and seconds, peak GPU memory, an edit forgetting
    20 authors (in memory on the GPU, and ``apply_run`` writing the edited checkpoint), and
    all 200 authors in layer chunks sized to the GPU's memory and the disk.
(c) ai-engram 0.11.0 (``benchmarks/peer.py``'s driver conventions) on the same GPU, model
    and rows for 5 and 20 concepts: one pass for the total, then per concept one pass and
    one pseudo-inverse per layer. Concepts are timed one by one until its time budget ends;
    the rest is extrapolated (labelled so) from the mean per-concept time.

Each part runs under a time budget (``--budget-s``, default 450 s for the whole) and catches
its own exceptions, so the table (``DIR/gpu_check.md``, ``DIR/gpu_check.json``) is always
written; a part that ran out of time or failed says so in its row.

Σ for 200 concepts of every layer does not fit on one GPU at this size (each author's ~600
answer tokens are kept as rows: 600 × (3·2048 + 8192) × 4 B ≈ 34 MB per layer, so ≈ 7 GB per
layer and ≈ 110 GB for 16 layers, with the model, the forward's activations and Σ_total
beside them); the 200-author extraction is measured in chunks of layers sized to the GPU's
free memory and the disk, each committed, measured and removed before the next.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from engram_ray.core.batch import Batch  # noqa: E402

IGNORE = -100

SIZES = {
    "full": {
        "small": dict(vocab=512, hidden=128, inter=256, layers=2, heads=4, kv=2, rows=96,
                      authors=6, tokens=32, batch=16, forget=2),
        "big": dict(vocab=128256, hidden=2048, inter=8192, layers=16, heads=32, kv=8,
                    rows=4000, authors=200, tokens=100, batch=64, forget=20, peer=(5, 20)),
    },
    "medium": {  # a CPU rehearsal of the full run's paths (chunk sizing, time guards)
        "small": dict(vocab=128, hidden=32, inter=64, layers=2, heads=4, kv=2, rows=48,
                      authors=4, tokens=16, batch=16, forget=2),
        "big": dict(vocab=2000, hidden=128, inter=256, layers=4, heads=4, kv=2, rows=400,
                    authors=40, tokens=40, batch=16, forget=4, peer=(2, 4)),
    },
    "smoke": {  # every code path, seconds on a CPU: the suite runs it (tests/test_gpu_check.py)
        "small": dict(vocab=64, hidden=16, inter=32, layers=1, heads=2, kv=1, rows=12,
                      authors=3, tokens=12, batch=6, forget=2),
        "big": dict(vocab=128, hidden=16, inter=32, layers=2, heads=2, kv=1, rows=16,
                    authors=4, tokens=12, batch=8, forget=2, peer=(1, 2)),
    },
}


# --- bookkeeping ------------------------------------------------------------------------------
class Report:
    """Rows of the table, each part's status, the clock."""

    def __init__(self, budget_s: float, device: str) -> None:
        self.t0 = time.perf_counter()
        self.budget_s = budget_s
        self.device = device
        self.rows: list[dict] = []
        self.parts: dict[str, str] = {}
        self.checks: list[dict] = []
        self.errors: dict[str, str] = {}
        self.current: str | None = None  # the part running now

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self, until_frac: float = 1.0) -> float:
        return self.budget_s * until_frac - self.elapsed()

    def add(self, part: str, what: str, value=None, unit: str = "", note: str = "",
            **extra) -> None:
        row = {"part": part, "what": what, "value": value, "unit": unit, "note": note, **extra}
        self.rows.append(row)
        shown = f"{value:.4g}" if isinstance(value, float) else value
        print(f"[{self.elapsed():6.1f}s] ({part}) {what}: {shown} {unit} {note}", flush=True)

    def check(self, what: str, target: str, measured, ok: bool | None) -> None:
        self.checks.append({"what": what, "target": target, "measured": measured,
                            "met": ok})

    @contextlib.contextmanager
    def part(self, name: str, until_frac: float):
        """Run a part if its share of the budget is not spent; record its exception."""
        if self.left(until_frac) <= 0:
            self.parts[name] = f"skipped: no time left ({self.elapsed():.0f}s elapsed)"
            print(f"[{self.elapsed():6.1f}s] part {name} skipped: out of time", flush=True)
            yield False
            return
        sync(self.device)
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        self.current = name
        try:
            yield True
            self.parts.setdefault(name, "ok")
        except Exception as e:  # noqa: BLE001 - one part's failure must not stop the others
            self.parts[name] = f"error: {type(e).__name__}: {str(e)[:300]}"
            self.errors[name] = traceback.format_exc()
            print(f"[{self.elapsed():6.1f}s] part {name} failed:\n{traceback.format_exc()}",
                  flush=True)
        finally:
            print(f"[{self.elapsed():6.1f}s] part {name}: {time.perf_counter() - t:.1f}s",
                  flush=True)
            cleanup(self.device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def cleanup(device: str) -> None:
    """Give freed GPU memory back (a full collection first: cycles may hold tensors). A no-op
    on the CPU, where a collection costs ~1 s with transformers loaded and frees nothing
    the next part needs."""
    if device.startswith("cuda"):
        import gc

        gc.collect()
        torch.cuda.empty_cache()


def peak_gb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def dir_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(root, f))
    return total


# --- model and data ---------------------------------------------------------------------------
def llama_config(s: dict):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"],
                       intermediate_size=s["inter"], num_hidden_layers=s["layers"],
                       num_attention_heads=s["heads"], num_key_value_heads=s["kv"],
                       max_position_embeddings=max(256, 2 * s["tokens"]),
                       tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                       pad_token_id=0, rms_norm_eps=1e-5)


def build_model(s: dict, device: str, dtype: torch.dtype, path: str | None, seed: int = 0):
    """A random LlamaForCausalLM from ``s`` built on ``device`` (no hub), in ``dtype``; saved
    as an HF directory with safetensors at ``path`` when given."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(llama_config(s))
    model = model.to(dtype).eval()
    if path is not None:
        model.save_pretrained(path, safe_serialization=True)
    return model


def make_rows(s: dict, seed: int = 0) -> list[dict]:
    """``s["rows"]`` QA rows over ``s["authors"]`` authors (consecutive rows per author, as
    TOFU): BOS, a prompt of 70 % of ~``s["tokens"]`` tokens, then the answer (30 counted
    answer tokens a row at 100: docs/scaling.md's TOFU workload, ~600 per author); token ids
    drawn half from a band of the author's own and half from the whole vocabulary, so
    authors differ in their statistics. ``prompt`` is the prompt's length."""
    g = torch.Generator().manual_seed(seed)
    n, a, t, v = s["rows"], s["authors"], s["tokens"], s["vocab"]
    per = -(-n // a)
    band = max(8, (v - 3) // a)
    rows = []
    for i in range(n):
        author = i // per
        length = max(6, int(t * (0.8 + 0.4 * torch.rand(1, generator=g).item())))
        prompt = max(2, int(0.7 * length))
        lo = 3 + (author * band) % max(1, v - 3 - band)
        own = torch.randint(lo, lo + band, (length,), generator=g)
        anyv = torch.randint(3, v, (length,), generator=g)
        ids = torch.where(torch.rand(length, generator=g) < 0.5, own, anyv)
        ids[0] = 1  # BOS
        rows.append({"author": f"author_{author:03d}", "ids": ids, "prompt": prompt})
    return rows


def batches_for(rows: list[dict], keep: set[str] | None, batch: int) -> list[Batch]:
    """Right-padded batches (pad id 0), answer-token masks (the positions whose input token is
    an answer token: ai-engram's convention), rows of authors outside ``keep`` unlabelled
    (they count in Σ_total only); ``keep=None`` labels every row."""
    out = []
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        width = max(len(r["ids"]) for r in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        attn = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.bool)
        for j, r in enumerate(chunk):
            n = len(r["ids"])
            ids[j, :n], attn[j, :n], mask[j, r["prompt"]:n] = r["ids"], 1, True
        concepts = [r["author"] if keep is None or r["author"] in keep else None for r in chunk]
        out.append(Batch(inputs={"input_ids": ids, "attention_mask": attn}, concepts=concepts,
                         mask=mask))
    return out


def peer_encoded(rows: list[dict]) -> list[dict]:
    """The same rows as ``benchmarks/peer.py`` feeds ai-engram: ids and labels (-100 off the
    answer)."""
    out = []
    for r in rows:
        labels = r["ids"].clone()
        labels[: r["prompt"]] = IGNORE
        out.append({"input_ids": r["ids"], "labels": labels})
    return out


def answer_tokens(rows: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["author"]] = counts.get(r["author"], 0) + len(r["ids"]) - r["prompt"]
    return counts


def sigma_bytes(counts: dict[str, int], dims: list[int]) -> int:
    """Bytes of Σ the capture holds for concepts with ``counts`` answer tokens over input
    groups of widths ``dims`` (core/moments.py's rule: a concept keeps its n_c × D float32 rows
    while n_c ≤ D/2, else a D × D float64 block; plus Σ_total)."""
    total = 0
    for d in dims:
        total += d * d * 8
        for n in counts.values():
            total += n * d * 4 if n <= d // 2 else d * d * 8
    return total


# --- our engine through the public API --------------------------------------------------------
def engram_source(run, model, model_dir: str | None):
    """Something ``plan_edit`` and ``engram`` can read: the run ``extract`` returned, else (a
    run that stores statistics and forms engrams on read) the run bound to its saved model
    directory (weights read on the host), else to the in-memory model."""
    probe = (run.concepts[0], run.modules[0])
    candidates = [lambda: run]
    for given in (model_dir, model):
        if given is not None:
            candidates.append(lambda given=given: _bound(run.uri, given))
    error: Exception | None = None
    for make in candidates:
        try:
            source = make()
            source.engram(*probe)
            return source
        except Exception as e:  # noqa: BLE001 - try the next way of reading engrams
            error = e if error is None else error
    raise error


def _bound(uri: str, model):
    import engram_ray

    return engram_ray.open_run(uri, model=model)


def extract_timed(model, batches, uri: str, device: str, **select) -> dict:
    """``extract`` end to end (statistics, solve, commit), timed; the run's own timings."""
    from engram_ray.local import extract

    sync(device)
    t0 = time.perf_counter()
    run = extract(model, batches, uri=uri, **select)
    sync(device)
    wall = time.perf_counter() - t0
    timings = run.info.get("timings", {})
    total = timings.get("total_s")
    return {"run": run, "wall_s": wall, "statistics_s": timings.get("statistics_s"),
            "solve_s": timings.get("solve_s"),
            "commit_s": (wall - total) if total is not None else None,
            "bytes": dir_bytes(uri), "solve_groups": run.info.get("solve_groups", [])}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / a.norm().clamp_min(1e-300))


# --- parts ------------------------------------------------------------------------------------
def part_a(rep: Report, sizes: dict, device: str, tmp: str) -> None:
    """CUDA against CPU on a small Llama: engrams and an edit. In float32 (how models run;
    the two devices' float32 kernels differ in the last bits, and the solve amplifies that)
    and in float64 (activations agree to ~1e-15 before the capture casts them to float32, so
    what differs is the engine alone: Σ, eigh and the engrams on the GPU)."""
    for dtype, tag in ((torch.float32, ""), (torch.float64, " (float64 model: the engine alone)")):
        _part_a(rep, sizes["small"], device, tmp, dtype, tag)


def _part_a(rep: Report, s: dict, device: str, tmp: str, dtype: torch.dtype, tag: str) -> None:
    from engram_ray.core.edit import apply_edit, plan_edit

    name = str(dtype).removeprefix("torch.")
    model_dir = os.path.join(tmp, f"small-model-{name}")
    cpu_model = build_model(s, "cpu", dtype, model_dir)
    rows = make_rows(s, seed=1)
    batches = batches_for(rows, None, s["batch"])
    dev_model = copy.deepcopy(cpu_model).to(device)
    cpu = extract_timed(cpu_model, batches, os.path.join(tmp, f"a-cpu-{name}"), "cpu")
    dev = extract_timed(dev_model, batches, os.path.join(tmp, f"a-dev-{name}"), device)
    src_cpu = engram_source(cpu["run"], cpu_model, model_dir)
    src_dev = engram_source(dev["run"], dev_model, model_dir)
    errs = [relative(src_cpu.engram(c, m), src_dev.engram(c, m))
            for c in src_cpu.concepts for m in src_cpu.modules]
    worst = max(errs)
    rep.add("a", f"{name} engrams {device} vs cpu, worst relative (of {len(errs)})", worst,
            note=f"median {statistics.median(errs):.2e}; target ≤ 1e-5")
    rep.check(f"engrams on {device} equal CPU engrams{tag}", "≤ 1e-5 relative", f"{worst:.2e}",
              worst <= 1e-5)
    forget = src_cpu.concepts[: s["forget"]]
    base = {n: p.detach().clone() for n, p in cpu_model.named_parameters()}
    apply_edit(cpu_model, plan_edit(src_cpu, forget, alpha=1.0))
    apply_edit(dev_model, plan_edit(src_dev, forget, alpha=1.0))
    dev_params = dict(dev_model.named_parameters())
    worst_w = worst_d = 0.0
    for n, p in cpu_model.named_parameters():
        q = dev_params[n].detach().cpu()
        worst_w = max(worst_w, relative(p.detach(), q))
        delta = (p.detach() - base[n]).double()
        if delta.norm() > 0:
            worst_d = max(worst_d, float((q.double() - p.detach().double()).norm()
                                         / delta.norm()))
    rep.add("a", f"{name} edit on {device} vs cpu edit (forget {len(forget)}), worst weight "
                 "relative", worst_w, note=f"relative to the edit itself: {worst_d:.2e}")
    rep.check(f"edit applied on {device} equals the CPU edit{tag}", "≤ 1e-5 relative (weights)",
              f"{worst_w:.2e} (of the edit: {worst_d:.2e})", worst_w <= 1e-5)


class Big:
    """The 1B-shaped model and rows, shared by parts b and c."""

    def __init__(self, sizes: dict, device: str, tmp: str, rep: Report) -> None:
        self.s = s = sizes["big"]
        self.device = device
        self.dir = os.path.join(tmp, "big-model")
        dtype = torch.bfloat16
        t = time.perf_counter()
        self.model = build_model(s, device, dtype, self.dir)
        sync(device)
        params = sum(p.numel() for p in self.model.parameters())
        rep.add("b", "model built on the device and saved (safetensors)",
                time.perf_counter() - t, "s",
                note=f"{params / 1e9:.3f} B parameters, bf16, {dir_bytes(self.dir) / 2**30:.2f} "
                     "GiB on disk")
        self.rows = make_rows(s)
        self.counts = answer_tokens(self.rows)
        self.authors = sorted(self.counts)
        n_tok = sum(len(r["ids"]) for r in self.rows)
        self.tokens = n_tok
        self.answer_tokens = sum(self.counts.values())
        rep.add("b", "data", len(self.rows), "rows",
                note=f"{len(self.authors)} authors, {n_tok} tokens "
                     f"({n_tok / len(self.rows):.0f} a row), {self.answer_tokens} answer tokens")
        h, i = s["hidden"], s["inter"]
        self.layer_dims = [h, h, h, i]  # q/k/v, o, gate/up, down
        self.lm_head_dim = h


def part_b_core(rep: Report, big: Big, tmp: str, ours: dict, until: float) -> None:
    """A plain bf16 forward of every row against our statistics pass over them."""
    device, s, model = big.device, big.s, big.model
    all_batches = batches_for(big.rows, None, s["batch"])

    def forward():  # inputs moved per batch, as the engine does
        with torch.no_grad():
            for b in all_batches:
                model(**{k: v.to(device) for k, v in b.inputs.items()})
        sync(device)

    with torch.no_grad():
        model(**{k: v.to(device) for k, v in all_batches[0].inputs.items()})  # warm-up
    sync(device)
    t = time.perf_counter()
    forward()
    t_fwd = ours["forward_s"] = big.s_forward = time.perf_counter() - t
    rep.add("b", "plain bf16 forward of every row (no hooks)", t_fwd, "s",
            note=f"{big.tokens / t_fwd:,.0f} tokens/s")
    stats_pass(rep, big, ours, "float64")


def stats_pass(rep: Report, big: Big, ours: dict, gram: str) -> None:
    """The statistics pass alone (the Capture the engine uses), the largest peer concept
    count labelled, Gram sums in ``gram``."""
    from engram_ray.core.capture import collect_statistics

    device, s = big.device, big.s
    k = max(s["peer"])
    bs = batches_for(big.rows, set(big.authors[:k]), s["batch"])
    sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    stats = collect_statistics(big.model, (_moved(b, device) for b in bs), gram_dtype=gram)
    sync(device)
    t_stats = time.perf_counter() - t
    del stats
    peak = peak_gb(device)
    cleanup(device)
    t_fwd = ours["forward_s"]
    ours[f"stats_{gram}_s"] = t_stats
    rep.add("b", f"statistics pass, Gram sums in {gram} ({k} concepts labelled)", t_stats, "s",
            note=f"{big.tokens / t_stats:,.0f} tokens/s; {t_stats / t_fwd:.2f}× the forward; "
                 f"peak GPU {_gb(peak)}", ratio=t_stats / t_fwd)
    if gram == "float64":
        rep.check("statistics pass vs plain bf16 forward", "≤ 1.5×", f"{t_stats / t_fwd:.2f}×",
                  t_stats / t_fwd <= 1.5)


def extract_k(rep: Report, big: Big, tmp: str, ours: dict, k: int, until: float) -> None:
    """Extraction end to end with the first ``k`` authors labelled (the others count in
    Σ_total only), every module; skipped when its bytes (scaled from a smaller run) would not
    fit on the disk."""
    device, s = big.device, big.s
    per = ours.get("bytes_per_concept")  # every module: the layers' and lm_head's
    if per is None and ours.get("bytes_per_concept_layer") is not None:
        per = ours["bytes_per_concept_layer"] * (s["layers"] + 1)
    if per is not None and per * k > 0.8 * shutil.disk_usage(tmp).free:
        rep.add("b", f"extraction, {k} concepts", None,
                note=f"skipped: would write ~{per * k / 2**30:.0f} GiB, the disk has "
                     f"{shutil.disk_usage(tmp).free / 2**30:.0f} GiB free")
        return
    guess = max((v["wall_s"] for key, v in ours.items() if isinstance(key, int)),
                default=None)  # a run of every module costs about the same for any k
    if guess is not None and guess > rep.left(until) + 30:
        rep.add("b", f"extraction, {k} concepts", None,
                note=f"skipped: would take ~{guess:.0f}s, {max(0, rep.left(until)):.0f}s left")
        return
    uri = os.path.join(tmp, f"b-{k}")
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    r = extract_timed(big.model, batches_for(big.rows, set(big.authors[:k]), s["batch"]), uri,
                      device)
    peak = peak_gb(device)
    ours[k] = r
    ours["bytes_per_concept"] = r["bytes"] / k
    rep.add("b", f"extraction end to end, {k} concepts, every module", r["wall_s"], "s",
            note=f"statistics {_s(r['statistics_s'])}, solve {_s(r['solve_s'])}, "
                 f"commit {_s(r['commit_s'])}; {r['bytes'] / 2**30:.2f} GiB written; "
                 f"peak GPU {_gb(peak)}",
            bytes=r["bytes"], statistics_s=r["statistics_s"], solve_s=r["solve_s"],
            commit_s=r["commit_s"], peak_gpu_gib=peak)
    _solve_rows(rep, f"{k} concepts", r["solve_groups"])


def part_b_extra(rep: Report, big: Big, tmp: str, ours: dict, peer: dict,
                 until: float) -> None:
    """What the targets do not need, while time is left: the smaller peer count (and its
    comparison), the float32 Gram pass (the consumer-GPU setting), the 20-author edit (in
    memory and written: last, the slowest to bound)."""
    s = big.s
    smaller = sorted(s["peer"])[:-1]
    for k in smaller:
        if rep.left(until) > 0:
            extract_k(rep, big, tmp, ours, k, until)
    if smaller:
        compare(rep, big, ours, peer, smaller)
    if rep.left(until) > 0:
        stats_pass(rep, big, ours, "float32")
    k = s["forget"]
    if rep.left(until) > 0 and isinstance(ours.get(k), dict) and ours[k].get("run") is not None:
        _edit_rows(rep, big, ours[k]["run"], k, tmp, until)


def _moved(b: Batch, device: str) -> Batch:
    from engram_ray.devices import batch_to

    return batch_to(b, device)


def _s(x) -> str:
    return "n/a" if x is None else f"{x:.2f}s"


def _gb(x) -> str:
    return "n/a" if x is None else f"{x:.1f} GiB"


def _solve_rows(rep: Report, what: str, groups: list[dict]) -> None:
    """Solve seconds summed by group width D (the executor's per-group timings)."""
    by: dict[int, list[float]] = {}
    for g in groups:
        by.setdefault(int(g["dim"]), []).append(float(g["seconds"]))
    for d in sorted(by):
        t = by[d]
        rep.add("b", f"solve by group width, {what}: D = {d}", sum(t), "s",
                note=f"{len(t)} groups, {sum(t) / len(t):.3f}s each (eigh + engrams + write)",
                dim=d, groups=len(t))


def _edit_rows(rep: Report, big: Big, run, k: int, tmp: str, until: float) -> None:
    from engram_ray.apply import apply_run
    from engram_ray.core.edit import apply_edit, plan_edit

    device = big.device
    t = time.perf_counter()
    src = engram_source(run, big.model, big.dir)
    forget = big.authors[:k]
    if hasattr(src, "union"):  # a run that forms the union of the forget set at once
        src.union(forget, run.modules[-1])
    else:
        src.engram(forget[0], run.modules[-1])
    probe = time.perf_counter() - t  # one module's union (the binding's first read included)
    guess = 2 * probe * len(run.modules)  # apply_edit forms each delta twice (check, apply)
    if guess > rep.left(until) + 30:
        rep.add("b", f"edit in memory: forget {k} authors", None,
                note=f"skipped: ~{guess:.0f}s by one module's union ({probe:.1f}s), "
                     f"{max(0, rep.left(until)):.0f}s left")
        return
    edited = copy.deepcopy(big.model)
    sync(device)
    t = time.perf_counter()
    plan = plan_edit(src, forget, alpha=1.0)
    apply_edit(edited, plan)
    sync(device)
    t_edit = time.perf_counter() - t
    rep.add("b", f"edit in memory on the {device} model: forget {k} authors (plan + apply)",
            t_edit, "s", note=f"{len(plan.scales)} modules; engrams read via "
                             f"{'the run as extracted' if src is run else 'the bound run'}")
    del edited, plan
    cleanup(device)
    if rep.left(until) < max(60, 1.5 * t_edit):
        rep.add("b", f"apply_run: forget {k} authors, edited checkpoint written", None,
                note=f"skipped: {max(0, rep.left(until)):.0f}s left, the in-memory edit "
                     f"took {t_edit:.0f}s")
        return
    out = os.path.join(tmp, "edited")
    t = time.perf_counter()
    apply_run(run.uri, forget, alpha=1.0, out=out, model=big.dir, device=str(device))
    rep.add("b", f"apply_run: forget {k} authors, edited checkpoint written",
            time.perf_counter() - t, "s", note=f"{dir_bytes(out) / 2**30:.2f} GiB written")
    shutil.rmtree(out, ignore_errors=True)


def _all_authors(rep: Report, big: Big, tmp: str, smoke: bool, until: float,
                 ours: dict) -> dict:
    """Every author, every decoder layer, in chunks of layers that fit the GPU and the disk;
    each chunk committed, measured and removed. The first chunk is layer 0 alone: its bytes
    size the others (and tell whether a 20-concept run of every module fits on the disk).
    lm_head is left out (it has no layer index for ``layers_to_transform``; its group is one
    more D = hidden)."""
    device, s = big.device, big.s
    n_layers = s["layers"]
    per_layer_sigma = sigma_bytes(big.counts, big.layer_dims)
    done, wall, stats_s, solve_s, commit_s, nbytes, groups = 0, 0.0, 0.0, 0.0, 0.0, 0, []
    peak, chunks = 0.0, 0
    while done < n_layers and (done == 0 or rep.left(until) > 0):  # chunk 0 always
        if done == 0:
            chunk = 1
        else:
            fit_mem = n_layers
            if device.startswith("cuda"):
                fit_mem = max(1, int(0.6 * torch.cuda.mem_get_info()[0] // per_layer_sigma))
            per_layer_disk = max(1, nbytes // done)
            fit_disk = max(1, int(0.6 * shutil.disk_usage(tmp).free // per_layer_disk))
            # time: a chunk run pays a fixed part (the forward, the fingerprint) plus its layers
            fixed = ours.get("forward_s", 0.0) + 2.0
            per_layer_s = max(0.1, (wall / chunks) - fixed)
            fit_time = int((rep.left(until) - fixed) // per_layer_s)
            if fit_time < 1 and not smoke:
                rep.add("b", "all authors: next chunk", None,
                        note=f"skipped: a layer takes ~{per_layer_s:.0f}s, "
                             f"{max(0, rep.left(until)):.0f}s left")
                break
            chunk = 1 if smoke else min(n_layers - done, fit_mem, fit_disk, max(1, fit_time))
            if chunks == 1:
                rep.add("b", f"all {len(big.authors)} authors: layers per further chunk", chunk,
                        note=f"Σ of one layer for every author ≈ {per_layer_sigma / 2**30:.1f} "
                             f"GiB on the GPU (fits {fit_mem}); {per_layer_disk / 2**30:.1f} "
                             f"GiB a layer on disk (fits {fit_disk})")
        layers = list(range(done, done + chunk))
        uri = os.path.join(tmp, f"all-{done}")
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        r = extract_timed(big.model, batches_for(big.rows, None, s["batch"]), uri, device,
                          layers_to_transform=layers)
        r["run"] = None
        shutil.rmtree(uri, ignore_errors=True)
        p = peak_gb(device)
        cleanup(device)
        done += len(layers)
        chunks += 1
        wall += r["wall_s"]
        stats_s += r["statistics_s"] or 0.0
        solve_s += r["solve_s"] or 0.0
        commit_s += r["commit_s"] or 0.0
        nbytes += r["bytes"]
        groups += r["solve_groups"]
        peak = max(peak, p or 0.0)
        ours["bytes_per_concept_layer"] = nbytes / done / len(big.authors)
        rep.add("b", f"all authors, layers {layers[0]}–{layers[-1]}", r["wall_s"], "s",
                note=f"statistics {_s(r['statistics_s'])}, solve {_s(r['solve_s'])}, commit "
                     f"{_s(r['commit_s'])}; {r['bytes'] / 2**30:.2f} GiB; peak GPU {_gb(p)}")
    out = {"layers_done": done, "wall_s": wall, "bytes": nbytes}
    if not done:
        rep.add("b", f"all {len(big.authors)} authors", None, note="skipped: out of time")
        return out
    scale = n_layers / done
    est = wall * scale
    label = ("measured" if done == n_layers
             else f"extrapolated ×{scale:.2f} from {done} layers")
    rep.add("b", f"all {len(big.authors)} authors × {n_layers} layers end to end "
                 f"({chunks} chunk runs)", est, "s",
            note=f"{label}; statistics {stats_s * scale:.1f}s, solve {solve_s * scale:.1f}s, "
                 f"commit {commit_s * scale:.1f}s; {nbytes * scale / 2**30:.1f} GiB written; "
                 f"peak GPU {peak:.1f} GiB; each chunk run pays a full forward",
            bytes=nbytes * scale, measured_layers=done, peak_gpu_gib=peak)
    _solve_rows(rep, f"{len(big.authors)} concepts", groups)
    rep.check(f"{len(big.authors)} concepts, 1B-shaped, statistics + solve + commit",
              "≤ 60 s", f"{est:.1f}s ({label})", est <= 60)
    out["estimate_s"] = est
    return out


def part_c(rep: Report, big: Big, peer: dict, until: float) -> None:
    """ai-engram 0.11.0 on the same device, model (loaded from the saved directory) and rows:
    the total's pass, then concept by concept (a pass over its rows + ``compute_engram_weights``,
    one pseudo-inverse per layer) until the part's time is spent."""
    try:
        import engram
    except ImportError:
        rep.parts["c"] = "skipped: ai-engram is not importable here"
        rep.add("c", "ai-engram 0.11.0", None, note="skipped: not installed")
        return
    from transformers import AutoModelForCausalLM

    from benchmarks.peer import _loader

    device, s = big.device, big.s
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(big.dir, dtype=torch.bfloat16).to(device)
    model.eval()
    rep.add("c", "ai-engram: model loaded from the saved directory", time.perf_counter() - t,
            "s", note="bf16, as ours")
    editor = engram.EngramEditor(model, engram.EditorConfig(absorb_bias=True))
    encoded = peer_encoded(big.rows)

    def feats(b):
        return {"input_ids": b["input_ids"].to(device),
                "attention_mask": b["attention_mask"].to(device)}

    def mask(b):
        return b["labels"] != IGNORE

    sync(device)
    t = time.perf_counter()
    total = editor.collect_statistics(_loader(encoded, s["batch"], 0), batch_fn=feats,
                                      mask_fn=mask)
    sync(device)
    peer["total_s"] = time.perf_counter() - t
    rep.add("c", "ai-engram: total statistics pass (every row)", peer["total_s"], "s",
            note=f"{peer['total_s'] / big.s_forward:.2f}× our plain forward"
            if getattr(big, "s_forward", None) else "")
    per = peer["per_concept_s"] = []
    for c in big.authors[: max(s["peer"])]:
        if per and rep.left(until) <= sum(per) / len(per):  # the first always runs
            break
        enc = [e for e, r in zip(encoded, big.rows) if r["author"] == c]
        t = time.perf_counter()
        target = editor.collect_statistics(_loader(enc, s["batch"], 0), batch_fn=feats,
                                           mask_fn=mask)
        result = editor.compute_engram_weights(target, total)
        sync(device)
        per.append(time.perf_counter() - t)
        del target, result
    if per:
        rep.add("c", f"ai-engram: one concept (a pass over its rows + pseudo-inverses), mean "
                     f"of {len(per)}", sum(per) / len(per), "s",
                note=f"peak GPU {_gb(peak_gb(device))}")
    del editor, total, model


def compare(rep: Report, big: Big, ours: dict, peer: dict, ks) -> None:
    """ai-engram against ours for the concept counts ``ks``; with the largest, the target
    check and ai-engram's extrapolated time for every author next to ours."""
    per = peer.get("per_concept_s") or []
    if not per:
        rep.add("c", f"ai-engram vs ours, {list(ks)} concepts", None,
                note="no ai-engram concept was timed")
        return
    mean = sum(per) / len(per)
    for k in ks:
        measured = len(per) >= k
        t_peer = peer["total_s"] + (sum(per[:k]) if measured else mean * k)
        label = "measured" if measured else f"extrapolated from {len(per)} timed concepts"
        mine = ours[k]["wall_s"] if isinstance(ours.get(k), dict) else None
        ratio = t_peer / mine if mine else None
        rep.add("c", f"ai-engram end to end, {k} concepts", t_peer, "s",
                note=f"{label}; ours (extraction end to end) {_s(mine)}: "
                     + (f"{ratio:.1f}× faster" if ratio else "n/a"), ratio=ratio)
        if k == max(big.s["peer"]):
            rep.check(f"{k} concepts: ours vs ai-engram on the same device", "≥ 10× faster",
                      f"{ratio:.1f}× ({label})" if ratio else "n/a",
                      None if ratio is None else ratio >= 10)
    if max(big.s["peer"]) not in ks:
        return
    n = len(big.authors)
    all_s = (ours.get("all") or {}).get("estimate_s")
    rep.add("c", f"ai-engram for all {n} concepts (extrapolated)", peer["total_s"] + mean * n,
            "s", note=f"ours for all {n}: {_s(all_s)}")


# --- output -----------------------------------------------------------------------------------
def write(out: str, rep: Report, args, env: dict) -> None:
    os.makedirs(out, exist_ok=True)
    doc = {"command": " ".join(["python3", "benchmarks/gpu_check.py", *sys.argv[1:]]),
           "env": env, "elapsed_s": rep.elapsed(), "parts": rep.parts, "checks": rep.checks,
           "rows": rep.rows, "errors": rep.errors}
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump(doc, f, indent=1, default=str)
    lines = [f"# gpu_check ({'cpu smoke' if args.cpu_smoke else env.get('gpu', args.device)})",
             "", f"Command: `{doc['command']}`  ", f"Elapsed: {rep.elapsed():.0f}s of a "
             f"{args.budget_s:.0f}s budget; torch {env['torch']}, python {env['python']}", "",
             "| part | status |", "|---|---|"]
    lines += [f"| {p} | {st} |" for p, st in rep.parts.items()]
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    for c in rep.checks:
        met = {True: "yes", False: "**no**", None: "n/a"}[c["met"]]
        lines.append(f"| {c['what']}: {c['target']} | {c['measured']} | {met} |")
    lines += ["", "| part | what | value | note |", "|---|---|---|---|"]
    for r in rep.rows:
        v = r["value"]
        shown = "—" if v is None else (f"{v:.3g} {r['unit']}" if isinstance(v, float)
                                       else f"{v} {r['unit']}")
        lines.append(f"| {r['part']} | {r['what']} | {shown.strip()} | {r['note']} |")
    with open(os.path.join(out, "gpu_check.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def environment(device: str) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(),
           "cpus": os.cpu_count()}
    with contextlib.suppress(Exception):
        import transformers

        env["transformers"] = transformers.__version__
    if device.startswith("cuda") and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1))
    return env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory for gpu_check.md / gpu_check.json")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="the whole script on the CPU at a tiny size (a test runs it)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", choices=sorted(SIZES), default=None,
                    help="model and data sizes (default: full; smoke with --cpu-smoke)")
    ap.add_argument("--budget-s", type=float, default=450.0,
                    help="seconds for all parts; the table is written whatever is left")
    ap.add_argument("--hard-s", type=float, default=None,
                    help="write the table and exit 3 at this many seconds whatever is running "
                         "(default: the budget + 100)")
    ap.add_argument("--tmp", default=None, help="scratch directory (default: a new temp dir)")
    args = ap.parse_args(argv)
    device = "cpu" if args.cpu_smoke else args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --cpu-smoke for the CPU run)", file=sys.stderr)
        return 2
    sizes = SIZES[args.size or ("smoke" if args.cpu_smoke else "full")]
    rep = Report(args.budget_s, device)
    env = environment(device)
    tmp = tempfile.mkdtemp(prefix="gpu-check-", dir=args.tmp)
    hard_s = args.hard_s if args.hard_s is not None else args.budget_s + 100

    def hard_stop() -> None:  # a part that overran everything: the table still comes back
        rep.parts[rep.current or "?"] = f"killed: the hard limit ({hard_s:.0f}s) passed"
        try:
            write(args.out, rep, args, env)
        finally:
            os._exit(3)

    timer = threading.Timer(hard_s, hard_stop)
    timer.daemon = True
    timer.start()
    ours: dict = {}
    peer: dict = {}
    try:
        with rep.part("a", 0.10) as go:
            if go:
                part_a(rep, sizes, device, tmp)
        big = None
        with rep.part("b-model", 0.5) as go:  # a start limit: parts b and c need it
            if go:
                big = Big(sizes, device, tmp, rep)
        if big is not None:  # parts in the order of the targets they decide
            # rep.part(name, x): the part starts only before x of the budget; the fraction
            # passed inside bounds its optional steps (a first step always runs)
            with rep.part("b-core", 0.5) as go:
                if go:
                    part_b_core(rep, big, tmp, ours, 0.28)
            with rep.part("b-all", 0.7) as go:
                if go:
                    ours["all"] = _all_authors(rep, big, tmp, args.cpu_smoke, 0.54, ours)
            with rep.part("b-peer-count", 0.8) as go:
                if go:
                    extract_k(rep, big, tmp, ours, max(big.s["peer"]), 0.66)
            with rep.part("c", 0.84) as go:
                if go:
                    part_c(rep, big, peer, 0.84)
            with rep.part("compare", 2.0) as go:  # instant: whatever was measured
                if go:
                    compare(rep, big, ours, peer, [max(big.s["peer"])])
            with rep.part("b-extra", 0.96) as go:
                if go:
                    part_b_extra(rep, big, tmp, ours, peer, 0.96)
    finally:
        timer.cancel()
        shutil.rmtree(tmp, ignore_errors=True)
        write(args.out, rep, args, env)
    return 0 if not rep.errors else 1


if __name__ == "__main__":
    sys.exit(main())
