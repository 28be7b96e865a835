"""The course exercises (notebooks/05_exercises.ipynb) can be passed and can be failed: every check
passes on the reference solution, and fails on the untouched stub and on a planted, plausible
mistake. The notebook itself also runs with the solutions and with the mistakes filled in."""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "notebooks"))
import exercise_checks as check  # noqa: E402
import exercise_solutions as sol  # noqa: E402

NOTEBOOK = os.path.join(ROOT, "notebooks", "05_exercises.ipynb")


def stub(*args, **kwargs):
    raise NotImplementedError


# --- one plausible mistake per exercise -----------------------------------------------------------


def frame_causal_mask(num_frames, chunk_frames):  # causal per frame: a chunk no longer sees itself both ways
    f = torch.arange(num_frames)
    return f[None, :] <= f[:, None]


def tf_mask_sees_own_clean(num_frames, chunk_frames):  # noisy chunk b also sees clean chunk b: the answer
    chunk = torch.arange(num_frames) // chunk_frames
    causal = chunk[None, :] <= chunk[:, None]
    same = chunk[None, :] == chunk[:, None]
    return torch.cat([torch.cat([causal, torch.zeros_like(causal)], 1), torch.cat([causal, same], 1)], 0)


def x0_sign_flipped(x_s, v, s):
    return x_s + s * v


def forward_without_start_frame(model, x, t):  # every chunk written at frame 0: it never sees the others
    B, F = x.shape[:2]
    c, cache = model.cfg.chunk_frames, model.new_kv_cache(B, max_frames=F)
    return torch.cat([model(x[:, a:a + c], t[:, a:a + c], kv_cache=cache) for a in range(0, F, c)], 1)


def dmd_gradient_batch_norm(x, x0_real, x0_fake):  # one normaliser for the whole batch
    return (x0_fake - x0_real) / (x - x0_real).abs().mean()


def dmd_loss_not_detached(x, grad):
    return 0.5 * ((x - (x - grad)) ** 2).mean()


def ar_pairs_own_context(toy, eps, sigmas, chunk_frames, clean):  # the teacher's own outputs as context
    out = []
    for start in range(0, eps.shape[1], chunk_frames):
        frames = slice(start, min(start + chunk_frames, eps.shape[1]))
        context = torch.cat(out, 1) if out else clean[:, :0]
        x = eps[:, frames].double()
        for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
            x = x + toy.exact_velocity(x, s, frames, context) * (s_next - s)
        out.append(x)
    return torch.cat(out, 1)


def floor_sees_up_to_frame(flow_map, frames, chunk_frames, outer, inner, rng=None):  # the rest of i's chunk counted unseen
    floor = torch.zeros(frames, dtype=torch.float64)
    for i in range(frames):
        seen = i + 1
        eps = torch.randn(outer, 1, frames, 2, 1, 1, generator=rng, dtype=torch.float64).repeat(1, inner, 1, 1, 1, 1)
        eps[:, :, seen:] = torch.randn(outer, inner, frames - seen, 2, 1, 1, generator=rng, dtype=torch.float64)
        x = flow_map(eps.reshape(outer * inner, frames, 2, 1, 1)).reshape(outer, inner, frames, -1)
        floor[i] = x[:, :, i].var(dim=1).sum(-1).mean()
    return floor


# (check, solution, planted mistake): the stub fails every check too
EXERCISES = {
    1: (check.block_causal_mask, (sol.block_causal_mask,), (frame_causal_mask,)),
    2: (check.teacher_forcing_mask, (sol.teacher_forcing_mask,), (tf_mask_sees_own_clean,)),
    3: (check.flow_matching, (sol.x0_from_velocity, sol.euler_step), (x0_sign_flipped, sol.euler_step)),
    4: (check.kv_cache_streaming, (sol.forward_chunk_by_chunk,), (forward_without_start_frame,)),
    5: (check.dmd_gradient, (sol.dmd_gradient,), (dmd_gradient_batch_norm,)),
    6: (check.dmd_surrogate_loss, (sol.dmd_surrogate_loss,), (dmd_loss_not_detached,)),
    7: (check.ar_ode_pairs, (sol.ar_ode_pairs,), (ar_pairs_own_context,)),
    8: (check.injectivity_floor, (sol.injectivity_floor,), (floor_sees_up_to_frame,)),
}


@pytest.mark.parametrize("n", EXERCISES)
def test_check_passes_on_the_solution(n):
    fn, solution, _ = EXERCISES[n]
    result = fn(*solution)
    assert result.passed, result


@pytest.mark.parametrize("n", EXERCISES)
def test_check_fails_on_the_stub(n):
    fn, solution, _ = EXERCISES[n]
    result = fn(*[stub] * len(solution))
    assert result.status == "to do" and "NotImplementedError" in result.message


@pytest.mark.parametrize("n", EXERCISES)
def test_check_fails_on_a_planted_mistake_and_says_why(n):
    fn, _, mistake = EXERCISES[n]
    result = fn(*mistake)
    assert result.status == "failed" and "raised" not in result.message, result


def test_the_usual_mistakes_are_named():
    assert "wrong sign" in check.dmd_gradient(lambda x, real, fake: -sol.dmd_gradient(x, real, fake)).message
    assert "normalise each sample by its own" in check.dmd_gradient(dmd_gradient_batch_norm).message
    assert "copy the answer" in check.teacher_forcing_mask(tf_mask_sees_own_clean).message
    assert "of its own chunk" in check.block_causal_mask(frame_causal_mask).message
    assert "sign of the velocity term" in check.flow_matching(x0_sign_flipped, sol.euler_step).message
    assert "should be exactly 0" in check.injectivity_floor(floor_sees_up_to_frame).message
    assert "detach" in check.dmd_surrogate_loss(dmd_loss_not_detached).message
    assert "times grad / numel" in check.dmd_surrogate_loss(lambda x, g: ((x - (x - g).detach()) ** 2).mean()).message
    assert "did not see the earlier chunks" in check.kv_cache_streaming(forward_without_start_frame).message
    assert "free-running" in check.ar_ode_pairs(ar_pairs_own_context).message
    assert "one chunk" in check.kv_cache_streaming(lambda model, x, t: model(x, t)).message


# --- the notebook, with the stubs filled in ---------------------------------------------------------


def _run_notebook(fill: dict) -> list:
    """Executes the notebook with each exercise's stub cell (tagged "exercise-N") replaced by
    `fill[N]` (source code), and returns the Result lines its check cells displayed."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        tags = [t for t in cell.metadata.get("tags", []) if t.startswith("exercise-")]
        if tags and int(tags[0].split("-")[1]) in fill:
            cell.source = fill[int(tags[0].split("-")[1])]
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
    client.execute()
    lines = []
    for cell in nb.cells:
        if "check" in cell.metadata.get("tags", []):
            text = "".join(o.get("data", {}).get("text/plain", "") for o in cell.get("outputs", []))
            lines.append(text.strip("'\""))
    return lines


def _source_of(*fns) -> str:
    import inspect

    return "\n\n".join(inspect.getsource(f) for f in fns)


@pytest.mark.slow
def test_notebook_checks_pass_with_the_solutions_and_fail_with_the_mistakes():
    nb_names = {1: ("block_causal_mask",), 2: ("teacher_forcing_mask",), 3: ("x0_from_velocity", "euler_step"),
                4: ("forward_chunk_by_chunk",), 5: ("dmd_gradient",), 6: ("dmd_surrogate_loss",), 7: ("ar_ode_pairs",),
                8: ("injectivity_floor",)}
    solved = {n: "import torch\n\n" + _source_of(*(getattr(sol, name) for name in names)) for n, names in nb_names.items()}
    lines = _run_notebook(solved)
    assert len(lines) == len(EXERCISES) and all("PASSED" in line for line in lines), lines

    def renamed(fn, name):  # a planted mistake under the stub's name
        return _source_of(fn).replace(f"def {fn.__name__}(", f"def {name}(", 1)

    wrong = {n: "import torch\n\n" + "\n\n".join(renamed(m, name) for m, name in zip(EXERCISES[n][2], names))
             for n, names in nb_names.items()}
    lines = _run_notebook(wrong)
    assert len(lines) == len(EXERCISES) and all("FAILED" in line for line in lines), lines
