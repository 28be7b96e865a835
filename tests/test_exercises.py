"""The course exercises (notebooks/05_exercises.ipynb) can be graded: every check passes on the
reference solution, reports TO DO on the untouched stub, fails on a planted, plausible mistake with a
message that names it, and refuses a solution that calls causal_forcing's own answer. The notebook
itself runs with the stubs, the solutions, the mistakes and the module's answers filled in, from
another folder than notebooks/ too."""

import inspect
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


def floor_sees_up_to_frame(flow_map, frames, chunk_frames, outer, inner, rng=None):  # rest of i's chunk unseen
    floor = torch.zeros(frames, dtype=torch.float64)
    for i in range(frames):
        seen = i + 1
        eps = torch.randn(outer, 1, frames, 2, 1, 1, generator=rng, dtype=torch.float64).repeat(1, inner, 1, 1, 1, 1)
        eps[:, :, seen:] = torch.randn(outer, inner, frames - seen, 2, 1, 1, generator=rng, dtype=torch.float64)
        x = flow_map(eps.reshape(outer * inner, frames, 2, 1, 1)).reshape(outer, inner, frames, -1)
        floor[i] = x[:, :, i].var(dim=1).sum(-1).mean()
    return floor


# --- one solution per exercise that calls the module's own answer ----------------------------------


def module_block_causal_mask(num_frames, chunk_frames):
    import causal_forcing as cf

    f = torch.arange(num_frames)
    return cf.frame_visibility(f, f, chunk_frames)


def module_teacher_forcing_mask(num_frames, chunk_frames):
    import causal_forcing as cf

    return cf.teacher_forcing_visibility(torch.arange(num_frames), chunk_frames)


def module_x0_from_velocity(x_s, v, s):
    import causal_forcing as cf

    return cf.x0_from_velocity(x_s, v, s)


def module_euler_step(x, v, s, s_next):
    import causal_forcing as cf

    return cf.euler_ode(lambda x_, s_: v, x, torch.tensor([s, s_next]))[0]


def module_forward_chunk_by_chunk(model, x, t):  # the full forward: what the check compares with
    return model(x, t)


def module_dmd_gradient(x, x0_real, x0_fake):
    from causal_forcing import dmd_gradient as answer  # an alias is seen too

    return answer(x, x0_real, x0_fake)


def module_dmd_surrogate_loss(x, grad):
    import causal_forcing as cf

    return cf.dmd_loss(x, grad)


def module_ar_ode_pairs(toy, eps, sigmas, chunk_frames, clean):
    import causal_forcing as cf

    return cf.exact_ar_flow(toy, eps, sigmas, chunk_frames, context=clean)


def module_injectivity_floor(flow_map, frames, chunk_frames, outer, inner, rng=None):
    import causal_forcing as cf

    return cf.injectivity_floor(flow_map, frames, chunk_frames, outer, inner, rng)


# exercise: (check, the stubs' names, solution, planted mistake, the module's answer)
SOLUTION, MISTAKE, ANSWER = 2, 3, 4
EXERCISES = {
    1: (check.block_causal_mask, ("block_causal_mask",), (sol.block_causal_mask,), (frame_causal_mask,),
        (module_block_causal_mask,)),
    2: (check.teacher_forcing_mask, ("teacher_forcing_mask",), (sol.teacher_forcing_mask,), (tf_mask_sees_own_clean,),
        (module_teacher_forcing_mask,)),
    3: (check.flow_matching, ("x0_from_velocity", "euler_step"), (sol.x0_from_velocity, sol.euler_step),
        (x0_sign_flipped, sol.euler_step), (module_x0_from_velocity, module_euler_step)),
    4: (check.kv_cache_streaming, ("forward_chunk_by_chunk",), (sol.forward_chunk_by_chunk,),
        (forward_without_start_frame,), (module_forward_chunk_by_chunk,)),
    5: (check.dmd_gradient, ("dmd_gradient",), (sol.dmd_gradient,), (dmd_gradient_batch_norm,), (module_dmd_gradient,)),
    6: (check.dmd_surrogate_loss, ("dmd_surrogate_loss",), (sol.dmd_surrogate_loss,), (dmd_loss_not_detached,),
        (module_dmd_surrogate_loss,)),
    7: (check.ar_ode_pairs, ("ar_ode_pairs",), (sol.ar_ode_pairs,), (ar_pairs_own_context,), (module_ar_ode_pairs,)),
    8: (check.injectivity_floor, ("injectivity_floor",), (sol.injectivity_floor,), (floor_sees_up_to_frame,),
        (module_injectivity_floor,)),
}


@pytest.mark.parametrize("n", EXERCISES)
def test_check_passes_on_the_solution_and_leaves_the_global_generator_alone(n):
    fn, solution = EXERCISES[n][0], EXERCISES[n][SOLUTION]
    before = torch.get_rng_state()
    result = fn(*solution)
    assert result.passed, result
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("n", EXERCISES)
def test_check_says_to_do_on_the_stub(n):
    fn, names, _, _, _ = EXERCISES[n]
    result = fn(*[stub] * len(names))
    assert result.status == "to do" and "NotImplementedError" in result.message


@pytest.mark.parametrize("n", EXERCISES)
def test_check_fails_on_a_planted_mistake_and_says_why(n):
    result = EXERCISES[n][0](*EXERCISES[n][MISTAKE])
    assert result.status == "failed" and "raised" not in result.message, result


@pytest.mark.parametrize("n", EXERCISES)
def test_check_refuses_the_modules_own_answer(n):
    result = EXERCISES[n][0](*EXERCISES[n][ANSWER])
    assert result.status == "refused" and not result.passed, result
    assert ("causal_forcing." in result.message or "in one call" in result.message), result


# --- the usual mistakes, each named for what it is ----------------------------------------------------


def _variant(fn, old: str, new: str):
    """fn with one piece of its source replaced: a mistake made from a reference solution."""
    src = inspect.getsource(fn)
    assert old in src, (old, fn.__name__)
    space = {"torch": torch}
    exec(src.replace(old, new), space)
    return space[fn.__name__]


def test_the_mask_mistakes_are_named():
    assert "of its own chunk" in check.block_causal_mask(frame_causal_mask).message
    assert "transposed" in check.block_causal_mask(lambda F, c: sol.block_causal_mask(F, c).T.contiguous()).message
    assert "copy the answer" in check.teacher_forcing_mask(tf_mask_sees_own_clean).message

    def interleaved(F, c):
        order = torch.stack([torch.arange(F), torch.arange(F) + F], 1).flatten()
        return sol.teacher_forcing_mask(F, c)[order][:, order]
    assert "interleave clean and noisy" in check.teacher_forcing_mask(interleaved).message


def test_the_flow_and_streaming_mistakes_are_named():
    assert "sign of the velocity term" in check.flow_matching(x0_sign_flipped, sol.euler_step).message
    assert "did not see the earlier chunks" in check.kv_cache_streaming(forward_without_start_frame).message
    two = _variant(sol.forward_chunk_by_chunk, "c = model.cfg.chunk_frames", "c = 2")  # a hard-coded chunk size
    assert "model.cfg.chunk_frames" in check.kv_cache_streaming(two).message
    assert check.kv_cache_streaming(lambda model, x, t: model.forward(x, t)).status == "refused"


def test_the_dmd_mistakes_are_named():
    assert "wrong sign" in check.dmd_gradient(lambda x, real, fake: -sol.dmd_gradient(x, real, fake)).message
    assert "whole batch" in check.dmd_gradient(dmd_gradient_batch_norm).message
    per_frame = _variant(sol.dmd_gradient, "range(1, x.dim())", "range(2, x.dim())")
    assert "per frame" in check.dmd_gradient(per_frame).message
    fake_norm = _variant(sol.dmd_gradient, "(x - x0_real).abs()", "(x - x0_fake).abs()")
    assert "|x - x0_fake|" in check.dmd_gradient(fake_norm).message
    assert check.dmd_gradient(lambda x, real, fake: (fake - real) / ((x - real).abs().mean(
        dim=(1, 2, 3, 4), keepdim=True) + 1e-8)).passed  # an epsilon in the normaliser is the same answer
    assert "detach" in check.dmd_surrogate_loss(dmd_loss_not_detached).message
    assert "times grad / numel" in check.dmd_surrogate_loss(lambda x, g: ((x - (x - g).detach()) ** 2).mean()).message
    flipped = check.dmd_surrogate_loss(lambda x, g: 0.5 * ((x - (x + g).detach()) ** 2).mean()).message
    assert "sign is flipped" in flipped and "right way" not in flipped

    def on_a_copy(x, grad):
        y = x.detach().requires_grad_()
        return 0.5 * ((y - (y - grad).detach()) ** 2).mean()
    assert "does not depend on x" in check.dmd_surrogate_loss(on_a_copy).message

    def modified_in_place(x, grad):
        loss = 0.5 * (x.pow(2) - (x.pow(2) - grad).detach()).pow(2).mean()
        with torch.no_grad():
            x.add_(0.0)  # autograd finds out only when the check differentiates
        return loss
    message = check.dmd_surrogate_loss(modified_in_place).message
    assert "autograd could not differentiate" in message and "raised" not in message


def test_the_ode_pair_mistakes_are_named():
    assert "free-running" in check.ar_ode_pairs(ar_pairs_own_context).message
    leaked = _variant(sol.ar_ode_pairs, "clean[:, :start]", "clean[:, :frames.stop]")
    assert "own clean frames" in check.ar_ode_pairs(leaked).message

    def whole_clip(toy, eps, sigmas, chunk_frames, clean):  # the bidirectional teacher
        x = eps.double()
        for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
            x = x + toy.exact_velocity(x, s) * (s_next - s)
        return x
    assert "bidirectional" in check.ar_ode_pairs(whole_clip).message
    low = _variant(sol.ar_ode_pairs, "eps[:, frames].double()", "eps[:, frames].float()")
    assert "float32 precision" in check.ar_ode_pairs(low).message


def test_the_floor_mistakes_are_named():
    assert "should be exactly 0" in check.injectivity_floor(floor_sees_up_to_frame).message
    std = _variant(sol.injectivity_floor, ".var(dim=1)", ".std(dim=1)")
    assert "standard deviation" in check.injectivity_floor(std).message
    biased = _variant(sol.injectivity_floor, ".var(dim=1)", ".var(dim=1, correction=0)")
    assert "inner - 1" in check.injectivity_floor(biased).message
    no_rng = _variant(sol.injectivity_floor, "generator=rng", "generator=None")
    assert "never drew from the generator" in check.injectivity_floor(no_rng).message

    def chunk_averaged(flow_map, frames, chunk_frames, outer, inner, rng=None):
        floor = sol.injectivity_floor(flow_map, frames, chunk_frames, outer, inner, rng)
        return floor.reshape(-1, chunk_frames).mean(1).repeat_interleave(chunk_frames)
    assert "same for every frame of a chunk" in check.injectivity_floor(chunk_averaged).message


def test_a_crash_in_the_students_function_is_named_as_its_own():
    result = check.dmd_gradient(lambda x, real, fake: x.reshape(7, -1))
    assert result.status == "failed" and result.message.startswith("dmd_gradient raised RuntimeError")


# --- the notebook, with the stubs filled in ---------------------------------------------------------


def _execute(nb, cwd: str) -> None:
    nbclient = pytest.importorskip("nbclient")
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": cwd}})
    client.execute()


def _run_notebook(fill: dict, cwd: str = os.path.dirname(NOTEBOOK)) -> tuple[list, str]:
    """Executes the notebook in folder `cwd` with each exercise's stub cell (tagged "exercise-N") replaced
    by `fill[N]` (source code). Returns the Result lines its check cells displayed and the output of
    its last cell (every check on the reference solutions)."""
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        tags = [t for t in cell.metadata.get("tags", []) if t.startswith("exercise-")]
        if tags and int(tags[0].split("-")[1]) in fill:
            cell.source = fill[int(tags[0].split("-")[1])]
    _execute(nb, cwd)
    lines = []
    for cell in nb.cells:
        if "check" in cell.metadata.get("tags", []):
            text = "".join(o.get("data", {}).get("text/plain", "") for o in cell.get("outputs", []))
            lines.append(text.strip("'\""))
    return lines, "".join(o.get("text", "") for o in nb.cells[-1].get("outputs", []))


def _filled(column: int) -> dict:
    """Source for every exercise cell: the SOLUTION, MISTAKE or ANSWER column of EXERCISES, each
    function under the stub's name."""
    def renamed(fn, name):
        return inspect.getsource(fn).replace(f"def {fn.__name__}(", f"def {name}(", 1)
    return {n: "import torch\n\n" + "\n\n".join(renamed(fn, name) for fn, name in zip(row[column], row[1]))
            for n, row in EXERCISES.items()}


@pytest.mark.slow
def test_notebook_as_committed_says_to_do_and_shows_the_solutions_passing():
    lines, last = _run_notebook({}, cwd=os.path.join(ROOT, "docs"))  # started from another folder of the repository
    assert len(lines) == len(EXERCISES) and all("TO DO" in line for line in lines), lines
    assert last.count("PASSED") == len(EXERCISES), last


@pytest.mark.slow
def test_notebook_checks_pass_with_the_solutions_and_fail_with_the_mistakes():
    lines, _ = _run_notebook(_filled(SOLUTION))
    assert len(lines) == len(EXERCISES) and all("PASSED" in line for line in lines), lines
    lines, _ = _run_notebook(_filled(MISTAKE))
    assert len(lines) == len(EXERCISES) and all("FAILED" in line for line in lines), lines


@pytest.mark.slow
def test_notebook_refuses_the_modules_answers_started_outside_the_repository(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", ROOT)  # the repository is found where causal_forcing is imported from
    lines, _ = _run_notebook(_filled(ANSWER), cwd=str(tmp_path))
    assert len(lines) == len(EXERCISES) and all("REFUSED" in line for line in lines), lines


@pytest.mark.slow
def test_notebook_outside_the_repository_says_where_it_looked(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells = [next(c for c in nb.cells if c.cell_type == "code")]  # the cell that finds the repository
    with pytest.raises(Exception, match="causal_forcing.py"):
        _execute(nb, str(tmp_path))
