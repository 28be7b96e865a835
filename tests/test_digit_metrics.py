"""The digit table's metrics score the frames as a figure shows them, motion inside chunks is told
apart from jumps, the data row is class-balanced, the student's "ode" re-noising is an Euler step, and
examples/digit_probe.py scores the run's own sampler as the table does."""

import json
import os

import pytest
import torch

import causal_forcing as cf

SHIPPED_RUN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "mnist_run")


def moving_square(frames=6, size=16, jump_at=()):
    """One bright 4x4 square on a dark frame, moving one pixel right per frame, or only at `jump_at`."""
    video, x = -torch.ones(2, frames, 1, size, size), 2
    for f in range(frames):
        if f and (not jump_at or f in jump_at):
            x += 1 if not jump_at else 3
        video[:, f, 0, 6:10, x:x + 4] = 1.0
    return video


def test_digit_metrics_score_the_frames_as_displayed():
    """Frames pushed beyond [-1, 1] score as the same frames clamped; out_of_range tells them apart."""
    torch.manual_seed(0)
    classifier = cf.DigitClassifier(16).eval()
    held_out = moving_square()
    shown = moving_square() * 0.9
    pushed = shown.clone()
    pushed[shown < -0.85] = -1.3  # the background 0.3 below the range, as a generator's often is
    pushed[shown > 0.85] = 1.1
    labels = torch.zeros(2, 1, dtype=torch.long)
    a = cf.digit_metrics(pushed, labels, held_out, classifier, chunk_frames=2)
    b = cf.digit_metrics(pushed.clamp(-1, 1), labels, held_out, classifier, chunk_frames=2)
    for key in a:
        if key not in ("out_of_range", "overshoot"):
            assert a[key] == pytest.approx(b[key], nan_ok=True, rel=1e-12), key
    assert b["out_of_range"] == 0 and b["overshoot"] == 0
    assert a["out_of_range"] == pytest.approx(float((pushed.abs() > 1).double().mean()))
    assert a["overshoot"] == pytest.approx(float((pushed.abs() - 1)[pushed.abs() > 1].mean()), rel=1e-6)


def test_motion_within_chunks_does_not_count_jumps():
    """A square that moves only as a chunk starts has a dynamic degree but no motion inside chunks;
    one that moves steadily has the same motion inside chunks as the held-out clip it is."""
    classifier = cf.DigitClassifier(16).eval()
    steady = moving_square()
    jumping = moving_square(jump_at=(2, 4))  # chunks of 2: frames 2 and 4 start chunks
    m = cf.digit_metrics(jumping, None, steady, classifier, chunk_frames=2)
    assert m["motion_within_chunks"] == 0 and m["dynamic_degree"] > 1
    assert m["chunk_boundary_jump"] == float("inf") or m["chunk_boundary_jump"] > 100
    same = cf.digit_metrics(steady, None, steady, classifier, chunk_frames=2)
    assert same["motion_within_chunks"] == pytest.approx(1.0) and same["dynamic_degree"] == pytest.approx(1.0)


def test_balanced_digit_videos_ask_for_every_digit_alike():
    cfg = cf.get_config("mnist").data
    images = torch.randint(0, 255, (50, 28, 28), dtype=torch.uint8)
    labels = torch.arange(50) % 10
    videos, got = cf.balanced_digit_videos(cfg, 23, (images, labels), torch.Generator().manual_seed(0))
    assert videos.shape == (23, cfg.frames, 1, cfg.canvas, cfg.canvas)
    assert torch.equal(got[:, 0], torch.arange(23) % 10)


def test_ode_renoise_is_an_euler_step_of_the_student():
    """renoise="ode" re-noises x0 with the noise the model predicts: the student's own Euler ODE
    along its sigmas, ending with the x0 prediction at the last one; "fresh" draws new noise."""
    cfg = cf.get_config("toy2d", frames=2, chunk_frames=2)
    model = cf._random_weights(cf.CausalDiT(cfg.model, causal=True).double())
    sigmas = [1.0, 0.8, 0.5]
    x = torch.randn(3, 2, 2, 1, 1, dtype=torch.float64)
    got = cf.denoise_chunk(model, x, sigmas, None, None, 0, renoise="ode")
    y = x
    for s, s_next in zip(sigmas, sigmas[1:]):
        y = y + (s_next - s) * model(y, torch.full((3, 2), s))
    t = torch.full((3, 2), sigmas[-1])
    # float64 maths; the sampler's noise-level tensor is float32 (what the network takes): agreement to ~1e-8
    torch.testing.assert_close(got, cf.x0_from_velocity(y, model(y, t), t), rtol=1e-6, atol=1e-6)
    fresh = cf.denoise_chunk(model, x, sigmas, None, None, 0, rng=torch.Generator().manual_seed(0))
    assert not torch.allclose(fresh, got)
    with pytest.raises(ValueError, match="renoise"):
        cf.stream(model.float(), sigmas, num_frames=2, batch_size=1, renoise="ddim")
    with pytest.raises(ValueError, match="renoise='ODE' must be 'fresh' or 'ode'"):
        cf.denoise_chunk(model, x, sigmas, None, None, 0, renoise="ODE")


def test_digit_probe_on_the_shipped_run(tmp_path, capsys):
    """Both re-noisings of every student, the run's own one as the table samples it, and each DMD
    generator beside its init."""
    from examples import digit_probe

    assert digit_probe.main(["--run", SHIPPED_RUN, "--videos", "12", "--out", str(tmp_path / "p.json")]) == 0
    report = json.loads((tmp_path / "p.json").read_text())
    cfg = cf.run_config(SHIPPED_RUN, device="cpu")
    models = cf.load_models(SHIPPED_RUN, cfg)
    labels = torch.arange(12)[:, None] % 10
    held_out = cf.digit_videos(cfg.data, cfg.data.test_size, cf.digit_split(cfg.data)["test"],
                               torch.Generator().manual_seed(0))[0]
    as_table = cf.sample_row("causal_forcing", models["causal_forcing"], cfg, 12, cf.label_cond(labels),
                             rng=torch.Generator().manual_seed(0))
    expected = cf.digit_metrics(as_table, labels, held_out, models["digit_classifier"], cfg.model.chunk_frames)
    got = report["renoise"]["causal_forcing"][cfg.sample.renoise]
    assert got == pytest.approx({k: (None if v != v else v) for k, v in expected.items()})
    fresh, ode = (report["renoise"]["causal_forcing"][m] for m in ("fresh", "ode"))
    assert fresh["motion_within_chunks"] != ode["motion_within_chunks"]
    assert set(report["renoise"]) == set(digit_probe.STUDENTS) and set(report["dmd"]) == set(digit_probe.DMD_FROM)
    assert set(report["dmd"]["causal_forcing"]) == {"ode_student_from_ar", "causal_forcing"}
    assert "motion inside chunks" in capsys.readouterr().out


def test_digit_probe_refuses_a_run_that_is_not_of_moving_digits(tmp_path, capsys):
    from examples import digit_probe

    cfg = cf.get_config("toy2d", device="cpu")
    cf.save_atomic(cfg.to_dict(), str(tmp_path / "config.json"))
    torch.save({}, tmp_path / "models.pt")
    with pytest.raises(SystemExit):
        digit_probe.main(["--run", str(tmp_path), "--out", str(tmp_path / "p.json")])
    err = capsys.readouterr().err
    assert f"is a {cfg.data.dataset} run; re-noising and DMD probes are measured on moving digits" in err
    assert not (tmp_path / "p.json").exists()
