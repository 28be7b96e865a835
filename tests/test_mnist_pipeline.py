"""The moving-digit pipeline: label conditioning, guided AR sampling through the cache, the metrics'
closed forms, stage checkpoints and resuming, and a tiny end-to-end run."""

import json
import math
import os

import pytest
import torch

import causal_forcing as cf
from examples import figures
from examples import long_stream

# every stage runs a few steps on a 1-layer model: the whole pipeline in seconds
TINY = dict(train_size=64, test_size=40, base_steps=4, teacher_steps=4, ode_steps=4, dmd_steps=4, classifier_steps=4,
            ode_pairs=16, batch_size=8, eval_samples=20, teacher_solver_steps=4, device="cpu", num_layers=1,
            checkpoint_every=1, gen_update_ratio=2, ema_start_step=1, cd_steps=4)


def test_mnist_preset_and_its_checks():
    cfg = cf.get_config("mnist")
    assert cfg.data.dataset == "moving_digits" and (cfg.model.height, cfg.model.width) == (16, 16)
    assert cfg.model.cond_dim == 10 and cfg.model.chunk_frames == 2
    with pytest.raises(ValueError, match="moving digits are 1x16x16 frames"):
        cf.get_config("mnist", height=32)
    with pytest.raises(ValueError, match="cond_dim=7 must be 10"):
        cf.get_config("mnist", cond_dim=7)
    with pytest.raises(ValueError, match="dataset='cifar'"):
        cf.get_config("mnist", dataset="cifar")
    with pytest.raises(ValueError, match="num_digits=2: the pipeline's label conditions"):
        cf.get_config("mnist", num_digits=2)
    with pytest.raises(ValueError, match="canvas=20 must be a multiple of 8"):
        cf.get_config("mnist", canvas=20, height=20, width=20, patch_size=4)
    with pytest.raises(ValueError, match="checkpoint_every=0 must be >= 1"):
        cf.get_config("mnist", checkpoint_every=0)


def test_label_cond_and_dropout():
    c = cf.label_cond(torch.tensor([3, 0, 9]))
    assert c.shape == (3, 1, 10) and torch.equal(c.argmax(-1)[:, 0], torch.tensor([3, 0, 9])) and torch.equal(c.sum(-1), torch.ones(3, 1))
    with pytest.raises(ValueError, match="labels must lie in"):
        cf.label_cond(torch.tensor([10]))
    many = cf.label_cond(torch.arange(4000) % 10)
    dropped = cf.drop_cond(many, 0.25, torch.Generator().manual_seed(0))
    null = dropped.sum((1, 2)) == 0
    assert abs(null.double().mean().item() - 0.25) < 0.03  # the null condition, at the dropout rate
    assert torch.equal(dropped[~null], many[~null])  # the rest untouched
    assert cf.drop_cond(many, 0.0) is many


@pytest.mark.parametrize("negative", [False, True])
def test_guided_ar_teacher_through_the_cache_matches_recomputing_the_prefix(negative):
    """CFG with a KV cache of 2B rows (conditional rows, then unconditional) is the same sampler as
    running the guided model on [clean prefix at t = 0 ; chunk] for every step, without a cache;
    also against a negative prompt (uncond), which the cache's unconditional rows must hold."""
    cfg = cf.get_config("mnist", device="cpu", num_layers=2, frames=6, teacher_solver_steps=4)
    model = cf.CausalDiT(cfg.model, causal=True).double()
    for p in model.parameters():  # adaLN-Zero starts as the identity; make every path matter
        p.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(1)) if p.dim() > 1 else None
    cond = cf.label_cond(torch.tensor([2, 7, 5])).double()
    uncond = torch.full((1, 1, 10), 0.3, dtype=torch.float64) if negative else None
    torch.set_default_dtype(torch.float64)
    try:
        got = cf.sample_ar_teacher(model, cf.solver_sigmas(4, cfg.sample), batch_size=3, num_frames=6, cond=cond,
                                   guidance=3.0, uncond=uncond, rng=torch.Generator().manual_seed(0))
        plain = cf.sample_ar_teacher(model, cf.solver_sigmas(4, cfg.sample), batch_size=3, num_frames=6, cond=cond,
                                     guidance=3.0, rng=torch.Generator().manual_seed(0))
        g, sig, done = torch.Generator().manual_seed(0), cf.solver_sigmas(4, cfg.sample), []
        for start in range(0, 6, 2):
            x = torch.randn(3, 2, 1, 16, 16, generator=g)

            def on_prefix(x_, t_, c_, **kw):  # the doubled batch carries the prefix twice
                prefix = torch.cat(done, 1) if done else x_[:, :0]
                prefix = torch.cat([prefix, prefix]) if done else prefix
                t_all = torch.cat([torch.zeros(len(x_), prefix.shape[1]), t_], 1)
                return model(torch.cat([prefix, x_], 1), t_all, c_)[:, prefix.shape[1]:]
            vel = lambda x_, s: cf.guided_velocity(on_prefix, x_, torch.full(x_.shape[:2], s), cond, 3.0, uncond)  # noqa: E731
            done.append(cf.euler_ode(vel, x, sig)[0])
        with pytest.raises(ValueError, match="uncond"):  # (under the model's dtype: else that is the first error)
            cf.sample_ar_teacher(model, cf.solver_sigmas(4, cfg.sample), batch_size=3, num_frames=6, cond=cond,
                                 guidance=3.0, uncond=torch.zeros(2, 1, 10, dtype=torch.float64))
    finally:
        torch.set_default_dtype(torch.float32)
    assert torch.allclose(got, torch.cat(done, 1), atol=1e-10)
    assert torch.equal(got, plain) != negative  # the negative prompt matters; None is the null condition


def test_frechet_distance_closed_form():
    """Diagonal Gaussians: FD = |mu_x - mu_y|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2."""
    g = torch.Generator().manual_seed(0)
    n, a, b = 200000, torch.tensor([1.0, 4.0, 0.25]), torch.tensor([2.0, 1.0, 1.0])
    mx, my = torch.tensor([0.0, 1.0, -1.0]), torch.tensor([0.5, 1.0, 0.0])
    x = mx + a.sqrt() * torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = my + b.sqrt() * torch.randn(n, 3, generator=g, dtype=torch.float64)
    want = float((mx - my).pow(2).sum() + (a.sqrt() - b.sqrt()).pow(2).sum())
    assert cf.frechet_distance(x, y) == pytest.approx(want, abs=0.02)
    assert cf.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    # a full covariance against the same one rotated: only the rotation's effect remains, and the
    # eigendecomposition route agrees with a brute-force matrix square root
    C = torch.tensor([[2.0, 0.8], [0.8, 1.0]], dtype=torch.float64)
    L = torch.linalg.cholesky(C)
    z = torch.randn(n, 2, generator=g, dtype=torch.float64) @ L.T
    w = torch.randn(n, 2, generator=g, dtype=torch.float64)
    cz, cw = torch.cov(z.T), torch.cov(w.T)

    def sqrtm(m):
        e, v = torch.linalg.eigh(m)
        return v @ torch.diag(e.sqrt()) @ v.T
    brute = (z.mean(0) - w.mean(0)).pow(2).sum() + torch.trace(cz + cw - 2 * sqrtm(sqrtm(cz) @ cw @ sqrtm(cz)))
    assert cf.frechet_distance(z, w) == pytest.approx(float(brute), rel=1e-9)


def test_centroids_sharpness_and_dynamic_degree():
    video = -torch.ones(1, 3, 1, 8, 8)
    for f, (y, x) in enumerate([(1, 1), (1, 4), (5, 4)]):  # a 2x2 bright square that moves 3 px, then 4 px
        video[0, f, 0, y:y + 2, x:x + 2] = 1
    assert torch.allclose(cf.centroids(video)[0], torch.tensor([[1.5, 1.5], [1.5, 4.5], [5.5, 4.5]], dtype=torch.float64))
    blurred = torch.nn.functional.avg_pool2d(video[0], 3, 1, 1, count_include_pad=False)[None]
    assert cf.sharpness(blurred) < cf.sharpness(video)
    assert cf.sharpness(torch.zeros(1, 2, 1, 4, 4)) == 0.0


def test_chunk_boundary_jump_compares_change_across_and_within_chunks():
    steady = torch.arange(8, dtype=torch.float64).reshape(1, 8, 1, 1, 1).expand(3, 8, 1, 4, 4)
    assert cf.chunk_boundary_jump(steady, 2) == pytest.approx(1.0)
    steps = torch.tensor([1.0, 3, 1, 3, 1, 3, 1])  # change into frames 1..7; frames 2, 4, 6 start a chunk
    jumpy = torch.cat([torch.zeros(1), steps.cumsum(0)]).reshape(1, 8, 1, 1, 1).expand(2, 8, 1, 4, 4)
    assert cf.chunk_boundary_jump(jumpy, 2) == pytest.approx(3.0)
    assert math.isnan(cf.chunk_boundary_jump(jumpy, 1)) and math.isnan(cf.chunk_boundary_jump(jumpy, 8))


def test_digit_metrics_on_data_and_on_a_frozen_video():
    """Held-out data scores like data; a video that stands still has dynamic degree 0, and one
    whose frames disagree about the digit loses temporal consistency."""
    cfg = cf.get_config("mnist", device="cpu", classifier_steps=60)
    split = cf.digit_split(cfg.data)
    g = torch.Generator().manual_seed(0)
    videos, labels = cf.digit_videos(cfg.data, 300, split["train"], g)
    clf, losses = cf.train_classifier(cfg, videos, labels, log=None, rng=g)
    assert losses[-1] < losses[0]
    held, held_labels = cf.digit_videos(cfg.data, 100, split["test"], g)
    fresh, fresh_labels = cf.digit_videos(cfg.data, 100, split["test"], g)
    m = cf.digit_metrics(fresh, fresh_labels, held, clf)
    assert 0.8 < m["dynamic_degree"] < 1.2 and 0.8 < m["sharpness"] < 1.2
    frozen = fresh[:, :1].expand_as(fresh)
    assert cf.digit_metrics(frozen, fresh_labels, held, clf)["dynamic_degree"] == 0.0
    mixed = torch.cat([fresh[:, :4], fresh.roll(1, 0)[:, 4:]], 1)  # second half shows another video's digit
    assert cf.digit_metrics(mixed, fresh_labels, held, clf)["temporal_consistency"] < m["temporal_consistency"]


def test_batches_restore_mid_epoch():
    a = cf.Batches(10, 3, torch.Generator().manual_seed(0))
    seen = [next(a) for _ in range(4)]  # crosses an epoch (3 full batches of 10)
    b = cf.Batches(10, 3, torch.Generator().manual_seed(99))
    b.load_state_dict(a.state_dict())
    b.rng.set_state(a.rng.get_state())
    assert all(torch.equal(next(a), next(b)) for _ in range(5))
    assert len(torch.cat(seen[:3]).unique()) == 9
    with pytest.raises(ValueError, match="larger than the dataset"):
        cf.Batches(2, 3, None)


def _results_and_models(folder):
    with open(os.path.join(folder, "results.json")) as f:
        results = json.load(f)
    return results, torch.load(os.path.join(folder, "models.pt"), weights_only=True)


@pytest.mark.slow
def test_tiny_end_to_end_run_and_interrupted_runs_resume_to_the_same_result(tmp_path):
    cfg = cf.get_config("mnist", **TINY)
    full = cf.run_pipeline(cfg, str(tmp_path / "full"), log=None)
    assert set(full["rows"]) == set(cf.DIGIT_ROWS)
    for row, m in full["rows"].items():
        assert all(math.isfinite(v) for v in m.values()), row
    assert full["rows"]["causal_forcing"]["nfe_per_frame"] == pytest.approx(4 + 3 / 4)  # 4 steps + 3 refreshes of 4 chunks
    assert full["rows"]["bidirectional_teacher"]["nfe_per_frame"] == 2 * 4  # 4 guided steps
    assert full["rows"]["causal_forcing_pp"]["nfe_per_frame"] == pytest.approx(13 / 4)  # 4 + 1, 2 + 1, 2 + 1, 2 chunk calls
    figures.write_figures(str(tmp_path / "full"))  # the figures of the run folder: samples, steps, training health
    assert os.path.getsize(tmp_path / "full" / "training_health.png") > 10_000  # with the DMD rollouts
    assert os.path.getsize(tmp_path / "full" / "steps.gif") > 1000
    assert os.path.getsize(tmp_path / "full" / "samples.gif") > 1000
    models = cf.load_models(str(tmp_path / "full"), cfg)  # every row, and the digit reader behind the metrics
    assert set(models) == set(cf.DIGIT_ROWS) | {"digit_classifier"}
    assert isinstance(models["digit_classifier"], cf.DigitClassifier)

    # interrupt four times: in the base's first step (before any checkpoint: the stage restarts
    # after loading the classifier, whose model building must not shift the random numbers), in
    # the AR teacher mid-way, in DMD after its EMA has started, and in consistency distillation
    # (its EMA student is part of the checkpoint); re-run the same call each time: finished stages
    # load, the interrupted one resumes from its checkpoint
    class Stop(Exception):
        pass
    for stop_at, partials in (("[base] step     1/", 0), ("[ar teacher, teacher forcing] step     3/", 1),
                              ("[dmd critic] step     3/", 1), ("[consistency distillation] step     3/", 1)):
        def log(msg, stop_at=stop_at):
            if msg.strip().startswith(stop_at):
                raise Stop(msg)
        with pytest.raises(Stop):
            cf.run_pipeline(cfg, str(tmp_path / "resumed"), log=log)
        partial = [p for p in os.listdir(tmp_path / "resumed" / "stages") if p.endswith(".partial.pt")]
        assert len(partial) == partials, partial
    messages = []
    resumed = cf.run_pipeline(cfg, str(tmp_path / "resumed"), log=messages.append)
    assert any("finished earlier" in m for m in messages)
    for row, m in full["rows"].items():  # every metric identical; only the wall time differs
        assert {k: v for k, v in resumed["rows"][row].items() if k != "ms_per_frame"} == \
            {k: v for k, v in m.items() if k != "ms_per_frame"}, row
    a, b = _results_and_models(tmp_path / "full")[1], _results_and_models(tmp_path / "resumed")[1]
    assert a.keys() == b.keys()
    for name in a:
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), (name, key)
    assert not [p for p in os.listdir(tmp_path / "resumed" / "stages") if p.endswith(".partial.pt")]


def test_a_run_folder_refuses_another_config(tmp_path):
    cfg = cf.get_config("mnist", **TINY)
    cf.save_atomic(cfg.to_dict(), str(tmp_path / "config.json"))  # what a run there writes
    cf._check_run_folder(cfg, str(tmp_path))  # the same config again: fine
    cf._check_run_folder(cf.get_config("mnist", **{**TINY, "checkpoint_every": 7}), str(tmp_path))  # no effect on results
    with pytest.raises(ValueError, match=r"another config \(differs in seed, train.base_steps\)"):
        cf._check_run_folder(cf.get_config("mnist", **{**TINY, "base_steps": 5}, seed=1), str(tmp_path))


def test_command_line_names_a_run_folder_with_another_config(tmp_path, capsys):
    cf.save_atomic(cf.get_config("toy2d", device="cpu").to_dict(), str(tmp_path / "config.json"))
    with pytest.raises(SystemExit):
        cf.main(["--out", str(tmp_path), "--seed", "1", "--device", "cpu"])
    assert "holds a run with another config (differs in seed)" in capsys.readouterr().err


@pytest.mark.slow
def test_long_stream_command_on_a_tiny_run(tmp_path, capsys):
    """The long-stream command streams a trained digit generator far past its clips through a
    rolling window and writes the per-block report, the figure and the prompt-switch GIF. Without
    a sink the live window is a run of consecutive frames, so window and absolute RoPE positions
    differ by a shift only and give the same streams (to float32 rounding); with a sink they differ."""
    cfg = cf.get_config("mnist", **{**TINY, "cd_steps": 0})
    cf.run_pipeline(cfg, str(tmp_path / "run"), log=None)
    with pytest.raises(SystemExit):
        long_stream.main(["--run", str(tmp_path / "run"), "--frames", "4"])
    assert "--frames must be >= 16" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        long_stream.main(["--run", str(tmp_path / "nothing")])
    assert "no trained digit models" in capsys.readouterr().err
    assert long_stream.main(["--run", str(tmp_path / "run"), "--frames", "24", "--batch-size", "10",
                    "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "out" / "long_stream.json").read_text())
    assert report["frames"] == 24 and report["window_frames"] == cfg.data.frames
    streams = report["streams"]
    assert set(streams) == {f"sink {s}, {p} positions" for s in (0, 2) for p in ("absolute", "window")}
    assert all(len(s["blocks"]) == 3 for s in streams.values())
    def same(a, b):  # to float32 rounding: the rotations differ in the positions they start from
        return all(x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-7) for x, y in zip(a, b) for k in x)
    assert same(streams["sink 0, absolute positions"]["blocks"], streams["sink 0, window positions"]["blocks"])
    assert not same(streams["sink 2, absolute positions"]["blocks"], streams["sink 2, window positions"]["blocks"])
    switch = report["prompt_switch"]["policies"]
    assert set(switch) == {"keep cache", "re-cache"}
    for r in switch.values():
        assert len(r["reads_new_digit_per_frame"]) == 32 and 0 <= r["videos_reaching_new_digit"] <= 1
    assert os.path.getsize(tmp_path / "out" / "long_stream.png") > 1000
    assert os.path.getsize(tmp_path / "out" / "prompt_switch.gif") > 1000


def test_stream_video_switches_only_at_chunk_boundaries():
    cfg = cf.get_config("mnist", **{**TINY, "frames": 6})
    model = cf.CausalDiT(cfg.model)
    with pytest.raises(ValueError, match=r"switch frames \[3\] must be chunk boundaries"):
        long_stream.stream_video(model, cf.student_sigmas(cfg.sample), num_frames=6, batch_size=1,
                        cond=cf.label_cond(torch.tensor([[1]])), switches={3: cf.label_cond(torch.tensor([[2]]))})
    with pytest.raises(ValueError, match="rope_positions='relative'"):
        long_stream.windowed(model, 4, 0, "relative")
