"""Reference solutions to notebooks/05_exercises.ipynb. Try the exercises before reading on.

Each function has the stub's name and signature; the notebook's last section runs every check on
these, and the test suite checks that they pass. The answers to the notebook's "why" questions
(Exercises 3 and 4) are the docstrings of the functions they are about.
"""

import torch


# Exercise 1
def block_causal_mask(num_frames: int, chunk_frames: int) -> torch.Tensor:
    chunk = torch.arange(num_frames) // chunk_frames
    return chunk[None, :] <= chunk[:, None]  # [q, k]: key chunk <= query chunk


# Exercise 2
def teacher_forcing_mask(num_frames: int, chunk_frames: int) -> torch.Tensor:
    chunk = torch.arange(num_frames) // chunk_frames
    causal = chunk[None, :] <= chunk[:, None]
    earlier = chunk[None, :] < chunk[:, None]
    same = chunk[None, :] == chunk[:, None]
    clean_rows = torch.cat([causal, torch.zeros_like(causal)], 1)  # clean queries: clean keys only
    noisy_rows = torch.cat([earlier, same], 1)  # noisy queries: earlier clean chunks, own noisy chunk
    return torch.cat([clean_rows, noisy_rows], 0)


# Exercise 3
def x0_from_velocity(x_s: torch.Tensor, v: torch.Tensor, s: float) -> torch.Tensor:
    return x_s - s * v


def euler_step(x: torch.Tensor, v: torch.Tensor, s: float, s_next: float) -> torch.Tensor:
    """Why one step is exact in the check: along the straight path x_s = (1 - s) x0 + s eps the
    velocity dx_s/ds = eps - x0 is the same at every s, and an Euler step follows a constant velocity
    exactly. A trained teacher predicts E[eps - x0 | x_s], the average over every (x0, eps) that could
    have produced x_s; that average changes as s moves (the teacher's trajectories bend), so one step
    misses, by less the smaller the step: hence the teachers' 16 to 48 Euler steps."""
    return x + v * (s_next - s)


# Exercise 4
def forward_chunk_by_chunk(model, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Why the cache needs start_frame: it says where the chunk sits in the video. The cache reads the
    keys and values of the frames before start_frame and writes the chunk's into the slots of frames
    [start_frame, start_frame + c); the rotary embeddings rotate queries and keys by their absolute
    frame index, so attention knows how far apart two frames are. Without it every chunk is placed at
    frame 0: it reads nothing (no frame comes before 0), overwrites the first chunk's slots, and carries
    frame 0's positions, so no chunk ever sees the ones before it."""
    B, F = x.shape[:2]
    c = model.cfg.chunk_frames
    cache = model.new_kv_cache(B, max_frames=F)
    outs = []
    for start in range(0, F, c):
        outs.append(model(x[:, start:start + c], t[:, start:start + c], kv_cache=cache, start_frame=start))
    return torch.cat(outs, 1)


# Exercise 5
def dmd_gradient(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    norm = (x - x0_real).abs().mean(dim=tuple(range(1, x.dim())), keepdim=True)  # one number per sample
    return (x0_fake - x0_real) / norm


# Exercise 6
def dmd_surrogate_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    target = (x - grad).detach()
    return 0.5 * ((x - target) ** 2).mean()


# Exercise 7
def ar_ode_pairs(toy, eps: torch.Tensor, sigmas: torch.Tensor, chunk_frames: int, clean: torch.Tensor) -> torch.Tensor:
    out = []
    for start in range(0, eps.shape[1], chunk_frames):
        frames = slice(start, min(start + chunk_frames, eps.shape[1]))
        context = clean[:, :start]  # the ground truth before this chunk, never the teacher's own output
        x = eps[:, frames].double()
        for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
            x = x + toy.exact_velocity(x, s, frames, context) * (s_next - s)
        out.append(x)
    return torch.cat(out, 1)


# Exercise 8
def injectivity_floor(flow_map, frames: int, chunk_frames: int, outer: int, inner: int, rng=None) -> torch.Tensor:
    floor = torch.zeros(frames, dtype=torch.float64)
    for i in range(frames):
        seen = min((i // chunk_frames + 1) * chunk_frames, frames)  # the end of frame i's chunk
        eps = torch.randn(outer, 1, frames, 2, 1, 1, generator=rng, dtype=torch.float64).repeat(1, inner, 1, 1, 1, 1)
        eps[:, :, seen:] = torch.randn(outer, inner, frames - seen, 2, 1, 1, generator=rng, dtype=torch.float64)
        x = flow_map(eps.reshape(outer * inner, frames, 2, 1, 1)).reshape(outer, inner, frames, -1)
        floor[i] = x[:, :, i].var(dim=1).sum(-1).mean()
    return floor
