"""Streaming speed, FLOPs and the GPU suite of the module's generator (random weights).

    python examples/bench.py --config wan-1.3b                   # latent frames/s, first chunk, memory, bf16 use
    python examples/bench.py --config mnist --suite streaming    # KV cache vs recomputing; a rolling window's cost
    python examples/bench.py --suite gpu --out docs/gpu_bench.json   # on a GPU: fast paths checked, then timed

Every number is measured where it runs; the JSON names the device.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from typing import Callable, Iterator, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import causal_forcing as cf  # noqa: E402
from examples.figures import check_writable, remove_stale_temporaries  # noqa: E402


# dense bf16 tensor-core peaks from the vendors' data sheets (FLOP/s), for the utilisation figure
_BF16_PEAK = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12,
              "L40S": 362e12, "RTX 4090": 165e12}


def forward_flops(cfg: cf.ModelConfig, frames: int, key_frames: int, text_tokens: int) -> int:
    """Matrix-multiply FLOPs (2 per multiply-add) of one forward pass over `frames` frames whose
    queries see `key_frames` frames: per layer the q/k/v/o and FFN projections, attention, and
    cross-attention to the text; plus patch embedding, time and text embeddings and the head."""
    D, S = cfg.dim, (cfg.height // cfg.patch_size) * (cfg.width // cfg.patch_size)
    n, k, pixels = frames * S, key_frames * S, cfg.patch_size**2 * cfg.in_channels
    per_layer = 2 * n * (4 * D * D + 2 * D * cfg.ffn_dim) + 4 * n * k * D
    if cfg.cond_dim:
        per_layer += 2 * n * 2 * D * D + 2 * text_tokens * 2 * D * D + 4 * n * text_tokens * D
    outer = 2 * n * D * pixels * 2 + 2 * frames * (cfg.freq_dim * D + D * D + 6 * D * D)
    if cfg.cond_dim:
        outer += 2 * text_tokens * (cfg.cond_dim * D + D * D)
    return cfg.num_layers * per_layer + outer


def streaming_cost(cfg: cf.Config, num_frames: Optional[int] = None, batch_size: int = 1) -> dict:
    """What streaming one clip costs, from the shapes alone: parameters, matrix FLOPs of every
    denoising step and cache refresh (`forward_flops`), and KV-cache bytes per frame in bf16."""
    m, num_frames = cfg.model, num_frames or cfg.data.frames
    with torch.device("meta"):  # shapes only: no memory, even for 14B parameters
        params = sum(p.numel() for p in cf.CausalDiT(m).parameters())
    S = (m.height // m.patch_size) * (m.width // m.patch_size)
    steps, flops = len(cfg.sample.denoising_steps), 0
    for start in range(0, num_frames, m.chunk_frames):  # every step, and the refresh of all but the last chunk
        n = min(m.chunk_frames, num_frames - start)
        calls = steps + (1 if start + n < num_frames else 0)
        flops += calls * forward_flops(m, n, start + n, m.text_len or 1) * batch_size
    return {"parameters": params, "tokens_per_frame": S, "frames": num_frames, "flops_per_clip": flops,
            "flops_per_frame": flops / (num_frames * batch_size),
            "kv_cache_bytes_per_frame": m.num_layers * 2 * S * m.dim * 2 * batch_size}


def _random_generator(cfg: cf.Config, batch_size: int) -> tuple[cf.CausalDiT, Optional[torch.Tensor]]:
    """A randomly initialised generator for the benchmarks, made on its device (a 1.3B model's init
    is slow on a CPU), in bf16 weights and cache on CUDA unless precision="fp32" (as upstream
    inference), and a random condition of the config's text length, if it has one."""
    device = torch.device(cfg.device)
    with torch.device(device):
        model = cf.CausalDiT(cfg.model).eval()
    if device.type == "cuda" and cfg.model.precision != "fp32":
        model = model.to(torch.bfloat16)
    cond = None
    if cfg.model.cond_dim:
        cond = torch.randn(batch_size, cfg.model.text_len or 1, cfg.model.cond_dim, device=device,
                           dtype=next(model.parameters()).dtype)
    return model, cond


def benchmark_stream(cfg: cf.Config, num_frames: Optional[int] = None, batch_size: int = 1, repeats: int = 2) -> dict:
    """Streams `num_frames` latent frames with the few-step sampler (4 steps per chunk, cache
    refresh) from a randomly initialised generator and measures it: latent frames per second,
    time to the first chunk, peak GPU memory, and the fraction of the card's bf16 peak. The
    first run warms up (kernel selection, compilation) and is not counted."""
    num_frames = num_frames or cfg.data.frames
    device = torch.device(cfg.device)
    model, cond = _random_generator(cfg, batch_size)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    cost = streaming_cost(cfg, num_frames, batch_size)
    flops = cost["flops_per_clip"]
    runs = []
    for r in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync()
        t0 = time.perf_counter()
        first = None
        for chunk in cf.stream(model, cf.student_sigmas(cfg.sample), num_frames=num_frames, batch_size=batch_size, cond=cond,
                            context_noise=cfg.sample.context_noise, rng=torch.Generator().manual_seed(r)):
            if first is None:
                sync()
                first = time.perf_counter() - t0
        sync()
        memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        runs.append((time.perf_counter() - t0, first, memory))
    total, first, memory = min(runs[1:]) if repeats else runs[0]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    peak = next((v for k, v in _BF16_PEAK.items() if k in name), None)
    return {
        "config": cfg.name, "device": name, "frames": num_frames, "batch_size": batch_size,
        "tokens_per_frame": cost["tokens_per_frame"], "chunk_frames": cfg.model.chunk_frames,
        "denoising_steps": len(cfg.sample.denoising_steps), "parameters": cost["parameters"],
        "latent_frames_per_second": num_frames * batch_size / total,
        "seconds_per_video": total, "time_to_first_chunk_s": first,
        "peak_gpu_memory_gib": memory,
        "tflops_per_second": flops / total / 1e12,
        "fraction_of_bf16_peak": flops / total / peak if peak else None,
    }


def timed_chunks(chunks: Iterator[torch.Tensor], device) -> list[float]:
    """Wall-clock seconds of every chunk a stream yields."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    times, t0 = [], time.perf_counter()
    for _ in chunks:
        sync()
        times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
    return times


def benchmark_cache(cfg: cf.Config, lengths=(16, 64, 256), batch_size: int = 1) -> list[dict]:
    """Streaming with the KV cache against recomputing the whole prefix for every chunk
    (`stream_recompute`, which gives the same samples), side by side in one run, per video length.
    The cache makes each chunk's cost grow with the prefix only through attention; recomputing
    makes it grow through every layer, so the ratio grows with the length."""
    c = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, window_frames=None, sink_frames=0))
    model, sigmas = cf.CausalDiT(c.model).to(c.device).eval(), cf.student_sigmas(c.sample)
    out = []
    for n in lengths:
        size = dict(num_frames=n, batch_size=batch_size)
        cached = sum(timed_chunks(cf.stream(model, sigmas, **size, rng=torch.Generator().manual_seed(0)), c.device))
        recomputed = sum(timed_chunks(cf.stream_recompute(model, sigmas, **size, rng=torch.Generator().manual_seed(0)), c.device))
        out.append({"frames": n, "cached_s": cached, "recompute_s": recomputed, "speedup": recomputed / cached})
    return out


def benchmark_flat_cost(cfg: cf.Config, window_frames: int, sink_frames: int = 0, at_chunks=(10, 1000),
                        probe: int = 5, batch_size: int = 1, rope_positions: str = "absolute") -> dict:
    """With a rolling cache, the time per chunk should not grow: streams past the last of `at_chunks`
    and compares the mean time of `probe` chunks from each, and the cache's size."""
    c = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, window_frames=window_frames, sink_frames=sink_frames,
                                                           rope_positions=rope_positions))
    model = cf.CausalDiT(c.model).to(c.device).eval()
    cache = model.new_kv_cache(batch_size)
    frames = (max(at_chunks) + probe) * c.model.chunk_frames
    memory = {}  # memory in use after the first probe, and at the end
    if torch.device(c.device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def chunks():
        for k, chunk in enumerate(cf.stream(model, cf.student_sigmas(c.sample), num_frames=frames, batch_size=batch_size,
                                         kv_cache=cache, rng=torch.Generator().manual_seed(0))):
            yield chunk
            if k + 1 in (min(at_chunks) + probe, max(at_chunks) + probe):
                memory[k + 1] = _memory_bytes(c.device)
    times = timed_chunks(chunks(), c.device)
    per_chunk = {k: sum(times[k: k + probe]) / probe for k in at_chunks}
    return {"window_frames": window_frames, "sink_frames": sink_frames, "rope_positions": rope_positions,
            "frames": frames, "seconds_per_chunk": per_chunk,
            "ratio_last_to_first": per_chunk[max(at_chunks)] / per_chunk[min(at_chunks)],
            "kv_cache_bytes": cache.k.numel() * cache.k.element_size() * 2,
            "memory_bytes_after_chunk": memory, "memory_measure": _memory_bytes.__doc__}


def benchmark_recache(cfg: cf.Config, window_frames: int, sink_frames: int = 0, switch_chunk: int = 20,
                      repeats: int = 3, batch_size: int = 1) -> dict:
    """What a prompt switch costs: the time of the chunk after a switch that keeps the cache, and of
    one that re-caches it first (a forward pass per kept chunk), measured side by side (best of
    `repeats`), against an ordinary chunk."""
    c = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, window_frames=window_frames, sink_frames=sink_frames))
    model, cond = _random_generator(c, batch_size)
    if cond is None:
        raise ValueError(f"config {cfg.name!r} has no conditioning (cond_dim=0): there is no prompt to switch")
    chunk, frames = c.model.chunk_frames, (switch_chunk + 2) * c.model.chunk_frames
    best = {}
    for _ in range(repeats + 1):  # the first round warms up
        for recache in (False, True):
            chunks = cf.stream(model, cf.student_sigmas(c.sample), num_frames=frames, batch_size=batch_size, cond=cond,
                               rng=torch.Generator().manual_seed(0), recache=recache)
            times = timed_chunks((next(chunks) if k != switch_chunk else chunks.send(cond)
                                  for k in range(switch_chunk + 2)), c.device)
            for key, value in ((recache, times[switch_chunk]), ("plain", times[switch_chunk - 1])):
                best[key] = min(best.get(key, float("inf")), value)
    kept = min(window_frames, switch_chunk * chunk) // chunk
    return {"window_frames": window_frames, "sink_frames": sink_frames, "kept_chunks": kept,
            "seconds_plain_chunk": best["plain"], "seconds_after_switch_keep_cache": best[False],
            "seconds_after_switch_recache": best[True], "recache_over_plain": best[True] / best["plain"]}


def _memory_bytes(device) -> int:
    """CUDA: peak allocated GPU memory since the stream began; CPU: resident memory now (Linux)."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated())
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):  # not Linux
        return -1


# --- the GPU suite: fast paths against the readable ones, then the speed of a Wan-sized model ----
# `python examples/bench.py --suite gpu --out docs/gpu_bench.json`. Every check also runs on a
# CPU (eager FlexAttention, CPU bf16 autocast), which is how the tests keep the suite itself honest.


def check_config(device: str = "cpu", **overrides) -> cf.Config:
    """A small model with what makes the Wan-sized one hard for the fast paths: 36-token frames (so
    FlexAttention's 128-token blocks straddle frame boundaries), 3-frame chunks and a text condition
    padded to text_len. Its data set is "none": the checks feed it random videos."""
    base = dict(dataset="none", frames=6, in_channels=4, height=12, width=12, patch_size=2, dim=128, ffn_dim=256,
                num_heads=2, num_layers=2, freq_dim=64, cond_dim=32, text_len=8, chunk_frames=3, batch_size=4,
                ode_pairs=8, base_steps=3, teacher_steps=3, ode_steps=3, dmd_steps=3, gen_update_ratio=1,
                ema_start_step=1, base_lr=1e-3, teacher_lr=1e-3, ode_lr=1e-3, gen_lr=1e-4, critic_lr=1e-3,
                device=device)
    return cf.get_config("toy2d", **{**base, **overrides})


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: 0 when equal, about 4e-3 for one bf16 rounding of b."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@contextlib.contextmanager
def _no_tf32():
    """fp32 means fp32: no TF32 in matrix multiplies or the patch-embedding convolution."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _agreement(name: str, err: float, tol: float) -> dict:
    """One check's row: its relative error, its tolerance, and whether the error is finite and within."""
    return {"check": name, "rel_err": err, "tol": tol, "ok": bool(math.isfinite(err) and err <= tol)}


def exactness_checks(device: str, precision: str, backend: str, tol: float) -> list[dict]:
    """Pairs of paths that must agree, for one precision and attention backend:
    the KV-cached chunk-by-chunk forward against the full causal forward (full cache, and a rolling
    window with a sink against the banded mask); the backend against the dense masks for the causal,
    teacher-forcing and windowed forwards, and their gradients; and (bf16) every output against fp32."""
    rows, g = [], torch.Generator().manual_seed(1)

    def build(**kw) -> cf.CausalDiT:  # the same weights whatever the precision, backend or window
        cfg = check_config(device, **{"precision": precision, "attention": backend, **kw})
        torch.manual_seed(0)
        return cf._random_weights(cf.CausalDiT(cfg.model)).to(device).eval()

    def inputs(cfg_model, frames, batch=2):
        x = torch.randn(batch, frames, cfg_model.in_channels, cfg_model.height, cfg_model.width, generator=g)
        chunks = -(-frames // cfg_model.chunk_frames)
        t = torch.rand(batch, chunks, generator=g).repeat_interleave(cfg_model.chunk_frames, 1)[:, :frames]
        cond = torch.randn(batch, 5, cfg_model.cond_dim, generator=g)
        clean = torch.randn(x.shape, generator=g)
        return x.to(device), t.to(device), cond.to(device), clean.to(device)

    def chunked(model, x, t, cond, cache):
        c = model.cfg.chunk_frames
        return torch.cat([model(x[:, s:s + c], t[:, s:s + c], cond, kv_cache=cache, start_frame=s)
                          for s in range(0, x.shape[1], c)], 1)

    with _no_tf32(), torch.no_grad():
        model = build()
        x, t, cond, clean = inputs(model.cfg, 6)
        rows.append(_agreement("kv_cache_vs_full_causal", _rel_err(
            chunked(model, x, t, cond, model.new_kv_cache(2, max_frames=6)), model(x, t, cond)), tol))
        win = build(window_frames=6, sink_frames=3)
        xw, tw, cw, clean_w = inputs(win.cfg, 12)
        rows.append(_agreement("rolling_cache_vs_banded_mask", _rel_err(
            chunked(win, xw, tw, cw, win.new_kv_cache(2)), win(xw, tw, cw)), tol))
        outputs = {"causal": lambda m, mw: m(x, t, cond),
                   "teacher_forcing": lambda m, mw: m(x, t, cond, clean_context=clean),
                   "windowed": lambda m, mw: mw(xw, tw, cw),
                   "windowed_teacher_forcing": lambda m, mw: mw(xw, tw, cw, clean_context=clean_w)}
        pair = lambda **kw: (build(**kw), build(window_frames=6, sink_frames=3, **kw))  # noqa: E731 - full, windowed
        dense, ref32 = pair(attention="dense"), pair(attention="dense", precision="fp32")
        for name, f in outputs.items():
            ours = f(model, win)
            if backend != "dense":
                rows.append(_agreement(f"{name}_{backend}_vs_dense", _rel_err(ours, f(*dense)), tol))
            if precision != "fp32":
                rows.append(_agreement(f"{name}_vs_fp32", _rel_err(ours, f(*ref32)), tol))
    # the backward pass of the masked kernel, which training runs through (FlexAttention has no CPU backward)
    if backend != "dense" and torch.device(device).type == "cuda":
        with _no_tf32():
            grads = []
            for m in (model.train(), dense[0].train()):
                m.zero_grad(set_to_none=True)
                m(x, t, cond, clean_context=clean).float().pow(2).mean().backward()
                grads.append(torch.cat([p.grad.flatten().float() for p in m.parameters()]))
            rows.append(_agreement(f"teacher_forcing_gradient_{backend}_vs_dense",
                                   float((grads[0] - grads[1]).norm() / grads[1].norm()), tol))
    for r in rows:
        r.update(precision=precision, attention=backend)
    return rows


def training_checks(device: str, fast: dict, tol: float = 0.1) -> dict:
    """A few steps of every stage (base, AR teacher by teacher forcing, ODE pairs and student, DMD)
    on the check config, once in fp32 with dense masks and once with `fast` (e.g. bf16 autocast,
    FlexAttention, gradient checkpointing, compile), from the same weights and random draws. A
    non-finite loss stops the check (Diverged, recorded as the section's error); each stage's first
    loss (same weights in both runs) must agree within
    `tol`, relatively; later losses are reported (the two runs drift apart by rounding). The tolerance
    is wide for bf16 because the ODE loss is the square of a small difference (student and teacher
    start from the same weights): on a CPU its first step differs by 2.8% between the two runs."""
    def run(**kw) -> dict:
        cfg = check_config(device, **kw)
        g, m = torch.Generator().manual_seed(0), cfg.model
        data = torch.randn(16, cfg.data.frames, m.in_channels, m.height, m.width, generator=g)
        cond = torch.randn(16, 5, m.cond_dim, generator=g)
        torch.manual_seed(0)
        t0 = time.perf_counter()
        base, l_base = cf.train_base(cfg, data, None, g, cond)
        teacher, l_teacher = cf.train_ar_teacher(cfg, base, data, "teacher_forcing", None, g, cond)
        pairs = cf.make_ode_pairs(cfg, teacher, data, "ar", cond, g)
        student, l_ode = cf.train_ode_student(cfg, teacher, pairs, "ar", None, g)
        prompts = lambda batch, rng: torch.randn(batch, 5, m.cond_dim, generator=rng).to(device)  # noqa: E731
        _, hist = cf.train_dmd(cfg, student, base, base, prompts, None, g)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        return {"base": l_base, "ar_teacher": l_teacher, "ode_student": l_ode, "dmd_generator": hist["generator"],
                "dmd_critic": hist["critic"], "ode_pair_x0_mean_abs": float(pairs["x0"].abs().mean()),
                "seconds": time.perf_counter() - t0}

    with _no_tf32():
        ref = run(precision="fp32", attention="dense")
    got = run(**fast)
    stages = {}
    for k in ("base", "ar_teacher", "ode_student", "dmd_critic", "dmd_generator"):
        finite = all(math.isfinite(v) for v in got[k] + ref[k])
        first = abs(got[k][0] - ref[k][0]) / max(abs(ref[k][0]), 1e-12)
        # the DMD loss is a difference of two near-equal scores here (real and fake both start from
        # the base), so its relative error is rounding noise: it must only be finite
        checked = k != "dmd_generator"
        stages[k] = {"fp32": ref[k], "fast": got[k], "first_step_rel_diff": first, "finite": finite,
                     "ok": bool(finite and (first <= tol or not checked))}
    return {"fast": fast, "tol": tol, "stages": stages, "seconds": {"fp32": ref["seconds"], "fast": got["seconds"]},
            "ok": all(s["ok"] for s in stages.values())}


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def recompile_check(device: str, chunks: int = 8) -> dict:
    """Streams `chunks` chunks with compile=True (a full cache, then a rolling window with a sink) and
    counts the graphs torch.compile makes during each chunk: after the first few chunks (new shapes
    while the cache fills) there must be none, or every chunk would pay for a compilation."""
    import torch._dynamo as dynamo

    out = {}
    for name, kw in (("full_cache", {}), ("rolling_window", dict(window_frames=6, sink_frames=3))):
        dynamo.reset()
        cfg = check_config(device, compile=True, frames=3 * chunks, **kw)
        model = cf._random_weights(cf.CausalDiT(cfg.model)).to(device).eval()
        cond = torch.randn(1, 5, cfg.model.cond_dim, generator=torch.Generator().manual_seed(0)).to(device)
        per_chunk, before = [], _graphs_compiled()
        for _ in cf.stream(model, cf.student_sigmas(cfg.sample), num_frames=cfg.data.frames, batch_size=1, cond=cond,
                        rng=torch.Generator().manual_seed(0)):
            per_chunk.append(_graphs_compiled() - before)
            before = _graphs_compiled()
        late = per_chunk[len(per_chunk) // 2:]
        out[name] = {"graphs_per_chunk": per_chunk, "ok": sum(late) == 0}
    out["ok"] = all(v["ok"] for v in out.values())
    return out


def _matmul_tflops(device, n: int = 8192, repeats: int = 10) -> Optional[float]:
    """What a plain n x n x n bf16 matrix product reaches on this card: the practical ceiling."""
    if torch.device(device).type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e12


def profile_stream(cfg: cf.Config, num_frames: Optional[int] = None, top: int = 15) -> list[dict]:
    """Where the time of one streamed video goes: the `top` GPU kernels by their time (on a CPU, the
    operators by their own CPU time), with their share of the total, from torch.profiler, after a
    warm-up video."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(cfg.device)
    num_frames = num_frames or cfg.data.frames
    model, cond = _random_generator(cfg, 1)
    run = lambda: [c.sum().item() for c in cf.stream(model, cf.student_sigmas(cfg.sample), num_frames=num_frames, batch_size=1,  # noqa: E731
                                                   cond=cond, rng=torch.Generator().manual_seed(0))]
    run()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        run()
    events = prof.key_averages()

    if device.type == "cuda":  # the kernels themselves: an operator's device time repeats its kernels'
        from torch.autograd import DeviceType

        events = [e for e in events if e.device_type == DeviceType.CUDA]

    def own(e):
        if device.type != "cuda":
            return e.self_cpu_time_total
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
    total = sum(own(e) for e in events) or 1
    ranked = sorted(events, key=own, reverse=True)[:top]
    return [{"op": e.key, "calls": e.count, "ms": own(e) / 1e3, "share": own(e) / total} for e in ranked]


GPU_SECTIONS = ("exactness", "wan", "profile", "training", "recompiles", "training_compiled", "wan_compiled")


def gpu_suite(device: str = "cuda", sections=GPU_SECTIONS, frames: int = 21,
              save: Optional[Callable[[dict], None]] = None, log=print) -> dict:
    """Everything the GPU path must prove, in one run, section by section (`sections`, in this order):
      exactness          the fast paths against the readable ones: KV cache vs full forward, rolling
                         cache vs banded mask, FlexAttention vs dense masks (outputs and gradients),
                         in fp32 and in bf16 (also against fp32)
      wan                the wan-1.3b streaming benchmark, chunk-wise and frame-wise, eager, and a
                         plain bf16 matrix product for the card's practical ceiling
      profile            where the time of one wan-1.3b video goes, by kernel
      training           a few steps of every stage with bf16, FlexAttention and gradient
                         checkpointing, against fp32 with dense masks
      recompiles         graphs torch.compile makes per streamed chunk (must stop after the first few)
      training_compiled  the training check with compile=True as well
      wan_compiled       the chunk-wise benchmark with compile=True
    `save(result)` is called after every section, so an interrupted run keeps what it measured; a
    section that raises is recorded with its error and the suite goes on."""
    unknown = sorted(set(sections) - set(GPU_SECTIONS))
    if unknown:
        raise ValueError(f"unknown gpu suite sections {unknown}; choose from {', '.join(GPU_SECTIONS)}")
    device = cf.resolve_device(device)
    result: dict = {"device": torch.cuda.get_device_name(device) if device.startswith("cuda") else device,
                    "torch": torch.__version__, "cuda": torch.version.cuda}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        result.update(gpu_memory_gib=props.total_memory / 2**30, multiprocessors=props.multi_processor_count)
        try:
            import subprocess

            result["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                              capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            result["driver"] = None
    save = save or (lambda r: None)

    def section(name, fn):
        log(f"[gpu suite] {name} ...")
        t0 = time.perf_counter()
        try:
            result[name] = fn()
        except Exception as e:  # noqa: BLE001 - a failure is a result: record it, go on to the next section
            import traceback

            result[name] = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        result.setdefault("seconds", {})[name] = time.perf_counter() - t0
        log(f"[gpu suite] {name}: {time.perf_counter() - t0:.1f} s, ok={_all_ok(result[name])}")
        save(result)

    import torch._dynamo as dynamo

    # each new shape or mask is one more compiled graph of the same code; past torch's default limit
    # of 8 it would silently fall back to eager code, and the suite would time that instead
    limit = "recompile_limit" if hasattr(dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(dynamo.config, limit, max(getattr(dynamo.config, limit), 64))
    wan = lambda **kw: cf.get_config("wan-1.3b", device=device, **kw)  # noqa: E731
    fast = dict(precision="bf16", attention="flex" if device.startswith("cuda") else "dense",  # no flex backward on a CPU
                grad_checkpointing=True)
    for name in GPU_SECTIONS:
        if name not in sections:
            continue
        if name == "exactness":
            section(name, lambda: exactness_checks(device, "fp32", "dense", 1e-5)
                    + exactness_checks(device, "fp32", "flex", 1e-5) + exactness_checks(device, "bf16", "flex", 5e-2))
        elif name == "wan":
            section("matmul_tflops", lambda: _matmul_tflops(device))
            section("wan_1_3b_chunk_wise", lambda: benchmark_stream(wan(), frames))
            section("wan_1_3b_frame_wise", lambda: benchmark_stream(wan(chunk_frames=1), frames))
            best = result["wan_1_3b_chunk_wise"]
            result["wan_1_3b"] = {"latent_frames_per_second": best.get("latent_frames_per_second"),
                                  "first_chunk_seconds": best.get("time_to_first_chunk_s"),
                                  "peak_memory_gib": best.get("peak_gpu_memory_gib"),
                                  "bf16_utilisation": best.get("fraction_of_bf16_peak"),
                                  "measured": "chunk-wise (3 latent frames), 4 denoising steps, eager, bf16, batch 1"}
        elif name == "profile":
            section("wan_1_3b_profile", lambda: profile_stream(wan(), frames))
        elif name == "training":
            section(name, lambda: training_checks(device, fast))
        elif name == "recompiles":
            section(name, lambda: recompile_check(device))
        elif name == "training_compiled":
            section(name, lambda: training_checks(device, {**fast, "compile": True}))
        elif name == "wan_compiled":
            section("wan_1_3b_chunk_wise_compiled", lambda: benchmark_stream(wan(compile=True), frames))
    checks = ("exactness", "training", "recompiles", "training_compiled")
    result["ok"] = all(_all_ok(result[k]) for k in checks if k in result)
    save(result)
    return result


def _all_ok(value) -> Optional[bool]:
    """The `ok` flags of a section's result, all together (None where it has none)."""
    if isinstance(value, list):
        flags = [_all_ok(v) for v in value]
        flags = [f for f in flags if f is not None]
        return all(flags) if flags else None
    if isinstance(value, dict):
        return value.get("ok")
    return None


def main(argv) -> int:
    parser = argparse.ArgumentParser(prog="examples/bench.py", description="Streaming speed of the "
                                     "few-step causal generator (random weights): latent frames per second, time "
                                     "to the first chunk, peak GPU memory, fraction of the card's bf16 peak.")
    parser.add_argument("--config", default="wan-1.3b", choices=sorted(cf._PRESETS), help="preset (default wan-1.3b)")
    parser.add_argument("--frames", type=int, default=None, help="latent frames per video (default: the config's)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs after one warm-up run; the best counts")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: auto)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    parser.add_argument("--suite", default="speed", choices=["speed", "streaming", "gpu"],
                        help="speed: frames/s, first chunk, memory (default); streaming: KV cache against "
                             "recomputing the prefix at 16/64/256 frames, and the flat cost of a rolling window; "
                             "gpu: the fast paths against the readable ones (exactness, training steps, "
                             "recompiles) and the wan-1.3b benchmark chunk-wise and frame-wise, eager and "
                             "compiled (--config is not used; see --sections)")
    parser.add_argument("--sections", default=",".join(GPU_SECTIONS),
                        help=f"gpu suite: the sections to run, comma-separated (default: all, {','.join(GPU_SECTIONS)})")
    parser.add_argument("--out", default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    for flag, value, least in (("--frames", args.frames, 1), ("--batch-size", args.batch_size, 1), ("--repeats", args.repeats, 0)):
        if value is not None and value < least:
            parser.error(f"{flag} {value}: must be >= {least}")
    if args.out:  # a place that cannot be written is said now, not after the benchmark
        try:
            check_writable(args.out, "--out")
        except ValueError as e:
            parser.error(str(e))
        remove_stale_temporaries(args.out)  # left by a run of this program that was killed
    cfg = cf._config_from_flags(parser, args.config, args.set, args.device)
    if args.suite == "gpu":
        sections = [x.strip() for x in args.sections.split(",") if x.strip()]
        if set(sections) - set(GPU_SECTIONS):
            parser.error(f"--sections: unknown {sorted(set(sections) - set(GPU_SECTIONS))}; "
                         f"choose from {','.join(GPU_SECTIONS)}")
        result = gpu_suite(cfg.device, sections, frames=args.frames or 21,
                           save=(lambda r: cf.save_atomic(r, args.out)) if args.out else None)
        print(json.dumps(result, indent=2))
        return 0 if result["ok"] else 1
    if args.suite == "speed":
        if cfg.model.dim >= 1024 and cfg.device == "cpu":  # a Wan-sized network on every chunk, on a CPU
            print(f"note: {cfg.name} on the CPU takes a long time (a Wan-sized network on every chunk); on a laptop, "
                  "try --config mnist", file=sys.stderr)
        result = benchmark_stream(cfg, args.frames, args.batch_size, args.repeats)
    else:
        window = cfg.model.window_frames or 2 * cfg.model.chunk_frames
        chunk = cfg.model.chunk_frames
        result = {"config": cfg.name, "device": cfg.device, "batch_size": args.batch_size,
                  "cache_vs_recompute": benchmark_cache(cfg, batch_size=args.batch_size),
                  "flat_cost": benchmark_flat_cost(cfg, window, cfg.model.sink_frames, batch_size=args.batch_size),
                  "flat_cost_window_positions": benchmark_flat_cost(  # 10,000 frames, a sink, window positions
                      cfg, max(window, 2 * chunk), chunk, at_chunks=(10, -(-10_000 // chunk)), batch_size=args.batch_size,
                      rope_positions="window")}
        if cfg.model.cond_dim:
            result["recache"] = benchmark_recache(cfg, max(window, 4 * chunk), chunk, batch_size=args.batch_size)
    print(json.dumps(result, indent=2))
    if args.out:
        cf.save_atomic(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
