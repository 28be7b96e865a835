"""Continuing a given video: held-out moving-digit videos continued by the trained generator from their
first chunk, and what happens at the seam.

    python examples/continuation.py                  # the shipped run in docs/mnist_run (or runs/mnist), 250 videos
    python examples/continuation.py --run runs/mnist --videos 100 --out runs/continuation.json

`stream(..., prefix=frames)` writes the given frames to the KV cache as context and generates the frames
after them. Here every held-out video's first chunk is the prefix, under the video's label, and the new
frames are compared with the rest of the same video: does the continuation keep the digit (the classifier's
reading against the label), is there a jump at the seam (the change into the first new frame over the
change inside chunks), and does the motion carry on (the centroid's step into the first new frame against
the data's own step there)? A stream of the same labels from noise is the baseline that ignores the
given frames. Writes the numbers to --out (default docs/continuation.json).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import causal_forcing as cf  # noqa: E402
from examples.figures import check_writable  # noqa: E402
from examples.long_stream import add_run_argument, digit_run_config  # noqa: E402


def held_out_videos(cfg: cf.Config, num_videos: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`num_videos` moving-digit videos (N, F, 1, H, W) of the held-out digits (digits no training video
    shows) and their labels (N, 1), the same for a seed."""
    return cf.digit_videos(cfg.data, num_videos, cf.digit_split(cfg.data)["test"], torch.Generator().manual_seed(seed))


@torch.no_grad()
def continue_videos(generator: cf.CausalDiT, cfg: cf.Config, prefix: torch.Tensor, labels: torch.Tensor,
                    num_frames: int, rng=None) -> torch.Tensor:
    """The generator's `num_frames` frames after the clean frames `prefix` (B, P, C, H, W), under `labels`
    (B, 1), streamed with the run's 4-step sampler; on the CPU, (B, num_frames, C, H, W)."""
    device = next(generator.parameters()).device
    chunks = cf.stream(generator, **cf.streaming_steps(cfg.sample, 4), num_frames=num_frames, batch_size=len(prefix),
                       cond=cf.label_cond(labels).to(device), prefix=prefix.to(device), rng=rng)
    return torch.cat(list(chunks), 1).cpu()


def seam_statistics(videos: torch.Tensor, data: torch.Tensor, labels: torch.Tensor, seam: int,
                    chunk_frames: int, classifier: cf.DigitClassifier) -> dict:
    """How videos (B, F, 1, H, W), new from frame `seam` on, carry on from their frames before it, against
    the data (B, F, 1, H, W), the videos they should continue:
      digit_kept        fraction of the new frames the classifier reads as the label
      seam_jump         mean change into frame `seam` over the mean change inside chunks after it (about 1:
                        no jump)
      seam_speed_px     mean centroid step |c(seam) - c(seam - 1)| in pixels
      seam_velocity_error_px  mean distance of that step from the data's own step there
      seam_velocity_cosine    mean cosine between the two steps (1: the same direction; 0: unrelated)
      seam_turn_cosine  mean cosine between the step into frame `seam` and the step before it (the data's
                        own: a digit keeps its direction but where it bounces)
      centroid_error_px mean distance of the centroid from the data's, per new frame
    Every statistic scores the frames as shown, clamped to [-1, 1] (as digit_metrics does)."""
    videos = videos.clamp(-1, 1)
    change = (videos[:, 1:] - videos[:, :-1]).abs().mean(dim=(2, 3, 4)).mean(0)  # change into frames 1 .. F-1
    inside = [f - 1 for f in range(seam + 1, videos.shape[1]) if f % chunk_frames]
    cv, cd = cf.centroids(videos), cf.centroids(data)  # (B, F, 2)
    step, step_data = cv[:, seam] - cv[:, seam - 1], cd[:, seam] - cd[:, seam - 1]
    before = cv[:, seam - 1] - cv[:, seam - 2] if seam >= 2 else torch.zeros_like(step)  # no step before frame 1

    def cosine(a, b):  # over the videos where both steps move (a direction needs a step); NaN if none
        moving = a.norm(dim=-1) * b.norm(dim=-1) > 1e-6
        return float(torch.nn.functional.cosine_similarity(a, b, dim=-1)[moving].mean())
    pred = cf.read_frames(classifier, videos[:, seam:])[1]
    return {"digit_kept": float((pred == labels[:, :1]).double().mean()),
            "seam_jump": float(change[seam - 1] / change[inside].mean()),
            "seam_speed_px": float(step.norm(dim=-1).mean()),
            "seam_velocity_error_px": float((step - step_data).norm(dim=-1).mean()),
            "seam_velocity_cosine": cosine(step, step_data),
            "seam_turn_cosine": cosine(step, before),
            "centroid_error_px": (cv[:, seam:] - cd[:, seam:]).norm(dim=-1).mean(0).tolist()}


def continuation_report(models: dict, cfg: cf.Config, num_videos: int = 250, seed: int = 0) -> dict:
    """The held-out videos continued from their first chunk, a stream of their labels from noise, and the
    data itself, each measured by seam_statistics at the first chunk boundary."""
    gen, classifier = models["causal_forcing"], models["digit_classifier"]
    chunk, frames = gen.cfg.chunk_frames, cfg.data.frames
    data, labels = held_out_videos(cfg, num_videos, seed)
    t0 = time.perf_counter()
    new = continue_videos(gen, cfg, data[:, :chunk], labels, frames - chunk, torch.Generator().manual_seed(seed))
    seconds = time.perf_counter() - t0
    from_noise = cf.sample_student(gen, **cf.streaming_steps(cfg.sample, 4), batch_size=num_videos, num_frames=frames,
                                   cond=cf.label_cond(labels).to(cfg.device), rng=torch.Generator().manual_seed(seed)).cpu()
    videos = {"continued": torch.cat([data[:, :chunk], new], 1), "from noise": from_noise, "data": data}
    return {"videos": num_videos, "frames": frames, "prefix_frames": chunk, "seed": seed,
            "seconds_to_continue": round(seconds, 3),
            **{name: seam_statistics(v, data, labels, chunk, chunk, classifier) for name, v in videos.items()}}


def main(argv) -> int:
    parser = argparse.ArgumentParser(prog="examples/continuation.py", description="Held-out moving-digit videos "
                                     "continued from their first chunk by a trained generator (stream(..., prefix=)): "
                                     "is the digit kept, and does the motion carry on across the seam?")
    add_run_argument(parser)
    parser.add_argument("--videos", type=int, default=250, help="held-out videos to continue (default 250)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the videos and of the sampler (default 0)")
    parser.add_argument("--out", default=os.path.join("docs", "continuation.json"),
                        help="the JSON file to write (default docs/continuation.json)")
    args = parser.parse_args(argv)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
    if args.videos < 1:
        parser.error("--videos must be >= 1")
    try:  # where the report goes, before any work
        check_writable(args.out, "--out")
    except ValueError as e:
        parser.error(str(e))
    run, cfg = digit_run_config(parser, args.run, "continuations", device="cpu")
    if cfg.data.frames < 2 * cfg.model.chunk_frames:
        parser.error(f"{run!r} has one chunk per clip: a continuation needs at least two")
    name = os.path.relpath(os.path.abspath(run), here)  # the run as the repository names it, from any folder
    report = {"run": run if name.startswith("..") else name,
              **continuation_report(cf.load_models(run, cfg), cfg, args.videos, args.seed)}
    print(f"{args.videos} held-out videos of {run}, continued from their first {report['prefix_frames']} frames "
          f"({report['seconds_to_continue']:.2f} s):")
    for name in ("continued", "from noise", "data"):
        r = report[name]
        print(f"  {name:10s} digit kept {r['digit_kept']:.3f}, seam jump {r['seam_jump']:.2f}, step at the seam "
              f"{r['seam_speed_px']:.2f} px (off the data's by {r['seam_velocity_error_px']:.2f} px, cosine "
              f"{r['seam_velocity_cosine']:.2f}; with the step before {r['seam_turn_cosine']:.2f}), centroid off "
              "the data's by "
              + " ".join(f"{e:.2f}" for e in r["centroid_error_px"]) + " px")
    cf.save_atomic(report, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
