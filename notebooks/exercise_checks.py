"""Checks for notebooks/05_exercises.ipynb.

Each check runs a student's function beside the module's own on random inputs and returns a
`Result`: it is true when the function agrees, and it displays one line (passed, not attempted, or
what differs and what that usually means). A check never raises, so "Run all" reaches every
exercise; `Result.passed` is what a grader reads.
"""

import math
import os
import sys
from typing import Callable

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
import causal_forcing as cf  # noqa: E402


class Result:
    """The verdict of one check: `passed` (bool) and a `message` for the student."""

    def __init__(self, exercise: int, status: str, message: str):
        self.exercise, self.status, self.message = exercise, status, message  # status: passed, failed, to do
        self.passed = status == "passed"

    def __bool__(self) -> bool:
        return self.passed

    def __repr__(self) -> str:
        return f"Exercise {self.exercise} {self.status.upper()}: {self.message}"


def _run(exercise: int, check: Callable[[], str]) -> Result:
    """Runs a check body: it returns the success message or raises _Fail with the explanation."""
    try:
        return Result(exercise, "passed", check())
    except NotImplementedError:
        return Result(exercise, "to do", "the function above still raises NotImplementedError; fill it in and run "
                                         "this cell again.")
    except _Fail as e:
        return Result(exercise, "failed", str(e))
    except Exception as e:  # the student's code crashed: say how, not a traceback
        return Result(exercise, "failed", f"your function raised {type(e).__name__}: {e}")


class _Fail(Exception):
    pass


def _tensor(value, name: str, shape, dtype=None) -> torch.Tensor:
    if not torch.is_tensor(value):
        raise _Fail(f"{name} should return a torch.Tensor, got {type(value).__name__}.")
    if tuple(value.shape) != tuple(shape):
        raise _Fail(f"{name} returned shape {tuple(value.shape)}; expected {tuple(shape)}.")
    if dtype is not None and value.dtype != dtype:
        raise _Fail(f"{name} returned dtype {value.dtype}; expected {dtype}.")
    return value


def _rng(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- Exercise 1: the block-causal mask ------------------------------------------------------------


def block_causal_mask(fn: Callable) -> Result:
    def check():
        for F, c in ((6, 1), (6, 2), (7, 3), (8, 4), (5, 5)):
            got = _tensor(fn(F, c), f"block_causal_mask({F}, {c})", (F, F), torch.bool)
            f = torch.arange(F)
            want = cf.frame_visibility(f, f, c)
            bad = torch.nonzero(got != want).tolist()
            if bad:
                q, k = bad[0]
                if got[q, k]:  # sees something it must not
                    raise _Fail(f"with {F} frames in chunks of {c}, query frame {q} sees key frame {k}, which lies in "
                                f"a later chunk ({k // c} > {q // c}): the future leaks into the past, and streaming "
                                f"could never reproduce it ({len(bad)} entries differ in all).")
                raise _Fail(f"with {F} frames in chunks of {c}, query frame {q} does not see key frame {k} "
                            + ("of its own chunk: frames denoised together see each other both ways" if k // c == q // c
                               else "of an earlier chunk: the context must stay visible")
                            + f" ({len(bad)} entries differ in all).")
        return "frame q sees frame k exactly when chunk(k) <= chunk(q), for chunk sizes 1 to 5."
    return _run(1, check)


# --- Exercise 2: the teacher-forcing mask ---------------------------------------------------------


def teacher_forcing_mask(fn: Callable) -> Result:
    part = lambda i, F: ("clean", i) if i < F else ("noisy", i - F)  # noqa: E731

    def check():
        for F, c in ((4, 1), (6, 2), (6, 3)):
            got = _tensor(fn(F, c), f"teacher_forcing_mask({F}, {c})", (2 * F, 2 * F), torch.bool)
            want = cf.teacher_forcing_visibility(torch.arange(F), c)
            bad = torch.nonzero(got != want).tolist()
            if bad:
                (qa, qf), (ka, kf) = part(bad[0][0], F), part(bad[0][1], F)
                what = f"{qa} frame {qf} {'sees' if got[bad[0][0], bad[0][1]] else 'does not see'} {ka} frame {kf}"
                if qa == "noisy" and ka == "clean" and kf // c == qf // c and got[bad[0][0], bad[0][1]]:
                    why = "a noisy chunk that sees its own clean frames can copy the answer instead of denoising"
                elif qa == "noisy" and ka == "clean":
                    why = "a noisy chunk attends to the clean frames of the chunks before it and only those"
                elif ka == "noisy" and qa == "clean":
                    why = "clean frames are context: they never attend to noisy frames"
                elif qa == ka == "noisy":
                    why = "a noisy chunk attends to itself (both ways) and to no other noisy chunk"
                else:
                    why = "clean frames attend to each other block-causally, as in Exercise 1"
                raise _Fail(f"with {F} frames in chunks of {c} (rows and columns: {F} clean, then {F} noisy), "
                            f"{what}: {why} ({len(bad)} entries differ in all).")
        return "clean frames are block-causal context; noisy chunk b sees the clean chunks before b and itself."
    return _run(2, check)


# --- Exercise 3: flow matching: x0 from a velocity, one Euler step --------------------------------


def flow_matching(x0_from_velocity: Callable, euler_step: Callable) -> Result:
    def check():
        g = _rng(3)
        x0, eps = torch.randn(4, 3, 2, 1, 1, generator=g, dtype=torch.float64), torch.randn(4, 3, 2, 1, 1, generator=g, dtype=torch.float64)
        s, s_next = 0.7, 0.45
        x_s = cf.add_noise(x0, eps, s)
        v = eps - x0  # the true velocity of this straight path
        got = _tensor(x0_from_velocity(x_s, v, s), "x0_from_velocity", x0.shape)
        err = (got - x0).abs().max().item()
        if err > 1e-9:
            flipped = (got - (x_s + s * v)).abs().max().item() < 1e-9
            raise _Fail(f"x0_from_velocity misses the clean video by up to {err:.3g}"
                        + (": the sign of the velocity term is flipped (v points from data to noise, x_s = x0 + s v)."
                           if flipped else ": with x_s = (1 - s) x0 + s eps and v = eps - x0, solve for x0."))
        stepped = _tensor(euler_step(x_s, v, s, s_next), "euler_step", x0.shape)
        target = cf.add_noise(x0, eps, s_next)  # on a straight path one Euler step is exact
        err = (stepped - target).abs().max().item()
        if err > 1e-9:
            back = (stepped - (x_s + v * (s - s_next))).abs().max().item() < 1e-9
            raise _Fail(f"one Euler step from s={s} to s={s_next} along the true velocity should land exactly on x_{s_next} "
                        f"(the path is a straight line) but misses by up to {err:.3g}"
                        + (": the step has the wrong sign; s decreases, so x moves by v (s_next - s)." if back else "."))
        return "x0 = x_s - s v, and an Euler step x + v (s_next - s) follows the straight path exactly."
    return _run(3, check)


# --- Exercise 4: streaming through the KV cache equals the full forward ---------------------------


class _Recorder(torch.nn.Module):
    """The model, recording how many frames each call fed it."""

    def __init__(self, model):
        super().__init__()
        self.model, self.frames = model, []
        self.cfg = model.cfg

    def forward(self, x, *args, **kw):
        self.frames.append(x.shape[1])
        return self.model(x, *args, **kw)

    def new_kv_cache(self, *args, **kw):
        return self.model.new_kv_cache(*args, **kw)


def tiny_causal_model(chunk_frames: int = 2, seed: int = 0) -> cf.CausalDiT:
    """A small random causal DiT for the exercises (frames of 4x4 pixels, 4 tokens each)."""
    cfg = cf.get_config("toy2d", in_channels=1, height=4, width=4, patch_size=2, dim=32, ffn_dim=64, num_heads=2,
                        num_layers=2, chunk_frames=chunk_frames, device="cpu")
    torch.manual_seed(seed)
    model = cf._random_weights(cf.CausalDiT(cfg.model, causal=True), seed=seed)
    return model.double().eval()


def kv_cache_streaming(fn: Callable) -> Result:
    def check():
        model = tiny_causal_model(chunk_frames=2)
        g = _rng(4)
        x = torch.randn(2, 6, 1, 4, 4, generator=g, dtype=torch.float64)
        t = torch.rand(2, 6, generator=g, dtype=torch.float64)
        with torch.no_grad():
            want = model(x, t)
            rec = _Recorder(model)
            got = _tensor(fn(rec, x, t), "forward_chunk_by_chunk", want.shape)
        if max(rec.frames, default=0) > model.cfg.chunk_frames:
            raise _Fail(f"your function fed the model {max(rec.frames)} frames in one call; feed it one chunk "
                        f"({model.cfg.chunk_frames} frames) at a time and let the cache hold the rest.")
        err = (got - want).abs().amax(dim=(0, 2, 3, 4))  # per frame
        bad = [i for i, e in enumerate(err.tolist()) if e > 1e-9]
        if bad:
            hint = ("the first chunk agrees but later ones do not, so they did not see the earlier chunks: use one "
                    "cache for the whole video and pass start_frame (the first frame of the chunk)"
                    if bad[0] >= model.cfg.chunk_frames else
                    "even the first chunk differs: each chunk must be given its own frames and timesteps")
            raise _Fail(f"frames {bad} differ from the full forward (by up to {err.max():.3g}): {hint}.")
        return (f"{len(rec.frames)} calls of one chunk each, through one KV cache, give the full block-causal "
                "forward to float64 precision.")
    return _run(4, check)


# --- Exercises 5 and 6: the DMD gradient and its surrogate loss -----------------------------------


def _dmd_inputs():
    g = _rng(5)
    scale = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64).reshape(4, 1, 1, 1, 1)  # samples of different size
    x, real, fake = (scale * torch.randn(4, 3, 2, 2, 2, generator=g, dtype=torch.float64) for _ in range(3))
    return x, real, fake


def dmd_gradient(fn: Callable) -> Result:
    def check():
        x, real, fake = _dmd_inputs()
        got = _tensor(fn(x, real, fake), "dmd_gradient", x.shape)
        want = cf.dmd_gradient(x, real, fake)
        if torch.allclose(got, want, rtol=1e-9, atol=1e-12):
            return "grad = (x0_fake - x0_real) / mean|x - x0_real|, normalised per sample."
        if torch.allclose(got, -want, rtol=1e-9, atol=1e-12):
            raise _Fail("the gradient has the wrong sign: descending it must move samples from the fake towards the "
                        "real distribution, so it is x0_fake - x0_real.")
        ratio = (got / want).reshape(len(x), -1)
        if torch.allclose(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-6):  # right direction, wrong scale per sample
            per = ", ".join(f"{r:.3g}" for r in ratio[:, 0].tolist())
            raise _Fail(f"the direction is right but the scale is off by sample ({per}): normalise each sample by its "
                        "own mean |x - x0_real| (over all its frames and pixels), not by the whole batch's.")
        raise _Fail(f"{int((~torch.isclose(got, want, rtol=1e-9, atol=1e-12)).sum())} of {got.numel()} entries differ: "
                    "grad = (x0_fake - x0_real) / mean|x - x0_real|.")
    return _run(5, check)


def dmd_surrogate_loss(fn: Callable) -> Result:
    def check():
        x, real, fake = _dmd_inputs()
        grad = cf.dmd_gradient(x, real, fake)
        x = x.clone().requires_grad_(True)
        loss = fn(x, grad)
        if not torch.is_tensor(loss) or loss.dim() != 0:
            raise _Fail("the loss should be a scalar tensor (one number for the batch).")
        if not loss.requires_grad:
            raise _Fail("the loss carries no gradient to x: build it from x itself.")
        (dx,) = torch.autograd.grad(loss, x)
        want = grad / x.numel()
        if torch.allclose(dx, want, rtol=1e-9, atol=1e-15):
            return "autograd gives d loss / dx = grad / numel: backward carries the DMD gradient into the generator."
        if dx.abs().max() == 0:
            raise _Fail("d loss / dx is zero everywhere: the target x - grad moves with x; detach it so that only the "
                        "prediction carries a gradient.")
        ratio = (dx / want).flatten()
        if torch.allclose(ratio, ratio[:1].expand_as(ratio), rtol=1e-6):
            raise _Fail(f"d loss / dx points the right way but is {ratio[0]:.3g} times grad / numel: check the constant "
                        "(0.5 * mean of squares has derivative (x - target) / numel).")
        raise _Fail("d loss / dx is not proportional to grad: the loss should be 0.5 * mean((x - sg(x - grad))^2).")
    return _run(6, check)


# --- Exercise 7: ODE pairs from the AR teacher, with clean context --------------------------------


def toy_videos() -> cf.ToyVideos:
    """The toy's data distribution (4 frames, each a point in the plane), with its exact teachers."""
    return cf.ToyVideos(cf.get_config("toy2d").data)


def ar_ode_pairs(fn: Callable) -> Result:
    def check():
        toy, g = toy_videos(), _rng(7)
        sigmas = cf.solver_sigmas(16, cf.get_config("toy2d").sample)
        for c in (1, 2):
            clean = toy.sample(64, g).double()
            eps = torch.randn(clean.shape, generator=g, dtype=torch.float64)
            got = _tensor(fn(toy, eps, sigmas, c, clean), "ar_ode_pairs", clean.shape)
            want = cf.exact_ar_flow(toy, eps, sigmas, c, context=clean)
            err = (got - want).abs().amax(dim=(0, 2, 3, 4))
            bad = [i for i, e in enumerate(err.tolist()) if e > 1e-9]
            if not bad:
                continue
            own = cf.exact_ar_flow(toy, eps, sigmas, c)  # context: the teacher's own outputs (inference)
            if (got - own).abs().max() < 1e-9:
                raise _Fail(f"with chunks of {c}, frames {bad} are the teacher's free-running samples: ODE pairs "
                            "condition every chunk on the ground-truth clean frames before it (teacher forcing), "
                            "which is what the student sees when it is trained on them.")
            raise _Fail(f"with chunks of {c}, frames {bad} differ (by up to {err.max():.3g})"
                        + (": chunk 0 agrees, so look at the context given to later chunks (clean[:, :start])."
                           if bad[0] >= c else ": even the first chunk differs; check the Euler steps along sigmas."))
        return "every chunk integrates the exact AR teacher's ODE given the ground-truth clean frames before it."
    return _run(7, check)


# --- Exercise 8: the injectivity floor --------------------------------------------------------------


def injectivity_floor(fn: Callable) -> Result:
    def check():
        toy = toy_videos()
        sig = cf.solver_sigmas(16, cf.get_config("toy2d").sample)
        F = toy.cfg.frames
        bi = lambda eps: cf.exact_bidirectional_flow(toy, eps, sig)  # noqa: E731
        for c in (1, 2):
            ar = lambda eps, c=c: cf.exact_ar_flow(toy, eps, sig, c)  # noqa: E731
            got_ar = _tensor(fn(ar, F, c, 128, 16, _rng(8)), "injectivity_floor", (F,))
            if got_ar.abs().max() > 1e-12:
                per = ", ".join(f"{v:.3g}" for v in got_ar.tolist())
                raise _Fail(f"the AR teacher's floor should be exactly 0 (its frame i depends only on the noise the "
                            f"student sees) but you get [{per}] with chunks of {c}: redraw only the noise of the "
                            "chunks after frame i's chunk, and keep everything up to the end of its chunk.")
            got_bi = _tensor(fn(bi, F, c, 128, 16, _rng(9)), "injectivity_floor", (F,)).double()
            want_bi = cf.injectivity_floor(bi, F, c, 128, 16, _rng(9))
            if got_bi[-c:].abs().max() > 1e-12:
                raise _Fail(f"the last chunk sees all the noise, so even the bidirectional teacher's floor is 0 there, "
                            f"but you get {got_bi[-1]:.3g}: measure the variance over redraws of the unseen noise only.")
            early = slice(0, F - c)
            rel = ((got_bi[early] - want_bi[early]).abs() / want_bi[early]).max().item()
            if rel > 0.35:  # a Monte-Carlo estimate: agree to sampling error, not to the last digit
                per = ", ".join(f"{v:.3g}" for v in got_bi.tolist())
                ref = ", ".join(f"{v:.3g}" for v in want_bi.tolist())
                raise _Fail(f"the bidirectional teacher's floor per frame is [{per}]; the module estimates [{ref}] with "
                            f"chunks of {c}: the floor is E[Var(phi(eps)^i | visible noise)], summed over a frame's "
                            "coordinates.")
        per = ", ".join(f"{v:.3f}" for v in got_bi.tolist())
        return (f"the AR teacher's floor is exactly 0 in every frame; the bidirectional teacher's is [{per}] per frame "
                "(chunks of 2): positive wherever later noise still changes the frame.")
    return _run(8, check)
