"""Run by tests/test_distributed.py under torchrun: a few steps of every stage, data parallel.
Writes each rank's losses and final parameters to OUT/rank{R}.pt."""

import sys

import torch

import causal_forcing as cf


def stages(mode: str, out: str) -> None:
    rank, world = cf.init_distributed()
    cfg = cf.get_config("toy2d", device="cpu", num_layers=1, batch_size=16, base_steps=3, teacher_steps=2,
                        ode_pairs=32, ode_steps=2, dmd_steps=3, gen_update_ratio=2, ema_start_step=1,
                        teacher_solver_steps=8, data_parallel=mode)
    torch.manual_seed(0)  # the initial weights
    g = torch.Generator().manual_seed(0)  # every draw of the training loops
    data = cf.ToyVideos(cfg.data).sample(64, g)
    base, base_losses = cf.train_base(cfg, data, log=None, rng=g)
    teacher, _ = cf.train_ar_teacher(cfg, base, data, log=None, rng=g)
    pairs = cf.make_ode_pairs(cfg, teacher, data, "ar", rng=g)
    student, _ = cf.train_ode_student(cfg, teacher, pairs, "ar", log=None, rng=g)
    final, hist = cf.train_dmd(cfg, student, base, base, log=None, rng=g)
    states = {name: cf.full_state_dict(m) for name, m in
              (("base", base), ("teacher", teacher), ("student", student), ("dmd", final))}
    torch.save({"base_losses": base_losses, "critic": hist["critic"], "states": states, "world": world},
               f"{out}/rank{rank}.pt")


if __name__ == "__main__":
    stages(sys.argv[1], sys.argv[2])
