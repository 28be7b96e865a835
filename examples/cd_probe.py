"""Retrains only Causal Forcing++'s two stages (consistency distillation, then DMD streamed with 2
steps) from a finished toy run's teachers, with config overrides, and prints the transition accuracy
and off-manifold fraction of the consistency student and of the CF++ generator at 1, 2 and 4 steps
(the same 2,000 noise draws for every setting). The consistency-stage probes in docs/results.md
(the table under "Reading the toy results against the paper") were made with it.

    python causal_forcing.py                                   # the seed-0 toy run, once
    python examples/cd_probe.py                                    # the preset
    python examples/cd_probe.py --set cd_grid_steps=48             # upstream's consistency grid (discrete_cd_N)
    python examples/cd_probe.py --set cd_ema_decay=0.99            # upstream's EMA

About 35 s per setting on a 2-core CPU (the preset; more with a larger cd_batch_size)."""

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import causal_forcing as cf  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="examples/cd_probe.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=os.path.join("runs", "toy2d"), help="a finished toy run (default runs/toy2d)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    args = parser.parse_args(argv)
    try:  # a misspelt key, a bad value or a folder that is not a finished toy run: a usage error, no traceback
        overrides = dict(map(cf._parse_override, args.set))
        saved = cf.run_config(args.run, device="cpu")
        cfg = cf.run_config(args.run, device="cpu", **overrides)
        if saved.data.dataset != "toy2d":
            parser.error(f"{args.run!r} is a {saved.data.dataset} run; the probe retrains a toy2d run's CF++ stages")
        fixed = [f"{part}.{k}" for part in ("data", "model") for k, v in dataclasses.asdict(getattr(cfg, part)).items()
                 if getattr(getattr(saved, part), k) != v]
        if fixed:  # the students are copies of the run's teachers, trained on its data
            parser.error(f"--set {', '.join(fixed)}: the probe keeps the run's network and data; set only training "
                         "and sampling fields (e.g. cd_batch_size, cd_lr, cd_grid_steps)")
        models = cf.load_models(args.run, saved)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    run = cf.PipelineRun(cfg, None, lambda *a: None)
    base, teacher = models["bidirectional_teacher"], models["ar_teacher"]
    t0 = time.perf_counter()
    student, _ = cf.train_consistency(cfg, teacher, run.data.train, log=None, rng=run.g)
    t1 = time.perf_counter()
    generator, _ = cf.train_dmd(cfg, student, base, base, None, None, run.g, steps=cfg.sample.pp_denoising_steps)
    out = {"overrides": overrides, "consistency_seconds": round(t1 - t0, 1),
           "dmd_seconds": round(time.perf_counter() - t1, 1)}
    for name, model in (("consistency_student", student), ("causal_forcing_pp", generator)):
        for k in (1, 2, 4):
            x = cf.sample_student(model, num_frames=cfg.data.frames, batch_size=2000, rng=torch.Generator().manual_seed(0),
                                  **cf.streaming_steps(cfg.sample, k))
            m = cf.toy_metrics(x, run.data.toy, run.data.test, cfg.eval.transition_tol_degrees)
            out[f"{name}_{k}_steps"] = {"transition_accuracy": round(m["transition_accuracy"], 3),
                                        "off_manifold": round(m["off_manifold"], 3)}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
