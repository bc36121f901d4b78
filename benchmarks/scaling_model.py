"""The scaling model of docs/scaling.md: bytes, memory and time of the Ray pipeline by formula.

    .venv/bin/python benchmarks/scaling_model.py

Counts follow the code: a stage hop carries the (B, T, H) hidden states as float32 numpy plus
the (B, T) masks (``distributed/wire.py``); a concept with at most D/2 counted tokens keeps its
rows (n_c × D float32), else a D × D float64 block (``core/moments.py``); Σ_total is D × D
float64 per input group; a reduction moves each non-root partial once and ⌈log₂R⌉ partials on
its longest path (``distributed/reduce.py``, checked against measured object-store bytes by
``scaling_bytes.py``). Rates are assumptions, named in :data:`GPUS` and :data:`NET`; the time
model is an estimate to read orders of magnitude from, not a measurement.
"""

from __future__ import annotations

import math

# Llama shapes: hidden H, MLP width I, layers L, attention heads / KV heads, vocabulary V.
MODELS = {
    "Llama-3.2-1B": {"H": 2048, "I": 8192, "L": 16, "heads": 32, "kv": 8, "V": 128256},
    "Llama-3.1-8B": {"H": 4096, "I": 14336, "L": 32, "heads": 32, "kv": 8, "V": 128256},
}
# Workloads: rows, tokens per row (forward), counted (answer) tokens per row, concepts and
# counted tokens per concept (the rest of the rows are reference rows, in Σ_total only).
WORKLOADS = {
    "TOFU (4,000 QA rows, all 200 authors as concepts)":
        {"rows": 4000, "tokens": 100, "counted": 30, "concepts": 200, "per_concept": 600},
    "1M-row corpus (20 concepts of 1,000 rows)":
        {"rows": 1_000_000, "tokens": 256, "counted": 100, "concepts": 20,
         "per_concept": 100_000},
}
# Assumed sustained rates: forward in bf16 (40% of the dense tensor peak), Gram blocks and
# factors in float64 (50% of the FP64 tensor peak), eigh (cuSOLVER syevd, ~9·D³ flops).
GPUS = {
    "A100-80GB": {"bf16": 0.4 * 312e12, "fp64": 0.5 * 19.5e12, "eigh": 5e12, "mem": 80e9},
    "H100-80GB": {"bf16": 0.4 * 989e12, "fp64": 0.5 * 67e12, "eigh": 10e12, "mem": 80e9},
}
NET = {"link": 100e9 / 8, "store_copy": 5e9, "write": 1e9}  # bytes/s: 100 Gb/s, memcpy, S3
STARTUP_S = 30.0  # Ray on a cluster, actor processes, weights read (assumption)


def modules(m: dict) -> list[tuple[str, int, int]]:
    """(input group, out, D) of every linear module: q/k/v share their input, gate/up theirs."""
    h, i, head = m["H"], m["I"], m["H"] // m["heads"]
    kv = m["kv"] * head
    out = []
    for layer in range(m["L"]):
        out += [(f"{layer}.qkv", h, h), (f"{layer}.qkv", kv, h), (f"{layer}.qkv", kv, h),
                (f"{layer}.o", h, h), (f"{layer}.up", i, h), (f"{layer}.up", i, h),
                (f"{layer}.down", h, i)]
    return out + [("lm_head", m["V"], h)]


def groups(m: dict) -> dict[str, int]:
    return {g: d for g, _, d in modules(m)}


def sigma_bytes(m: dict, w: dict, replicas: int = 1) -> dict[str, float]:
    """Σ held by one replica: Σ_total, dense concept blocks, concept rows (its share)."""
    gs = groups(m)
    total = sum(8 * d * d for d in gs.values())
    dense = sum(8 * d * d for d in gs.values() if w["per_concept"] / replicas > d // 2)
    rows = sum(4 * d * w["per_concept"] / replicas for d in gs.values()
               if w["per_concept"] / replicas <= d // 2)
    return {"total": total, "blocks": dense * w["concepts"], "rows": rows * w["concepts"]}


def flops(m: dict, w: dict) -> dict[str, float]:
    """Forward (2·params per token), Gram (2·D² per counted token and group), solve."""
    mods = modules(m)
    fwd = 2 * sum(o * d for _, o, d in mods) * w["rows"] * w["tokens"]
    gram = 2 * sum(d * d for d in groups(m).values()) * w["rows"] * w["counted"]
    eigh = sum(9 * d ** 3 for d in groups(m).values())
    n_c = w["per_concept"] * w["concepts"]
    # The norms of every (concept, module) engram at extraction (solve.py's Gram identities):
    # X_c Σ⁺ once per group (D²·n_c); per module W X_cᵀ (out·D·n_c) when out ≤ D, else
    # WᵀW once (out·D²) and X_c WᵀW (D²·n_c); then n_c² products per concept.
    per = w["per_concept"]
    norms = sum(2 * (o * d * n_c if o <= d else o * d * d + d * d * n_c) + 2 * n_c * per * d
                for _, o, d in mods) + sum(2 * d * d * n_c for d in groups(m).values())
    return {"forward": fwd, "gram": gram, "eigh": eigh, "norms": norms}


def payload_bytes(m: dict, w: dict) -> float:
    """Run format 2 (before statistics runs): every (concept, module) engram written, as
    rank-n_c factors (out + D)·n_c, or dense out·D, float32."""
    mods = modules(m)
    per = [sum((o + d) * w["per_concept"] if w["per_concept"] <= d // 2 else o * d
               for _, o, d in mods)]
    return 4 * per[0] * w["concepts"]


def run_bytes(m: dict, w: dict, row_bytes: int = 4) -> float:
    """Run format 3 (``io/store.py``): per input group, Σ_total's eigendecomposition (float64
    eigenvectors D² and eigenvalues D) and each concept's rows n_c·D in the captured dtype
    (``row_bytes``: 4 for float32 models, 2 for bf16) or its packed float64 Σ_c block;
    nothing per module."""
    out = 0.0
    for d in groups(m).values():
        out += 8 * d * (d + 1)
        per = w["per_concept"]
        out += w["concepts"] * (row_bytes * per * d if per <= d // 2 else 8 * d * (d + 1) // 2)
    return out


def stage_memory(m: dict, w: dict, stages: int, replicas: int, batch_tokens: int) -> float:
    """Bytes one stage actor holds: bf16 weights, Σ, two activation buffers of the widest
    layer (float32), all divided evenly over the stages."""
    weights = 2 * sum(o * d for _, o, d in modules(m))
    s = sigma_bytes(m, w, replicas)
    act = 2 * 4 * batch_tokens * max(m["I"], m["H"])
    return (weights + s["total"] + s["blocks"] + s["rows"]) / stages + act


def time_s(m: dict, w: dict, gpu: dict, replicas: int, stages: int) -> dict[str, float]:
    """Phase estimates: stream (every GPU busy, stages balanced), reduce (longest path),
    solve (groups over every GPU), write (one writer per node, 8 GPUs a node)."""
    f = flops(m, w)
    gpus = replicas * stages
    stream = (f["forward"] / gpu["bf16"] + f["gram"] / gpu["fp64"]) / gpus
    s = sigma_bytes(m, w, replicas)
    part = (s["total"] + s["blocks"] + s["rows"]) / stages
    reduce = math.ceil(math.log2(replicas)) * part * (1 / NET["link"] + 2 / NET["store_copy"]) \
        if replicas > 1 else 0.0
    solve = (f["eigh"] / gpu["eigh"] + f["norms"] / gpu["fp64"]) / gpus
    write = run_bytes(m, w, 2) / (NET["write"] * max(1, gpus // 8))
    return {"startup": STARTUP_S, "stream": stream, "reduce": reduce, "solve": solve,
            "write": write, "total": STARTUP_S + stream + reduce + solve + write}


def hop_bytes(m: dict, w: dict, stages: int) -> float:
    """Bytes between stages over the whole stream: float32 hidden states + two masks."""
    return (stages - 1) * w["rows"] * w["tokens"] * (4 * m["H"] + 8 + 1)


def _gb(x: float) -> str:
    return f"{x / 1e9:,.1f}"


def report() -> str:
    out = ["| model | workload | Σ_total per replica GB | concept Σ GB (blocks + rows) | "
           "format-2 engrams GB | run GB, float32 rows | run GB, bf16 rows | "
           "hidden-state bytes per token per hop | stage hops, S = 4, GB |",
           "|---|---|---|---|---|---|---|---|---|"]
    for mn, m in MODELS.items():
        for wn, w in WORKLOADS.items():
            s = sigma_bytes(m, w)
            old, f32, bf16 = payload_bytes(m, w), run_bytes(m, w, 4), run_bytes(m, w, 2)
            out.append(f"| {mn} | {wn} | {_gb(s['total'])} | {_gb(s['blocks'] + s['rows'])} | "
                       f"{_gb(old)} | {_gb(f32)} ({old / f32:.1f}× smaller) | "
                       f"{_gb(bf16)} ({old / bf16:.1f}×) | {4 * m['H'] + 9:,} | "
                       f"{_gb(hop_bytes(m, w, 4))} |")
    out += ["", "| model | workload | GPU | R × S | stage memory GB | stream s | reduce s | "
            "solve s | write s | total s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for mn, m in MODELS.items():
        for wn, w in WORKLOADS.items():
            for gn, g in GPUS.items():
                for r, st in ((1, 4), (4, 4), (8, 8)):
                    t = time_s(m, w, g, r, st)
                    mem = stage_memory(m, w, st, r, 4096)
                    fit = "" if mem <= g["mem"] else " ✗"
                    out.append(f"| {mn} | {wn.split(' (')[0]} | {gn} | {r} × {st} | "
                               f"{_gb(mem)}{fit} | {t['stream']:,.0f} | {t['reduce']:,.0f} | "
                               f"{t['solve']:,.0f} | {t['write']:,.0f} | {t['total']:,.0f} |")
    return "\n".join(out)


if __name__ == "__main__":
    print(report())
