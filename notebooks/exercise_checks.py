"""Checks for notebooks/05_exercises.ipynb.

Each check runs a student's function on fixed inputs, compares it with an answer computed here, and
returns a `Result` with one of four verdicts: passed; to do (the stub still raises
NotImplementedError); failed, with what differs and what that usually means; refused, when the
function calls causal_forcing's own answer to the exercise (whatever name it reached it by), which
proves nothing. A check never raises, so "Run all" reaches every exercise; `Result.passed` is what a
grader reads. The checks are deterministic and leave torch's global random generator as they found it.
"""

import contextlib
import os
import sys
from typing import Callable, Optional

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
import causal_forcing as cf  # noqa: E402

F64 = torch.float64


class Result:
    """The verdict of one check: `status` (passed, failed, to do, refused), `passed` (bool) and a
    `message` for the student."""

    def __init__(self, exercise: int, status: str, message: str):
        self.exercise, self.status, self.message = exercise, status, message
        self.passed = status == "passed"

    def __bool__(self) -> bool:
        return self.passed

    def __repr__(self) -> str:
        return f"Exercise {self.exercise} {self.status.upper()}: {self.message}"


class _Fail(Exception):
    """A wrong answer; the message says what differs."""


class _Refused(Exception):
    """The function used the module's own answer."""


def _run(exercise: int, check: Callable[[], str]) -> Result:
    """Runs a check body: it returns the success message or raises _Fail / _Refused with the explanation."""
    try:
        return Result(exercise, "passed", check())
    except NotImplementedError:
        return Result(exercise, "to do", "the function above still raises NotImplementedError; fill it in and run "
                                         "this cell again.")
    except _Refused as e:
        return Result(exercise, "refused", str(e))
    except _Fail as e:
        return Result(exercise, "failed", str(e))
    except Exception as e:  # the check failed on what the function returned (the function's own errors are _Fail)
        return Result(exercise, "failed", f"the check could not use what your function returned: "
                                          f"{type(e).__name__}: {e}")


# --- calling the student's function ---------------------------------------------------------------


@contextlib.contextmanager
def _watching(names: tuple):
    """Yields the list of causal_forcing's functions among `names` called inside the block. It watches
    every Python call (sys.setprofile), so an alias (`from causal_forcing import x as y`) is seen too."""
    called, previous = [], sys.getprofile()

    def profile(frame, event, arg):
        code = frame.f_code
        if event == "call" and code.co_name in names and os.path.basename(code.co_filename) == "causal_forcing.py":
            called.append(code.co_name)
        if previous is not None:
            previous(frame, event, arg)
    sys.setprofile(profile)
    try:
        yield called
    finally:
        sys.setprofile(previous)


def _call(fn: Callable, name: str, answers: tuple, *args):
    """fn(*args), the student's function. Its own errors are reported as its own; a call of one of the
    module's `answers` refuses it."""
    with _watching(answers) as called:
        try:
            out = fn(*args)
        except NotImplementedError:
            raise
        except Exception as e:
            if not called:
                raise _Fail(f"{name} raised {type(e).__name__}: {e}") from None
    if called:
        raise _Refused(f"{name} calls causal_forcing.{called[0]}, the module's own answer to this exercise, so "
                       "passing would prove nothing: write it yourself with torch.")
    return out


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


def _same(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-9) -> bool:
    return a.shape == b.shape and torch.allclose(a.double(), b.double(), rtol=rtol, atol=1e-12)


def _numbers(x: torch.Tensor, digits: int = 3) -> str:
    return "[" + ", ".join(f"{v:.{digits}g}" for v in x.tolist()) + "]"


# --- Exercise 1: the block-causal mask ------------------------------------------------------------


def _block_causal(F: int, c: int) -> torch.Tensor:
    chunk = torch.arange(F) // c
    return chunk[None, :] <= chunk[:, None]  # [q, k]


def block_causal_mask(fn: Callable) -> Result:
    answers = ("frame_visibility", "teacher_forcing_visibility")

    def check():
        for F, c in ((6, 1), (6, 2), (7, 3), (8, 4), (5, 5)):
            name = f"block_causal_mask({F}, {c})"
            got = _tensor(_call(fn, name, answers, F, c), name, (F, F), torch.bool)
            want = _block_causal(F, c)
            bad = torch.nonzero(got != want).tolist()
            if not bad:
                continue
            if torch.equal(got, want.T):
                raise _Fail(f"with {F} frames in chunks of {c}, your mask is transposed: entry [q, k] (row: query, "
                            "column: key) says whether frame q sees frame k.")
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


def _teacher_forcing(F: int, c: int) -> torch.Tensor:
    chunk = torch.arange(F) // c
    causal, earlier, same = (chunk[None, :] <= chunk[:, None], chunk[None, :] < chunk[:, None],
                             chunk[None, :] == chunk[:, None])
    return torch.cat([torch.cat([causal, torch.zeros_like(causal)], 1), torch.cat([earlier, same], 1)], 0)


def _tf_order(got: torch.Tensor, want: torch.Tensor, F: int) -> str:
    """What is wrong with the row and column order, if the entries are right in another order; else ''."""
    f = torch.arange(F)
    orders = {"interleave clean and noisy frames (clean 0, noisy 0, clean 1, ...)":
              torch.stack([f, f + F], 1).flatten(), "put the noisy frames first": torch.cat([f + F, f])}
    for what, order in orders.items():
        if torch.equal(got, want[order][:, order]):
            return what
    return "are transposed (rows must be queries, columns keys)" if torch.equal(got, want.T) else ""


def teacher_forcing_mask(fn: Callable) -> Result:
    part = lambda i, F: ("clean", i) if i < F else ("noisy", i - F)  # noqa: E731
    answers = ("teacher_forcing_visibility", "frame_visibility")

    def check():
        for F, c in ((4, 1), (6, 2), (6, 3)):
            name = f"teacher_forcing_mask({F}, {c})"
            got = _tensor(_call(fn, name, answers, F, c), name, (2 * F, 2 * F), torch.bool)
            want = _teacher_forcing(F, c)
            bad = torch.nonzero(got != want).tolist()
            if not bad:
                continue
            order = _tf_order(got, want, F)
            if order:
                raise _Fail(f"with {F} frames in chunks of {c}, your rows and columns {order}: the entries are right, "
                            f"but the order is all {F} clean frames, then all {F} noisy frames.")
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
    answers = ("x0_from_velocity", "euler_ode")

    def check():
        g = _rng(3)
        x0, eps = torch.randn(4, 3, 2, 1, 1, generator=g, dtype=F64), torch.randn(4, 3, 2, 1, 1, generator=g, dtype=F64)
        s, s_next = 0.7, 0.45
        x_s = (1 - s) * x0 + s * eps
        v = eps - x0  # the true velocity of this straight path
        got = _tensor(_call(x0_from_velocity, "x0_from_velocity", answers, x_s, v, s), "x0_from_velocity", x0.shape)
        err = (got - x0).abs().max().item()
        if err > 1e-9:
            flipped = (got - (x_s + s * v)).abs().max().item() < 1e-9
            raise _Fail(f"x0_from_velocity misses the clean video by up to {err:.3g}"
                        + (": the sign of the velocity term is flipped (v points from data to noise, x_s = x0 + s v)."
                           if flipped else ": with x_s = (1 - s) x0 + s eps and v = eps - x0, solve for x0."))
        stepped = _tensor(_call(euler_step, "euler_step", answers, x_s, v, s, s_next), "euler_step", x0.shape)
        target = (1 - s_next) * x0 + s_next * eps  # on a straight path one Euler step is exact
        err = (stepped - target).abs().max().item()
        if err > 1e-9:
            back = (stepped - (x_s + v * (s - s_next))).abs().max().item() < 1e-9
            raise _Fail(f"one Euler step from s={s} to s={s_next} along the true velocity should land exactly on "
                        f"x_{s_next} (the path is a straight line) but misses by up to {err:.3g}"
                        + (": the step has the wrong sign; s decreases, so x moves by v (s_next - s)."
                           if back else "."))
        return "x0 = x_s - s v, and an Euler step x + v (s_next - s) follows the straight path exactly."
    return _run(3, check)


# --- Exercise 4: streaming through the KV cache equals the full forward ---------------------------


def tiny_causal_model(chunk_frames: int = 2, seed: int = 0) -> cf.CausalDiT:
    """A small random causal DiT for the exercises (frames of 4x4 pixels, 4 tokens each), in float64."""
    cfg = cf.get_config("toy2d", in_channels=1, height=4, width=4, patch_size=2, dim=32, ffn_dim=64, num_heads=2,
                        num_layers=2, chunk_frames=chunk_frames, device="cpu")
    with torch.random.fork_rng(devices=[]):  # the initialisation draws from the global generator: restore it
        torch.manual_seed(seed)
        model = cf.CausalDiT(cfg.model, causal=True)
    return cf._random_weights(model, seed=seed).double().eval()


def _stream_once(fn: Callable, model: cf.CausalDiT, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, list]:
    """The student's output and the number of frames of every forward pass it ran, counted where the
    model computes (its patch embedding), however the model was called."""
    frames = []
    hook = model.patch_embedding.register_forward_hook(lambda m, args, out: frames.append(args[0].shape[2]))
    try:
        with torch.no_grad():
            out = _call(fn, "forward_chunk_by_chunk", (), model, x, t)
    finally:
        hook.remove()
    return out, frames


def _stream_verdict(frames: list, got: torch.Tensor, want: torch.Tensor, c: int) -> None:
    F = want.shape[1]
    if not frames:
        raise _Fail("your function never ran the model: call it once per chunk.")
    if max(frames) >= F:
        raise _Refused(f"your function ran the model on all {F} frames in one call, which is the check's own answer "
                       "(the full forward): feed it one chunk (model.cfg.chunk_frames frames) per call and let the "
                       "cache hold the rest.")
    if max(frames) > c:
        raise _Fail(f"with chunks of {c}, your function fed the model {max(frames)} frames in one call: take "
                    "the chunk size from model.cfg.chunk_frames, one chunk per call.")
    err = (got - want).abs().amax(dim=(0, 2, 3, 4))  # per frame
    bad = [i for i, e in enumerate(err.tolist()) if e > 1e-9]
    if not bad:
        return
    if max(frames) < c:
        hint = (f"your calls fed the model {max(frames)} frames at most, but a chunk has {c}, and its frames see each "
                "other both ways: take the chunk size from model.cfg.chunk_frames")
    elif bad[0] >= c:
        hint = ("the first chunk agrees but later ones do not, so they did not see the earlier chunks: use one cache "
                "for the whole video and pass start_frame (the first frame of the chunk)")
    else:
        hint = "even the first chunk differs: each chunk must be given its own frames and timesteps"
    raise _Fail(f"with chunks of {c}, frames {bad} differ from the full forward (by up to {err.max():.3g}): "
                f"{hint}.")


def kv_cache_streaming(fn: Callable) -> Result:
    def check():
        calls = []
        for c in (1, 2, 3):
            model = tiny_causal_model(chunk_frames=c)
            g = _rng(4)
            x = torch.randn(2, 6, 1, 4, 4, generator=g, dtype=F64)
            t = torch.rand(2, 6, generator=g, dtype=F64)
            with torch.no_grad():
                want = model(x, t)
            got, frames = _stream_once(fn, model, x, t)
            _stream_verdict(frames, _tensor(got, "forward_chunk_by_chunk", want.shape), want, c)
            calls.append(len(frames))
        return (f"one chunk per call through one KV cache ({', '.join(map(str, calls))} calls for chunks of 1, 2 and 3 "
                "frames) gives the full block-causal forward to float64 precision.")
    return _run(4, check)


# --- Exercises 5 and 6: the DMD gradient and its surrogate loss -----------------------------------


def _dmd_inputs():
    g = _rng(5)
    scale = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=F64).reshape(4, 1, 1, 1, 1)  # samples of different size
    x, real, fake = (scale * torch.randn(4, 3, 2, 2, 2, generator=g, dtype=F64) for _ in range(3))
    return x, real, fake


def _dmd(x, real, fake, dims=(1, 2, 3, 4)) -> torch.Tensor:
    """(fake - real) / mean |x - real| over `dims` (the right answer: every dimension but the batch)."""
    return (fake - real) / (x - real).abs().mean(dim=dims, keepdim=True)


def _dmd_scale_hint(got, want, x, real, fake) -> str:
    """Names the normaliser a wrong-scale answer used, when it is a usual one; else ''."""
    usual = {"one normaliser for the whole batch; normalise each sample by its own mean |x - x0_real|":
             _dmd(x, real, fake, (0, 1, 2, 3, 4)),
             "one normaliser per frame; normalise each sample by one mean over all its frames and pixels":
             _dmd(x, real, fake, (2, 3, 4)),
             "no normaliser; divide by each sample's mean |x - x0_real|": fake - real,
             "the normaliser measures |x - x0_fake|; it is |x - x0_real|, how far the teacher's answer lies":
             (fake - real) / (x - fake).abs().mean(dim=(1, 2, 3, 4), keepdim=True)}
    for hint, candidate in usual.items():
        if _same(got, candidate, 1e-6):
            return hint
    ratio = (got / want).reshape(len(x), -1)
    if not torch.allclose(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-6):
        return ""
    if torch.allclose(ratio[:, 0], ratio[:1, 0].expand(len(x)), rtol=1e-6):
        return (f"every entry is {ratio[0, 0]:.3g} times the right one: the normaliser is the mean (not the sum or "
                "the norm) of |x - x0_real| over the sample's frames and pixels")
    return (f"each sample is off by its own factor {_numbers(ratio[:, 0])}: the normaliser is the mean of "
            "|x - x0_real| over that sample's frames and pixels")


def dmd_gradient(fn: Callable) -> Result:
    def check():
        x, real, fake = _dmd_inputs()
        got = _tensor(_call(fn, "dmd_gradient", ("dmd_gradient", "dmd_generator_loss"), x, real, fake),
                      "dmd_gradient", x.shape)
        want = _dmd(x, real, fake)
        if _same(got, want, 1e-6):
            return "grad = (x0_fake - x0_real) / mean|x - x0_real|, normalised per sample."
        if _same(got, -want, 1e-6):
            raise _Fail("the gradient has the wrong sign: descending it must move samples from the fake towards the "
                        "real distribution, so it is x0_fake - x0_real.")
        hint = _dmd_scale_hint(got, want, x, real, fake)
        if hint:
            raise _Fail(f"the direction is right but the scale is off: {hint}.")
        raise _Fail(f"{int((~torch.isclose(got, want, rtol=1e-6, atol=1e-12)).sum())} of {got.numel()} entries differ "
                    "and not by a scale: grad = (x0_fake - x0_real) / mean|x - x0_real|.")
    return _run(5, check)


def _loss_gradient(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """d loss / dx by autograd; its failures are named as the loss's."""
    if not torch.is_tensor(loss) or loss.dim() != 0:
        raise _Fail("the loss should be a scalar tensor (one number for the batch).")
    if not loss.requires_grad:
        raise _Fail("the loss carries no gradient to x: build it from x itself.")
    try:
        (dx,) = torch.autograd.grad(loss, x, allow_unused=True)
    except RuntimeError as e:
        raise _Fail(f"autograd could not differentiate your loss with respect to x ({e}): build it from x with "
                    "differentiable torch operations and do not modify x in place.") from None
    if dx is None:
        raise _Fail("your loss does not depend on x (autograd finds no path to it): build it from x itself, "
                    "not from a detached copy.")
    return dx


def dmd_surrogate_loss(fn: Callable) -> Result:
    def check():
        x, real, fake = _dmd_inputs()
        grad = _dmd(x, real, fake)
        x = x.clone().requires_grad_(True)
        dx = _loss_gradient(_call(fn, "dmd_surrogate_loss", ("dmd_loss", "dmd_generator_loss"), x, grad), x)
        want = grad / x.numel()
        if torch.allclose(dx, want, rtol=1e-9, atol=1e-15):
            return "autograd gives d loss / dx = grad / numel: backward carries the DMD gradient into the generator."
        if dx.abs().max() == 0:
            raise _Fail("d loss / dx is zero everywhere: the target x - grad moves with x; detach it so that only the "
                        "prediction carries a gradient.")
        ratio = (dx / want).flatten()
        if torch.allclose(ratio, ratio[:1].expand_as(ratio), rtol=1e-6):
            r = ratio[0].item()
            if abs(r + 1) < 1e-6:
                raise _Fail("d loss / dx is -grad / numel: the sign is flipped. The target is sg(x - grad), so a "
                            "descent step moves x along -grad.")
            if r < 0:
                raise _Fail(f"d loss / dx points against grad ({r:.3g} times grad / numel): the target is "
                            "sg(x - grad), and the constant is 0.5 * mean of squares.")
            raise _Fail(f"d loss / dx points the right way but is {r:.3g} times grad / numel: check the constant "
                        "(0.5 * mean of squares has derivative (x - target) / numel).")
        raise _Fail("d loss / dx is not proportional to grad: the loss should be 0.5 * mean((x - sg(x - grad))^2).")
    return _run(6, check)


# --- Exercise 7: ODE pairs from the AR teacher, with clean context --------------------------------


def toy_videos() -> cf.ToyVideos:
    """The toy's data distribution (4 frames, each a point in the plane), with its exact teachers."""
    return cf.ToyVideos(cf.get_config("toy2d").data)


def _euler(velocity: Callable, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        x = x + velocity(x, s) * (s_next - s)
    return x


def _ar_flow(toy, eps, sigmas, c: int, context: Callable) -> torch.Tensor:
    """The exact AR teacher chunk by chunk in float64; context(start, end, outputs so far) is a chunk's
    clean context."""
    out = []
    for start in range(0, eps.shape[1], c):
        frames = slice(start, min(start + c, eps.shape[1]))
        ctx = context(start, frames.stop, out)
        out.append(_euler(lambda x, s: toy.exact_velocity(x, s, frames, ctx), eps[:, frames].double(), sigmas))
    return torch.cat(out, 1)


def _ode_pair_hint(got, toy, eps, sigmas, c, clean) -> str:
    """Names the usual way an answer went wrong, when it is one of them; else ''."""
    usual = {"are the teacher's free-running samples: ODE pairs condition every chunk on the ground-truth clean "
             "frames before it (teacher forcing), which is what the student sees when it is trained on them":
             _ar_flow(toy, eps, sigmas, c, lambda a, b, out: torch.cat(out, 1) if out else clean[:, :0]),
             "were made with each chunk's own clean frames in its context (clean[:, :end]): that hands the teacher the "
             "answer; the context is the frames before the chunk, clean[:, :start]":
             _ar_flow(toy, eps, sigmas, c, lambda a, b, out: clean[:, :b]),
             "come from the whole clip integrated at once, the bidirectional teacher: integrate chunk by chunk, each "
             "given the clean frames before it":
             _euler(lambda x, s: toy.exact_velocity(x, s), eps.double(), sigmas)}
    for hint, candidate in usual.items():
        if (got - candidate).abs().max() < 1e-9:
            return hint
    return ""


def ar_ode_pairs(fn: Callable) -> Result:
    answers = ("exact_ar_flow", "exact_ode_pairs", "euler_ode")

    def check():
        toy, g = toy_videos(), _rng(7)
        sigmas = cf.solver_sigmas(16, cf.get_config("toy2d").sample)
        for c in (1, 2):
            clean = toy.sample(64, g).double()
            eps = torch.randn(clean.shape, generator=g, dtype=F64)
            got = _tensor(_call(fn, "ar_ode_pairs", answers, toy, eps, sigmas, c, clean), "ar_ode_pairs", clean.shape)
            want = _ar_flow(toy, eps, sigmas, c, lambda a, b, out: clean[:, :a])
            err = (got.double() - want).abs().amax(dim=(0, 2, 3, 4))
            bad = [i for i, e in enumerate(err.tolist()) if e > 1e-9]
            if not bad and got.dtype == F64:
                continue
            if err.max() < 1e-4:
                raise _Fail(f"with chunks of {c}, your pairs ({got.dtype}) agree only to float32 precision (up to "
                            f"{err.max():.2g}): run the teacher's ODE in float64 from eps.double(), as the exact "
                            "teacher does, and return float64.")
            hint = _ode_pair_hint(got.double(), toy, eps, sigmas, c, clean)
            if hint:
                raise _Fail(f"with chunks of {c}, frames {bad} {hint}.")
            raise _Fail(f"with chunks of {c}, frames {bad} differ (by up to {err.max():.3g}): every chunk starts from "
                        "its own noise eps[:, start:end] and takes one Euler step x + v (s_next - s) per pair of "
                        "consecutive sigmas, with v = toy.exact_velocity(x, s, frames, clean[:, :start]).")
        return "every chunk integrates the exact AR teacher's ODE given the ground-truth clean frames before it."
    return _run(7, check)


# --- Exercise 8: the injectivity floor --------------------------------------------------------------


def _floor(flow_map: Callable, F: int, c: int, outer: int, inner: int, rng: torch.Generator,
           spread: Optional[Callable] = None) -> torch.Tensor:
    """The Monte-Carlo floor per frame, drawn in the order the exercise states; `spread(x)` replaces
    the unbiased variance over the redraws to reproduce the usual mistakes."""
    floor = torch.zeros(F, dtype=F64)
    for i in range(F):
        seen = min((i // c + 1) * c, F)  # the end of frame i's chunk
        eps = torch.randn(outer, 1, F, 2, 1, 1, generator=rng, dtype=F64).repeat(1, inner, 1, 1, 1, 1)
        eps[:, :, seen:] = torch.randn(outer, inner, F - seen, 2, 1, 1, generator=rng, dtype=F64)
        x = flow_map(eps.reshape(outer * inner, F, 2, 1, 1)).reshape(outer, inner, F, -1)[:, :, i]  # (outer, inner, 2)
        floor[i] = (spread(x) if spread else x.var(dim=1)).sum(-1).mean()
    return floor


_SIZES = (32, 16)  # (outer, inner) of every estimate the check asks for: an exact comparison needs few


def _estimate(fn: Callable, flow_map: Callable, F: int, c: int, seed: int) -> torch.Tensor:
    rng = _rng(seed)
    before = rng.get_state()
    got = _call(fn, "injectivity_floor", ("injectivity_floor",), flow_map, F, c, *_SIZES, rng)
    if torch.equal(rng.get_state(), before):
        raise _Fail("your function never drew from the generator `rng` it was given: draw every noise with "
                    "torch.randn(..., generator=rng, dtype=torch.float64), so that a seed fixes the estimate.")
    return _tensor(got, "injectivity_floor", (F,)).double()


def _floor_hint(fn, flow_map, got, F: int, c: int, seed: int) -> str:
    """Names the usual mistake behind a floor that differs from the check's on the same generator; else ''."""
    def mine(**kw):
        return _floor(flow_map, F, c, *_SIZES, _rng(seed), **kw)
    usual = {"is the standard deviation over the redraws; the floor is their variance":
             lambda: mine(spread=lambda x: x.std(dim=1)),
             "divides by inner (the biased variance); use the unbiased one, which divides by inner - 1 "
             "(torch.var's default)": lambda: mine(spread=lambda x: x.var(dim=1, correction=0)),
             "averages a frame's two coordinates; sum them": lambda: mine() / 2}
    for hint, candidate in usual.items():
        if _same(got, candidate()):
            return hint
    scaled = _estimate(fn, lambda eps: 3 * flow_map(eps), F, c, seed)
    if _same(scaled, 3 * got):
        return "grows like k, not k^2, when the flow map is scaled by k: it is not a variance"
    shifted = _estimate(fn, lambda eps: flow_map(eps) + 5, F, c, seed)
    if not _same(shifted, got, 1e-6):
        return ("changes when a constant is added to the flow map, which a variance would not: measure the spread "
                "around the mean of the redraws")
    chunks = got.reshape(-1, c) if F % c == 0 else None
    if c > 1 and chunks is not None and torch.allclose(chunks, chunks[:, :1].expand_as(chunks)):
        return "is the same for every frame of a chunk; the floor is per frame, the variance of frame i itself"
    return ""


def _bidirectional_verdict(fn, flow_map, F: int, c: int) -> torch.Tensor:
    got = _estimate(fn, flow_map, F, c, 9)
    want = _floor(flow_map, F, c, *_SIZES, _rng(9))
    if _same(got, want):
        return got
    if got[-c:].abs().max() > 1e-12:
        raise _Fail(f"the last chunk sees all the noise, so even the bidirectional teacher's floor is 0 there, but you "
                    f"get {got[-1]:.3g}: measure the variance over redraws of the unseen noise only.")
    hint = _floor_hint(fn, flow_map, got, F, c, 9)
    raise _Fail(f"with chunks of {c}, your estimate of the bidirectional teacher's floor {_numbers(got)} "
                + (hint if hint else f"differs from the check's {_numbers(want)} with the same generator: keep the "
                   "stated order of the draws (per frame: the visible noise, then the redraws) and their shapes")
                + ".")


def injectivity_floor(fn: Callable) -> Result:
    def check():
        toy = toy_videos()
        sig = cf.solver_sigmas(16, cf.get_config("toy2d").sample)
        F = toy.cfg.frames
        for c in (1, 2):
            ar = lambda eps, c=c: cf.exact_ar_flow(toy, eps, sig, c)  # noqa: E731
            got_ar = _estimate(fn, ar, F, c, 8)
            if got_ar.abs().max() > 1e-12:
                raise _Fail(f"the AR teacher's floor should be exactly 0 (its frame i depends only on the noise the "
                            f"student sees) but you get {_numbers(got_ar)} with chunks of {c}: redraw only the noise "
                            "of the chunks after frame i's chunk, and keep everything up to the end of its chunk.")
            got_bi = _bidirectional_verdict(fn, lambda eps: cf.exact_bidirectional_flow(toy, eps, sig), F, c)
        return (f"the AR teacher's floor is exactly 0 in every frame; the bidirectional teacher's is "
                f"{_numbers(got_bi)} per frame (chunks of 2): positive wherever later noise still changes the frame.")
    return _run(8, check)
