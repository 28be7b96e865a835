"""A trained moving-digit generator far past its training length, and prompt switches.

    python examples/long_stream.py                 # the shipped run in docs/mnist_run (or runs/mnist), 1,024 frames
    python examples/long_stream.py --run runs/mnist --frames 256 --out runs/long_stream

Streams the causal_forcing generator of a finished `--config mnist` run through a rolling window
(no sink and a sink of one chunk; absolute and window RoPE positions), measures every block of 8
frames with the pipeline's digit metrics, and switches the digit mid-video with the cache kept or
re-cached. Writes long_stream.json, long_stream.png and prompt_switch.gif to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Iterator, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import causal_forcing as cf  # noqa: E402
from examples.figures import atomic_file, check_writable, remove_stale_temporaries, save_gif  # noqa: E402


def windowed(generator: cf.CausalDiT, window_frames: int, sink_frames: int = 0,
             rope_positions: str = "absolute") -> cf.CausalDiT:
    """The generator's weights in a model that streams through a rolling window of `window_frames`
    (the first `sink_frames` always kept) with RoPE positions `rope_positions`: how a generator
    trained on short clips makes a video of any length in fixed memory."""
    if rope_positions not in cf.ROPE_POSITIONS:
        raise ValueError(f"rope_positions={rope_positions!r} is not 'absolute' or 'window'")
    cfg = dataclasses.replace(generator.cfg, window_frames=window_frames, sink_frames=sink_frames,
                              rope_positions=rope_positions)
    model = cf.CausalDiT(cfg, causal=True).to(next(generator.parameters()).device)
    model.load_state_dict(generator.state_dict())
    return model.eval().requires_grad_(False)


def switched_stream(generator: cf.CausalDiT, sigmas, *, num_frames: int, batch_size: int, cond=None,
                    switches: Optional[dict] = None, recache: bool = False, rng=None, **sampler) -> Iterator[torch.Tensor]:
    """`stream`'s chunks with prompt switches planned ahead: switches {frame: new_cond} sends each new
    condition at its frame (a chunk boundary; with recache, the kept context is rebuilt under it). sampler:
    the rest of `stream`'s arguments (first_chunk_sigmas, context_noise, renoise; cf.streaming_steps)."""
    c, switches = generator.cfg.chunk_frames, switches or {}
    if any(f % c or not 0 < f < num_frames for f in switches):
        raise ValueError(f"switch frames {sorted(switches)} must be chunk boundaries (chunk_frames={c}) inside the video")
    chunks = cf.stream(generator, sigmas, num_frames=num_frames, batch_size=batch_size, cond=cond, rng=rng,
                       recache=recache, **sampler)
    for at in range(0, num_frames, c):
        yield chunks.send(switches[at]) if at in switches else next(chunks)


@torch.no_grad()
def stream_video(generator: cf.CausalDiT, sigmas, *, num_frames: int, batch_size: int, cond=None,
                 switches: Optional[dict] = None, recache: bool = False, rng=None, **sampler) -> torch.Tensor:
    """A whole streamed video (B, num_frames, C, H, W), with the prompt switches of `switched_stream`."""
    return torch.cat(list(switched_stream(generator, sigmas, num_frames=num_frames, batch_size=batch_size, cond=cond,
                                          switches=switches, recache=recache, rng=rng, **sampler)), 1)


def long_stream_report(models: dict, cfg: cf.Config, held_out: torch.Tensor, num_frames: int = 1024,
                       batch_size: int = 64, block: int = 8, window_frames: Optional[int] = None,
                       seed: int = 0, log=print) -> dict:
    """Streams a trained digit generator (models["causal_forcing"], read by models["digit_classifier"])
    far past the clips it was trained on, through a rolling window of `window_frames` (default: the
    training clip length), without and with a sink and under both RoPE position policies, and
    measures every block of `block` frames with `digit_metrics` (the first block is the same
    generator on a training-length video). Each stream has the same noise and labels."""
    gen, classifier = models["causal_forcing"], models["digit_classifier"]
    W, chunk = window_frames or cfg.data.frames, gen.cfg.chunk_frames
    held_out = held_out[:256]  # the reference of every block's metrics (read once per block)
    labels = torch.arange(batch_size)[:, None] % 10
    cond = cf.label_cond(labels).to(cfg.device)
    report = {"frames": num_frames, "block": block, "window_frames": W, "batch_size": batch_size,
              "trained_frames": cfg.data.frames, "streams": {}}
    for sink in (0, chunk):
        for policy in cf.ROPE_POSITIONS:
            name = f"sink {sink}, {policy} positions"
            t0 = time.perf_counter()
            video = stream_video(windowed(gen, W, sink, policy), **cf.streaming_steps(cfg.sample, 4), num_frames=num_frames,
                                 batch_size=batch_size, cond=cond, rng=torch.Generator().manual_seed(seed)).cpu()
            seconds = time.perf_counter() - t0
            blocks = [{"first_frame": a, **cf.digit_metrics(video[:, a:a + block], labels, held_out, classifier, chunk)}
                      for a in range(0, num_frames - block + 1, block)]
            report["streams"][name] = {"sink_frames": sink, "rope_positions": policy, "seconds": round(seconds, 2),
                                       "blocks": blocks}
            log(f"  {name}: {num_frames} frames x {batch_size} videos in {seconds:.0f} s; instruction following "
                f"first block {blocks[0]['instruction_following']:.3f}, last {blocks[-1]['instruction_following']:.3f}")
    return report


def prompt_switch_report(models: dict, cfg: cf.Config, num_frames: int = 32, switch_at: int = 16,
                         batch_size: int = 100, seed: int = 0) -> dict:
    """Every video switches from digit a to another digit b at frame `switch_at`, with the finished
    chunks kept in the cache as written (under a) or re-cached under b. Per policy: the fraction of
    videos read as b at every frame, how many frames after the switch a video is first read as b
    (mean over the videos that get there), the block jump at the switch (change into the switch
    frame over the mean change inside chunks), and the stream's wall time."""
    gen, classifier = models["causal_forcing"], models["digit_classifier"]
    chunk = gen.cfg.chunk_frames
    a = torch.arange(batch_size) % 10
    b = (a + 1 + (torch.arange(batch_size) // 10) % 9) % 10  # a different digit for every video
    cond_a, cond_b = (cf.label_cond(v[:, None]).to(cfg.device) for v in (a, b))
    report = {"frames": num_frames, "switch_at": switch_at, "batch_size": batch_size, "policies": {}}
    for recache in (False, True):
        t0 = time.perf_counter()
        video = stream_video(gen, **cf.streaming_steps(cfg.sample, 4), num_frames=num_frames, batch_size=batch_size,
                             cond=cond_a, switches={switch_at: cond_b}, recache=recache,
                             rng=torch.Generator().manual_seed(seed)).cpu().clamp(-1, 1)  # the frames as shown
        seconds = time.perf_counter() - t0
        pred = cf.read_frames(classifier, video)[1]  # (B, F)
        is_b = pred[:, switch_at:] == b[:, None]
        reached = is_b.any(1)
        delay = is_b.double().argmax(1)[reached].double()  # frames after the switch until a video first reads as b
        change, into_new_chunk = cf.frame_changes(video, chunk)
        report["policies"]["re-cache" if recache else "keep cache"] = {
            "reads_new_digit_per_frame": (pred == b[:, None]).double().mean(0).tolist(),
            "reads_old_digit_per_frame": (pred == a[:, None]).double().mean(0).tolist(),
            "videos_reaching_new_digit": float(reached.double().mean()),
            "frames_until_new_digit": float(delay.mean()) if len(delay) else float("nan"),
            "jump_at_switch": float(change[switch_at - 1] / change[~into_new_chunk].mean()),
            "seconds": round(seconds, 3)}
    return report


LONG_STREAM_METRICS = ("instruction_following", "frechet_distance", "sharpness", "dynamic_degree", "motion_within_chunks",
                       "chunk_boundary_jump", "out_of_range")


def summarize_long_stream(report: dict, edges=(0, 8, 64, 256, 1024)) -> dict:
    """Each stream's metrics averaged over the blocks in frames [edges[i], edges[i + 1]): the first
    range is the training length, the others how quality holds further on."""
    out = {}
    for name, s in report["streams"].items():
        out[name] = {}
        for lo, hi in zip(edges[:-1], edges[1:]):
            blocks = [b for b in s["blocks"] if lo <= b["first_frame"] < hi]
            if blocks:
                out[name][f"frames {lo}-{hi - 1}"] = {m: sum(b[m] for b in blocks) / len(blocks) for m in LONG_STREAM_METRICS}
    return out


def plot_long_stream(report: dict, path: str, smooth: int = 8) -> None:
    """Quality against frame index (log scale, each block at its last frame), one line per stream
    setting (a running mean over `smooth` blocks; the raw blocks faint), one panel per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = LONG_STREAM_METRICS
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6))
    for ax, metric in zip(axes, metrics):
        for k, (name, s) in enumerate(report["streams"].items()):
            x = [b["first_frame"] + report["block"] for b in s["blocks"]]
            y = torch.tensor([b[metric] for b in s["blocks"]], dtype=torch.float64)
            mean = torch.stack([y[max(0, i - smooth + 1): i + 1].mean() for i in range(len(y))])
            colour = f"C{k}"
            ax.plot(x, y.tolist(), color=colour, lw=0.5, alpha=0.25)
            ax.plot(x, mean.tolist(), color=colour, lw=1.2, label=name, ls="-" if s["rope_positions"] == "window" else "--")
        ax.axvline(report["trained_frames"], color="0.6", lw=0.8)
        ax.set(xscale="log", xlabel="frame", title=metric.replace("_", " "))
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{report['frames']}-frame streams through a {report['window_frames']}-frame window "
                 f"(grey line: the {report['trained_frames']}-frame training clips)", fontsize=10)
    fig.tight_layout()
    with atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=80)
    plt.close(fig)


def stream_memory_bytes(cfg: cf.Config, num_frames: int, batch_size: int, window_frames: int) -> int:
    """About the bytes one long stream holds at once (float32): the video kept whole (its chunks and
    their concatenation), the rolling window's KV cache, and one chunk's activations (the FFN's and
    the attention scores over the window)."""
    m = cfg.model
    tokens = (m.height // m.patch_size) * (m.width // m.patch_size)  # per frame
    seen = window_frames + m.chunk_frames  # frames a chunk attends to
    video = 2 * num_frames * m.in_channels * m.height * m.width
    cache = m.num_layers * 2 * seen * tokens * m.dim
    activations = m.chunk_frames * tokens * (m.ffn_dim + 8 * m.dim + m.num_heads * seen * tokens)
    return 4 * batch_size * (video + cache + activations)


def machine_memory_bytes(device: str) -> Optional[int]:
    """The memory a stream on `device` can have: the GPU's, else the machine's RAM (None where unknown)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows)
        return None


def load_digit_models(run: str, cfg: cf.Config) -> dict:
    """The run's models (its models.pt), checked to hold the causal_forcing generator and the
    digit_classifier and to fit its config.json: otherwise a ValueError naming the file and the fix."""
    path = os.path.join(run, "models.pt")
    try:
        models = cf.load_models(run, cfg)
    except RuntimeError as e:  # load_state_dict: weights of other shapes than config.json says
        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))[:200]
        raise ValueError(f"{path} does not fit the config in {os.path.join(run, 'config.json')} ({detail}): the two "
                         "come from different runs; give --run a whole run folder of 'causal_forcing.py --config "
                         "mnist'") from None
    missing = [name for name in ("causal_forcing", "digit_classifier") if name not in models]
    if missing:
        raise ValueError(f"{path} has no {' or '.join(map(repr, missing))} entry (it holds {sorted(models)}): long "
                         f"streams need a finished run: python causal_forcing.py --config mnist --out {run}")
    return models


def digit_run(parser, run) -> str:
    """The run folder of --run: given, else runs/mnist if it has models.pt, else the run shipped in
    docs/mnist_run; a folder without models.pt is a usage error."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
    run = run or next((p for p in (os.path.join("runs", "mnist"), os.path.join(here, "docs", "mnist_run"))
                       if os.path.isfile(os.path.join(p, "models.pt"))), None)
    if run is None or not os.path.isfile(os.path.join(run, "models.pt")):
        parser.error(f"no trained digit models in {run or 'runs/mnist or docs/mnist_run'!r}: run "
                     "'python causal_forcing.py --config mnist' first, or pass --run")
    return run


def add_run_argument(parser) -> None:
    """--run, the digit run folder that digit_run_config reads."""
    parser.add_argument("--run", default=None, help="a finished --config mnist run folder (default: runs/mnist if it "
                        "has models.pt, else the run shipped in docs/mnist_run)")


def digit_run_config(parser, run: Optional[str], what: str, device: Optional[str] = None) -> tuple[str, cf.Config]:
    """--run's folder (digit_run) and its config.json, which must be a moving-digit run: `what` (e.g. "long
    streams") is measured on moving digits only; anything else is a usage error."""
    run = digit_run(parser, run)
    try:
        cfg = cf.run_config(run, **({"device": device} if device else {}))
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    if cfg.data.dataset != "moving_digits":
        parser.error(f"{run!r} is a {cfg.data.dataset} run; {what} are measured on moving digits")
    return run, cfg


def _checked_run(parser, args) -> tuple[str, cf.Config]:
    """The run folder and its config from the flags, every flag checked before any work."""
    run, cfg = digit_run_config(parser, args.run, "long streams", args.device)
    chunk = cfg.model.chunk_frames
    too_short = args.window is not None and args.window < 2 * chunk
    if args.frames < 2 * cfg.data.frames or args.batch_size < 10 or too_short:
        parser.error(f"--frames must be >= {2 * cfg.data.frames}, --batch-size >= 10 (every digit), "
                     f"--window >= {2 * chunk}")
    need = stream_memory_bytes(cfg, args.frames, args.batch_size, args.window or cfg.data.frames)
    have = machine_memory_bytes(cfg.device)
    if have is not None and need > have:
        parser.error(f"--batch-size {args.batch_size} and --frames {args.frames} need about {need / 2**30:,.1f} GiB "
                     f"(each stream's videos are kept whole), more than the {have / 2**30:,.1f} GiB of this "
                     f"machine's {cfg.device}: lower --batch-size or --frames")
    try:
        check_writable(args.out, "--out", folder=True)  # makes the folder: last, once everything else is right
    except ValueError as e:
        parser.error(str(e))
    return run, cfg


def main(argv) -> int:
    parser = argparse.ArgumentParser(prog="examples/long_stream.py", description="A trained moving-digit "
                                     "generator far past its training length: quality per block of frames through a "
                                     "rolling window (no sink and a sink, absolute and window RoPE positions), and "
                                     "prompt switches with the cache kept or re-cached. Writes long_stream.json, "
                                     "long_stream.png and prompt_switch.gif to --out.")
    add_run_argument(parser)
    parser.add_argument("--frames", type=int, default=1024, help="frames per stream (default 1024)")
    parser.add_argument("--batch-size", type=int, default=64, help="videos per stream (default 64)")
    parser.add_argument("--window", type=int, default=None, help="rolling window in frames (default: the training clip length)")
    parser.add_argument("--out", default=os.path.join("runs", "long_stream"), help="folder for the results (default runs/long_stream)")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: auto)")
    args = parser.parse_args(argv)
    run, cfg = _checked_run(parser, args)
    for name in ("long_stream.json", "long_stream.png", "prompt_switch.gif"):
        remove_stale_temporaries(os.path.join(args.out, name))  # left by a run of this program that was killed
    try:
        models = load_digit_models(run, cfg)
    except ValueError as e:
        parser.error(str(e))
    held_out = cf.PipelineRun(cfg, None, print).data.test
    print(f"long streams of the causal_forcing generator in {run}:")
    report = long_stream_report(models, cfg, held_out, args.frames, args.batch_size, window_frames=args.window)
    report["run"], report["device"] = run, cfg.device
    report["prompt_switch"] = prompt_switch_report(models, cfg)
    for policy, r in report["prompt_switch"]["policies"].items():
        print(f"  prompt switch, {policy}: {r['videos_reaching_new_digit']:.2f} of videos read the new digit, after "
              f"{r['frames_until_new_digit']:.2f} frames on average; jump at the switch {r['jump_at_switch']:.2f}; {r['seconds']:.2f} s")
    report["summary"] = summarize_long_stream(report)
    cf.save_atomic(report, os.path.join(args.out, "long_stream.json"))
    plot_long_stream(report, os.path.join(args.out, "long_stream.png"))
    first = torch.arange(10)  # a video of each digit, which changes twice: d -> d + 3 -> d + 6
    conds = [cf.label_cond(((first + k) % 10)[:, None]).to(cfg.device) for k in (0, 3, 6)]
    gif = {name: stream_video(models["causal_forcing"], **cf.streaming_steps(cfg.sample, 4), num_frames=48, batch_size=10,
                              cond=conds[0], switches={16: conds[1], 32: conds[2]}, recache=recache,
                              rng=torch.Generator().manual_seed(0)).cpu()
           for name, recache in (("keep_cache", False), ("re_cache", True))}
    save_gif(gif, os.path.join(args.out, "prompt_switch.gif"))
    print(f"wrote {args.out}/long_stream.json, long_stream.png, prompt_switch.gif")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
