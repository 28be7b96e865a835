"""Causal Forcing in one file: autoregressive video diffusion distillation, done right.

Paper: "Causal Forcing: Autoregressive Diffusion Distillation Done Right for High-Quality Real-Time
Interactive Video Generation" (2026), building on CausVid, Self Forcing and DMD2. The recipe distils a
slow video diffusion model into a few-step *causal* generator that streams video chunk by chunk:

    stage 0  bidirectional base model      flow matching, full attention
    stage 1  AR teacher by teacher forcing  [clean ; noisy] sequence, block-causal mask
    stage 2  causal ODE distillation        the few-step student regresses the AR teacher's ODE
                                            endpoints, with clean ground-truth context
             (Causal Forcing++: causal consistency distillation from the AR teacher instead)
    stage 3  DMD with self-rollout          real score (frozen) against a fake score trained on
                                            the generator's own samples

Why stage 2 must distil an *AR* teacher (Sec. 3, frame-level injectivity): a bidirectional teacher's
output for frame i also depends on the noise of future frames, which a causal student cannot see, so
the MSE-optimal student is a conditional expectation, a blurred average of futures (Prop. 3.3). The AR
teacher's flow map for frame i is a function of exactly what the student sees: a unique target.

The default run trains every stage on toy 2-D "videos" whose data is a Gaussian mixture, so the
teachers also have exact closed forms (ground truth); "mnist" trains the same stages on moving digits
conditioned on their label; "wan-1.3b" is Wan2.1-T2V-1.3B's DiT, whose checkpoints load into it.

    python causal_forcing.py                  # every stage on toy 2-D videos, then the table
    python causal_forcing.py --config mnist   # the same on moving digits (about 30 min on 2 CPU cores)
    torchrun --nproc_per_node=2 causal_forcing.py   # data parallel
    python -m pytest                          # the tests

Part I (I.1-I.9) is the method, in the order the data flows; Part II (II.1-II.8) engineering that does not change
it: checks, Wan checkpoints, fast attention, the training loop, data, metrics, the pipeline, the command line.
Beside the module, examples/ holds the figures, long streams, benchmarks and Wan2.1 text to video.

Shapes: B batch, F frames, C channels, H W height width, S tokens per frame, N tokens, D width,
h heads, d head dim. Videos are (B, F, C, H, W); noise levels t are sigmas (B, F) in [0, 1], 1 = noise.
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
import types
import typing
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F_
from einops import rearrange


# #### PART I: THE METHOD, in the order the data flows (the stages run II.4's training loop) ######
# ==== I.1 config: the fields and their defaults (the named presets and the checks: II.1) =========


@dataclass
class DataConfig:
    """Which videos: "toy2d", a point that starts on a circle and turns by a fixed angle every frame;
    or "moving_digits", digits that move and bounce on a canvas (Srivastava et al. 2015)."""

    dataset: str = "toy2d"  # or "moving_digits"; "none" for the Wan presets (no training data here)
    frames: int = 4  # F, frames per video
    num_starts: int = 8  # K start points, evenly spaced on the circle
    radius: float = 2.0
    turn_degrees: float = 45.0  # each video turns by +turn or by -turn every frame
    noise_std: float = 0.15  # Gaussian noise on every coordinate of every frame
    train_size: int = 20000  # a fixed training set, as a user would have
    test_size: int = 2000  # held-out videos for the metrics
    # moving digits (the paper-standard setting is canvas 64, digit_size 28, num_digits 2, speed 0.1)
    canvas: int = 32
    digit_size: int = 16  # digits are resized from 28 px
    num_digits: int = 1  # one digit, so that its label is the video's class
    speed: float = 0.2  # per frame, in units of the canvas span (canvas - digit_size)
    mnist_dir: Optional[str] = None  # MNIST IDX files; None: toy_data sprites (get_config: $CAUSAL_FORCING_MNIST)


ROPE_POSITIONS = ("absolute", "window")  # the values of ModelConfig.rope_positions


@dataclass
class ModelConfig:
    """CausalDiT shapes. Field names follow Wan2.1 where Wan has the same knob."""

    in_channels: int = 2  # C; toy 2-D frames are (C=2, H=1, W=1)
    height: int = 1  # H of a frame (before patchify)
    width: int = 1  # W of a frame
    patch_size: int = 1  # spatial patch (Wan: 2); the temporal patch is always 1 frame
    dim: int = 64  # D
    ffn_dim: int = 256
    num_heads: int = 4
    num_layers: int = 3
    freq_dim: int = 64  # sinusoidal timestep features (Wan: 256)
    cond_dim: int = 0  # width of the conditioning sequence (Wan: 4096 text features); 0 = none
    text_len: Optional[int] = None  # pad the conditioning with zero rows to this length (Wan: 512)
    rope_theta: float = 10000.0
    eps: float = 1e-6
    chunk_frames: int = 1  # causal block size: 1 = frame-wise, 3 = chunk-wise (Wan latents)
    window_frames: Optional[int] = None  # rolling attention window in frames (None = full)
    sink_frames: int = 0  # first frames always attended inside a rolling window
    rope_positions: str = "absolute"  # in a rolling cache (official) or "window": re-indexed at every chunk
    attention: str = "auto"  # speed (no change to the method): "dense" masks or "flex"; auto = flex on CUDA
    precision: str = "auto"  # "fp32" or "bf16" autocast; auto = bf16 on CUDA, fp32 elsewhere
    grad_checkpointing: bool = False  # recompute each block in backward: memory for compute
    compile: bool = False  # torch.compile each block in place (state-dict keys stay unchanged)


@dataclass
class TrainConfig:
    """The training stages. Upstream values (Wan2.1-1.3B fine-tuning) in comments; the toy defaults
    train a 184k-parameter model from scratch in seconds, so learning rates are larger and step counts
    smaller. Every stage but DMD decays its lr on a cosine; DMD keeps it constant."""

    batch_size: int = 256  # upstream 64 clips
    weight_decay: float = 0.01  # upstream 0.01 everywhere
    adam_beta1: float = 0.0  # upstream betas (0, 0.999) for teacher, ODE and DMD stages
    adam_beta2: float = 0.999
    grad_clip: float = 10.0  # upstream 10
    # stage 0: the bidirectional base (upstream: pretrained Wan), from scratch with the usual Adam momentum
    base_steps: int = 1200
    base_lr: float = 2e-3
    base_beta1: float = 0.9
    # stage 1: AR teacher (upstream lr 2e-6, ~2K steps)
    teacher_steps: int = 600
    teacher_lr: float = 5e-4
    teacher_mode: str = "teacher_forcing"  # or "diffusion_forcing" (the paper's ablation)
    teacher_guidance: float = 6.0  # CFG of the ODE-pair teacher (upstream 6); unused when unconditional
    cond_dropout: float = 0.1  # base and AR teacher: drop the condition so that CFG has an "uncond"
    # base and AR teacher's sigma draw and weight (from scratch, a model also needs the low noise levels)
    fm_shift: Optional[float] = None  # shift of the sigma draw; None = the sampler's `shift`
    fm_weight: str = "bump"  # "bump" (upstream: 0 at t = 1000, near 0 at the clean end) or "uniform"
    # stage 2: ODE pairs and ODE distillation (upstream lr 2e-6, ~1K steps)
    ode_pairs: int = 2048
    ode_steps: int = 400
    ode_lr: float = 5e-4
    ode_step_draw: str = "upstream"  # each frame's student step: "upstream", "batch", "sample" or "chunk"
    # stage 2, Causal Forcing++: consistency distillation from the AR teacher, then DMD with pp_denoising_steps
    # (upstream lr 2e-6, >= 3K steps at batch 64, teacher CFG 3, EMA 0.99); cd_steps=0 leaves it out
    cd_steps: int = 600
    cd_lr: float = 5e-4
    cd_guidance: float = 3.0  # CFG of the teacher's Euler step; unused when unconditional
    cd_ema_decay: float = 0.99  # the EMA student that gives the consistency target
    cd_batch_size: Optional[int] = None  # clips per step (upstream 64); None = batch_size
    # stage 3: DMD (upstream gen lr 2e-6, critic lr 4e-7, ratio 5, EMA 0.99 from step 200)
    dmd_steps: int = 300  # critic updates; the generator updates every `gen_update_ratio` steps
    gen_lr: float = 5e-5  # 4x below this the generator barely moves; 4x above it degrades frame 0
    critic_lr: float = 4e-4
    gen_update_ratio: int = 5  # "two time-scale update": the fake score must track the generator
    dmd_batch_size: Optional[int] = None  # DMD's clips per step; None = batch_size
    ema_decay: float = 0.99
    ema_start_step: int = 20  # in generator updates (upstream: from critic step 200, 40 updates at ratio 5)
    dmd_min_sigma: float = 0.02  # DMD/critic timesteps are clamped to [0.02, 0.98] (upstream)
    dmd_max_sigma: float = 0.98
    real_guidance: float = 4.0  # CFG scale uncond + g (cond - uncond); upstream "cond + 3 (cond - uncond)"
    # the run: engineering and evaluation, none changes what a stage computes
    classifier_steps: int = 600  # the digit classifier behind the moving-digit metrics
    checkpoint_every: int = 100  # steps between resumable checkpoints of a stage (with --out)
    dmd_snapshots: int = 8  # fixed rollouts of 4 videos recorded as DMD trains (for examples/figures.py)
    data_parallel: str = "auto"  # under torchrun: "ddp" or "fsdp" (sharded); auto = fsdp if dim >= 1024


@dataclass
class SampleConfig:
    """Noise schedule and samplers (Wan flow-matching conventions)."""

    shift: float = 5.0  # s' = k s / (1 + (k - 1) s); upstream generator k = 5
    num_train_timesteps: int = 1000
    teacher_solver_steps: int = 48  # Euler steps of the teachers (upstream 48 for ODE pairs)
    cd_grid_steps: Optional[int] = None  # consistency grid (upstream 48); None = teacher_solver_steps
    denoising_steps: tuple = (1000, 750, 500, 250)  # the student's steps before warping
    pp_denoising_steps: tuple = (1000, 500)  # Causal Forcing++: 2 steps (the first chunk at denoising_steps)
    warp_denoising_steps: bool = True  # map them through the shifted schedule: 1000, 937.5, 833.3, 625
    context_noise: float = 0.0  # sigma at which finished chunks are written to the KV cache
    renoise: str = "fresh"  # the student between its steps: fresh noise (upstream) or "ode", its own Euler step


@dataclass
class EvalConfig:
    eval_samples: int = 2000
    floor_outer: int = 256  # Monte-Carlo samples of what the student sees
    floor_inner: int = 32  # resamples of the future noise it cannot see
    transition_tol_degrees: float = 15.0


@dataclass
class Config:
    name: str = "toy2d"
    seed: int = 0
    device: str = "auto"  # cuda, then mps, then cpu; resolved by get_config
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ==== I.2 data: toy 2-D videos with their exact denoisers; conditions ============================


class ToyVideos:
    """Videos of F frames, each a point in R^2 (C=2, H=W=1) that starts at one of K points on a circle and
    turns by +turn or -turn every frame, with Gaussian noise on every coordinate: a mixture of 2K isotropic
    Gaussians in R^(2F) with means mu_m (one path each) and std sigma_d. So the flow-matching teachers have
    closed forms: under x_s = (1 - s) x0 + s eps, component m gives x_s ~ N((1 - s) mu_m, v_s I) with
    v_s = (1 - s)^2 sigma_d^2 + s^2, and E[x0 | x_s] mixes the per-component posterior means."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        k = torch.arange(cfg.num_starts, dtype=torch.float64)
        start = 2 * math.pi * k / cfg.num_starts  # (K,)
        turn = math.radians(cfg.turn_degrees) * torch.tensor([1.0, -1.0], dtype=torch.float64)
        i = torch.arange(cfg.frames, dtype=torch.float64)
        angle = start[:, None, None] + turn[None, :, None] * i  # (K, 2, F)
        path = cfg.radius * torch.stack([angle.cos(), angle.sin()], -1)  # (K, 2, F, 2)
        self.means = rearrange(path, "k d f c -> (k d) f c")  # (M, F, 2), M = 2K modes
        self.log_weights = torch.full((len(self.means),), -math.log(len(self.means)), dtype=torch.float64)
        self.std = cfg.noise_std

    def sample(self, n: int, rng: Optional[torch.Generator] = None) -> torch.Tensor:
        """(n, F, 2, 1, 1) float32 videos."""
        m = torch.randint(len(self.means), (n,), generator=rng)
        x = self.means[m] + self.std * torch.randn(n, *self.means.shape[1:], generator=rng, dtype=torch.float64)
        return x.float()[..., None, None]

    def frame_points(self) -> torch.Tensor:
        """(P, 2): every distinct point a frame can sit on (the K circle points)."""
        pts = rearrange(self.means, "m f c -> (m f) c")
        return torch.unique(pts.round(decimals=6), dim=0)

    # --- exact teachers -----------------------------------------------------------------------
    def exact_x0(self, x_s: torch.Tensor, s: torch.Tensor, frames: Optional[slice] = None,
                 context: Optional[torch.Tensor] = None) -> torch.Tensor:
        """E[x0 | x_s] for the frames `frames` of a video (all frames if None), optionally given clean earlier frames
        `context` = x0[:, :frames.start]. Conditioning a mixture on some of its coordinates reweights its components by
        how well each explains them: that is the exact AR teacher. x_s is (B, f, 2, 1, 1); s is a float or (B,)."""
        frames = frames or slice(0, self.means.shape[1])
        B = x_s.shape[0]
        x = x_s.double().reshape(B, -1)  # (B, f*2)
        mu = self.means[:, frames].reshape(len(self.means), -1)  # (M, f*2)
        s = torch.as_tensor(s, dtype=torch.float64).reshape(-1, 1).expand(B, 1)  # (B, 1)
        var_s = (1 - s) ** 2 * self.std**2 + s**2  # (B, 1)
        logw = self.log_weights[None].expand(B, -1)  # (B, M)
        if context is not None and context.shape[1] > 0:
            ctx = context.double().reshape(B, -1)
            mu_c = self.means[:, : context.shape[1]].reshape(len(self.means), -1)
            logw = logw - torch.cdist(ctx, mu_c) ** 2 / (2 * self.std**2)
        logw = logw - ((x[:, None] - (1 - s)[:, :, None] * mu[None]) ** 2).sum(-1) / (2 * var_s)
        w = torch.softmax(logw, dim=-1)  # (B, M) posterior over components
        gain = (1 - s) * self.std**2 / var_s  # (B, 1)
        post = mu[None] + gain[:, :, None] * (x[:, None] - (1 - s)[:, :, None] * mu[None])  # (B, M, f*2)
        return torch.einsum("bm,bmd->bd", w, post).reshape(x_s.shape)

    def exact_velocity(self, x_s, s, frames=None, context=None) -> torch.Tensor:
        """The exact flow-matching velocity E[eps - x0 | x_s] = (x_s - E[x0 | x_s]) / s, s > 0."""
        s_ = torch.as_tensor(s, dtype=torch.float64).reshape(-1, *[1] * (x_s.dim() - 1))
        return (x_s.double() - self.exact_x0(x_s, s, frames, context)) / s_


def label_cond(labels: torch.Tensor, num_classes: int = 10) -> torch.Tensor:
    """Digit labels (B,) or (B, num_digits) -> the condition (B, num_digits, num_classes): a one-hot row per
    digit, through the cross-attention that carries text in Wan. The null condition is zeros (cond=None)."""
    labels = labels.reshape(len(labels), -1)
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    return F_.one_hot(labels.long(), num_classes).float()


def drop_cond(cond: Optional[torch.Tensor], p: float, rng=None) -> Optional[torch.Tensor]:
    """Replaces each sample's condition by the null condition (zeros) with probability p, so that one
    network learns both the conditional and the unconditional velocity (classifier-free guidance)."""
    if cond is None or p == 0:
        return cond
    keep = (torch.rand(len(cond), generator=rng) >= p).to(cond.dtype).to(cond.device)
    return cond * keep.reshape(-1, *[1] * (cond.dim() - 1))


# ==== I.3 flow matching: noising, x0 and velocity, the loss, sigmas, the Euler ODE, exact teachers


def shift_sigma(sigma, shift: float):
    """s' = k s / (1 + (k - 1) s). Spends more of the schedule at high noise (k > 1)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def _per_frame(sigma, x):
    """(B, F) or (B,) or scalar sigma -> broadcastable against x (B, F, C, H, W)."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return sigma.reshape(*sigma.shape, *[1] * (x.dim() - sigma.dim()))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_s = (1 - s) x0 + s eps; sigma broadcasts from (B, F)."""
    s = _per_frame(sigma, x0)
    return (1 - s) * x0 + s * noise


def x0_from_velocity(x_s, v, sigma):
    """x0 = x_s - s v, from v = eps - x0."""
    return x_s - _per_frame(sigma, x_s) * v


def flow_matching_loss(model, x0, sigma, noise, cond=None, weight=None, **kw) -> torch.Tensor:
    """Flow matching (Wan's objective, rectified flow): the MSE between the model's velocity at
    x_s = (1 - s) x0 + s eps and the true velocity eps - x0, per frame, averaged with `weight` (B, F)
    if given (`bump_weight`), else uniformly. `kw` go to the model (clean_context: teacher forcing)."""
    x_s = add_noise(x0, noise, sigma)
    err = (model(x_s, sigma, cond, **kw) - (noise - x0)).pow(2).mean(dim=(2, 3, 4))  # (B, F)
    return (err * weight).mean() if weight is not None else err.mean()


def training_sigmas(cfg: SampleConfig) -> torch.Tensor:
    """The 1000 training sigmas of Wan's scheduler: shift(linspace(1, 0, 1001)[:-1]), descending."""
    raw = torch.linspace(1, 0, cfg.num_train_timesteps + 1, dtype=torch.float64)[:-1]
    return shift_sigma(raw, cfg.shift)


def bump_weight(sigma: torch.Tensor, cfg: SampleConfig) -> torch.Tensor:
    """Training-loss weight over timesteps t = 1000 s: exp(-2 ((t - 500) / 1000)^2), shifted to a
    minimum of 0 and normalised to mean 1 over the training schedule (upstream "bsmntw"). It
    downweights the two ends, where the flow-matching target is nearly trivial or pure noise."""
    T = cfg.num_train_timesteps
    grid = training_sigmas(cfg) * T
    w = torch.exp(-2 * ((grid - T / 2) / T) ** 2)
    w = w - w.min()
    w = w * len(w) / w.sum()
    idx = (grid[None].to(sigma.device) - (sigma.double() * T).reshape(-1, 1)).abs().argmin(-1)
    return w.to(sigma.device)[idx].reshape(sigma.shape).to(sigma.dtype)


def sample_sigmas(batch: int, frames: int, chunk_frames: int, cfg: SampleConfig, rng=None) -> torch.Tensor:
    """(B, F) training sigmas: one per chunk, drawn uniformly from the 1000 steps of the shifted schedule
    (`training_sigmas`); chunk_frames >= frames gives one per clip."""
    chunks = -(-frames // chunk_frames)
    idx = torch.randint(cfg.num_train_timesteps, (batch, chunks), generator=rng)
    s = training_sigmas(cfg)[idx].float()  # (B, chunks)
    return s.repeat_interleave(chunk_frames, dim=1)[:, :frames]


def solver_sigmas(steps: int, cfg: SampleConfig) -> torch.Tensor:
    """steps + 1 descending sigmas from 1 to 0 on the shifted schedule, for the Euler ODE."""
    return shift_sigma(torch.linspace(1, 0, steps + 1, dtype=torch.float64), cfg.shift)


def student_sigmas(cfg: SampleConfig, steps: Optional[tuple] = None) -> list[float]:
    """The few-step student's sigmas for `steps` (default cfg.denoising_steps), warped through the shifted
    schedule (Self Forcing's warp_denoising_step): [1000, 750, 500, 250] -> [1000, 937.5, 833.3, 625] / 1000."""
    T = cfg.num_train_timesteps
    steps = cfg.denoising_steps if steps is None else steps
    if not steps or not all(0 < k <= T for k in steps) or any(a <= b for a, b in zip(steps, steps[1:])):
        raise ValueError(f"denoising steps {steps} must be a non-empty, strictly descending list in (0, {T}]")
    raw = torch.tensor(steps, dtype=torch.float64) / T
    return [float(s) for s in (shift_sigma(raw, cfg.shift) if cfg.warp_denoising_steps else raw)]


def ode_pair_sigmas(cfg: SampleConfig) -> tuple[list[float], torch.Tensor]:
    """(the student's sigmas, the teacher's Euler grid) for ODE pairs: the teacher's trajectory is
    kept where it passes the student's sigmas, so these must lie on its grid."""
    keep, grid = student_sigmas(cfg), solver_sigmas(cfg.teacher_solver_steps, cfg)
    missing = [s for s in keep if not any(abs(s - g) < 1e-6 for g in grid.tolist())]
    if missing:
        raise ValueError(f"student sigmas {missing} are not on the teacher's {len(grid) - 1}-step grid; "
                         "choose teacher_solver_steps so that the grids align")
    return keep, grid


def consistency_sigmas(cfg: SampleConfig) -> list[float]:
    """Causal Forcing++'s grid: N = cd_grid_steps (default teacher_solver_steps) Euler steps on the shifted
    schedule without the final 0, N sigmas from 1 down. A step pairs grid[n] with grid[n + 1], n < N - 1."""
    steps = cfg.teacher_solver_steps if cfg.cd_grid_steps is None else cfg.cd_grid_steps
    return solver_sigmas(steps, cfg)[:-1].tolist()


def euler_ode(velocity: Callable, x: torch.Tensor, sigmas: torch.Tensor,
              keep: Optional[list[float]] = None) -> tuple[torch.Tensor, dict]:
    """Integrates the PF-ODE dx/ds = v(x, s) from sigmas[0] to sigmas[-1] with Euler steps
    x <- x + v (s_next - s). Returns the endpoint and the states at the sigmas listed in `keep`."""
    kept = {}
    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        for k in keep or []:
            if abs(k - s) < 1e-6:
                kept[k] = x
        x = x + velocity(x, s) * (s_next - s)
    return x, kept


# --- the toy's exact teachers: its closed-form velocities (I.2) through the Euler ODE ------------


def exact_bidirectional_flow(data: ToyVideos, eps: torch.Tensor, sigmas: torch.Tensor, keep=None):
    """phi_Bi: noise of all frames -> the exact bidirectional teacher's clean video. With `keep`
    (a list of sigmas), also the states there: (x0, {sigma: x})."""
    x0, kept = euler_ode(lambda x, s: data.exact_velocity(x, s), eps.double(), sigmas, keep)
    return (x0, kept) if keep else x0


def exact_ar_flow(data: ToyVideos, eps: torch.Tensor, sigmas: torch.Tensor, chunk_frames: int,
                  context: Optional[torch.Tensor] = None, keep=None):
    """phi_AR: chunk by chunk, the exact AR teacher's ODE given clean earlier frames: its own outputs, or
    `context` (ground truth, as for ODE pairs). With `keep`, also the states there: (x0, {sigma: x})."""
    out, kept = [], {k: [] for k in keep or []}
    for start in range(0, eps.shape[1], chunk_frames):
        fr = slice(start, min(start + chunk_frames, eps.shape[1]))
        earlier = (context if context is not None else torch.cat(out, 1) if out else eps[:, :0].double())[:, :start]
        vel = lambda x, s: data.exact_velocity(x, s, fr, earlier)  # noqa: E731
        x0, states = euler_ode(vel, eps[:, fr].double(), sigmas, keep)
        out.append(x0)
        for k in kept:
            kept[k].append(states[k])
    x0 = torch.cat(out, 1)
    return (x0, {k: torch.cat(v, 1) for k, v in kept.items()}) if keep else x0


def _check_kind(kind: str) -> None:
    if kind not in ("ar", "bidirectional"):
        raise ValueError(f"kind must be 'ar' or 'bidirectional', got {kind!r}")


def exact_ode_pairs(data: ToyVideos, cfg: Config, clean: torch.Tensor, kind: str, rng=None) -> dict:
    """make_ode_pairs (I.8) with the *exact* teachers (toy data only), which isolate the injectivity argument
    from any error of a learned teacher: "ar" given the ground-truth earlier frames, "bidirectional"."""
    _check_kind(kind)
    keep, sig = ode_pair_sigmas(cfg.sample)
    eps = torch.randn(clean.shape, generator=rng, dtype=torch.float64)
    if kind == "ar":
        x0, kept = exact_ar_flow(data, eps, sig, cfg.model.chunk_frames, context=clean.double(), keep=keep)
    else:
        x0, kept = exact_bidirectional_flow(data, eps, sig, keep=keep)
    xt = torch.stack([kept[k] for k in keep], 1)
    return {"xt": xt.float().to(cfg.device), "x0": x0.float().to(cfg.device), "clean": clean.to(cfg.device)}


# ==== I.4 attention masks: block-causal, teacher forcing, rolling window =========================


def frame_visibility(q_frames: torch.Tensor, k_frames: torch.Tensor, chunk_frames: int,
                     window_frames: Optional[int] = None, sink_frames: int = 0) -> torch.Tensor:
    """(Fq, Fk) bool: may a query in frame q see a key in frame k? Causal over chunks of
    `chunk_frames` frames (aligned to absolute frame 0), bidirectional inside a chunk:
        k < end(chunk(q)),
    and, with a rolling window of W frames of which Z are sink frames, only the sink or the latest
    W - Z frames up to the end of the query's chunk:  k < Z  or  k >= end(chunk(q)) - (W - Z)."""
    q_end = (q_frames // chunk_frames + 1) * chunk_frames  # (Fq,)
    vis = k_frames[None, :] < q_end[:, None]
    if window_frames is not None:
        recent = k_frames[None, :] >= (q_end - (window_frames - sink_frames))[:, None]
        vis = vis & (recent | (k_frames[None, :] < sink_frames))
    return vis


def teacher_forcing_visibility(frames: torch.Tensor, chunk_frames: int, window_frames=None,
                               sink_frames: int = 0) -> torch.Tensor:
    """(2F, 2F) bool over the sequence [clean frames ; noisy frames] (the AR teacher, stage 1).
    Clean frames attend block-causally among clean frames; noisy chunk b attends to the clean
    frames of chunks < b and to its own noisy chunk; noisy frames never serve as context."""
    causal = frame_visibility(frames, frames, chunk_frames, window_frames, sink_frames)
    chunk = frames // chunk_frames
    earlier = chunk[None, :] < chunk[:, None]  # key chunk < query chunk
    same = chunk[None, :] == chunk[:, None]
    top = torch.cat([causal, torch.zeros_like(causal)], 1)  # clean queries
    bottom = torch.cat([causal & earlier, same], 1)  # noisy queries
    return torch.cat([top, bottom], 0)


def expand_to_tokens(vis: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
    """(Fq, Fk) frame mask -> (Fq*S, Fk*S) token mask (tokens are frame-major)."""
    return vis.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)


# Attention back-ends: name -> (a frame mask to the kernel's mask, the kernel); II.3 adds "flex" for GPUs.
ATTENTION_BACKENDS: dict = {"dense": (expand_to_tokens, F_.scaled_dot_product_attention)}
_MASKS: dict = {}  # the same few masks recur every step: each is built once


def token_mask(vis: Optional[torch.Tensor], tokens_per_frame: int, backend: str, device) -> Optional[tuple]:
    """A frame visibility (Fq, Fk) as `attend` takes it: (kernel, token-level mask); None where every key is
    visible. backend: ModelConfig.attention ("auto": flex on CUDA, where II.3 provides it, else dense)."""
    if vis is None or bool(vis.all()):
        return None
    if backend == "auto":
        backend = "flex" if torch.device(device).type == "cuda" and "flex" in ATTENTION_BACKENDS else "dense"
    key = (tuple(vis.shape), vis.cpu().numpy().tobytes(), tokens_per_frame, backend, str(device))
    if key not in _MASKS:
        if len(_MASKS) >= 32:
            _MASKS.clear()
        build, kernel = ATTENTION_BACKENDS[backend]
        _MASKS[key] = (kernel, build(vis.to(device), tokens_per_frame))
    return _MASKS[key]


def attend(q, k, v, mask=None) -> torch.Tensor:
    """Softmax attention, q (B, h, Nq, d), k v (B, h, Nk, d) -> (B, h, Nq, d), under `token_mask`'s mask;
    None: every key visible, and PyTorch picks a fused (flash) kernel."""
    q, k = q.to(v.dtype), k.to(v.dtype)  # under autocast q, k leave the fp32 norm gains as fp32
    kernel, token_level = mask or (F_.scaled_dot_product_attention, None)
    return kernel(q, k, v, token_level)


# ==== I.5 network: a Wan-style DiT with causal attention and a KV cache ==========================


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """(N, 3) integer (frame, y, x) positions -> (N, d/2) rotation angles in float64. As in Wan, the head
    dim splits into frame / height / width parts of d - 4 (d // 6), 2 (d // 6), 2 (d // 6) dims; an axis of
    d_a dims turns at frequencies theta^(-2i / d_a). No table: positions never overflow, however long the stream."""
    d_hw = 2 * (head_dim // 6)
    parts = []
    for axis, d_a in enumerate((head_dim - 2 * d_hw, d_hw, d_hw)):
        omega = theta ** (-torch.arange(0, d_a, 2, dtype=torch.float64, device=positions.device) / d_a)
        parts.append(positions[:, axis, None].double() * omega[None])
    return torch.cat(parts, -1)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotates adjacent pairs (x[2j], x[2j+1]) of x (B, N, h, d) by angles (N, d/2), in at least
    float32 (Wan rotates in float64), and returns x's dtype."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    cos, sin = angles.cos().to(xf.dtype)[:, None], angles.sin().to(xf.dtype)[:, None]  # (N, 1, d/2)
    x1, x2 = xf[..., 0::2], xf[..., 1::2]
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)  # (B, N, h, d/2, 2)
    return out.flatten(-2).to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the full width (Wan applies it to q and k before splitting heads)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # normalise in >= fp32, as Wan
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class KVCache:
    """Keys and values of the frames already generated, per layer: a new chunk attends to them instead of re-running the
    prefix. Buffers (layers, B, h, slots, S, d), a slot per frame: max_frames (default 1024), or W = window_frames (the
    model's, if it has one): Z = sink_frames for the first frames, a ring for the rest. Keys are stored rotated
    ("absolute" positions) or raw ("window": rotated at each read). A call on frames [a, a + F) (`plan`, each layer's
    `extend`, `commit`) overwrites their slots and forgets later frames."""

    def __init__(self, model, batch_size: int, max_frames: Optional[int] = None, window_frames: Optional[int] = None,
                 sink_frames: Optional[int] = None):
        c, p = model.cfg, next(model.parameters())
        window = c.window_frames if window_frames is None else window_frames
        sink = c.sink_frames if sink_frames is None else sink_frames
        own = (c.window_frames, c.sink_frames)
        if c.window_frames is not None and (max_frames is not None or (window, sink) != own):
            raise ValueError(f"max_frames={max_frames}, window_frames={window_frames}, sink_frames={sink_frames} "
                             f"conflict with the model's rolling window {own}: leave them out (max_frames is for a "
                             "full cache)")
        if window is not None and (sink < 0 or window - sink < c.chunk_frames):
            raise ValueError(f"sink_frames={sink} must be >= 0 and window_frames - sink_frames a chunk or more")
        self.batch_size, self.chunk_frames, self.rope_positions = batch_size, c.chunk_frames, c.rope_positions
        self.max_frames = (max_frames or 1024) if window is None else None
        self.window_frames, self.sink_frames = window, sink
        shape = (len(model.blocks), batch_size, c.num_heads, window or self.max_frames, model.tokens_per_frame,
                 c.dim // c.num_heads)
        dtype = torch.bfloat16 if model.uses_bf16(p.device) else p.dtype  # keys and values are bf16 under autocast
        self.k, self.v = (torch.zeros(shape, dtype=dtype, device=p.device) for _ in range(2))
        self.slot_frame = torch.full((shape[3],), -1, dtype=torch.long)  # which frame each slot holds
        self.end = 0  # frames [0, end) have been written

    def slot(self, frames: torch.Tensor) -> torch.Tensor:
        if self.window_frames is None:
            return frames
        ring = self.window_frames - self.sink_frames
        return torch.where(frames < self.sink_frames, frames, self.sink_frames + (frames - self.sink_frames) % ring)

    def plan(self, start_frame: int, num_frames: int) -> tuple:
        """For frames [start, start + F): the cached frames' slots in frame order (a slice where contiguous:
        a view, no copy), the new frames' slots, and the (F, Fk) visibility of the keys, cached then new."""
        read = torch.nonzero((self.slot_frame >= 0) & (self.slot_frame < start_frame)).flatten()
        read = read[self.slot_frame[read].argsort()]
        cached = self.slot_frame[read]
        if len(read) and bool((read.diff() == 1).all()):
            read = slice(int(read[0]), int(read[-1]) + 1)
        q = torch.arange(start_frame, start_frame + num_frames)
        vis = frame_visibility(q, torch.cat([cached, q]), self.chunk_frames, self.window_frames, self.sink_frames)
        return read, self.slot(q), vis

    def extend(self, layer: int, read, write, key_angles, k, v, raw_k) -> tuple:
        """A layer's new keys and values k v (B, h, N, d) -> the cached frames' (slots `read`), then the new,
        which go to `write`: k, or with key_angles ("window") raw_k (B, N, h, d), rotated at each read."""
        old_k, old_v = (rearrange(buf[layer][:, :, read], "b h f s d -> b h (f s) d") for buf in (self.k, self.v))
        if key_angles is not None:
            old_k = rearrange(apply_rope(rearrange(old_k, "b h n d -> b n h d"), key_angles), "b n h d -> b h n d")
        stored = (k if key_angles is None else rearrange(raw_k, "b n h d -> b h n d"), v)
        k, v = torch.cat([old_k.to(k.dtype), k], 2), torch.cat([old_v.to(v.dtype), v], 2)
        # after the read (`read` may be a view); detached: a later refresh of the slots must not break DMD's backward
        for buf, new in zip((self.k, self.v), stored):
            buf[layer][:, :, write] = rearrange(new.detach(), "b h (f s) d -> b h f s d", s=buf.shape[-2]).to(buf.dtype)
        return k, v

    def commit(self, start_frame: int, num_frames: int) -> None:
        """Records that every layer wrote frames [start, start + F); later frames are forgotten."""
        self.slot_frame[self.slot_frame >= start_frame] = -1
        frames = torch.arange(start_frame, start_frame + num_frames)
        self.slot_frame[self.slot(frames)] = frames
        self.end = start_frame + num_frames


class SelfAttention(nn.Module):
    def __init__(self, dim, num_heads, eps):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def forward(self, x, angles, mask=None, cache: Optional[tuple] = None):
        """x (B, N, D); angles (N, d/2); mask: `attend`'s; cache: (KVCache, and the rest of the arguments
        of its `extend`) when streaming: the cached frames' keys and values come first."""
        split = lambda t: rearrange(t, "b n (h d) -> b n h d", h=self.num_heads)  # noqa: E731
        q, raw_k, v = split(self.norm_q(self.q(x))), split(self.norm_k(self.k(x))), split(self.v(x))  # (B, N, h, d)
        q, k, v = (rearrange(t, "b n h d -> b h n d") for t in (apply_rope(q, angles), apply_rope(raw_k, angles), v))
        if cache is not None:
            kv, *where = cache
            k, v = kv.extend(*where, k, v, raw_k)
        out = attend(q, k, v, mask)  # (B, h, N, d)
        return self.o(rearrange(out, "b h n d -> b n (h d)"))


class CrossAttention(SelfAttention):
    """Video tokens attend to the conditioning sequence (text features upstream): the same
    projections and norms as self-attention, but keys and values come from `ctx`, and no RoPE."""

    def forward(self, x, ctx):
        split = lambda t: rearrange(t, "b n (h d) -> b h n d", h=self.num_heads)  # noqa: E731
        q, k, v = split(self.norm_q(self.q(x))), split(self.norm_k(self.k(ctx))), split(self.v(ctx))
        out = F_.scaled_dot_product_attention(q, k, v)
        return self.o(rearrange(out, "b h n d -> b n (h d)"))


class Block(nn.Module):
    """Wan's block with per-frame adaLN: (shift, scale, gate) for self-attention and for the FFN
    come from the frame's timestep embedding plus a learned offset `modulation`."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, eps: float = 1e-6, cross_attention: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, num_heads, eps)
        if cross_attention:
            self.norm3 = nn.LayerNorm(dim, eps=eps)
            self.cross_attn = CrossAttention(dim, num_heads, eps)
        self.norm2 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.zeros(1, 6, dim))  # adaLN-Zero: see CausalDiT.init_weights

    def forward(self, x, e0, ctx, angles, mask=None, cache=None):
        """x (B, N, D) with N = F*S; e0 (B, F, 6, D) per-frame modulation: DiT's adaLN terms
        (shift, scale, gate) for self-attention (msa) and for the FFN (mlp), each (B, F, 1, D)."""
        F = e0.shape[1]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (self.modulation[:, None] + e0).chunk(6, dim=2)
        per_frame = lambda h: rearrange(h, "b (f s) d -> b f s d", f=F)  # noqa: E731 - (B, F, S, D), as the terms
        flat = lambda h: rearrange(h, "b f s d -> b (f s) d")  # noqa: E731
        a = flat(per_frame(self.norm1(x)) * (1 + scale_msa) + shift_msa)
        x = x + flat(per_frame(self.self_attn(a, angles, mask, cache)) * gate_msa)
        if ctx is not None:
            x = x + self.cross_attn(self.norm3(x), ctx)
        b = flat(per_frame(self.norm2(x)) * (1 + scale_mlp) + shift_mlp)
        return x + flat(per_frame(self.ffn(b)) * gate_mlp)


class Head(nn.Module):
    """The output layer: adaLN (shift, scale) from the frame's time embedding, then each token to its patch."""

    def __init__(self, dim: int, out_dim: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.head = nn.Linear(dim, out_dim)
        self.modulation = nn.Parameter(torch.zeros(1, 2, dim))

    def forward(self, x, e):
        """x (B, F*S, D), e (B, F, D) -> (B, F*S, p*p*C)."""
        shift, scale = (self.modulation[:, None] + e[:, :, None]).chunk(2, dim=2)  # (B, F, 1, D) each
        x = rearrange(self.norm(x), "b (f s) d -> b f s d", f=e.shape[1]) * (1 + scale) + shift
        return self.head(rearrange(x, "b f s d -> b (f s) d"))


def timestep_features(timestep: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of a timestep (any shape, 0..1000 = 1000 sigma), cosine first as in Wan: (..., dim)."""
    half = dim // 2
    omega = 10000.0 ** (-torch.arange(half, dtype=torch.float64, device=timestep.device) / half)
    arg = timestep.double()[..., None] * omega
    return torch.cat([arg.cos(), arg.sin()], -1)  # float64; the caller casts to its dtype


class CausalDiT(nn.Module):
    """A Wan2.1-style video DiT: bidirectional (causal=False, full attention) or block-causal over chunks of
    chunk_frames frames. model(x, t, cond=None, kv_cache=None, start_frame=0, clean_context=None) is the
    velocity eps - x0 of x (B, F, C, H, W) at noise levels t (B, F) given cond (B, L, cond_dim) or None;
    with clean_context (B, F, C, H, W) it sees [clean ; noisy] (teacher forcing); with a kv_cache, x holds
    frames [start_frame, start_frame + F) of a stream. It knows no losses or samplers, and checks nothing:
    the samplers check their arguments, `check_inputs` (Part II) a hand-made call."""

    def __init__(self, cfg: ModelConfig, causal: bool = True):
        super().__init__()
        self.cfg, self.causal = cfg, causal
        D, p = cfg.dim, cfg.patch_size
        self.patch_embedding = nn.Conv3d(cfg.in_channels, D, kernel_size=(1, p, p), stride=(1, p, p))
        if cfg.cond_dim:
            self.text_embedding = nn.Sequential(nn.Linear(cfg.cond_dim, D), nn.GELU(approximate="tanh"),
                                                nn.Linear(D, D))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, D), nn.SiLU(), nn.Linear(D, D))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))
        self.blocks = nn.ModuleList(Block(D, cfg.ffn_dim, cfg.num_heads, cfg.eps, cross_attention=bool(cfg.cond_dim))
                                    for _ in range(cfg.num_layers))
        self.head = Head(D, p * p * cfg.in_channels, cfg.eps)
        self.init_weights()
        if cfg.compile:  # in place: parameter names (and saved state dicts) stay exactly the same
            for block in self.blocks:
                block.compile()

    def init_weights(self):
        """Xavier-uniform linears with zero bias (as Wan), then adaLN-Zero (as DiT): the modulation offsets,
        the time projection and the output layer start at zero, so every block starts as the identity."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.view(self.cfg.dim, -1))
        for m in (self.time_embedding[0], self.time_embedding[2]):
            nn.init.normal_(m.weight, std=0.02)
        for p in (self.time_projection[1].weight, self.time_projection[1].bias, self.head.head.weight,
                  self.head.head.bias, self.head.modulation, *(b.modulation for b in self.blocks)):
            nn.init.zeros_(p)

    @property
    def tokens_per_frame(self) -> int:
        return (self.cfg.height // self.cfg.patch_size) * (self.cfg.width // self.cfg.patch_size)

    def patchify(self, x):
        """(B, F, C, H, W) -> (B, F*S, D), tokens frame-major then row then column."""
        y = self.patch_embedding(rearrange(x, "b f c h w -> b c f h w"))  # (B, D, F, h, w)
        return rearrange(y, "b d f h w -> b (f h w) d")

    def unpatchify(self, y, frames):
        """(B, F*S, p*p*C) -> (B, F, C, H, W); inside a token the channel is the fastest index (Wan)."""
        p, c = self.cfg.patch_size, self.cfg
        return rearrange(y, "b (f h w) (ph pw c) -> b f c (h ph) (w pw)", f=frames,
                         h=c.height // p, w=c.width // p, ph=p, pw=p)

    def rope(self, frames: torch.Tensor) -> torch.Tensor:
        """(F,) frame positions -> (F*S, d/2) rotation angles of their tokens at (frame, y, x)."""
        c = self.cfg
        f, y, x = torch.meshgrid(frames, torch.arange(c.height // c.patch_size), torch.arange(c.width // c.patch_size),
                                 indexing="ij")
        return rope_angles(torch.stack([f, y, x], -1).reshape(-1, 3), c.dim // c.num_heads, c.rope_theta)

    def embed_cond(self, cond, batch, dtype, device):
        c = self.cfg
        if not c.cond_dim:
            return None
        cond = torch.zeros(batch, 1, c.cond_dim, dtype=dtype, device=device) if cond is None else cond  # null: uncond
        cond = cond if c.text_len is None else F_.pad(cond, (0, 0, 0, c.text_len - cond.shape[1]))  # as Wan: to 512
        return self.text_embedding(cond)

    def forward(self, x, t, cond=None, kv_cache: Optional[KVCache] = None, start_frame: int = 0,
                clean_context=None):
        """The velocity eps - x0 of x (B, F, C, H, W) at noise levels t (B, F): see the class docstring."""
        (B, F), S, w = x.shape[:2], self.tokens_per_frame, self.head.head.weight.dtype
        if clean_context is not None:
            t = torch.cat([torch.zeros_like(t), t], 1)  # teacher forcing: the clean frames carry t = 0
        # as in Wan, the time embedding and the head run in the weights' dtype (fp32), outside autocast
        e = self.time_embedding(timestep_features(t * 1000.0, self.cfg.freq_dim).to(w))  # (B, F', D)
        e0 = rearrange(self.time_projection(e), "b f (six d) -> b f six d", six=6)  # (B, F', 6, D)
        angles, mask, caches = self.attention_layout(start_frame, F, kv_cache, clean_context is not None, x.device)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.uses_bf16(x.device)):
            tokens = self.patchify(x)  # (B, F*S, D)
            if clean_context is not None:  # [clean ; noisy]
                tokens = torch.cat([self.patchify(clean_context), tokens], 1)
            ctx = self.embed_cond(cond, B, x.dtype, x.device)  # (B, L, D) or None
            for block, cache in zip(self.blocks, caches):
                tokens = self.run_block(block, tokens, e0, ctx, angles, mask, cache)
        if kv_cache is not None:
            kv_cache.commit(start_frame, F)
        out = self.head(tokens[:, -F * S:].to(w), e[:, -F:].to(w))  # the new (noisy) frames only
        return self.unpatchify(out, F).to(x.dtype)

    def attention_layout(self, start_frame: int, F: int, kv_cache, teacher_forcing: bool, device) -> tuple:
        """Who attends to whom, at which positions: (the tokens' rotary angles, `attend`'s mask, each block's
        cache argument) for teacher forcing [clean ; noisy], streaming through a KV cache, or a plain call."""
        c, frames, caches = self.cfg, torch.arange(start_frame, start_frame + F), [None] * len(self.blocks)
        positions, vis = frames, None  # None: all see all (a plain bidirectional call)
        if teacher_forcing:  # both halves at the same positions
            positions = torch.cat([frames, frames])
            vis = teacher_forcing_visibility(frames, c.chunk_frames, c.window_frames, c.sink_frames)
        elif kv_cache is not None:  # the new frames attend to the cached ones, then to themselves
            read, write, vis = kv_cache.plan(start_frame, F)
            key_angles = None  # "absolute": the cached keys were rotated when written
            if c.rope_positions == "window":  # the keys the queries see, re-indexed 0, 1, ... in frame order
                live = vis.any(0)
                place = torch.where(live, live.long().cumsum(0) - 1, 0)  # keys no query sees are masked anyway
                positions, key_angles = place[-F:], self.rope(place[:-F]).to(device)
            caches = [(kv_cache, i, read, write, key_angles) for i in range(len(self.blocks))]
        elif self.causal:
            vis = frame_visibility(frames, frames, c.chunk_frames, c.window_frames, c.sink_frames)
        return self.rope(positions).to(device), token_mask(vis, self.tokens_per_frame, c.attention, device), caches

    # --- speed, plugged in: bf16 autocast, gradient checkpointing (flex attention: token_mask; compile: init)
    def uses_bf16(self, device) -> bool:
        return self.cfg.precision == "bf16" or (self.cfg.precision == "auto" and torch.device(device).type == "cuda")

    def run_block(self, block, *args):
        """grad_checkpointing keeps only a block's inputs for backward (memory for compute); never on a cached
        call, whose recompute would read cache slots that later chunks may have overwritten."""
        checkpointed = self.cfg.grad_checkpointing and torch.is_grad_enabled() and args[-1] is None
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False) if checkpointed else block(*args)

    def new_kv_cache(self, batch_size: int, max_frames: Optional[int] = None, window_frames: Optional[int] = None,
                     sink_frames: Optional[int] = None) -> KVCache:
        """An empty KV cache for streaming (see KVCache)."""
        return KVCache(self, batch_size, max_frames, window_frames, sink_frames)


# ==== I.6 samplers: the teachers, the few-step streaming student, and its training rollout =======


def uncond_rows(cond: torch.Tensor, uncond=None) -> torch.Tensor:
    """The unconditional branch's condition for every row of cond: zeros, or `uncond` (1 or len(cond) rows)."""
    return torch.zeros_like(cond) if uncond is None else uncond.expand(len(cond), -1, -1)


def guided_velocity(model, x, t, cond=None, guidance: float = 1.0, uncond=None, **kw):
    """Classifier-free guidance uncond + g (cond - uncond), one pass on the doubled batch [x ; x] (a KV cache
    for it holds the 2B rows); without a condition the plain prediction. uncond: the null condition by
    default (zeros, what condition dropout trains), or e.g. Wan's negative prompt (1 row or B)."""
    if cond is None or guidance == 1.0:
        return model(x, t, cond, **kw)
    uncond = uncond_rows(cond, uncond)
    v = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, uncond]),
              **{k: (torch.cat([v_, v_]) if torch.is_tensor(v_) else v_) for k, v_ in kw.items()})
    v_cond, v_uncond = v.chunk(2)
    return v_uncond + guidance * (v_cond - v_uncond)


def _noise(model, batch_size: int, frames: int, rng=None) -> torch.Tensor:
    """Standard normal noise for `frames` frames of the model's video shape (see _randn)."""
    c = model.cfg
    return _randn((batch_size, frames, c.in_channels, c.height, c.width), rng, next(model.parameters()).device)


def _randn(shape, rng, device):
    """Drawn on the CPU from rng, so that a seed gives the same video on every device."""
    return torch.randn(shape, generator=rng).to(device)


def new_cache_for(model: CausalDiT, batch_size: int, num_frames: int) -> KVCache:
    """An empty KV cache for a video of `num_frames`: the model's rolling window, or a full cache."""
    return model.new_kv_cache(batch_size, max_frames=None if model.cfg.window_frames else num_frames)


@torch.no_grad()
def sample_bidirectional(model: CausalDiT, sigmas, *, batch_size: int, num_frames: int, cond=None,
                         guidance: float = 1.0, uncond=None, rng=None, noise=None) -> torch.Tensor:
    """The bidirectional teacher: Euler along `sigmas` (from 1 to 0, e.g. solver_sigmas(48, cfg.sample)), one
    timestep for the whole clip; guided against `uncond` (see guided_velocity)."""
    sigmas = check_sampling(model, sigmas, batch_size, num_frames, cond, uncond, to_zero=True, noise=noise)
    x = noise if noise is not None else _noise(model, batch_size, num_frames, rng)
    vel = lambda x_, s: guided_velocity(  # noqa: E731
        model, x_, torch.full(x_.shape[:2], s, device=x_.device), cond, guidance, uncond)
    return euler_ode(vel, x, sigmas)[0]


@torch.no_grad()
def sample_ar_teacher(model: CausalDiT, sigmas, *, batch_size: int, num_frames: int, cond=None,
                      guidance: float = 1.0, uncond=None, context_noise: float = 0.0, rng=None) -> torch.Tensor:
    """The AR teacher: chunk by chunk, a full Euler ODE along `sigmas` with the KV cache holding the clean
    earlier chunks, each written at t = context_noise. Guided, the conditional and unconditional predictions
    keep their own context (2B rows), and a finished chunk is written to both, each under its condition."""
    sigmas = check_sampling(model, sigmas, batch_size, num_frames, cond, uncond, context_noise, to_zero=True)
    guided = cond is not None and guidance != 1.0
    cache = new_cache_for(model, 2 * batch_size if guided else batch_size, num_frames)
    chunk, chunks = model.cfg.chunk_frames, []
    for start in range(0, num_frames, chunk):
        n = min(chunk, num_frames - start)
        vel = lambda x_, s: guided_velocity(model, x_, torch.full(x_.shape[:2], s, device=x_.device),  # noqa: E731
                                            cond, guidance, uncond, kv_cache=cache, start_frame=start)
        x0 = euler_ode(vel, _noise(model, batch_size, n, rng), sigmas)[0]
        chunks.append(x0)
        if start + n < num_frames:  # guided: to both halves of the doubled batch, [cond ; uncond]
            rows = torch.cat([cond, uncond_rows(cond, uncond)]) if guided else cond
            write_context(model, x0, rows, cache, start, context_noise, rng, copies=2 if guided else 1)
    return torch.cat(chunks, 1)


def write_context(model, x0, cond, cache, start, context_noise: float = 0.0, rng=None, copies: int = 1) -> None:
    """Re-runs a finished chunk at sigma = context_noise, so that its cache slots hold the keys and values of
    (nearly) clean frames for later chunks; copies=2: to both halves of a guided cache (cond has 2B rows)."""
    x = add_noise(x0, _randn(x0.shape, rng, x0.device), context_noise) if context_noise > 0 else x0
    x = torch.cat([x] * copies) if copies > 1 else x
    with torch.no_grad():
        model(x, torch.full(x.shape[:2], context_noise, device=x.device), cond, kv_cache=cache, start_frame=start)


def denoise_chunk(model, x, sigmas, cond, cache, start, exit_step=None, rng=None, renoise: str = "fresh"):
    """Few-step student on one chunk (Self Forcing Alg. 1): at each sigma predict x0, then re-noise it to
    the next sigma with *fresh* noise (renoise="fresh", upstream) or with the noise the model predicts,
    eps = x0 + v (renoise="ode": exactly an Euler step of the student's own ODE, which keeps it near the
    teacher trajectories its ODE pairs came from). Steps after `exit_step` are skipped; only the exit
    step runs with gradients (when grad mode is on). Returns the chunk's x0."""
    if renoise not in ("fresh", "ode"):  # a misspelt mode would otherwise re-noise as "fresh" unnoticed
        raise ValueError(f"renoise={renoise!r} must be 'fresh' or 'ode'")
    exit_step = len(sigmas) - 1 if exit_step is None else exit_step
    for k, s in enumerate(sigmas[: exit_step + 1]):
        t = torch.full(x.shape[:2], s, device=x.device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and k == exit_step):
            v = model(x, t, cond, kv_cache=cache, start_frame=start)
            x0 = x0_from_velocity(x, v, t)
        if k < exit_step:
            noise = x0 + v if renoise == "ode" else _randn(x.shape, rng, x.device)
            x = add_noise(x0, noise, sigmas[k + 1])
    return x0


def stream(generator: CausalDiT, sigmas, *, num_frames: int, batch_size: int, cond=None,
           kv_cache: Optional[KVCache] = None, rng: Optional[torch.Generator] = None,
           first_chunk_sigmas=None, context_noise: float = 0.0, recache: bool = False,
           prefix: Optional[torch.Tensor] = None, renoise: str = "fresh") -> Iterator[torch.Tensor]:
    """Streams the few-step causal student (Self Forcing's inference loop): yields each chunk (B, f, C, H, W)
    as soon as it is denoised, then writes it to the KV cache (default new_cache_for) at t = context_noise.
    sigmas: e.g. student_sigmas(cfg.sample); first_chunk_sigmas (default the same) for the first chunk,
    which has no context. chunks.send(new_cond) in place of next(chunks) switches the prompt from the next
    chunk on; the cached chunks stay as written (upstream) or, with recache=True, are re-run under it (LongLive).
    prefix: clean frames (B, P, C, H, W), whole chunks, cached first to continue them. renoise: see denoise_chunk.
    Every argument, and a new prompt, is checked before any work."""
    sigmas = check_sampling(generator, sigmas, batch_size, num_frames, cond, context_noise=context_noise,
                            renoise=renoise, kv_cache=kv_cache, prefix=prefix).tolist()
    first = sigmas if first_chunk_sigmas is None else check_sigmas(first_chunk_sigmas, "first_chunk_sigmas").tolist()
    P = 0 if prefix is None else prefix.shape[1]
    cache = kv_cache if kv_cache is not None else new_cache_for(generator, batch_size, P + num_frames)
    chunks = _stream(generator, sigmas, first, num_frames, batch_size, cond, cache, rng, context_noise, recache, prefix,
                     renoise)
    next(chunks)  # to its first `yield`, before any work: so a send(cond) may ask for the first chunk too
    return chunks


def _stream(generator, sigmas, first, num_frames, batch_size, cond, cache, rng, context_noise, recache, prefix,
            renoise):
    chunk, kept = generator.cfg.chunk_frames, []  # kept: (start, x0) of the cached chunks, for recache
    P, x0 = 0 if prefix is None else prefix.shape[1], None  # x0: the chunk made (or given) last
    new_cond = yield
    for start in range(0, P + num_frames, chunk):
        if new_cond is not None:
            check_cond(generator, new_cond, batch_size)
        # no_grad never spans a yield: the caller's code between chunks runs in its own grad mode
        with torch.no_grad():
            if start > 0:  # the chunk yielded last is cached only now, under the prompt it was made with
                write_context(generator, x0, cond, cache, start - chunk, context_noise, rng)
                kept = [(a, x) for a, x in kept if bool((cache.slot_frame == a).any())] + [(start - chunk, x0)]
            if new_cond is not None:
                cond = new_cond
                for a, x in kept if recache else []:  # every kept chunk's keys and values again, in frame order
                    write_context(generator, x, cond, cache, a, context_noise, rng)
            if start < P:  # a given chunk: context, as a finished one is (nothing to yield)
                x0, new_cond = prefix[:, start:start + chunk], None
                continue
            noise = _noise(generator, batch_size, min(chunk, P + num_frames - start), rng)
            x0 = denoise_chunk(generator, noise, first if start == 0 else sigmas, cond, cache, start, rng=rng,
                               renoise=renoise)
        new_cond = yield x0


def stream_recompute(generator: CausalDiT, sigmas, *, num_frames: int, batch_size: int, cond=None,
                     rng: Optional[torch.Generator] = None) -> Iterator[torch.Tensor]:
    """`stream` without a KV cache, the baseline it is measured against: every step runs the model on [the
    frames made so far at t = 0 ; the noisy chunk]. The same samples as `stream` (context_noise 0, same rng;
    with a rolling window only under absolute RoPE positions, as frames keep their indices here)."""
    sigmas, done = check_sampling(generator, sigmas, batch_size, num_frames, cond).tolist(), []

    def on_prefix(x, t, cond, kv_cache, start_frame):  # the model on [clean prefix at t = 0 ; chunk]
        prefix = torch.cat(done, 1) if done else x[:, :0]  # a rolling window is the config's banded mask
        t_all = torch.cat([torch.zeros(len(x), prefix.shape[1], device=x.device), t], 1)
        return generator(torch.cat([prefix, x], 1), t_all, cond)[:, prefix.shape[1]:]

    for start in range(0, num_frames, generator.cfg.chunk_frames):
        with torch.no_grad():  # not across the yield (see _stream)
            noise = _noise(generator, batch_size, min(generator.cfg.chunk_frames, num_frames - start), rng)
            done.append(denoise_chunk(on_prefix, noise, sigmas, cond, None, start, rng=rng))
        yield done[-1]


def sample_student(model: CausalDiT, sigmas, *, batch_size: int, num_frames: int, cond=None, context_noise: float = 0.0,
                   rng=None, first_chunk_sigmas=None, renoise: str = "fresh") -> torch.Tensor:
    """The whole video from `stream`, (B, F, C, H, W)."""
    chunks = stream(model, sigmas, num_frames=num_frames, batch_size=batch_size, cond=cond, rng=rng,
                    context_noise=context_noise, first_chunk_sigmas=first_chunk_sigmas, renoise=renoise)
    return torch.cat(list(chunks), 1)


def self_rollout(generator: CausalDiT, sigmas, *, batch_size: int, num_frames: int, exit_step: Optional[int] = None,
                 cond=None, context_noise: float = 0.0, rng=None, renoise: str = "fresh") -> torch.Tensor:
    """Self Forcing's training rollout: the whole video chunk by chunk from the generator's own outputs
    through a fresh KV cache; only the exit step keeps its graph (not the steps before, nor the refresh)."""
    _check_sizes(batch_size, num_frames)  # the rest comes checked from train_dmd's config
    cache, chunks = new_cache_for(generator, batch_size, num_frames), []
    for start in range(0, num_frames, generator.cfg.chunk_frames):
        n = min(generator.cfg.chunk_frames, num_frames - start)
        noise = _noise(generator, batch_size, n, rng)
        chunks.append(denoise_chunk(generator, noise, sigmas, cond, cache, start, exit_step, rng, renoise))
        if start + n < num_frames:
            write_context(generator, chunks[-1].detach(), cond, cache, start, context_noise, rng)
    return torch.cat(chunks, 1)


# ==== I.7 losses: ODE regression, consistency distillation, DMD's generator loss, the critic's ====


def ode_regression_loss(student: CausalDiT, x_t: torch.Tensor, t: torch.Tensor, target: torch.Tensor, cond=None,
                        clean_context=None) -> torch.Tensor:
    """ODE regression (stage 2, upstream `ODERegression.generator_loss`): the squared error between the student's x0
    from x_t (B, F, C, H, W) at noise levels t (B, F) and the teacher's ODE endpoint `target`, per frame, summed over a
    frame's coordinates (the units of the injectivity floor, I.9): (B, F); the caller averages. With clean_context (the
    ground-truth clip) the student sees clean earlier chunks through the teacher-forcing mask: the AR variant (Causal
    Forcing). Without it, it sees the noisy earlier frames under the block-causal mask, as in CausVid / Self Forcing."""
    x0 = x0_from_velocity(x_t, student(x_t, t, cond, clean_context=clean_context), t)
    return (x0 - target).pow(2).sum(dim=(2, 3, 4))


def ode_pair_batch(pairs: dict, idx, k, sigmas: list[float], kind: str = "ar") -> tuple:
    """`ode_regression_loss`'s inputs for ODE pairs `idx`, each frame at student step k (an int, or (B, F)
    from `ode_step_index`): x_t, t, the teacher's endpoints, the conditions or None, and the ground-truth
    clips as clean context for kind="ar" (None for "bidirectional": its student sees noisy frames)."""
    _check_kind(kind)
    xt = pairs["xt"][idx]  # (B, K, F, C, H, W): the teacher's states at every student sigma
    B, K, F = xt.shape[:3]
    if K != len(sigmas):
        raise ValueError(f"the ODE pairs hold states at {K} sigmas, not at the {len(sigmas)} given: make them anew")
    k = (torch.full((B, F), int(k)) if not torch.is_tensor(k) or k.dim() == 0 else k).to(xt.device)
    x = xt.gather(1, k[:, None, :, None, None, None].expand(B, 1, F, *xt.shape[3:]))[:, 0]  # (B, F, C, H, W)
    t = torch.tensor(sigmas, dtype=torch.float64)[k.cpu()].to(x.dtype).to(x.device)
    cond = pairs["cond"][idx] if "cond" in pairs else None
    return x, t, pairs["x0"][idx], cond, pairs["clean"][idx] if kind == "ar" else None


def consistency_distillation_loss(student: CausalDiT, ema: CausalDiT, teacher: CausalDiT, x0: torch.Tensor,
                                  noise: torch.Tensor, t: float, t_next: float, cond=None,
                                  guidance: float = 1.0) -> torch.Tensor:
    """Causal Forcing++'s stage 2 (upstream `NaiveConsistency.generator_loss`): causal consistency
    distillation on ground-truth clips x0, one pair of grid sigmas t > t_next for the whole batch:
        x_t      = add_noise(x0, noise, t)
        x_t_next = x_t + v_teacher(x_t, t) (t_next - t)          one guided Euler step of the AR teacher
        loss     = MSE( x0_student(x_t, t),  sg x0_ema(x_t_next, t_next) )
    Teacher, student and EMA student all see the clean clip as context (teacher-forcing mask), so
    chunk b's target depends only on what the student sees for chunk b, its own noisy chunk and the
    clean chunks before it: the frame-level injectivity of the AR teacher's ODE pairs, with no ODE
    pairs to make. Returns the squared error per frame, averaged over a frame's coordinates: (B, F).
    x0, noise (B, F, C, H, W); t, t_next floats; each net(x, t (B, F), cond, clean_context=x0) -> eps - x0.
    The caller moves the EMA towards the student after the step (`train_consistency`)."""
    tt, tn = (torch.full(x0.shape[:2], float(s), device=x0.device, dtype=x0.dtype) for s in (t, t_next))
    x_t = add_noise(x0, noise, tt)
    with torch.no_grad():
        x_next = x_t + guided_velocity(teacher, x_t, tt, cond, guidance, clean_context=x0) * (t_next - t)
        target = x0_from_velocity(x_next, ema(x_next, tn, cond, clean_context=x0), tn)
    pred = x0_from_velocity(x_t, student(x_t, tt, cond, clean_context=x0), tt)
    return (pred - target).pow(2).mean(dim=(2, 3, 4))


def dmd_gradient(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """The DMD gradient (DMD2 / Self Forcing), normalised per sample:
        grad = (x0_fake - x0_real) / mean|x - x0_real|.
    The KL between the generator's and the data distribution, noised, has gradient
    (score_fake - score_real); with x0-predictions this is proportional to x0_fake - x0_real.
    Upstream also replaces non-finite values of grad by 0 (nan_to_num); here a zero normaliser or a
    NaN reaches the loss, and the training loop stops there with an error instead."""
    norm = (x - x0_real).abs().mean(dim=tuple(range(1, x.dim())), keepdim=True)
    return (x0_fake - x0_real) / norm


def dmd_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """0.5 * MSE(x, (x - grad).detach()) in float64: its gradient w.r.t. x is grad / numel, so
    a descent step moves the samples along -grad, from the fake towards the real distribution."""
    return 0.5 * F_.mse_loss(x.double(), (x.double() - grad.double()).detach())


def dmd_generator_loss(x: torch.Tensor, real_score: nn.Module, fake_score: nn.Module, sigma: torch.Tensor,
                       noise: torch.Tensor, cond=None, guidance: float = 1.0, uncond=None) -> torch.Tensor:
    """The generator's DMD loss (upstream `DMD.generator_loss` -> `compute_distribution_matching_loss`):
        x_s = add_noise(x, noise, sigma),  grad = (x0_fake(x_s) - x0_real(x_s)) / mean|x - x0_real(x_s)|,
        loss = 0.5 * mean((x - sg(x - grad))^2)
    with x0_real from the frozen real score (guided) and x0_fake from the fake score, both without
    gradient (`dmd_gradient`, `dmd_loss`). Only x carries a gradient, back into the generator.
    x, noise (B, F, C, H, W); sigma (B, F), one per clip (`_dmd_sigma`); each score(x_s, sigma, cond) ->
    eps - x0; the guidance's unconditional branch uses `uncond` (see `guided_velocity`)."""
    with torch.no_grad():
        x_s = add_noise(x, noise, sigma)
        x0_real = x0_from_velocity(x_s, guided_velocity(real_score, x_s, sigma, cond, guidance, uncond), sigma)
        x0_fake = x0_from_velocity(x_s, fake_score(x_s, sigma, cond), sigma)
        grad = dmd_gradient(x, x0_real, x0_fake)
    return dmd_loss(x, grad)


def critic_loss(fake_score: nn.Module, x: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor,
                cond=None) -> torch.Tensor:
    """The fake score's loss (upstream `DMD.critic_loss`): unweighted flow matching on the generator's samples
    x (no gradient into the generator), so that the fake score tracks what the generator produces now."""
    return flow_matching_loss(fake_score, x.detach(), sigma, noise, cond)


# ==== I.8 stages: base, AR teacher, ODE pairs and student, consistency student, DMD (loop: II.4) ====
# 0 trains the base; 1 turns a copy into the AR teacher; 2 trains a student from the teacher on its ODE pairs (CF++:
# by consistency; the baseline: from the base, on its pairs); 3, DMD, trains it with the base as real score and a
# copy as fake score. Each stage is its loss (I.7) in a step; the plumbing (train_loop, _step, ...) is II.4's.


def _fm_schedule(cfg: Config) -> SampleConfig:
    """The timestep schedule flow matching trains on: the sampler's, or its shift replaced by fm_shift."""
    return cfg.sample if cfg.train.fm_shift is None else dataclasses.replace(cfg.sample, shift=cfg.train.fm_shift)


def _flow_matching_batch(cfg: Config, data, cond, batches: "Batches", chunk_frames: int, rng):
    """This rank's share of a flow-matching minibatch, on the device: clean clips, one sigma per chunk, noise,
    the conditions (dropped at cond_dropout, so that guidance has an "uncond") and the loss weight: fm_weight's,
    over the schedule the sigmas come from (None: uniform). Every rank draws the whole global batch from the
    shared generator and keeps its slice."""
    idx, schedule = next(batches), _fm_schedule(cfg)
    x0 = data[idx]
    sigma = sample_sigmas(len(x0), x0.shape[1], chunk_frames, schedule, rng)
    noise = torch.randn(x0.shape, generator=rng)
    y = None if cond is None else drop_cond(cond[idx], cfg.train.cond_dropout, rng)
    x0, sigma, noise, y = (None if v is None else _shard(v).to(cfg.device) for v in (x0, sigma, noise, y))
    return x0, sigma, noise, y, bump_weight(sigma, schedule) if cfg.train.fm_weight == "bump" else None


def train_base(cfg: Config, data: torch.Tensor, log=print, rng=None, cond=None, ckpt=None) -> tuple[CausalDiT, list]:
    """Stage 0: the bidirectional base, flow matching with one timestep per clip (upstream: the pretrained
    Wan2.1); cond (N, L, cond_dim): each training video's condition (dropped at cond_dropout)."""
    tr = cfg.train
    model = parallelize(CausalDiT(cfg.model, causal=False).to(cfg.device), cfg)
    check_data(model, data, cond)
    opt = _adamw(model.parameters(), tr.base_lr, tr, beta1=tr.base_beta1, cosine_steps=tr.base_steps)
    batches = Batches(len(data), tr.batch_size, rng)

    def step(i):
        x0, sigma, noise, y, w = _flow_matching_batch(cfg, data, cond, batches, data.shape[1], rng)  # a sigma a clip
        loss = flow_matching_loss(model, x0, sigma, noise, y, weight=w)
        _step(opt, model, loss, tr.grad_clip)
        return {"flow_matching": loss}
    history = train_loop("base", tr.base_steps, step, ckpt, log, hint=f"lower base_lr (now {tr.base_lr:g})",
                         model=model, opt=opt, rng=rng, batches=batches)
    return model, history.get("flow_matching", [])


def copy_model(model: CausalDiT, causal: Optional[bool] = None) -> CausalDiT:
    """A fresh, trainable copy, also of an FSDP-sharded model (its full weights are gathered);
    causal=True makes the causal copy of a bidirectional model: same parameters, only the mask differs."""
    new = CausalDiT(model.cfg, causal=model.causal if causal is None else causal).to(next(model.parameters()).device)
    new.load_state_dict(full_state_dict(model))
    return new


@torch.no_grad()
def ema_update(ema_params, params, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * param, in place: the EMA of DMD's generator (`_update_ema`)
    and the EMA student that gives Causal Forcing++'s consistency target."""
    for pe, p in zip(ema_params, params):
        pe.lerp_(p, 1 - decay)


def train_ar_teacher(cfg: Config, base: CausalDiT, data: torch.Tensor, mode=None, log=print,
                     rng=None, cond=None, ckpt=None) -> tuple[CausalDiT, list]:
    """Stage 1: the AR teacher, initialised from the bidirectional base, one timestep per chunk.
    teacher forcing (default): the model sees [clean video ; noisy video]; noisy chunk b attends
      to the clean chunks < b, exactly the context it will have at inference.
    diffusion forcing (ablation): every chunk is noisy at its own level and attends to the noisy
      earlier chunks; at inference the context is clean, a train/test mismatch (Prop. 3.4)."""
    tr, mode = cfg.train, mode or cfg.train.teacher_mode
    if mode not in ("teacher_forcing", "diffusion_forcing"):
        raise ValueError(f"mode={mode!r} must be 'teacher_forcing' or 'diffusion_forcing'")
    check_data(base, data, cond)
    model = parallelize(copy_model(base, causal=True), cfg)
    opt = _adamw(model.parameters(), tr.teacher_lr, tr, cosine_steps=tr.teacher_steps)
    batches = Batches(len(data), tr.batch_size, rng)

    def step(i):
        x0, sigma, noise, y, w = _flow_matching_batch(cfg, data, cond, batches, cfg.model.chunk_frames, rng)
        kw = {"clean_context": x0} if mode == "teacher_forcing" else {}
        loss = flow_matching_loss(model, x0, sigma, noise, y, weight=w, **kw)
        _step(opt, model, loss, tr.grad_clip)
        return {"flow_matching": loss}
    history = train_loop(f"ar teacher, {mode.replace('_', ' ')}", tr.teacher_steps, step, ckpt, log, model=model,
                         hint=f"lower teacher_lr (now {tr.teacher_lr:g})", opt=opt, rng=rng, batches=batches)
    return model, history.get("flow_matching", [])


@torch.no_grad()
def make_ode_pairs(cfg: Config, teacher: CausalDiT, data: torch.Tensor, kind: str, cond=None,
                   rng=None, batch: int = 1024) -> dict:
    """ODE pairs for the few-step student: the teacher's Euler trajectory (teacher_solver_steps on the shifted
    grid, which holds the student's warped sigmas), kept at the student's sigmas. kind="ar": the AR teacher
    integrates every chunk given the *ground-truth* clean earlier chunks (one teacher-forcing pass does all
    chunks); kind="bidirectional": the bidirectional teacher the whole clip. cond (N, L, cond_dim): each
    clip's condition, which guides the teacher (teacher_guidance) and is kept for the student. Returns
    {"xt": (n, K, F, C, H, W) states at the K student sigmas, "x0": endpoints, "clean": clips, "cond"}."""
    _check_kind(kind)
    check_data(teacher, data, cond)
    keep, sig = ode_pair_sigmas(cfg.sample)
    n = min(cfg.train.ode_pairs, len(data))
    out = {"xt": [], "x0": [], "clean": [], "cond": []}
    for idx in torch.arange(n).split(batch):
        clean = data[idx].to(cfg.device)
        y = None if cond is None else cond[idx].to(cfg.device)
        kw = {"clean_context": clean} if kind == "ar" else {}
        vel = lambda x_, s: guided_velocity(teacher, x_, torch.full(x_.shape[:2], s, device=x_.device),  # noqa: E731
                                            y, cfg.train.teacher_guidance, **kw)
        x0, kept = euler_ode(vel, torch.randn(clean.shape, generator=rng).to(cfg.device), sig, keep)
        for key, value in (("xt", torch.stack([kept[s] for s in keep], 1)), ("x0", x0), ("clean", clean), ("cond", y)):
            if value is not None:
                out[key].append(value)
    return {k: torch.cat(v) for k, v in out.items() if v}


def ode_step_index(batch: int, frames: int, chunk_frames: int, steps: int, per: str, rng=None) -> torch.Tensor:
    """(B, F) the student step each frame regresses from in one ODE-regression batch:
      "batch":  one step for the whole batch;
      "sample": one per video (Causal Forcing's ODE init);
      "chunk":  one per chunk of each video (Self Forcing's ODE init)."""
    if per == "batch":
        return torch.randint(steps, (1,), generator=rng).expand(batch, frames)
    if per == "sample":
        return torch.randint(steps, (batch, 1), generator=rng).expand(batch, frames)
    if per == "chunk":
        k = torch.randint(steps, (batch, -(-frames // chunk_frames)), generator=rng)
        return k.repeat_interleave(chunk_frames, dim=1)[:, :frames]
    raise ValueError(f"per={per!r} is not 'batch', 'sample' or 'chunk'")


UPSTREAM_ODE_STEP_DRAW = {"bidirectional": "chunk", "ar": "sample"}  # Self Forcing's, Causal Forcing's


def train_ode_student(cfg: Config, init: CausalDiT, pairs: dict, kind: str, log=print,
                      rng=None, ckpt=None) -> tuple[CausalDiT, list]:
    """Stage 2: the few-step causal student by ODE regression, from `init` (the AR teacher for kind="ar", the
    base made causal for "bidirectional"). Each frame regresses from a student sigma drawn per ode_step_draw
    ("upstream": per chunk on bidirectional pairs as Self Forcing, per sample on AR pairs as Causal Forcing)."""
    tr = cfg.train
    _check_kind(kind)
    student = parallelize(copy_model(init, causal=True), cfg)
    opt = _adamw(student.parameters(), tr.ode_lr, tr, cosine_steps=tr.ode_steps)
    (n, K, F), chunk = pairs["xt"].shape[:3], cfg.model.chunk_frames
    per = UPSTREAM_ODE_STEP_DRAW[kind] if tr.ode_step_draw == "upstream" else tr.ode_step_draw
    coords_per_frame = cfg.model.in_channels * cfg.model.height * cfg.model.width  # logged: MSE per coordinate
    sigmas = student_sigmas(cfg.sample)

    def step(i):
        idx = torch.randint(n, (tr.batch_size,), generator=rng)
        k = ode_step_index(tr.batch_size, F, chunk, K, per, rng)  # the whole batch's, then this rank's share
        loss = ode_regression_loss(student, *ode_pair_batch(pairs, _shard(idx), _shard(k), sigmas, kind))
        loss = loss.mean() / coords_per_frame
        _step(opt, student, loss, tr.grad_clip)
        return {"ode_regression": loss}
    history = train_loop(f"ode student from {kind}", tr.ode_steps, step, ckpt, log,
                         hint=f"lower ode_lr (now {tr.ode_lr:g})", model=student, opt=opt, rng=rng)
    return student, history.get("ode_regression", [])


def train_consistency(cfg: Config, teacher: CausalDiT, data: torch.Tensor, log=print, rng=None, cond=None,
                      ckpt=None) -> tuple[CausalDiT, list]:
    """Stage 2, Causal Forcing++ (upstream model/naive_consistency.py): the student and an EMA copy start
    from the frozen AR teacher. Each step: ground-truth clips (conditions without dropout), one grid index
    for the batch (`consistency_sigmas`), fresh noise, a `consistency_distillation_loss` step, then the EMA
    moves towards the student (cd_ema_decay). Returns the student; the EMA only gives targets."""
    tr = cfg.train
    check_data(teacher, data, cond)
    student = parallelize(copy_model(teacher, causal=True).train(), cfg)
    ema = parallelize(copy_model(teacher, causal=True).eval().requires_grad_(False), cfg)
    frozen, grid = teacher.eval(), consistency_sigmas(cfg.sample)
    opt = _adamw(student.parameters(), tr.cd_lr, tr, cosine_steps=tr.cd_steps)
    batches = Batches(len(data), tr.cd_batch_size or tr.batch_size, rng)

    def step(i):
        idx = next(batches)
        n = int(torch.randint(len(grid) - 1, (1,), generator=rng))
        x0, noise = data[idx], torch.randn(data[idx].shape, generator=rng)
        y = None if cond is None else cond[idx]
        x0, noise, y = (None if v is None else _shard(v).to(cfg.device) for v in (x0, noise, y))
        loss = consistency_distillation_loss(student, ema, frozen, x0, noise, grid[n], grid[n + 1], y, tr.cd_guidance)
        loss = loss.mean()
        _step(opt, student, loss, tr.grad_clip)
        _reshard(student)
        _reshard(ema)
        ema_update(ema.parameters(), student.parameters(), tr.cd_ema_decay)
        return {"consistency": loss}
    history = train_loop("consistency distillation", tr.cd_steps, step, ckpt, log, model=student, ema=ema, opt=opt,
                         hint=f"lower cd_lr (now {tr.cd_lr:g})", rng=rng, batches=batches)
    return student.eval(), history.get("consistency", [])


def _dmd_sigma(cfg: Config, batch, rng, device):
    """One sigma per clip for the DMD and critic losses, as upstream: t uniform in {0, ..., T - 1}, shifted,
    clamped to [dmd_min_sigma, dmd_max_sigma] = [0.02, 0.98] (at shift 5, about 9% of draws sit at 0.98)."""
    tr, T = cfg.train, cfg.sample.num_train_timesteps
    raw = torch.randint(0, T, (batch, 1), generator=rng).double() / T
    s = shift_sigma(raw, cfg.sample.shift).clamp(tr.dmd_min_sigma, tr.dmd_max_sigma).float()
    return s.repeat(1, cfg.data.frames).to(device)


def train_dmd(cfg: Config, generator: CausalDiT, real_score: CausalDiT, fake_init: CausalDiT,
              cond_sampler: Optional[Callable] = None, log=print, rng=None, ckpt=None,
              steps: Optional[tuple] = None) -> tuple[CausalDiT, dict]:
    """Stage 3: DMD with self-rollout (Self Forcing). Every step trains the fake score (bidirectional, from the base)
    with `critic_loss` on a fresh rollout; every `gen_update_ratio` steps the generator takes a `dmd_generator_loss`
    step on its own rollout, stopped at a random denoising step. The real score (the base; upstream Wan2.1-14B) is
    frozen, guided when conditioned; cond_sampler(batch, rng) draws a batch's conditions. steps: every chunk's
    denoising steps in the rollouts (default denoising_steps). Returns the EMA generator (the raw one before EMA
    starts) and its record: losses, gradient norms, 4 videos every floor(updates / dmd_snapshots) updates."""
    tr = cfg.train
    gen = parallelize(copy_model(generator).train(), cfg)
    fake = parallelize(copy_model(fake_init).train(), cfg)
    real = real_score.eval()  # frozen: only ever called under no_grad
    opt_g, opt_f = _adamw(gen.parameters(), tr.gen_lr, tr), _adamw(fake.parameters(), tr.critic_lr, tr)
    sigmas = student_sigmas(cfg.sample, steps)
    batch = len(_shard(torch.empty(tr.dmd_batch_size or tr.batch_size)))  # this rank's share
    state = {"ema": None, "gen_updates": 0, "snapshots": []}  # EMA: a copy of each (local shard of a) parameter
    rollout = lambda exit_step, cond, own, n=batch: self_rollout(  # noqa: E731
        gen, sigmas, batch_size=n, num_frames=cfg.data.frames, exit_step=exit_step, cond=cond,
        context_noise=cfg.sample.context_noise, rng=own, renoise=cfg.sample.renoise)
    fixed = lambda: torch.Generator().manual_seed(0)  # noqa: E731 - the snapshots' noise and conditions
    snapshot_cond = cond_sampler(4, fixed()) if cond_sampler else None
    every = max(1, -(-tr.dmd_steps // tr.gen_update_ratio) // tr.dmd_snapshots) if tr.dmd_snapshots else None

    def step(i):
        losses = {}
        own = _rank_rng(rng)  # the rollouts' noise differs between ranks; exit steps are shared
        cond = cond_sampler(batch, own) if cond_sampler else None  # this rank's prompts
        if i % tr.gen_update_ratio == 0:
            if every and state["gen_updates"] % every == 0:
                with torch.no_grad():
                    state["snapshots"].append((state["gen_updates"], rollout(None, snapshot_cond, fixed(), 4).cpu()))
            x = rollout(int(torch.randint(len(sigmas), (1,), generator=rng)), cond, own)
            sigma = _dmd_sigma(cfg, len(x), own, cfg.device)
            loss = dmd_generator_loss(x, real, fake, sigma, _randn(x.shape, own, x.device), cond, tr.real_guidance)
            losses["generator_grad_norm"] = _step(opt_g, gen, loss, tr.grad_clip)
            _reshard(gen)
            _update_ema(state, gen, tr)
            losses["generator"] = loss
        with torch.no_grad():  # the critic's samples: a fresh rollout with its own random exit step
            x = rollout(int(torch.randint(len(sigmas), (1,), generator=rng)), cond, own)
        sigma = _dmd_sigma(cfg, len(x), own, cfg.device)
        loss_f = critic_loss(fake, x, sigma, _randn(x.shape, own, x.device), cond)
        _step(opt_f, fake, loss_f, tr.grad_clip)
        return {"critic": loss_f, **losses}
    history = train_loop("dmd critic", tr.dmd_steps, step, ckpt, log, state,
                         hint=f"lower gen_lr (now {tr.gen_lr:g}) or critic_lr (now {tr.critic_lr:g})",
                         gen=gen, fake=fake, opt_g=opt_g, opt_f=opt_f, rng=rng)
    if state["ema"] is not None:  # hand back the EMA weights
        _reshard(gen)
        with torch.no_grad():
            for pe, pg in zip(state["ema"], gen.parameters()):
                pg.copy_(pe.to(pg.device))
    record = {name: history.get(name, []) for name in ("generator", "critic", "generator_grad_norm")}
    updates, videos = zip(*state["snapshots"]) if state["snapshots"] else ((), ())
    record["snapshots"] = {"updates": list(updates), "videos": torch.stack(videos) if videos else torch.empty(0)}
    return gen.eval().requires_grad_(False), record


def _update_ema(state: dict, model: nn.Module, tr: TrainConfig) -> None:
    """After a generator update: count it; from ema_start_step on, keep an exponential moving average
    of the weights (decay ema_decay) in state["ema"] (restored from a checkpoint on the CPU)."""
    state["gen_updates"] += 1
    with torch.no_grad():
        if state["ema"] is not None:
            state["ema"] = [e.to(p.device) for e, p in zip(state["ema"], model.parameters())]
            ema_update(state["ema"], model.parameters(), tr.ema_decay)
        elif state["gen_updates"] >= tr.ema_start_step:
            state["ema"] = [p.detach().clone() for p in model.parameters()]


# ==== I.9 injectivity: the frame-level floor of ODE regression (Sec. 3, Prop. 3.3) ===============


def injectivity_floor(flow_map: Callable, frames: int, chunk_frames: int, outer: int, inner: int,
                      rng=None, shape=(2, 1, 1), return_mean: bool = False):
    """E[ Var(phi(eps)^i | eps^<=i) ] per frame i, summed over a frame's coordinates, where eps^<=i is the noise of
    every frame up to the end of frame i's chunk (a noisy-context student's input at sigma = 1): the part of its
    ODE-regression loss there that no causal student can remove, as frame i's target depends on noise it does not
    see. Monte Carlo: `outer` draws of the visible noise, `inner` redraws of the future noise for each. (F,) float64;
    return_mean: also each frame's MSE-optimal causal prediction E[phi(eps)^i | eps^<=i], (outer, F, *shape)."""
    floor = torch.zeros(frames, dtype=torch.float64)
    mean = torch.zeros(outer, frames, *shape, dtype=torch.float64)
    for i in range(frames):
        seen = min((i // chunk_frames + 1) * chunk_frames, frames)
        eps = torch.randn(outer, 1, frames, *shape, generator=rng, dtype=torch.float64)
        eps = eps.expand(-1, inner, -1, *shape).clone()
        eps[:, :, seen:] = torch.randn(outer, inner, frames - seen, *shape, generator=rng, dtype=torch.float64)
        x = flow_map(eps.reshape(outer * inner, frames, *shape)).reshape(outer, inner, frames, -1)
        floor[i] = x[:, :, i].var(dim=1).sum(-1).mean()
        mean[:, i] = x[:, :, i].mean(1).reshape(outer, *shape)
    return (floor, mean) if return_mean else floor


# #### PART II: ENGINEERING, none of which changes the method (II.1-II.8, listed at the top) ######
# ==== II.1 checks: named presets with checked overrides; the network's inputs ====================


_PRESETS: dict[str, dict] = {
    # One token a frame. The base, from scratch, needs the low noise levels that place a frame: unshifted sigmas,
    # weighted uniformly (upstream: shifted, bump); the AR teacher adapts to the causal mask with more steps at a
    # higher lr than a fine-tune. CD: 16 grid steps (upstream 48: each trained 3x as often), a faster EMA target.
    "toy2d": dict(fm_shift=1.0, fm_weight="uniform", base_lr=4e-3, base_steps=2000, teacher_lr=2e-3, teacher_steps=1200,
                  cd_grid_steps=16, cd_batch_size=64, cd_ema_decay=0.95, dmd_batch_size=128),  # DMD: ~3 minutes
    # Moving digits, every stage (Causal Forcing++'s too) in under 30 minutes on a 2-core CPU: 16x16 frames, patch 4,
    # the label as a one-token condition, a milder shift for small frames, DMD ratio 2 (upstream 5). The paper's data,
    # at a GPU's cost: canvas, height, width 64, digit_size=28, num_digits=2, frames=20, speed=0.1.
    "mnist": dict(dataset="moving_digits", frames=8, canvas=16, digit_size=12, num_digits=1, speed=0.25,
                  train_size=10000, test_size=1000, in_channels=1, height=16, width=16, patch_size=4, dim=96,
                  ffn_dim=384, num_heads=4, num_layers=4, freq_dim=64, cond_dim=10, chunk_frames=2, batch_size=64,
                  base_steps=1200, base_lr=4e-3, teacher_steps=300, teacher_lr=1e-3, ode_pairs=320, ode_steps=200,
                  ode_lr=5e-4, dmd_steps=200, dmd_batch_size=32, gen_update_ratio=2, gen_lr=5e-5, critic_lr=4e-4,
                  ema_start_step=50, shift=1.5, teacher_solver_steps=16, teacher_guidance=4.0, real_guidance=4.0,
                  eval_samples=250, cd_steps=250, cd_batch_size=32, renoise="ode"),
    # Wan2.1-T2V-1.3B: 21 latent frames of 16 x 60 x 104 (480x832 pixels), 1560 tokens a frame, umT5 text 512 x 4096.
    "wan-1.3b": dict(dataset="none", dmd_snapshots=0, frames=21, in_channels=16, height=60, width=104, patch_size=2,
                     dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, freq_dim=256, cond_dim=4096, text_len=512,
                     chunk_frames=3),
}
_PRESETS["wan-14b"] = {**_PRESETS["wan-1.3b"], "dim": 5120, "ffn_dim": 13824, "num_heads": 40, "num_layers": 40}
_SECTIONS = ("data", "model", "train", "sample", "eval")  # the sub-configs of Config


# Each numeric field's range: (the test, what a value must be, the fields). A None (where allowed) is not tested.
_RANGES = (
    (lambda v: v >= 1, "must be >= 1",
     "frames num_starts train_size test_size canvas digit_size in_channels height width patch_size dim ffn_dim "
     "num_heads num_layers text_len chunk_frames batch_size base_steps teacher_steps ode_pairs ode_steps dmd_steps "
     "dmd_batch_size gen_update_ratio cd_batch_size classifier_steps checkpoint_every num_train_timesteps "
     "teacher_solver_steps cd_grid_steps eval_samples floor_outer"),
    (lambda v: v >= 2 and v % 2 == 0, "must be an even number >= 2", "freq_dim"),
    (lambda v: v >= 2, "must be >= 2 (it draws a variance)", "floor_inner"),
    (lambda v: math.isfinite(v) and v > 0, "must be a finite number > 0",
     "base_lr teacher_lr ode_lr cd_lr gen_lr critic_lr grad_clip fm_shift shift rope_theta eps radius speed"),
    (lambda v: math.isfinite(v) and v >= 0, "must be a finite number >= 0",
     "weight_decay noise_std ema_start_step dmd_snapshots cd_steps"),
    (lambda v: 0 <= v < 1, "must lie in [0, 1)",
     "adam_beta1 adam_beta2 base_beta1 ema_decay cd_ema_decay cond_dropout context_noise"),
    (math.isfinite, "must be finite", "turn_degrees real_guidance teacher_guidance cd_guidance transition_tol_degrees"),
    (lambda v: 0 <= v < 2**63, "must lie in [0, 2**63 - 1] (torch.Generator's seeds)", "seed"),
)
_CHOICES = {  # the fields that name one of a few choices
    "dataset": ("toy2d", "moving_digits", "none"), "rope_positions": ROPE_POSITIONS, "renoise": ("fresh", "ode"),
    "attention": ("auto", "dense", "flex"), "precision": ("auto", "fp32", "bf16"), "fm_weight": ("bump", "uniform"),
    "data_parallel": ("auto", "ddp", "fsdp"), "teacher_mode": ("teacher_forcing", "diffusion_forcing"),
    "ode_step_draw": ("upstream", "batch", "sample", "chunk"),
}


def _short(value) -> str:
    """repr(value) cut to about 80 characters: a huge value must not flood an error message."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}...{text[-16:]} ({len(text)} characters)"


def _field_types() -> dict[str, tuple[str, object]]:
    """Every overridable field name -> (its section, "" for Config's own fields; its type). Names are unique."""
    hints = typing.get_type_hints(Config)
    out = {name: ("", hints[name]) for name in ("name", "seed", "device")}
    for section in _SECTIONS:
        for name, typ in typing.get_type_hints(hints[section]).items():
            assert name not in out, f"config field {name} is defined twice"
            out[name] = (section, typ)
    return out


def _coerce(key: str, value, typ):
    """One override, type-checked: an int is accepted where a float is expected, None where the type is Optional."""
    if value is None and type(None) in typing.get_args(typ):
        return None
    typ = next((a for a in typing.get_args(typ) if a is not type(None)), typ)  # Optional[int] -> int
    allowed = {float: (int, float), tuple: (tuple, list)}.get(typ, typ)
    if not isinstance(value, allowed) or (isinstance(value, bool) and typ is not bool):
        raise ValueError(f"config override {key}={_short(value)} has type {type(value).__name__}, not {typ.__name__}")
    return float(value) if typ is float else tuple(value) if typ is tuple else value


def get_config(name: str = "toy2d", **overrides) -> Config:
    """A named preset with overrides by field name, wherever it lives: get_config("toy2d", chunk_frames=2). Before
    anything runs, one ValueError lists each value's problems (key, type, _RANGES, _CHOICES), else _disagreements."""
    if name not in _PRESETS:
        raise ValueError(f"unknown config {_short(name)}; available: {sorted(_PRESETS)}")
    types, cfg = _field_types(), Config(name=name)
    parts = {"": cfg, **{section: getattr(cfg, section) for section in _SECTIONS}}
    for key, value in {**_PRESETS[name], **overrides}.items():
        if key not in types:
            valid = ", ".join(sorted(set(types) - {"name"}))  # the preset's name is get_config's first argument
            raise ValueError(f"unknown config key {_short(key)}; valid keys: {valid}")
        setattr(parts[types[key][0]], key, _coerce(key, value, types[key][1]))
    values = {key: getattr(parts[section], key) for key, (section, _) in types.items()}
    problems = [f"{key}={_short(values[key])} {rule}" for ok, rule, keys in _RANGES for key in keys.split()
                if values[key] is not None and not ok(values[key])]
    problems += [f"{key}={_short(values[key])} is not {', '.join(map(repr, choices[:-1]))} or {choices[-1]!r}"
                 for key, choices in _CHOICES.items() if values[key] not in choices]
    problems = problems or _disagreements(cfg)
    if problems:
        raise ValueError("invalid config: " + "; ".join(problems))
    cfg.device = resolve_device(cfg.device)
    if cfg.data.dataset == "moving_digits" and "mnist_dir" not in overrides:  # record where the digits come from
        cfg.data.mnist_dir = os.environ.get(MNIST_ENV) or None
    return cfg


def _disagreements(cfg: Config) -> list[str]:
    """get_config's problems of values that must fit together (each value is in its range)."""
    d, m, tr, s = cfg.data, cfg.model, cfg.train, cfg.sample
    head, grid = m.dim // m.num_heads, "teacher_solver_steps" if s.cd_grid_steps is None else "cd_grid_steps"
    params = m.dim * (m.num_layers * (8 * m.dim + 2 * m.ffn_dim) + m.cond_dim + m.freq_dim
                      + 2 * m.in_channels * m.patch_size**2)  # blocks (attention 8 D^2, FFN), embeddings, head
    rules = [  # (what must hold, what to say if it does not)
        (0 < tr.dmd_min_sigma < tr.dmd_max_sigma <= 1,
         f"DMD sigmas: 0 < dmd_min_sigma={tr.dmd_min_sigma} < dmd_max_sigma={tr.dmd_max_sigma} <= 1 does not hold"),
        (m.dim % m.num_heads == 0 and head % 2 == 0 and head >= 6,
         f"dim={m.dim} must be num_heads={m.num_heads} times an even head dim >= 6 (3-D rotary positions)"),
        (d.dataset == "none" or max(tr.batch_size, tr.cd_batch_size or 0) <= d.train_size,
         f"batch_size={tr.batch_size} and cd_batch_size={tr.cd_batch_size} must be <= train_size={d.train_size}"),
        (params <= 50e9, f"dim, ffn_dim, num_layers give about {params:.1e} parameters, over 5e10 (Wan2.1 14B 1.4e10)"),
        (m.height % m.patch_size == 0 and m.width % m.patch_size == 0,
         f"height={m.height}, width={m.width} must be multiples of patch_size={m.patch_size}"),
        (m.window_frames is None or m.window_frames - m.sink_frames >= m.chunk_frames,
         f"window_frames={m.window_frames} - sink_frames={m.sink_frames} must hold a chunk ({m.chunk_frames})"),
        (m.sink_frames >= 0 and m.sink_frames % m.chunk_frames == 0,
         f"sink_frames={m.sink_frames} must be a non-negative multiple of chunk_frames={m.chunk_frames}"),
        (not tr.cd_steps or getattr(s, grid) >= 2,
         f"{grid}={getattr(s, grid)}: consistency distillation needs a grid of at least 2 steps"),
    ]
    for key in ("denoising_steps", "pp_denoising_steps"):  # as the samplers take them
        steps = getattr(s, key)
        ok = steps and all(isinstance(k, (int, float)) and 0 < k <= s.num_train_timesteps for k in steps)
        rules.append((ok and all(a > b for a, b in zip(steps, steps[1:])), f"{key}={_short(steps)} must be "
                      f"strictly descending numbers in (0, {s.num_train_timesteps}]"))
    if d.dataset == "moving_digits":
        rules += [
            ((m.in_channels, m.height, m.width) == (1, d.canvas, d.canvas),
             f"moving digits are 1x{d.canvas}x{d.canvas} frames: set in_channels=1, height=width=canvas={d.canvas}"),
            (d.digit_size <= d.canvas, f"digit_size={d.digit_size} does not fit the {d.canvas}x{d.canvas} canvas"),
            (d.num_digits == 1, f"num_digits={d.num_digits}: the pipeline's label conditions and digit metrics read "
             "one digit a video"),
            (d.canvas % 8 == 0, f"canvas={d.canvas} must be a multiple of 8 (the digit classifier pools three times)"),
            (m.cond_dim in (0, 10), f"cond_dim={m.cond_dim} must be 10 (a one-hot label) or 0 (unconditional)"),
        ]
    problems = [message for ok, message in rules if not ok]
    if not problems:
        try:  # the teacher's Euler grid must pass through the student's sigmas (ODE pairs keep them)
            ode_pair_sigmas(s)
        except ValueError as err:
            problems.append(str(err))
    return problems


def resolve_device(name: str) -> str:
    """'auto': cuda if a GPU is visible, else mps (Apple), else cpu. Another name must be a device that is here."""
    here = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if name == "auto":
        return next(kind for kind, ok in here.items() if ok)
    try:
        kind = torch.device(name).type
    except (RuntimeError, ValueError):
        raise ValueError(f"device={_short(name)} is not a device torch knows; use cuda, mps, cpu or auto") from None
    if kind not in here:
        raise ValueError(f"device={_short(name)}: this code runs on cuda, mps or cpu; use one of them or auto")
    if not here[kind]:
        raise ValueError(f"device={_short(name)}: no {kind} device is available here; use cpu or auto")
    return name


# --- the network's inputs: clear errors before any work (samplers check theirs; check_inputs a hand-made call)


def _check_tensor(model, x, name: str, fits: Optional[Callable] = None, shape: str = "") -> None:
    """x must be a finite tensor of the model's float dtype whose shape `fits` (as `shape` says); by default, videos
    of the model's frames."""
    frame, w = (model.cfg.in_channels, model.cfg.height, model.cfg.width), model.patch_embedding.weight
    if fits is None:
        fits, shape = (lambda v: v.dim() == 5 and v.shape[1] >= 1 and v.shape[2:] == frame,
                       f"shape (B, F, {', '.join(map(str, frame))}) with F >= 1")
    if not torch.is_tensor(x) or not fits(x):
        raise ValueError(f"{name} must have {shape}, got {tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
    if not x.is_floating_point() or (x.dtype != w.dtype and not model.uses_bf16(w.device)):
        raise TypeError(f"{name} is {x.dtype} but the model's weights are {w.dtype}: use {name}.to({w.dtype})")
    if not torch.isfinite(x).all():  # attention would spread a NaN to every frame, earlier ones too
        raise FloatingPointError(f"{name} holds NaN or infinite values")


def check_inputs(model, x, t, cond=None, kv_cache=None, start_frame: int = 0, clean_context=None) -> None:
    """Checks a hand-made call model(x, t, cond, kv_cache=, start_frame=, clean_context=) before any work: inputs
    that would fail deep inside torch or quietly give wrong numbers."""
    _check_tensor(model, x, "x")
    B, F = x.shape[:2]
    if not torch.is_tensor(t) or t.shape != (B, F):
        raise ValueError(f"t must have shape (B, F) = ({B}, {F}), got {tuple(t.shape) if torch.is_tensor(t) else t!r}")
    if not ((t >= 0) & (t <= 1)).all():  # also false for NaN
        raise ValueError(f"t holds noise levels outside [0, 1] (sigma = timestep / 1000): {_short(t.tolist())}")
    if cond is not None:
        check_cond(model, cond, B)
    if isinstance(start_frame, bool) or not isinstance(start_frame, int):
        raise TypeError(f"start_frame must be an int, got {start_frame!r}")
    if model.causal and start_frame % model.cfg.chunk_frames:
        raise ValueError(f"start_frame={start_frame} is not at a chunk boundary (of {model.cfg.chunk_frames} frames)")
    if (kv_cache is not None or clean_context is not None) and not model.causal:
        raise ValueError("kv_cache and clean_context need a causal model (causal=True)")
    if kv_cache is not None and clean_context is not None:
        raise ValueError("pass either kv_cache or clean_context, not both")
    if clean_context is not None:
        _check_tensor(model, clean_context, "clean_context", lambda v: v.shape == x.shape,
                      f"the shape of x {tuple(x.shape)}")
    if kv_cache is not None:
        check_cache(model, kv_cache, B)
        _check_cache_call(kv_cache, start_frame, F)


def _check_cache_call(cache, start_frame: int, num_frames: int) -> None:
    """Frames [start, start + F) through the cache: the next ones, or ones written again that it still holds."""
    end, window, sink = start_frame + num_frames, cache.window_frames, cache.sink_frames
    if not 0 <= start_frame <= cache.end:
        raise ValueError(f"start_frame={start_frame} is beyond the KV cache: start at frame {cache.end} at most")
    if end > (cache.max_frames if window is None else start_frame + window - sink):
        raise ValueError(f"frames [{start_frame}, {end}) do not fit a KV cache of " + (
            f"max_frames={cache.max_frames}" if window is None else f"{window - sink} rolling non-sink slots"))
    needed = frame_visibility(torch.arange(start_frame, end), torch.arange(start_frame), cache.chunk_frames, window,
                              sink).any(0)  # (start,): which earlier frames the call attends to
    missing = sorted(set(needed.nonzero().flatten().tolist()) - set(cache.slot_frame.tolist()))
    if missing:
        raise ValueError(f"frames {missing} are no longer in the rolling KV cache: re-denoise only the latest chunk")


def check_cache(model, cache, batch: int) -> None:
    """The cache must be one model.new_kv_cache(batch) makes (a full-attention model may use any window)."""
    c, (layers, _, heads, _, tokens, head_dim) = model.cfg, cache.k.shape
    window = (cache.window_frames, cache.sink_frames)
    made_for = [("layers", layers, len(model.blocks)), ("heads", heads, c.num_heads),
                ("head dim", head_dim, c.dim // c.num_heads), ("tokens per frame", tokens, model.tokens_per_frame),
                ("chunk_frames", cache.chunk_frames, c.chunk_frames),
                ("rope_positions", cache.rope_positions, c.rope_positions),
                ("(window_frames, sink_frames)", window, window if c.window_frames is None else
                 (c.window_frames, c.sink_frames))]
    wrong = [f"{name}={got!r} is not the model's {own!r}" for name, got, own in made_for if got != own]
    if wrong:
        raise ValueError(f"this KV cache was made for another model ({'; '.join(wrong)}): use model.new_kv_cache")
    if batch != cache.batch_size:
        raise ValueError(f"batch size {batch} does not match the KV cache's {cache.batch_size}")


def check_cond(model, cond, batch: int, name: str = "cond", like=None) -> None:
    """cond must be (batch, L, cond_dim) floats, L <= text_len, finite; a guidance uncond (like=cond) may also
    have 1 row for the whole batch, and has cond's L."""
    c = model.cfg
    if not c.cond_dim:
        raise ValueError(f"this model has no conditioning (cond_dim=0) but {name} was given")
    batches, L = ((batch,), "L") if like is None else ((1, batch), like.shape[1])
    _check_tensor(model, cond, name, lambda v: v.dim() == 3 and v.shape[0] in batches and v.shape[2] == c.cond_dim
                  and (like is None or v.shape[1] == L), f"shape ({' or '.join(map(str, batches))}, {L}, {c.cond_dim})")
    if c.text_len is not None and cond.shape[1] > c.text_len:
        raise ValueError(f"{name} has {cond.shape[1]} rows, more than text_len={c.text_len}")


def check_data(model, data, cond=None) -> None:
    """A training stage's clips (N, F, C, H, W), finite, of the model's dtype, and their conditions (N, L, cond_dim)
    or None (a model without conditioning refuses one), before any work."""
    _check_tensor(model, data, "data")
    if cond is not None:
        check_cond(model, cond, len(data))


def check_sigmas(sigmas, name: str = "sigmas") -> torch.Tensor:
    """A sampler's noise levels as a float64 tensor, checked: a non-empty, strictly descending list in [0, 1]."""
    try:
        s = torch.as_tensor(sigmas, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be a list of noise levels such as student_sigmas(cfg.sample), got "
                        f"{type(sigmas).__name__}") from None
    if s.dim() != 1 or not len(s) or not ((s >= 0) & (s <= 1)).all() or not (s[1:] < s[:-1]).all():
        raise ValueError(f"{name} must be a non-empty, strictly descending list in [0, 1], got {s.tolist()}")
    return s


def check_sampling(model, sigmas, batch_size: int, num_frames: int, cond=None, uncond=None, context_noise: float = 0.0,
                   renoise: str = "fresh", kv_cache=None, prefix=None, to_zero: bool = False,
                   noise=None) -> torch.Tensor:
    """A sampler's arguments, before any work (returns the sigmas as check_sigmas does): the sizes, the model's dtype
    (noise comes in torch's default dtype), context_noise, renoise, cond and uncond, a KV cache with room for the
    frames, a prefix to go on, given noise; with to_zero (a teacher's ODE) sigmas that end at 0."""
    sigmas = check_sigmas(sigmas)
    w, default = next(model.parameters()), torch.get_default_dtype()
    if w.dtype != default and not model.uses_bf16(w.device):
        raise TypeError(f"the model's weights are {w.dtype}, but samplers draw noise in torch's default dtype "
                        f"{default}: use model.to({default}) or torch.set_default_dtype({w.dtype})")
    _check_sizes(batch_size, num_frames)
    if not 0 <= context_noise < 1:
        raise ValueError(f"context_noise={context_noise} must lie in [0, 1): the noise level of the cached chunks")
    if renoise not in ("fresh", "ode"):
        raise ValueError(f"renoise={renoise!r} must be 'fresh' or 'ode'")
    if cond is not None:
        check_cond(model, cond, batch_size)
    if cond is not None and uncond is not None:
        check_cond(model, uncond, batch_size, "uncond", like=cond)
    if kv_cache is not None:
        check_cache(model, kv_cache, batch_size)
    if prefix is not None:
        _check_tensor(model, prefix, "prefix")
        if len(prefix) != batch_size or prefix.shape[1] % model.cfg.chunk_frames:
            raise ValueError(f"prefix has {len(prefix)} videos of {prefix.shape[1]} frames: it needs batch_size="
                             f"{batch_size} videos of whole chunks of chunk_frames={model.cfg.chunk_frames}")
    total = num_frames + (0 if prefix is None else prefix.shape[1])
    if kv_cache is not None and kv_cache.max_frames is not None and total > kv_cache.max_frames:
        raise ValueError(f"{total} frames do not fit this KV cache (max_frames={kv_cache.max_frames}): make one with "
                         f"model.new_kv_cache({batch_size}, max_frames={total}), or leave kv_cache out")
    if to_zero and sigmas[-1] != 0:
        raise ValueError(f"a teacher's sigmas must end at 0, e.g. solver_sigmas(48, cfg.sample); got {sigmas.tolist()}")
    if noise is not None:
        shape = (batch_size, num_frames, model.cfg.in_channels, model.cfg.height, model.cfg.width)
        _check_tensor(model, noise, "noise", lambda v: v.shape == shape, f"shape {shape}")
    return sigmas


def _check_sizes(batch_size: int, num_frames: int) -> None:
    for name, value in (("batch_size", batch_size), ("num_frames", num_frames)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _random_weights(model: CausalDiT, seed: int = 0, std: float = 0.1) -> CausalDiT:
    """Random noise on every parameter (tests, checks): zero-initialised gates make every comparison vacuous."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.device, p.dtype) * std)
    return model


# ==== II.2 checkpoints in Wan's formats (Wan2.1, Causal Forcing, Self Forcing) ===================


# Diffusers' WanTransformer3DModel parameter names against Wan2.1's; "{}" is a block index. The
# cross-attention's LayerNorm runs second in a block: Diffusers calls it norm2, Wan norm3.
_WAN_NAMES = [
    ("patch_embedding.", "patch_embedding."), ("proj_out.", "head.head."), ("scale_shift_table", "head.modulation"),
    *((f"condition_embedder.{x}_embedder.linear_{j}.", f"{x}_embedding.{i}.") for x in ("text", "time")
      for i, j in ((0, 1), (2, 2))),
    ("condition_embedder.time_proj.", "time_projection.1."), ("blocks.{}.scale_shift_table", "blocks.{}.modulation"),
    *((f"blocks.{{}}.{dif}.{b}", f"blocks.{{}}.{wan}.{a}")
      for wan, dif in (("self_attn", "attn1"), ("cross_attn", "attn2"))
      for a, b in (("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("o.", "to_out.0."), ("norm_q.", "norm_q."),
                   ("norm_k.", "norm_k."))),
    ("blocks.{}.norm2.", "blocks.{}.norm3."), ("blocks.{}.ffn.net.0.proj.", "blocks.{}.ffn.0."),
    ("blocks.{}.ffn.net.2.", "blocks.{}.ffn.2."),
]


def diffusers_to_wan(state: dict) -> dict:
    """A Wan2.1 DiT state dict with Diffusers' names renamed to Wan's; a name the table does not cover is an error."""
    import re

    rules = [(re.compile(re.escape(src).replace(r"\{\}", r"(\d+)") + ("" if src.endswith(".") else "$")), dst)
             for src, dst in _WAN_NAMES]  # "proj_out." is a prefix, "scale_shift_table" a whole name
    out, unknown = {}, []
    for name, tensor in state.items():
        for pattern, dst in rules:
            if m := pattern.match(name):
                out[dst.format(*m.groups()) + name[m.end():]] = tensor
                break
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(f"{len(unknown)} parameter names are not Diffusers-layout Wan2.1 text-to-video DiT names "
                         f"(an image-to-video or Wan2.2 model?): {unknown[:6]}")
    return out


def checkpoint_entry(state: dict, key: Optional[str] = None) -> Optional[str]:
    """Which top-level entry of a checkpoint holds the weights: `key` if given, else the first of generator_ema,
    generator, model; None for a bare state dict of tensors."""
    if key is None and all(torch.is_tensor(v) for v in state.values()):
        return None
    if key is None:
        key = next((k for k in ("generator_ema", "generator", "model") if isinstance(state.get(k), dict)), None)
    if key is None or key not in state:
        what = "no state dict" if key is None else f"no entry {key!r}"
        raise KeyError(f"{what} in this checkpoint; its top-level keys: {_short(sorted(state))}")
    return key


def wan_state_dict(state: dict, key: Optional[str] = None) -> dict:
    """Wan's bare parameter names from the official files, a Causal/Self Forcing checkpoint's entry (checkpoint_entry),
    under FSDP, DDP ("module.") or torch.compile ("_orig_mod.") wrappers, or in Diffusers' names (diffusers_to_wan)."""
    import re

    entry, wrappers = checkpoint_entry(state, key), "_fsdp_wrapped_module|_orig_mod|_checkpoint_wrapped_module"
    out = {re.sub(rf"\.({wrappers})\b", "", re.sub(rf"^((module|model|{wrappers})\.)+", "", name)): tensor
           for name, tensor in (state if entry is None else state[entry]).items()}  # they nest: model._orig_mod.
    diffusers = any(k.startswith("condition_embedder.") or ".attn1." in k for k in out)
    return diffusers_to_wan(out) if diffusers else out


def _is_zip(path: str) -> bool:
    """Whether a file starts as a zip archive does (torch.save's format since PyTorch 1.6)."""
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _archive_problem(path: str) -> Optional[str]:
    """Why torch.load, which checks nothing, must not read a torch zip file; None if nothing is wrong or it is no zip
    archive. torch.save stores records as they are: a compressed one, or one declaring more bytes than the file holds,
    could inflate to any size; one failing its CRC-32 (a flipped bit; a full read finds it) is corrupt."""
    import zipfile

    if not _is_zip(path):
        return None
    try:
        with zipfile.ZipFile(path) as z:
            for r in z.infolist():
                if r.compress_type != zipfile.ZIP_STORED:
                    return f"record {r.filename} is compressed, which torch.save never does"
                if r.header_offset + max(r.file_size, r.compress_size) > os.path.getsize(path):
                    return f"record {r.filename} declares {r.file_size} bytes, more than the file holds"
            # all CRCs 0: written without checksums (torch.serialization.set_crc32_options(False))
            bad = z.testzip() if any(r.CRC for r in z.infolist()) else None
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return f"it is not a readable zip archive ({e})"
    return None if bad is None else f"record {bad} fails its CRC-32 checksum"


def _read_checkpoint(path: str) -> dict:
    """A checkpoint's tensors: .safetensors, or a torch zip file, memory-mapped after _load_saved's checks."""
    if not path.endswith(".safetensors"):
        if not _is_zip(path):
            raise ValueError(f"{path!r} is not a torch.save zip archive: download it again (a file saved before "
                             "PyTorch 1.6: load it there and torch.save it again)")
        return _load_saved(path, "checkpoint", "download it again", mmap=True)
    try:
        from safetensors.torch import load_file
    except ImportError as e:
        raise ImportError("reading .safetensors needs the safetensors package: pip install safetensors") from e
    try:
        return load_file(path)
    except Exception as e:  # noqa: BLE001 - SafetensorError: header or length wrong
        raise ValueError(f"{path!r} is not a readable .safetensors file ({e}); download it again") from None


def _read_transformer_folder(folder: str) -> dict:
    """The tensors of a Diffusers model folder (transformer/ or the download holding it):
    diffusion_pytorch_model.safetensors, or the shards its .safetensors.index.json lists (the 14B model's)."""
    if os.path.isdir(os.path.join(folder, "transformer")):
        folder = os.path.join(folder, "transformer")
    index = os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json")
    shards = ["diffusion_pytorch_model.safetensors"]
    if os.path.isfile(index):
        try:
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # not JSON, or no {name: shard} weight_map
            raise ValueError(f"{index!r} is not a shard index ({type(e).__name__}: {e}); download it again") from None
        files = {n for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n))}
        outside = sorted(set(shards) - files)  # also "../x", "/x", "sub/x" or a folder: not files there
        if outside:
            raise ValueError(f"{index!r} names shards that are not files in its folder: {_short(outside)}; download "
                             "the folder again")
    elif not os.path.isfile(os.path.join(folder, shards[0])):
        raise FileNotFoundError(f"no diffusion_pytorch_model.safetensors (or its .index.json) in {folder!r}: give the "
                                "transformer/ folder of a Wan2.1 Diffusers download")
    return {k: v for shard in shards for k, v in _read_checkpoint(os.path.join(folder, shard)).items()}


def load_wan_weights(model: nn.Module, path: str, key: Optional[str] = None,
                     log: Optional[Callable] = None) -> nn.Module:
    """Loads Wan2.1 DiT weights strictly (every parameter, its shape, nothing else) from a .safetensors or torch file
    (checksums checked) or a Diffusers folder; `key`: see checkpoint_entry; `log` is told which entry was loaded."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint file or Diffusers folder at {path!r}")
    raw = _read_transformer_folder(path) if os.path.isdir(path) else _read_checkpoint(path)
    entry = checkpoint_entry(raw, key)
    state, own = wan_state_dict(raw, entry), model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [f"{k}: file {tuple(state[k].shape)}, model {tuple(own[k].shape)}"
             for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{path!r} does not match the model ({len(missing)} missing, {len(unexpected)} unexpected, "
                         f"{len(wrong)} with other shapes).\n  missing: {missing}\n  unexpected: {unexpected}\n"
                         f"  shapes: {wrong}")
    model.load_state_dict(state, strict=True, assign=any(p.is_meta for p in model.parameters()))  # meta: take them
    if log is not None:
        log(f"loaded {path}" + (f" (its {entry!r} weights)" if entry else ""))
    return model


# ==== II.3 fast attention: FlexAttention block masks (CUDA) ======================================


def _flex_block_mask(vis: torch.Tensor, S: int, block: int = 128):
    """A FlexAttention BlockMask for the token mask vis[q // S, k // S], per pair of 128-token blocks: skipped if no
    frame pair it touches is visible, unmasked if every one is, else masked token by token. A block's frames are
    those of its first to last token; 2-D prefix sums count the visible frame pairs in each rectangle."""
    from torch.nn.attention.flex_attention import BlockMask

    Fq, Fk = vis.shape
    Nq, Nk = Fq * S, Fk * S

    def frames(N):  # the first and last frame of every block of N tokens
        edges = torch.arange(0, N + block, block, device=vis.device).clamp(max=N)
        return edges[:-1] // S, (edges[1:] - 1) // S

    (q0, q1), (k0, k1) = frames(Nq), frames(Nk)
    csum = F_.pad(vis.long().cumsum(0).cumsum(1), (1, 0, 1, 0))  # (Fq+1, Fk+1) prefix sums
    seen = csum[q1 + 1][:, k1 + 1] - csum[q0][:, k1 + 1] - csum[q1 + 1][:, k0] + csum[q0][:, k0]  # (nq, nk)
    area = (q1 - q0 + 1)[:, None] * (k1 - k0 + 1)[None, :]

    def lists(m):  # per query block: how many key blocks, and which (padded to nk)
        order = torch.argsort((~m).to(torch.int8), dim=1, stable=True).to(torch.int32)
        return m.sum(1).to(torch.int32)[None, None], order[None, None]

    def mask_mod(b, h, q, k):
        return vis[torch.clamp(q // S, max=Fq - 1), torch.clamp(k // S, max=Fk - 1)] & (q < Nq) & (k < Nk)

    return BlockMask.from_kv_blocks(*lists((seen > 0) & (seen < area)), *lists(seen == area), BLOCK_SIZE=block,
                                    mask_mod=mask_mod, seq_lengths=(Nq, Nk))


_compiled_flex = None


def flex_attend(q, k, v, block_mask) -> torch.Tensor:
    """FlexAttention under a block mask: compiled on CUDA, where it is fast; eager elsewhere (a slow reference)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if q.device.type == "cuda":
        _compiled_flex = _compiled_flex or torch.compile(flex_attention, dynamic=False)
        return _compiled_flex(q, k, v, block_mask=block_mask)
    return flex_attention(q, k, v, block_mask=block_mask)


ATTENTION_BACKENDS["flex"] = (_flex_block_mask, flex_attend)  # ModelConfig.attention="flex" (I.4)


# ==== II.4 the training loop: data parallel, optimizer steps, checkpoints, divergence ============
# Data parallel under torchrun: every rank draws the same *global* batch from the same seed, trains on its
# slice and averages the gradients over ranks before each optimizer step. So N processes take exactly the
# steps one process takes with the whole batch, and parameters stay identical on every rank.


def init_distributed(device: str = "cpu") -> tuple[int, int]:
    """Joins torchrun's process group (NCCL on CUDA, one GPU per LOCAL_RANK; else gloo): (rank, world size)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return rank_and_world()


def rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _shard(x: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a global batch."""
    rank, world = rank_and_world()
    if len(x) % world:
        raise ValueError(f"batch of {len(x)} does not split over {world} processes")
    return x.chunk(world)[rank] if world > 1 else x


def _rank_rng(rng: Optional[torch.Generator]) -> Optional[torch.Generator]:
    """This rank's own generator, seeded from the shared one: for draws that differ between ranks (rollouts)."""
    rank, world = rank_and_world()
    if world == 1:
        return rng
    return torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=rng)) + rank)


def parallelize(model: nn.Module, cfg: Config) -> nn.Module:
    """Under torchrun, in place: shards a large model with FSDP (each block, then the root; FSDP averages
    the gradients itself), or makes identical replicas (DDP's scheme: _step averages the gradients)."""
    mode, world = cfg.train.data_parallel, rank_and_world()[1]
    if world > 1 and (mode == "fsdp" or (mode == "auto" and cfg.model.dim >= 1024)):
        from torch.distributed.fsdp import fully_shard

        for module in (*model.blocks, model):
            fully_shard(module)
        model.fsdp = True
    elif world > 1:
        for p in model.parameters():
            torch.distributed.broadcast(p.data, src=0)  # rank 0's initial weights on every rank
    return model


def full_state_dict(model: nn.Module) -> dict:
    """The whole, unsharded state dict on every rank (FSDP gathers it); plain names, no prefixes."""
    if getattr(model, "fsdp", False):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return model.state_dict()


def _reshard(model: nn.Module) -> None:
    """Shards FSDP's root parameters again after a forward pass: the sharded ones are the optimizer's and EMA's."""
    if getattr(model, "fsdp", False):
        model.reshard()


def _adamw(params, lr, cfg: TrainConfig, beta1=None, cosine_steps: Optional[int] = None):
    """AdamW with the recipe's betas; with cosine_steps, _step decays the lr to 0 along a cosine over that many
    steps. The schedule is kept in the param group, so the optimizer's state dict holds it."""
    beta1 = cfg.adam_beta1 if beta1 is None else beta1
    opt = torch.optim.AdamW(params, lr=lr, betas=(beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)
    for group in opt.param_groups:
        group.update(base_lr=group["lr"], cosine_steps=cosine_steps, steps_done=0)
    return opt


def _step(opt, model, loss, clip) -> float:
    """One optimizer step: backward, average gradients over replicas, clip, step, the next lr (_adamw).
    Returns the gradient norm; a non-finite loss or gradient is refused before the step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    world = rank_and_world()[1]
    if world > 1 and not getattr(model, "fsdp", False):
        for p in model.parameters():
            if p.requires_grad:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad)
                p.grad /= world
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))  # the same on every rank
    if not math.isfinite(norm):
        raise FloatingPointError(f"loss {float(loss.detach()):.4g}, gradient norm {norm}")
    opt.step()
    for group in opt.param_groups:
        if group.get("cosine_steps"):
            group["steps_done"] += 1
            progress = min(group["steps_done"] / group["cosine_steps"], 1)
            group["lr"] = group["base_lr"] * (0.5 * (1 + math.cos(math.pi * progress)))
    return norm


class Batches:
    """Endless shuffled minibatches of n indices: a new permutation from rng each epoch, short last ones dropped."""

    def __init__(self, n: int, batch: int, rng):
        if batch > n:
            raise ValueError(f"batch_size={batch} is larger than the dataset ({n} samples)")
        self.n, self.batch, self.rng = n, batch, rng
        self.perm, self.pos = torch.empty(0, dtype=torch.long), 0

    def __next__(self) -> torch.Tensor:
        if self.pos + self.batch > len(self.perm):
            self.perm, self.pos = torch.randperm(self.n, generator=self.rng), 0
        self.pos += self.batch
        return self.perm[self.pos - self.batch: self.pos]

    def state_dict(self) -> dict:
        return {"perm": self.perm, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.perm, self.pos = state["perm"], state["pos"]


class Diverged(RuntimeError):
    """A stage met a non-finite loss or gradient. It stopped before that step, so its weights stay finite;
    nothing of it is saved as finished, and its last checkpoint is kept."""


def _global_mean(x: torch.Tensor) -> float:
    """A loss averaged over ranks (each rank's is the mean over its slice), for logging."""
    x, world = x.detach().float(), rank_and_world()[1]
    if world > 1:
        torch.distributed.all_reduce(x)
    return float(x / world)


def train_loop(stage: str, steps: int, step: Callable[[int], dict], ckpt: Optional["StageCheckpoint"] = None,
               log=print, state: Optional[dict] = None, hint: str = "", **objs) -> dict:
    """Runs step(i), which returns its losses by name, for i < steps: from `ckpt`'s step with `objs` (models,
    optimizers, generators, Batches) and `state` (the stage's own values, e.g. DMD's EMA) restored, saving
    every ckpt.every steps, logging ten times. A non-finite loss or gradient raises Diverged naming the stage,
    the step and `hint` (what to change). Returns {loss name: [one value per step giving it]}."""
    start, saved = ckpt.restore((stage, steps), **objs) if ckpt else (0, {})  # without a checkpoint: no files at all
    history = saved.get("history", {})
    if state is not None:
        state.update(saved.get("state", {}))
    every, t0 = max(steps // 10, 1), time.perf_counter()
    for i in range(start, steps):
        try:
            losses = {name: _global_mean(v) if torch.is_tensor(v) else float(v) for name, v in step(i).items()}
            if bad := [f"{name} loss {v}" for name, v in losses.items() if not math.isfinite(v)]:
                raise FloatingPointError(", ".join(bad))
        except FloatingPointError as e:
            raise Diverged(f"training diverged in stage '{stage}' at step {i + 1} of {steps} ({e}); nothing of it is "
                           f"saved as finished. The learning rate is likely too high{': ' + hint if hint else ''}; "
                           "on the command line, use a new --out folder (a run folder keeps its config)") from None
        for name, v in losses.items():
            history.setdefault(name, []).append(v)
        if log and (i % every == 0 or i == steps - 1):
            rate = (i + 1 - start) / max(time.perf_counter() - t0, 1e-9)
            log(f"  [{stage}] step {i + 1:5d}/{steps}  loss {next(iter(losses.values())):.4f}  "
                f"{rate:6.2f} it/s  {(steps - i - 1) / rate:5.0f} s left")
        if ckpt:
            ckpt.save(i + 1, steps, {"history": history, "state": state or {}}, stage, **objs)
    return history


def save_atomic(obj, path: str) -> None:
    """torch.save, or strict JSON for a .json path (NaN and infinities as null), to a temporary file flushed
    to disk and renamed over `path`: a kill, a power loss or a full disk never leaves an empty or cut file,
    and the old file stays until the new one is whole."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp-{os.getpid()}-{os.path.basename(path)}")  # a kill may leave it: delete it
    try:
        with contextlib.suppress(OSError):
            os.remove(tmp)  # a stale one, or a link planted there: O_EXCL makes a new file or fails
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            if path.endswith(".json"):
                strict = json.loads(json.dumps(obj), parse_constant=lambda _: None)
                f.write(json.dumps(strict, indent=2, allow_nan=False).encode())
            else:
                torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        cause = e.__context__ if isinstance(e, RuntimeError) else e  # torch.save raises a failed write as RuntimeError
        if isinstance(cause, OSError):  # a full disk among them
            raise OSError(cause.errno, f"cannot write {path!r}: {cause.strerror or cause}; the previous file "
                          "there, if any, is kept") from e
        raise
    with contextlib.suppress(OSError):  # the rename made durable, where the system lets a folder be opened
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _load_saved(path: str, what: str = "stage file", fix: str = "delete it and run again to redo that stage",
                mmap: bool = False) -> dict:
    """torch.load (tensors only) after the file's checksums; a bad file is a ValueError naming it and `fix`."""
    if (problem := _archive_problem(path)) is not None:
        raise ValueError(f"{what} {path!r} is corrupt: {problem}; {fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - EOFError, RuntimeError (bad zip), UnpicklingError (not tensors), ...
        raise ValueError(f"{what} {path!r} is empty or corrupt ({type(e).__name__}: {e}); {fix}") from None


class StageCheckpoint:
    """A training stage's resumable state in one file, saved atomically every `every` steps: its models,
    optimizers, generators and Batches, the step, its own values and the `config` (another config's is
    refused), so a resumed stage takes exactly the steps an uninterrupted one would. Off for path=None and
    under torchrun (sharded optimizer states are not gathered here)."""

    def __init__(self, path: Optional[str] = None, every: int = 100, config: Optional[dict] = None):
        self.path = path if rank_and_world()[1] == 1 else None
        self.every, self.config = every, config
        self.t0, self.earlier = time.perf_counter(), 0.0  # seconds spent before a resume

    def elapsed(self) -> float:
        """Seconds spent on the stage, the runs before an interruption included."""
        return self.earlier + time.perf_counter() - self.t0

    def restore(self, stage: Optional[tuple] = None, **objs) -> tuple[int, dict]:
        """Loads the saved state into `objs`: the step to go on from (0 without a checkpoint) and the extras; one of
        another `stage` (name, steps) or config is refused."""
        if not self.path or not os.path.exists(self.path):
            return 0, {}
        state, fix = _load_saved(self.path, "checkpoint"), "delete it, or use another --out folder"
        if stage is not None and state.get("stage") != tuple(stage):
            raise ValueError(f"checkpoint {self.path!r} is of stage {state.get('stage')}, not {tuple(stage)}; {fix}")
        if self.config and state.get("config"):
            _refuse_another_config(state["config"], self.config, f"checkpoint {self.path!r} is of", fix)
        try:
            for name, obj in objs.items():
                if isinstance(obj, torch.Generator):
                    obj.set_state(state["objs"][name])
                elif obj is not None:  # a model, an optimizer (its lr schedule included) or Batches
                    obj.load_state_dict(state["objs"][name])
        except (KeyError, RuntimeError, ValueError) as e:  # e.g. a model of another size
            raise ValueError(f"checkpoint {self.path!r} does not fit this stage ({type(e).__name__}: "
                             f"{str(e).strip().splitlines()[-1].strip()}); {fix}") from None
        torch.set_rng_state(state["torch_rng"])
        self.earlier = state["seconds"]
        return state["step"], state["extra"]

    def save(self, step: int, total: int, extra: dict, stage: str = "", **objs) -> None:
        """After `step` of `total` steps of `stage`: saves every `every` steps, not after the last (the stage's result
        is saved then)."""
        if not self.path or step % self.every or step == total:
            return
        states = {name: obj.get_state() if isinstance(obj, torch.Generator) else obj.state_dict()
                  for name, obj in objs.items() if obj is not None}
        save_atomic({"step": step, "objs": states, "extra": extra, "torch_rng": torch.get_rng_state(),
                     "seconds": self.elapsed(), "config": self.config, "stage": (stage, total)}, self.path)


# ==== II.5 data: moving digits (Srivastava et al., 2015), MNIST files, bundled sprites ===========


MNIST_ENV = "CAUSAL_FORCING_MNIST"  # a folder with the MNIST IDX files, if the user has them
_SPRITES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy_data", "digit_sprites.npz")


class DataNotFound(FileNotFoundError, ValueError):
    """A data file that is not there; also a ValueError, which the programs report as bad input."""


def read_idx(path: str) -> torch.Tensor:
    """An IDX file (MNIST's format, raw or .gz) as a uint8 tensor: two zero bytes, the type 0x08 (uint8),
    the number of dimensions, each dimension as a big-endian uint32, then exactly that much data."""
    import gzip
    import zlib

    if not os.path.isfile(path):
        raise DataNotFound(f"no IDX file at {path!r}")
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # gzip: bad header, CRC, truncated, bad deflate data
        raise ValueError(f"{path}: cannot be read ({type(e).__name__}: {e}); it is corrupt or truncated: "
                         "download it again") from e
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path} is not a uint8 IDX file (header {raw[:4].hex()}, expected 0000 08 <ndim>)")
    header = 4 + 4 * raw[3]
    dims = tuple(int.from_bytes(raw[i: i + 4], "big") for i in range(4, header, 4))
    if len(raw) != header + math.prod(dims):  # a header cut short counts dimensions of 0
        raise ValueError(f"{path}: expected {header + math.prod(dims)} bytes for shape {dims}, found {len(raw)}; "
                         "it is truncated or corrupt")
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(dims)


def load_digits(mnist_dir: Optional[str] = None, split: str = "test") -> tuple[torch.Tensor, torch.Tensor, str]:
    """Digit images (N, 28, 28) uint8, labels (N,) long, and their source: the MNIST `split` in `mnist_dir`, else
    the sprites in toy_data/ (see toy_data/make_digit_sprites.py). get_config reads $CAUSAL_FORCING_MNIST."""
    if not mnist_dir:
        if not os.path.isfile(_SPRITES):
            raise DataNotFound(f"no MNIST folder given (mnist_dir) and no digit sprites at {_SPRITES}; regenerate "
                               "them with toy_data/make_digit_sprites.py")
        import numpy as np

        with np.load(_SPRITES) as d:
            return torch.from_numpy(d["images"]), torch.from_numpy(d["labels"]).long(), "digit sprites (toy_data)"
    if split not in ("test", "train"):
        raise ValueError(f"split={split!r}: MNIST has a 'test' and a 'train' split")
    prefix, found = {"test": "t10k", "train": "train"}[split], []
    for kind, rank in (("images", 3), ("labels", 1)):
        names = [f"{prefix}-{kind}{sep}idx{rank}-ubyte{ext}" for sep in "-." for ext in ("", ".gz")]
        paths = [p for name in names if os.path.isfile(p := os.path.join(mnist_dir, name))]
        if not paths:
            raise DataNotFound(f"no MNIST {split} {kind} in {mnist_dir!r}: looked for {names}")
        found.append(read_idx(paths[0]))
    images, labels = found
    if images.dim() != 3 or len(images) != len(labels):
        raise ValueError(f"MNIST files in {mnist_dir!r} disagree: images {tuple(images.shape)}, "
                         f"labels {tuple(labels.shape)}")
    return images, labels.long(), f"MNIST {split} set from {mnist_dir}"


def moving_digits(num_videos: int, frames: int = 20, size: int = 64, num_digits: int = 2, speed: float = 0.1,
                  digit_size: int = 28, digits: Optional[tuple] = None, rng: Optional[torch.Generator] = None,
                  return_positions: bool = False):
    """Moving digits as in Srivastava et al. (2015), their setting the default: each digit starts uniformly in
    the unit square and moves `speed` per frame in a uniform direction, bouncing off [0, 1] (clamped, velocity
    flipped); positions scale by size - digit_size to top-left pixels, overlaps take the max. Returns uint8
    videos (N, F, size, size), labels (N, num_digits) and, with return_positions, the tops (N, F, D, 2) (y, x)."""
    if digit_size > size:
        raise ValueError(f"digit_size={digit_size} does not fit a {size}x{size} canvas")
    images, labels = digits if digits is not None else load_digits()[:2]
    if digit_size != images.shape[-1]:  # area-averaged resize, e.g. 28 -> 14 px for small canvases
        images = F_.interpolate(images[:, None].float(), size=(digit_size, digit_size), mode="area")
        images = images[:, 0].round().clamp(0, 255).to(torch.uint8)
    N, D = num_videos, num_digits
    pick = torch.randint(len(images), (N, D), generator=rng)
    pos = torch.rand(N, D, 2, generator=rng, dtype=torch.float64)  # (y, x) in the unit square
    angle = 2 * math.pi * torch.rand(N, D, generator=rng, dtype=torch.float64)
    vel = speed * torch.stack([angle.sin(), angle.cos()], -1)  # (N, D, 2)
    video = torch.zeros(N, frames, size, size, dtype=torch.uint8)
    tops = torch.zeros(N, frames, D, 2, dtype=torch.long)
    grid, n = torch.arange(digit_size), torch.arange(N)[:, None, None]
    for f in range(frames):
        tops[:, f] = (pos * (size - digit_size)).round().long()
        for d in range(D):
            rows = (tops[:, f, d, 0, None] + grid)[:, :, None]  # (N, s, 1)
            cols = (tops[:, f, d, 1, None] + grid)[:, None, :]  # (N, 1, s)
            video[n, f, rows, cols] = torch.maximum(video[n, f, rows, cols], images[pick[:, d]])
        pos = pos + vel
        pos, vel = pos.clamp(0, 1), torch.where((pos < 0) | (pos > 1), -vel, vel)
    return (video, labels[pick], tops) if return_positions else (video, labels[pick])


def digit_split(cfg: DataConfig) -> dict:
    """{"train": (images, labels), "test": (images, labels), "source": str}: a fixed 90/10 split of the
    digits, the same for every seed, so that held-out videos show digits no training video contains."""
    images, labels, source = load_digits(cfg.mnist_dir)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(12345))
    test, train = order[:len(images) // 10], order[len(images) // 10:]
    return {"train": (images[train], labels[train]), "test": (images[test], labels[test]), "source": source}


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> floats in [-1, 1]."""
    return pixels.float() / 127.5 - 1


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    """Floats in [-1, 1] -> uint8 pixels (clipped)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def digit_videos(cfg: DataConfig, num_videos: int, digits: tuple, rng=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Moving-digit videos as model input, (N, F, 1, H, W) in [-1, 1], and their labels (N, num_digits)."""
    video, labels = moving_digits(num_videos, cfg.frames, cfg.canvas, cfg.num_digits, cfg.speed, cfg.digit_size,
                                  digits, rng)
    return to_unit(video)[:, :, None], labels


def balanced_digit_videos(cfg: DataConfig, num_videos: int, digits: tuple, rng=None) -> tuple[torch.Tensor, ...]:
    """One-digit videos labelled 0, 1, ..., 9, 0, 1, ... (video i shows digit i % 10), each from its digit's images."""
    images, labels = digits
    per_digit = [digit_videos(cfg, len(range(k, num_videos, 10)), (images[labels == k], labels[labels == k]), rng)
                 for k in range(10)]
    order = torch.cat([torch.arange(num_videos)[k::10] for k in range(10)]).argsort()  # any num_videos, < 10 too
    return torch.cat([v for v, _ in per_digit])[order], torch.cat([lab for _, lab in per_digit])[order]


# ==== II.6 metrics: toy metrics; a digit classifier and the moving-digit metrics; NFE ============


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """2 E|X - Y| - E|X - X'| - E|Y - Y'| between two sets of flattened videos (0 iff equal laws)."""
    x, y = x.double().flatten(1), y.double().flatten(1)
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


def _steps(points: torch.Tensor) -> torch.Tensor:
    """(B, F - 1) the distance each video's point (B, F, 2) moves from frame to frame."""
    return (points[:, 1:] - points[:, :-1]).norm(dim=-1)


def toy_metrics(videos: torch.Tensor, data: ToyVideos, held_out: torch.Tensor, tol_degrees: float) -> dict:
    """Energy distance to held-out data; off_manifold = fraction of frames more than 3 std from every point a
    frame of the data can sit on; motion = mean frame-to-frame displacement over the data's; transition_accuracy
    = fraction of consecutive frames that turn by +-turn (within tol). One frame: NaN motion and transitions."""
    pts, ref = (rearrange(v.double(), "b f c h w -> b f (c h w)") for v in (videos, held_out))
    dist = torch.cdist(pts.reshape(-1, 2), data.frame_points())  # (B*F, P)
    ang = torch.atan2(pts[..., 1], pts[..., 0])
    turn = torch.remainder(ang[:, 1:] - ang[:, :-1] + math.pi, 2 * math.pi) - math.pi
    ok = (turn.abs() - math.radians(data.cfg.turn_degrees)).abs() < math.radians(tol_degrees)
    return {"energy_distance": energy_distance(videos, held_out),
            "off_manifold": float((dist.min(-1).values > 3 * data.std).double().mean()),
            "motion": float(_steps(pts).mean() / _steps(ref).mean()),
            "transition_accuracy": float(ok.double().mean())}


class DigitClassifier(nn.Module):
    """A small CNN that reads the digit in frames (B, 1, H, W) in [-1, 1]; returns (features (B, 128),
    logits (B, 10)). The features are the Frechet distance's (the role Inception features play for FID)."""

    def __init__(self, size: int):
        super().__init__()
        if size % 8:
            raise ValueError(f"DigitClassifier needs a frame size divisible by 8, got {size}")
        conv = lambda i, o: [nn.Conv2d(i, o, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]  # noqa: E731
        self.body = nn.Sequential(*conv(1, 32), *conv(32, 64), *conv(64, 64), nn.Flatten(),
                                  nn.Linear(64 * (size // 8) ** 2, 128), nn.ReLU())
        self.out = nn.Linear(128, 10)

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.body(frames)
        return f, self.out(f)


def train_classifier(cfg: Config, videos: torch.Tensor, labels: torch.Tensor, log=print, rng=None,
                     ckpt: Optional[StageCheckpoint] = None, batch: int = 128) -> tuple[DigitClassifier, list]:
    """Trains the DigitClassifier with Adam for classifier_steps steps on the frames of the training
    videos (one digit per video, so every frame carries the video's label)."""
    frames = rearrange(videos, "n f c h w -> (n f) c h w")
    targets = labels[:, 0].repeat_interleave(videos.shape[1])
    model = DigitClassifier(videos.shape[-1]).to(cfg.device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = Batches(len(frames), batch, rng)

    def step(i):
        idx = next(batches)
        loss = F_.cross_entropy(model(frames[idx].to(cfg.device))[1], targets[idx].to(cfg.device))
        _step(opt, model, loss, clip=math.inf)  # no clipping (the gradient is scaled by exactly 1)
        return {"cross_entropy": loss}
    history = train_loop("digit classifier", cfg.train.classifier_steps, step, ckpt, log, model=model, opt=opt,
                         rng=rng, batches=batches, hint="the classifier's Adam lr is 1e-3; check the data")
    return model.eval().requires_grad_(False), history.get("cross_entropy", [])


def frechet_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, D) (FID's formula):
        |mu_x - mu_y|^2 + tr(C_x + C_y - 2 (C_x^1/2 C_y C_x^1/2)^1/2),
    the matrix square roots from symmetric eigendecompositions, in float64."""
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"the Frechet distance needs 2 or more feature vectors a set, got {len(x)} and {len(y)}")
    x, y = x.double(), y.double()
    mx, my = x.mean(0), y.mean(0)
    cx, cy = torch.cov(x.T), torch.cov(y.T)
    w, V = torch.linalg.eigh(cx)
    root_x = (V * w.clamp(min=0).sqrt()) @ V.T
    cross = torch.linalg.eigvalsh(root_x @ cy @ root_x).clamp(min=0).sqrt().sum()
    return float((mx - my).pow(2).sum() + cx.trace() + cy.trace() - 2 * cross)


def centroids(videos: torch.Tensor) -> torch.Tensor:
    """The brightness-weighted centre (y, x) in pixels of every frame: (B, F, 1, H, W) -> (B, F, 2)."""
    w = ((videos[:, :, 0].double() + 1) / 2).clamp(0, 1)  # (B, F, H, W), brightness in [0, 1]
    total = w.sum((-2, -1)).clamp(min=1e-9)
    ys = (w.sum(-1) * torch.arange(w.shape[-2], dtype=w.dtype)).sum(-1) / total
    xs = (w.sum(-2) * torch.arange(w.shape[-1], dtype=w.dtype)).sum(-1) / total
    return torch.stack([ys, xs], -1)


def sharpness(videos: torch.Tensor) -> float:
    """Mean absolute difference between neighbouring pixels (both directions): low for blur."""
    v = videos.double()
    return float(((v[..., 1:, :] - v[..., :-1, :]).abs().mean() + (v[..., :, 1:] - v[..., :, :-1]).abs().mean()) / 2)


@torch.no_grad()
def read_frames(classifier: DigitClassifier, videos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The classifier on every frame of videos (B, F, 1, H, W), 256 videos at a time: features
    (B*F, 128) and the digit it reads in each frame (B, F), both on the CPU."""
    device = next(classifier.parameters()).device
    feats, logits = zip(*(classifier(rearrange(part, "b f c h w -> (b f) c h w").float().to(device))
                          for part in videos.split(256)))
    return torch.cat(feats).cpu(), torch.cat(logits).argmax(-1).reshape(len(videos), videos.shape[1]).cpu()


@torch.no_grad()
def frame_changes(videos: torch.Tensor, chunk_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(F - 1,) the mean change |x_{f+1} - x_f| into every frame f + 1 (over pixels and videos), and
    whether frame f + 1 starts a chunk."""
    change = (videos[:, 1:] - videos[:, :-1]).abs().mean(dim=(0, 2, 3, 4))
    return change, (torch.arange(1, videos.shape[1]) % chunk_frames) == 0


@torch.no_grad()
def chunk_boundary_jump(videos: torch.Tensor, chunk_frames: int) -> float:
    """The mean frame-to-frame change across chunk boundaries over that within chunks: about 1 for steady
    motion, above 1 when a chunk-wise generator jumps at each chunk's start; NaN without both kinds."""
    change, into_new_chunk = frame_changes(videos, chunk_frames)
    if into_new_chunk.all() or not into_new_chunk.any():
        return float("nan")
    return float(change[into_new_chunk].mean() / change[~into_new_chunk].mean())


def digit_metrics(videos: torch.Tensor, labels: torch.Tensor, held_out: torch.Tensor,
                  classifier: DigitClassifier, chunk_frames: Optional[int] = None) -> dict:
    """Metrics of moving-digit videos (B, F, 1, H, W) made for `labels` (B, num_digits; None: unconditional)
    against held-out videos, the paper's table in miniature, on the frames clamped to [-1, 1] as shown:
      frechet_distance       FD of the classifier's per-frame features                         (quality)
      sharpness              neighbouring-pixel contrast over the held-out videos'; < 1: blur  (quality)
      dynamic_degree         mean centroid displacement per frame over the held-out videos'    (motion)
      motion_within_chunks   the same inside chunks only: jumps at chunk boundaries are not motion
      instruction_following  fraction of frames read as the requested digit (NaN without labels)
      temporal_consistency   fraction of frames that agree with their video's majority reading
      chunk_boundary_jump    see chunk_boundary_jump (this and motion_within_chunks given chunk_frames)
      out_of_range, overshoot  the fraction of raw pixels outside [-1, 1], and their mean distance beyond"""
    beyond = (videos.cpu().float().abs() - 1).clamp(min=0)
    out = beyond > 0
    videos, held_out = (v.cpu().float().clamp(-1, 1) for v in (videos, held_out))
    feats, pred = read_frames(classifier, videos)
    steps, ref_steps = _steps(centroids(videos)), _steps(centroids(held_out))
    metrics = {
        "frechet_distance": frechet_distance(feats, read_frames(classifier, held_out)[0]),
        "sharpness": sharpness(videos) / sharpness(held_out),
        "dynamic_degree": float(steps.mean() / ref_steps.mean()),
        "instruction_following": float("nan") if labels is None else float((pred == labels[:, :1]).double().mean()),
        "temporal_consistency": float((pred == pred.mode(dim=1).values[:, None]).double().mean()),
        "out_of_range": float(out.double().mean()),
        "overshoot": float(beyond[out].double().mean()) if out.any() else 0.0,
    }
    if chunk_frames:
        inside = (torch.arange(1, videos.shape[1]) % chunk_frames) != 0  # frame pairs f, f + 1 in one chunk
        metrics["motion_within_chunks"] = float(steps[:, inside].mean() / ref_steps[:, inside].mean())
        metrics["chunk_boundary_jump"] = chunk_boundary_jump(videos, chunk_frames)
    return metrics


@contextlib.contextmanager
def count_frame_evaluations(model: nn.Module):
    """Yields a dict that counts the network's evaluations in the block: each forward call adds its (noisy)
    frames to 'frames' and batch x frames to 'sample_frames' (a guided call, on a doubled batch, twice)."""
    box = {"frames": 0, "sample_frames": 0}

    def hook(m, args, out):
        box["frames"] += out.shape[1]
        box["sample_frames"] += out.shape[0] * out.shape[1]
    handle = model.register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


# ==== II.7 pipeline: every stage, resumable; the table; results.json (figures: examples/) ========


ROWS = ("bidirectional_teacher", "ar_teacher", "ode_student_from_bidirectional", "ode_student_from_ar",
        "self_forcing", "causal_forcing", "consistency_student_from_ar", "causal_forcing_pp")
DIGIT_ROWS = ROWS[:2] + ("ar_teacher_diffusion_forcing",) + ROWS[2:]  # moving digits add the ablation
STEP_ROWS = ("causal_forcing", "causal_forcing_pp")  # also streamed with 1, 2 and 4 steps (results["steps"])
_MODEL_KINDS = ("bidirectional", "causal", "classifier")  # stages whose result is a trained model and its losses


def streaming_steps(cfg: SampleConfig, steps: int) -> dict:
    """`stream`'s arguments for a student streamed with 1, 2 or 4 steps, Causal Forcing++'s way (the first chunk,
    with no context to lean on, keeps denoising_steps' 4), with the config's context_noise and renoise."""
    few = {1: (1000,), 2: cfg.pp_denoising_steps, 4: cfg.denoising_steps}[steps]
    return {"sigmas": student_sigmas(cfg, few), "first_chunk_sigmas": student_sigmas(cfg),
            "context_noise": cfg.context_noise, "renoise": cfg.renoise}


def sample_row(row: str, model: CausalDiT, cfg: Config, batch_size: int, cond=None, rng=None) -> torch.Tensor:
    """Samples the model of a row of the table with that row's sampler: the teachers by their many-step
    ODE (guided with teacher_guidance when conditioned), the students by streaming (Causal Forcing++ 2 steps)."""
    s, size = cfg.sample, dict(batch_size=batch_size, num_frames=cfg.data.frames, cond=cond, rng=rng)
    teacher = dict(sigmas=solver_sigmas(s.teacher_solver_steps, s), guidance=cfg.train.teacher_guidance, **size)
    if row == "bidirectional_teacher":
        return sample_bidirectional(model, **teacher)
    if row.startswith("ar_teacher"):
        return sample_ar_teacher(model, context_noise=s.context_noise, **teacher)
    return sample_student(model, **streaming_steps(s, 2 if row == "causal_forcing_pp" else 4), **size)


def _saved_model(cfg: Config, kind: str, state: dict) -> nn.Module:
    """A model of a kind in _MODEL_KINDS with saved weights, on cfg.device; the classifier frozen, as trained."""
    model = DigitClassifier(cfg.data.canvas) if kind == "classifier" else CausalDiT(cfg.model, causal=kind == "causal")
    model.load_state_dict(state)
    return model.to(cfg.device).eval().requires_grad_(False) if kind == "classifier" else model.to(cfg.device)


def load_models(out: str, cfg: Config) -> dict:
    """The trained models of a finished run in folder `out` (its models.pt), ready to sample: a CausalDiT per row of
    the table and, on moving digits, the "digit_classifier" of the metrics. `cfg` (e.g. run_config(out)) must give
    the run's network: one that differs (chunk_frames, a window, a size) is refused; the speed fields may differ."""
    path = os.path.join(out, "models.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no models.pt in {out!r}: run the pipeline there first "
                                f"(python causal_forcing.py --out {out})")
    saved, speed = run_config(out, device=cfg.device).model, ("attention", "precision", "grad_checkpointing", "compile")
    diff = [f"model.{k}" for k, v in dataclasses.asdict(saved).items() if k not in speed and getattr(cfg.model, k) != v]
    if diff:
        raise ValueError(f"cfg differs from the network of the run in {out!r} ({', '.join(diff)}): use run_config(out)")
    kinds = {"digit_classifier": "classifier", "bidirectional_teacher": "bidirectional"}
    return {name: _saved_model(cfg, kinds.get(name, "causal"), state).eval().requires_grad_(False)
            for name, state in _load_saved(path, "models file").items()}


def _config_fields(config: dict) -> dict:
    """A Config.to_dict() (or config.json) flat: {"seed": 0, ..., "data.frames": 3, ...}, tuples as lists."""
    config = json.loads(json.dumps(config))
    fields = {k: v for k, v in config.items() if not isinstance(v, dict)}
    for section in _SECTIONS:
        fields.update({f"{section}.{k}": v for k, v in config.get(section, {}).items()})
    return fields


def run_config(out: str, **overrides) -> Config:
    """The config a run folder was made with (its config.json), checked as get_config checks any config;
    `overrides` (e.g. device) replace saved values."""
    path = os.path.join(out, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in {out!r}: it is not a run folder of this code")
    saved = _config_fields(_read_config_json(path))
    fields = {k.split(".")[-1]: v for k, v in saved.items() if k != "name"}  # field names are unique
    return get_config(saved["name"], **{**fields, **overrides})


def _read_config_json(path: str) -> dict:
    """A run folder's config.json; one that is not a config (cut short, edited, another file) is named with the fix."""
    try:
        with open(path) as f:
            config = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:  # json's errors are ValueErrors
        config = e
    if not isinstance(config, dict) or not isinstance(config.get("name"), str):
        raise ValueError(f"{path!r} is not a config this code wrote ({_short(config)}): put the run's config.json "
                         "back, or use another --out folder")
    return config


_NOT_RESULTS = ("device", "train.checkpoint_every", "train.dmd_snapshots")  # fields that do not change results


def _refuse_another_config(saved: dict, config: dict, what: str, fix: str) -> None:
    """Raises "<what> another config (differs in seed, train.dmd_steps, ...); <fix>" where the saved config
    (a Config.to_dict()) differs from `config` in a field other than _NOT_RESULTS."""
    a, b = _config_fields(saved), _config_fields(config)
    diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and k not in _NOT_RESULTS)
    if diff:
        raise ValueError(f"{what} another config (differs in {', '.join(diff)}); {fix}")


def _check_run_folder(cfg: Config, out: str) -> None:
    """A run folder belongs to the one config in its config.json (or, where that is gone, in its finished
    stages' files): a run with another config there would mix their stages, so it is refused."""
    path, stages = os.path.join(out, "config.json"), os.path.join(out, "stages")
    done = sorted(n for n in (os.listdir(stages) if os.path.isdir(stages) else [])
                  if n.endswith(".pt") and not n.endswith(".partial.pt") and not n.startswith(".tmp-"))
    if os.path.exists(path):
        saved = _read_config_json(path)
    elif done:
        saved = _load_saved(os.path.join(stages, done[0]))["config"]
    else:
        return
    _refuse_another_config(saved, cfg.to_dict(), f"{out!r} holds a run with",
                           "use another --out folder, or delete this one to start over")


def pipeline_data(cfg: Config, g: torch.Generator, log=print) -> types.SimpleNamespace:
    """The run's videos, drawn from g: train and test; on moving digits also their labels, the digit split and the
    label conditions `cond` (None on the toy and for unconditional models); on the toy its ToyVideos `toy`."""
    d = types.SimpleNamespace(cond=None, train_labels=None, test_labels=None)
    if cfg.data.dataset == "moving_digits":
        d.split = digit_split(cfg.data)
        log(f"data: {cfg.data.train_size} training and {cfg.data.test_size} held-out videos of {d.split['source']}")
        d.train, d.train_labels = digit_videos(cfg.data, cfg.data.train_size, d.split["train"], g)
        d.test, d.test_labels = digit_videos(cfg.data, cfg.data.test_size, d.split["test"], g)
        d.cond = label_cond(d.train_labels) if cfg.model.cond_dim else None
    elif (cfg.model.in_channels, cfg.model.height, cfg.model.width) != (2, 1, 1):
        raise ValueError("toy2d frames are points in the plane: in_channels=2, height=width=1")
    else:
        d.toy = ToyVideos(cfg.data)
        d.train, d.test = d.toy.sample(cfg.data.train_size, g), d.toy.sample(cfg.data.test_size, g)
    return d


def exact_flows(cfg: Config, toy: ToyVideos) -> dict:
    """The toy's exact teachers' flow maps through the teachers' Euler sampler."""
    sig = solver_sigmas(cfg.sample.teacher_solver_steps, cfg.sample)
    return {"bidirectional": lambda eps: exact_bidirectional_flow(toy, eps, sig),
            "ar": lambda eps: exact_ar_flow(toy, eps, sig, cfg.model.chunk_frames)}


def injectivity_floors(cfg: Config, toy: ToyVideos, g: torch.Generator) -> dict:
    """The frame-level floors of ODE regression from the toy's exact teachers, and how far off the data the
    bidirectional teacher's conditional means lie, per frame."""
    flows, e = exact_flows(cfg, toy), cfg.eval
    args = (cfg.data.frames, cfg.model.chunk_frames, e.floor_outer, e.floor_inner, g)
    bi, cond_mean = injectivity_floor(flows["bidirectional"], *args, return_mean=True)
    ar = injectivity_floor(flows["ar"], *args)
    points = rearrange(cond_mean, "b f c h w -> b f (c h w)")
    dist = torch.cdist(points, toy.frame_points().expand(len(cond_mean), -1, -1))
    off = (dist.min(-1).values > 3 * toy.std).double().mean(0)  # (F,) per frame
    return {"bidirectional": float(bi.mean()), "ar": float(ar.mean()),
            "per_frame": {"bidirectional": bi.tolist(), "ar": ar.tolist()},
            "conditional_mean_off_manifold": off.tolist()}


@torch.no_grad()
def held_out_ode_loss(cfg: Config, kind: str, teacher, student, test: torch.Tensor, g: torch.Generator) -> list:
    """The ODE student's regression loss at sigma = 1 on held-out pairs, per frame (the injectivity floor's units)."""
    held = make_ode_pairs(cfg, teacher, test[:512], kind, rng=g)
    batch = ode_pair_batch(held, slice(None), 0, student_sigmas(cfg.sample), kind)
    return ode_regression_loss(student, *batch).mean(0).tolist()


def run_pipeline(cfg: Config, out: Optional[str] = None, log=print) -> dict:
    """Every stage on the config's videos (toy 2-D or moving digits), in order: read it as the recipe's table of
    stages. Returns the results dict; with `out` it writes there results.json, losses.json (each trained stage's
    losses per step), models.pt (for `load_models`; examples/figures.py OUT draws the figures), each finished
    stage to stages/<stage>.pt and a training stage every checkpoint_every steps to <stage>.partial.pt: the same
    call again loads the finished stages and resumes the interrupted one, as if never interrupted."""
    run = PipelineRun(cfg, out, log)  # the data, the random generator, resumable stages
    d, g, m, say = run.data, run.g, run.models, run.log
    prompts = run.prompts if d.cond is not None else None
    if run.digits:  # the metrics' digit reader first: it is trained on the data alone
        run.classifier = run.stage("digit_classifier", "classifier", lambda ck: train_classifier(
            cfg, d.train, d.train_labels, say, g, ck))
        run.accuracy = float((read_frames(run.classifier, d.test)[1] == d.test_labels[:, :1]).double().mean())
        say(f"  digit classifier reads {run.accuracy:.3f} of held-out frames correctly")
    m["bidirectional_teacher"] = run.stage("bidirectional_base", "bidirectional", lambda ck: train_base(
        cfg, d.train, say, g, d.cond, ck))
    m["ar_teacher"] = run.stage("ar_teacher", "causal", lambda ck: train_ar_teacher(
        cfg, m["bidirectional_teacher"], d.train, "teacher_forcing", say, g, d.cond, ck))
    if run.digits:  # the ablation: the AR teacher by diffusion forcing (noisy context in training)
        m["ar_teacher_diffusion_forcing"] = run.stage("ar_teacher_diffusion_forcing", "causal", lambda ck: (
            train_ar_teacher(cfg, m["bidirectional_teacher"], d.train, "diffusion_forcing", say, g, d.cond, ck)))
    teacher = {"bidirectional": m["bidirectional_teacher"], "ar": m["ar_teacher"]}  # what each kind distils
    pairs = {kind: run.stage(f"ode_pairs_{kind}", "tensors", lambda ck: make_ode_pairs(
        cfg, teacher[kind], d.train, kind, d.cond, g)) for kind in ("bidirectional", "ar")}
    for kind in ("bidirectional", "ar"):
        m[f"ode_student_from_{kind}"] = run.stage(f"ode_student_{kind}", "causal", lambda ck: train_ode_student(
            cfg, teacher[kind], pairs[kind], kind, say, g, ck))
        if not run.digits:
            run.ode_losses[kind] = held_out_ode_loss(cfg, kind, teacher[kind], m[f"ode_student_from_{kind}"], d.test, g)
    real = m["bidirectional_teacher"]  # DMD's real score, and where its critic (the fake score) starts
    for row, kind in (("self_forcing", "bidirectional"), ("causal_forcing", "ar")):
        m[row] = run.stage(f"dmd_{row}", "causal", lambda ck: train_dmd(
            cfg, m[f"ode_student_from_{kind}"], real, real, prompts, say, g, ck))
    if cfg.train.cd_steps:  # Causal Forcing++: consistency distillation from the AR teacher, then the same DMD
        m["consistency_student_from_ar"] = run.stage("consistency_student_ar", "causal", lambda ck: (
            train_consistency(cfg, m["ar_teacher"], d.train, say, g, d.cond, ck)))
        m["causal_forcing_pp"] = run.stage("dmd_causal_forcing_pp", "causal", lambda ck: train_dmd(
            cfg, m["consistency_student_from_ar"], real, real, prompts, say, g, ck,
            steps=cfg.sample.pp_denoising_steps))

    if not run.digits:  # the injectivity floor, measured with the exact teachers
        run.floors = run.stage("injectivity_floor", "plain", lambda ck: injectivity_floors(cfg, d.toy, g))
    rows, by_steps, _ = run.stage("evaluation", "plain", lambda ck: run.evaluate())  # _: samples, for figures
    return run.finish(rows, by_steps)


class PipelineRun:
    """What `run_pipeline` needs besides its table of stages: the data, resumable stages, the evaluation and
    the files. Every stage draws from one generator, so the order of the calls is part of the results."""

    def __init__(self, cfg: Config, out: Optional[str], log):
        if cfg.data.dataset == "none":
            raise ValueError(f"the pipeline trains toy2d or mnist; {cfg.name!r} has no training data here (its stage "
                             "functions take your latents and text embeddings; examples/bench.py measures its speed)")
        self.cfg, self.out, self.digits = cfg, out, cfg.data.dataset == "moving_digits"
        self.rank, self.world = rank_and_world()
        self.log = log if log and self.rank == 0 else (lambda *_: None)  # under torchrun only rank 0 speaks and writes
        if out:  # every check, and the data, before config.json: a refused run leaves nothing to refuse the next
            _check_run_folder(cfg, out)
        torch.manual_seed(cfg.seed)
        self.g = torch.Generator().manual_seed(cfg.seed)
        self.data = pipeline_data(cfg, self.g, self.log)
        if out and self.rank == 0 and not os.path.exists(os.path.join(out, "config.json")):
            save_atomic(cfg.to_dict(), os.path.join(out, "config.json"))
        if out:  # again: a run of another config started beside this one may have claimed the folder meanwhile
            _check_run_folder(cfg, out)
        self.models, self.seconds, self.losses, self.ode_losses = {}, {}, {}, {}
        self.classifier = self.accuracy = self.floors = None

    def stage(self, name: str, kind: str, fn: Callable):
        """Runs fn(checkpoint), or loads its result if an earlier run finished it, with the random generators'
        states at its end, so the stages after it draw the same numbers. `kind`: one of _MODEL_KINDS (a trained
        model, whose losses go to losses.json), "tensors" (a dict of tensors) or "plain"."""
        path = os.path.join(self.out, "stages", name) if self.out else None
        if path and os.path.exists(path + ".pt"):
            saved = _load_saved(path + ".pt")
            _refuse_another_config(saved["config"], self.cfg.to_dict(), f"{path + '.pt'!r} was made by",
                                   "delete it (or use another --out folder) to redo that stage")
            result = saved["result"]
            if kind in _MODEL_KINDS:  # built first: building a model draws from the global generator
                result = (_saved_model(self.cfg, kind, result["model"]), result["losses"])
            elif kind == "tensors":  # loaded on the CPU: back to the device they were made on
                result = {k: v.to(self.cfg.device) for k, v in result.items()}
            self.g.set_state(saved["rng"])
            torch.set_rng_state(saved["torch_rng"])
            self.seconds[name] = saved["seconds"]
            self.log(f"stage: {name} (finished earlier: loaded {path}.pt)")
        else:
            self.log(f"stage: {name}")
            ckpt = StageCheckpoint(path and path + ".partial.pt", self.cfg.train.checkpoint_every, self.cfg.to_dict())
            result = fn(ckpt)
            self.seconds[name] = round(ckpt.elapsed(), 2)  # the time before an interruption included
            if path:  # a model as its whole state dict: every rank joins an FSDP gather
                packed = {"model": full_state_dict(result[0]), "losses": result[1]} if kind in _MODEL_KINDS else result
                if self.rank == 0:
                    save_atomic({"result": packed, "rng": self.g.get_state(), "torch_rng": torch.get_rng_state(),
                                 "seconds": self.seconds[name], "config": self.cfg.to_dict()}, path + ".pt")
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(path + ".partial.pt")
            self.log(f"  {name}: {self.seconds[name]:.1f} s")
        if kind in _MODEL_KINDS:
            self.losses[name] = result[1]
            return result[0]
        return result

    def prompts(self, batch, rng):
        """DMD's conditions on moving digits: uniformly drawn digit labels."""
        return label_cond(torch.randint(10, (batch, self.cfg.data.num_digits), generator=rng)).to(self.cfg.device)

    def metrics(self, videos: torch.Tensor, labels=None) -> dict:
        """digit_metrics or toy_metrics of videos (made for `labels`, on moving digits) against the held-out ones."""
        if self.digits:
            return digit_metrics(videos, labels, self.data.test, self.classifier, self.cfg.model.chunk_frames)
        return toy_metrics(videos, self.data.toy, self.data.test, self.cfg.eval.transition_tol_degrees)

    def evaluate(self) -> tuple[dict, dict, dict]:
        """Samples every row's model with its sampler (sample_row), and the STEP_ROWS students with 1, 2 and 4 steps
        (the first chunk 4) from one seed; measures the videos, NFE and wall time per frame. Returns (rows,
        {row: {steps: metrics}}, {"samples": {row: videos}, "steps": {"row (k steps)": videos}})."""
        cfg, n = self.cfg, self.cfg.eval.eval_samples
        labels = torch.arange(n)[:, None].repeat(1, cfg.data.num_digits) % 10  # every digit alike
        cond = label_cond(labels).to(cfg.device) if self.data.cond is not None else None

        def measure(model: CausalDiT, sample: Callable) -> tuple[torch.Tensor, dict]:
            t0 = time.perf_counter()
            with count_frame_evaluations(model) as nfe:
                x = sample()
            wall, frames = time.perf_counter() - t0, n * cfg.data.frames
            x = x.cpu()
            metrics = self.metrics(x, labels if cond is not None else None)
            return x, {**metrics, "nfe_per_frame": nfe["sample_frames"] / frames, "ms_per_frame": 1000 * wall / frames}
        rows, by_steps, samples = {}, {}, {"samples": {}, "steps": {}}
        for row in [r for r in (DIGIT_ROWS if self.digits else ROWS) if r in self.models]:
            model = self.models[row].eval()
            samples["samples"][row], rows[row] = measure(model, lambda: sample_row(row, model, cfg, n, cond, self.g))
        for row in [r for r in STEP_ROWS if r in self.models]:
            model, by_steps[row] = self.models[row], {}
            for k in (1, 2, 4):  # the same seed for every step count and row (self.g is left as it was)
                name = f"{row} ({k} step{'s' if k > 1 else ''})"
                samples["steps"][name], by_steps[row][str(k)] = measure(model, lambda: sample_student(
                    model, num_frames=cfg.data.frames, batch_size=n, cond=cond,
                    rng=torch.Generator().manual_seed(cfg.seed), **streaming_steps(cfg.sample, k)))
        return rows, by_steps, samples

    def finish(self, rows: dict, by_steps: dict) -> dict:
        """The results dict: every row, each stage's time and training throughput, and the data's own
        metrics; toy runs add the exact teachers, the injectivity floors and the held-out ODE losses.
        With `out` it writes results.json, losses.json (DMD's without its rollouts) and models.pt."""
        cfg, g, d, tr = self.cfg, self.g, self.data, self.cfg.train
        results = {"config": cfg.to_dict(), "rows": rows, "stage_seconds": self.seconds, "world_size": self.world}
        # training throughput: clips through each stage's optimizer per second (DMD: the critic's)
        plain, dmd, cd = tr.batch_size, tr.dmd_batch_size or tr.batch_size, tr.cd_batch_size or tr.batch_size
        work = {"bidirectional_base": (tr.base_steps, plain), "ar_teacher": (tr.teacher_steps, plain),
                "ar_teacher_diffusion_forcing": (tr.teacher_steps, plain),
                "ode_student_bidirectional": (tr.ode_steps, plain), "ode_student_ar": (tr.ode_steps, plain),
                "dmd_self_forcing": (tr.dmd_steps, dmd), "dmd_causal_forcing": (tr.dmd_steps, dmd),
                "consistency_student_ar": (tr.cd_steps, cd), "dmd_causal_forcing_pp": (tr.dmd_steps, dmd)}
        results["train_clips_per_second"] = {k: round(steps * batch / self.seconds[k], 1)
                                             for k, (steps, batch) in work.items() if self.seconds.get(k)}
        n = cfg.eval.eval_samples
        if self.digits:  # fresh held-out videos, class-balanced as the generated rows are
            results.update(data=self.metrics(*balanced_digit_videos(cfg.data, n, d.split["test"], g)),
                           digits=d.split["source"], classifier_accuracy=self.accuracy)
        else:  # and the exact teachers through the same sampler: a perfect network
            results["data"] = self.metrics(d.toy.sample(n, g))
            results["exact_teachers"] = {}
            for name, flow in exact_flows(cfg, d.toy).items():
                eps = torch.randn(n, cfg.data.frames, 2, 1, 1, generator=g, dtype=torch.float64)
                results["exact_teachers"][name] = self.metrics(flow(eps))
            results.update(injectivity_floor=self.floors, ode_loss_at_sigma_1=self.ode_losses)

        if by_steps:
            results["steps"] = by_steps
        if self.out:  # every rank joins the gather of the models' states
            models = {**self.models, "digit_classifier": self.classifier}
            states = {k: full_state_dict(m) for k, m in models.items() if m is not None}
            if self.rank == 0:
                losses = {k: v if isinstance(v, list) else {key: r for key, r in v.items() if key != "snapshots"}
                          for k, v in self.losses.items()}
                for name, obj in (("results.json", results), ("losses.json", losses), ("models.pt", states)):
                    save_atomic(obj, os.path.join(self.out, name))
                self.log(f"figures: python examples/figures.py {self.out}")
        return results


def format_table(results: dict) -> str:
    """The table the command line prints: a line per row after the data's own metrics; then on the toy the
    injectivity floors and held-out ODE losses, on moving digits the classifier's accuracy; each stage's time."""
    seconds = "stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in results["stage_seconds"].items())
    named = [("data (held-out vs fresh)", results["data"])]
    if "classifier_accuracy" in results:  # moving digits
        cols = ("frechet_distance", "sharpness", "dynamic_degree", "motion_within_chunks", "instruction_following",
                "temporal_consistency", "chunk_boundary_jump", "out_of_range", "nfe_per_frame", "ms_per_frame")
        heads = ("FD", "sharpness", "dynamic", "in-chunk", "instruction", "consistency", "block jump", "off range",
                 "NFE/frame", "ms/frame")
        width, col = 32, 12
        notes = [f"digits: {results['digits']}; the classifier reads {results['classifier_accuracy']:.3f} of "
                 "held-out frames", seconds + f"; total {sum(results['stage_seconds'].values()):.0f}"]
    else:
        cols = heads = ("energy_distance", "off_manifold", "motion", "transition_accuracy", "nfe_per_frame")
        width, col = 40, 21
        nfe = results["rows"]["bidirectional_teacher"]["nfe_per_frame"]  # the exact teachers use its sampler
        named += [(f"exact {k} teacher (reference)", {**v, "nfe_per_frame": nfe})
                  for k, v in results.get("exact_teachers", {}).items()]
        floor = results["injectivity_floor"]
        numbers = lambda values: "  ".join(f"{v:.3f}" for v in values)  # noqa: E731
        notes = ["injectivity floor E[Var(phi(eps)^i | eps^<=i)] per frame (exact teachers):",
                 *(f"  {kind + ':':15s}" + numbers(v) for kind, v in floor["per_frame"].items()),
                 "  off-manifold fraction of E[phi_Bi(eps)^i | eps^<=i], the best causal student's frame: "
                 + numbers(floor["conditional_mean_off_manifold"]),
                 *(f"  ode student from {kind:13s} held-out loss at sigma=1: " + numbers(v)
                   for kind, v in results.get("ode_loss_at_sigma_1", {}).items()), "", seconds]
    lines = [f"{'row':{width}s}" + "".join(f"{h:>{col}s}" for h in heads)]
    for row, m in [*named, *results["rows"].items()]:
        lines.append(f"{row:{width}s}" + "".join(f"{m.get(key, float('nan')):{col}.3f}" for key in cols))
    return "\n".join(lines + [""] + notes)


# ==== II.8 command line ==========================================================================


def _parse_override(text: str) -> tuple[str, object]:
    """--set KEY=VALUE: the value as JSON where it parses (3, 0.5, true, [1, 2]), else as text (get_config
    checks the key and the type). The preset's `name` is --config's, not a setting."""
    key, sep, raw = text.partition("=")
    if not sep:
        raise ValueError(f"--set expects KEY=VALUE, got {text!r}")
    if key == "name":
        raise ValueError("name is the preset's name: choose the preset with --config")
    with contextlib.suppress(json.JSONDecodeError):
        return key, None if raw == "None" else json.loads(raw)
    return key, raw


def _config_from_flags(parser, name: str, sets: list, device: Optional[str], **flags) -> Config:
    """get_config from --config, --set KEY=VALUE, --device and the other flags given (not None); a bad key
    or value, or a key given twice (--seed 1 --set seed=2), is a usage error."""
    try:
        given = [_parse_override(s) for s in sets]
        given += [(k, v) for k, v in {"device": device, **flags}.items() if v is not None]
        keys = [k for k, _ in given]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise ValueError(f"{', '.join(twice)} given twice; give each setting once")
        return get_config(name, **dict(given))
    except ValueError as e:
        parser.error(str(e))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Causal Forcing: trains every stage on toy 2-D videos or moving "
                                     "digits (--config mnist) and prints the table; the same command again resumes "
                                     "from the stages saved in --out. Streaming speed: examples/bench.py.")
    parser.add_argument("--config", default="toy2d", choices=sorted(_PRESETS), help="named preset (default toy2d)")
    parser.add_argument("--out", help="run folder (default runs/<config>): stages/, results.json, models.pt, ...")
    parser.add_argument("--seed", type=int, help="seed of every random draw (default 0)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field by name, e.g. --set frames=6 --set chunk_frames=2 (repeatable)")
    parser.add_argument("--mnist-dir", help=f"folder with the MNIST IDX files (raw or .gz) for --config mnist "
                        f"(default ${MNIST_ENV}, else the digit sprites in toy_data/)")
    parser.add_argument("--device", help="cuda, mps or cpu (default: auto)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads {args.threads}: give 1 or more")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = _config_from_flags(parser, args.config, args.set, args.device, seed=args.seed, mnist_dir=args.mnist_dir)
    out = args.out or os.path.join("runs", cfg.name)
    if os.path.exists(out) and not os.path.isdir(out):
        parser.error(f"--out {out!r} is a file; give a folder for the run")
    rank, world = init_distributed(cfg.device)
    t0 = time.perf_counter()
    try:
        results = run_pipeline(cfg, out)
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:  # bad input: another config in --out, a missing or unwritable file
        parser.error(str(e))
    if rank == 0:
        print(f"\n{format_table(results)}\n\ntotal {time.perf_counter() - t0:.1f} s on {world} process(es); wrote "
              f"{os.path.join(out, 'results.json')}")

    return 0


if __name__ == "__main__":
    sys.exit(main())
