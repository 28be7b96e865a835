"""What the student's sampler and DMD do in a trained moving-digit run.

    python examples/digit_probe.py                    # the shipped run in docs/mnist_run (or runs/mnist)
    python examples/digit_probe.py --run runs/mnist-seed1 --out runs/mnist-seed1/probe.json

1. Re-noising. Between its steps the few-step student re-noises its x0 prediction to the next sigma.
   Upstream draws fresh noise (renoise="fresh"); renoise="ode" re-noises with the noise the model
   predicts, eps = x0 + v, which is exactly an Euler step of the student's own ODE, the teacher's
   trajectories it regressed onto. Every student row is streamed both ways (same labels, same seed) and
   scored with digit_metrics: how much its digits move inside chunks, how often they read as asked.
2. DMD against its init. DMD's real score is the guided base, whose own sampler is the table's
   bidirectional_teacher row. For each DMD generator and the init it started from: the Frechet distance
   of the classifier's features to the held-out data and to the real score's samples. DMD should move a
   generator toward its real score.
Writes the numbers to --out (default docs/digit_probe.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import causal_forcing as cf  # noqa: E402
from examples.figures import check_writable  # noqa: E402
from examples.long_stream import add_run_argument, digit_run_config, load_digit_models  # noqa: E402

DMD_FROM = {"self_forcing": "ode_student_from_bidirectional", "causal_forcing": "ode_student_from_ar",
            "causal_forcing_pp": "consistency_student_from_ar"}  # each DMD generator and its init
STUDENTS = tuple(DMD_FROM.values()) + tuple(DMD_FROM)


@torch.no_grad()
def digit_probe(models: dict, cfg: cf.Config, num_videos: int = 250, seed: int = 0, log=print) -> dict:
    """The re-noising comparison and DMD against its init (module docstring), on `num_videos` videos per
    row asking for every digit alike, against the run's held-out videos."""
    classifier, chunk = models["digit_classifier"], cfg.model.chunk_frames
    labels = torch.arange(num_videos)[:, None] % 10
    cond = cf.label_cond(labels).to(cfg.device)
    held_out, _ = cf.digit_videos(cfg.data, cfg.data.test_size, cf.digit_split(cfg.data)["test"],
                                  torch.Generator().manual_seed(seed))

    def sample(row, renoise=None):
        run_cfg = cfg if renoise is None else dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, renoise=renoise))
        return cf.sample_row(row, models[row], run_cfg, num_videos, cond, rng=torch.Generator().manual_seed(seed)).cpu()

    def features(videos):  # of the frames as shown
        return cf.read_frames(classifier, videos.clamp(-1, 1))[0]

    teachers = {row: sample(row) for row in ("bidirectional_teacher", "ar_teacher")}
    report = {"run_renoise": cfg.sample.renoise, "videos": num_videos, "seed": seed,
              "teachers": {row: cf.digit_metrics(v, labels, held_out, classifier, chunk) for row, v in teachers.items()},
              "renoise": {}, "dmd": {}}
    videos = {}
    for row in [r for r in STUDENTS if r in models]:
        videos[row] = {mode: sample(row, mode) for mode in ("fresh", "ode")}
        report["renoise"][row] = {mode: cf.digit_metrics(v, labels, held_out, classifier, chunk)
                                  for mode, v in videos[row].items()}
        log(f"  {row}: motion inside chunks " + ", ".join(
            f"{mode} {m['motion_within_chunks']:.3f}" for mode, m in report["renoise"][row].items()))
    data_feats, real_feats = features(held_out), features(teachers["bidirectional_teacher"])
    for row in [r for r in DMD_FROM if r in videos and DMD_FROM[r] in videos]:
        report["dmd"][row] = {}
        for name in (DMD_FROM[row], row):
            feats = features(videos[name][cfg.sample.renoise])  # as the table samples it
            report["dmd"][row][name] = {"fd_to_data": cf.frechet_distance(feats, data_feats),
                                        "fd_to_real_score": cf.frechet_distance(feats, real_feats)}
        log(f"  {row} against its init {DMD_FROM[row]}: " + "; ".join(
            f"{name} FD to data {m['fd_to_data']:.1f}, to the real score {m['fd_to_real_score']:.1f}"
            for name, m in report["dmd"][row].items()))
    return report


def main(argv) -> int:
    parser = argparse.ArgumentParser(prog="examples/digit_probe.py", description="A trained digit run's students "
                                     "streamed with fresh and with 'ode' re-noising, and each DMD generator against "
                                     "its init: FD to the data and to the real score's samples.")
    add_run_argument(parser)
    parser.add_argument("--videos", type=int, default=250, help="videos per row (default 250)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the samplers and held-out videos (default 0)")
    parser.add_argument("--out", default=os.path.join("docs", "digit_probe.json"),
                        help="the JSON file to write (default docs/digit_probe.json)")
    args = parser.parse_args(argv)
    if args.videos < 1:
        parser.error("--videos must be >= 1")
    try:  # where the report goes, before any work
        check_writable(args.out, "--out")
    except ValueError as e:
        parser.error(str(e))
    run, cfg = digit_run_config(parser, args.run, "re-noising and DMD probes", device="cpu")
    try:
        models = load_digit_models(run, cfg)
    except ValueError as e:
        parser.error(str(e))
    print(f"{run}: {args.videos} videos per row")
    report = {"run": run, **digit_probe(models, cfg, args.videos, args.seed)}
    cf.save_atomic(report, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
