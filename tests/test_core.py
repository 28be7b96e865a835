"""Core tests: two code paths that must agree do agree, causality holds, closed forms match their
formulas, bad input gets a clear error. Everything runs on a CPU in seconds."""

import json
import math
import os

import pytest
import torch

import causal_forcing as cf
from examples import bench
from examples import figures
from examples import long_stream


def random_model(causal=True, dtype=torch.float64, seed=0, **overrides):
    """A small model with every parameter random: zero-initialised gates would make the network
    output 0 and every equivalence test vacuous."""
    cfg = cf.get_config("toy2d", **{"num_layers": 2, "dim": 48, "num_heads": 4, "ffn_dim": 64, **overrides})
    torch.manual_seed(seed)
    model = cf.CausalDiT(cfg.model, causal=causal).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model, cfg


def checked(model):
    """The model's forward behind check_inputs, as a hand-made call is checked."""
    def call(x, t, cond=None, **kw):
        cf.check_inputs(model, x, t, cond, **kw)
        return model(x, t, cond, **kw)
    return call


def video(model, batch, frames, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    c = model.cfg
    x = torch.randn(batch, frames, c.in_channels, c.height, c.width, generator=g, dtype=dtype)
    t = torch.rand(batch, frames, generator=g, dtype=dtype)
    return x, t


# --- config ------------------------------------------------------------------------------------


def test_overrides_reach_any_section():
    cfg = cf.get_config("toy2d", chunk_frames=2, frames=6, base_lr=1e-3, shift=3, eval_samples=10)
    assert (cfg.model.chunk_frames, cfg.data.frames, cfg.train.base_lr) == (2, 6, 1e-3)
    assert cfg.sample.shift == 3.0 and isinstance(cfg.sample.shift, float)
    assert cfg.eval.eval_samples == 10


def test_unknown_and_ill_typed_overrides_are_named():
    with pytest.raises(ValueError, match="unknown config key 'chunk_frame'.*chunk_frames"):
        cf.get_config("toy2d", chunk_frame=2)
    with pytest.raises(ValueError, match="frames=2.5"):
        cf.get_config("toy2d", frames=2.5)
    with pytest.raises(ValueError, match="teacher_steps=True"):
        cf.get_config("toy2d", teacher_steps=True)
    with pytest.raises(ValueError, match="unknown config 'nope'"):
        cf.get_config("nope")
    with pytest.raises(ValueError, match="num_heads"):
        cf.get_config("toy2d", dim=50)
    with pytest.raises(ValueError, match="window_frames"):
        cf.get_config("toy2d", chunk_frames=2, window_frames=3, sink_frames=2)


@pytest.mark.parametrize("key,steps", [("denoising_steps", (250, 500, 750, 1000)), ("denoising_steps", (1000, 1000)),
                                       ("pp_denoising_steps", (500, 1000))])
def test_denoising_steps_must_descend_as_the_samplers_require(key, steps):
    with pytest.raises(ValueError, match=f"{key}=.* strictly descending"):
        cf.get_config("toy2d", **{key: steps})


@pytest.mark.parametrize("overrides", [dict(dim=1_000_000_000), dict(ffn_dim=10**12), dict(num_layers=10**9)])
def test_a_model_too_big_for_any_machine_is_refused_before_it_is_built(overrides):
    with pytest.raises(ValueError, match="parameters"):
        cf.get_config("toy2d", **overrides)
    assert cf.get_config("wan-14b", device="cpu").model.dim == 5120  # the largest real model passes


@pytest.mark.parametrize("overrides,match", [
    (dict(train_size=50, batch_size=32), r"cd_batch_size=64 must be <= train_size=50"),  # the preset's CD batch
    (dict(freq_dim=3), r"freq_dim=3 must be an even number >= 2"), (dict(floor_inner=1), r"floor_inner=1 must be >= 2"),
    (dict(num_starts=0), r"num_starts=0 must be >= 1"), (dict(text_len=-5), r"text_len=-5 must be >= 1"),
    (dict(digit_size=0), r"digit_size=0 must be >= 1")])
def test_values_that_would_fail_late_or_quietly_are_refused_by_get_config(overrides, match):
    with pytest.raises(ValueError, match=match):
        cf.get_config("toy2d", **overrides)


def test_misspelt_kinds_and_modes_are_refused_not_trained_as_the_other_variant():
    cfg = cf.get_config("toy2d", num_layers=1, dim=24, num_heads=2, ffn_dim=32, device="cpu")
    base, data = cf.CausalDiT(cfg.model, causal=False), torch.randn(8, cfg.data.frames, 2, 1, 1)
    with pytest.raises(ValueError, match="mode='teacher-forcing' must be 'teacher_forcing' or 'diffusion_forcing'"):
        cf.train_ar_teacher(cfg, base, data, mode="teacher-forcing", log=None)
    pairs = {"xt": torch.zeros(2, 4, cfg.data.frames, 2, 1, 1), "x0": torch.zeros(2, cfg.data.frames, 2, 1, 1),
             "clean": torch.zeros(2, cfg.data.frames, 2, 1, 1)}
    for call in (lambda: cf.ode_pair_batch(pairs, slice(None), 0, cf.student_sigmas(cfg.sample), "AR"),
                 lambda: cf.train_ode_student(cfg, base, pairs, "AR", log=None)):
        with pytest.raises(ValueError, match="kind must be 'ar' or 'bidirectional', got 'AR'"):
            call()
    with pytest.raises(ValueError, match="strictly descending"):
        cf.student_sigmas(cfg.sample, (250, 1000))  # e.g. train_dmd(steps=...)


def test_the_stages_check_their_data_and_conditions_before_any_work():
    cfg = cf.get_config("toy2d", num_layers=1, dim=24, num_heads=2, ffn_dim=32, base_steps=2, device="cpu")
    base, data = cf.CausalDiT(cfg.model, causal=False), torch.randn(8, cfg.data.frames, 2, 1, 1)
    with pytest.raises(ValueError, match=r"no conditioning \(cond_dim=0\) but cond was given"):
        cf.train_base(cfg, data, log=None, cond=torch.randn(8, 1, 10))
    bad = data.clone()
    bad[5, 2] = math.nan
    for call in (lambda: cf.train_base(cfg, bad, log=None), lambda: cf.train_ar_teacher(cfg, base, bad, log=None),
                 lambda: cf.make_ode_pairs(cfg, base, bad, "bidirectional"),
                 lambda: cf.train_consistency(cfg, base, bad, log=None)):
        with pytest.raises(FloatingPointError, match="data holds NaN"):
            call()
    digits = cf.get_config("mnist", num_layers=1, dim=24, num_heads=2, ffn_dim=32, device="cpu")
    model, clips = cf.CausalDiT(digits.model, causal=False), torch.zeros(8, digits.data.frames, 1, 16, 16)
    with pytest.raises(ValueError, match=r"cond must have shape \(8, L, 10\), got \(6, 1, 10\)"):
        cf.train_ar_teacher(digits, model, clips, log=None, cond=torch.zeros(6, 1, 10))


def test_ode_pairs_made_for_other_student_sigmas_are_refused():
    cfg = cf.get_config("toy2d", num_layers=1, dim=24, num_heads=2, ffn_dim=32, device="cpu")
    two = cf.get_config("toy2d", num_layers=1, dim=24, num_heads=2, ffn_dim=32, denoising_steps=(1000, 500),
                        device="cpu")
    teacher, data = cf.CausalDiT(cfg.model), torch.randn(8, cfg.data.frames, 2, 1, 1)
    pairs = cf.make_ode_pairs(two, teacher, data, "ar")  # states at 2 sigmas
    with pytest.raises(ValueError, match="the ODE pairs hold states at 2 sigmas, not at the 4 given"):
        cf.train_ode_student(cfg, teacher, pairs, "ar", log=None)


def test_a_stage_checkpoint_of_another_stage_or_length_is_refused(tmp_path):
    """A checkpoint path met again by another stage (or the same stage with other step counts) must not be resumed:
    the stage would start from the other one's weights, optimizer and random state."""
    cfg = cf.get_config("toy2d", num_layers=1, dim=24, num_heads=2, ffn_dim=32, base_steps=5, teacher_steps=5,
                        batch_size=4, device="cpu")
    data, path = torch.randn(8, cfg.data.frames, 2, 1, 1), str(tmp_path / "stage.partial.pt")
    base, _ = cf.train_base(cfg, data, log=None, ckpt=cf.StageCheckpoint(path, every=2))  # leaves its step 4
    with pytest.raises(ValueError, match=r"is of stage \('base', 5\), not \('ar teacher, teacher forcing', 5\)"):
        cf.train_ar_teacher(cfg, base, data, log=None, ckpt=cf.StageCheckpoint(path, every=2))
    shorter = cf.get_config("toy2d", num_layers=1, dim=24, num_heads=2, ffn_dim=32, base_steps=3, batch_size=4,
                            device="cpu")
    with pytest.raises(ValueError, match=r"is of stage \('base', 5\), not \('base', 3\)"):
        cf.train_base(shorter, data, log=None, ckpt=cf.StageCheckpoint(path, every=2))


def test_a_teacher_is_refused_sigmas_that_stop_short_of_clean_frames_and_a_cache_too_small_for_a_stream():
    model, cfg = random_model(dtype=torch.float32)
    with pytest.raises(ValueError, match="a teacher's sigmas must end at 0"):
        cf.sample_bidirectional(model, cf.student_sigmas(cfg.sample), batch_size=1, num_frames=2)
    with pytest.raises(ValueError, match="a teacher's sigmas must end at 0"):
        cf.sample_ar_teacher(model, [1.0], batch_size=1, num_frames=2)
    with pytest.raises(ValueError, match=r"6 frames do not fit this KV cache \(max_frames=4\)"):
        cf.stream(model, [1.0], num_frames=6, batch_size=1, kv_cache=model.new_kv_cache(1, max_frames=4))
    with pytest.raises(ValueError, match="sink_frames=-2 must be >= 0"):
        model.new_kv_cache(1, window_frames=4, sink_frames=-2)
    sig = cf.solver_sigmas(4, cfg.sample)
    with pytest.raises(ValueError, match=r"noise must have shape \(1, 2, 2, 1, 1\), got \(1, 3, 2, 1, 1\)"):
        cf.sample_bidirectional(model, sig, batch_size=1, num_frames=2, noise=torch.randn(1, 3, 2, 1, 1))
    with pytest.raises(FloatingPointError, match="noise holds NaN"):
        cf.sample_bidirectional(model, sig, batch_size=1, num_frames=2, noise=torch.full((1, 2, 2, 1, 1), math.nan))


@pytest.mark.parametrize("seed", [-1, 2**63, 2**64])
def test_seeds_outside_torchs_range_are_refused(seed):
    with pytest.raises(ValueError, match=r"seed=.* must lie in \[0, 2\*\*63 - 1\]"):
        cf.get_config("toy2d", seed=seed)
    assert cf.get_config("toy2d", seed=2**63 - 1).seed == 2**63 - 1


@pytest.mark.parametrize("overrides", [dict(dataset="x" * 100_000), dict(frames="x" * 100_000),
                                       dict(device="x" * 100_000), dict(denoising_steps=(1,) * 100_000),
                                       {"x" * 100_000: 1}])
def test_a_huge_value_is_cut_short_in_the_error(overrides):
    with pytest.raises(ValueError) as e:
        cf.get_config("toy2d", **overrides)
    assert len(str(e.value)) < 3000


# --- KV cache vs full forward ------------------------------------------------------------------


@pytest.mark.parametrize("chunk,frames", [(1, 5), (2, 6), (3, 7)])
def test_kv_cache_streaming_equals_full_causal_forward(chunk, frames):
    model, _ = random_model(chunk_frames=chunk)
    x, t = video(model, 3, frames)
    full = model(x, t)
    cache = model.new_kv_cache(3, max_frames=frames)
    outs = []
    for start in range(0, frames, chunk):
        sl = slice(start, start + chunk)
        # a first pass with other inputs, then the real one: re-denoising overwrites the slots
        model(torch.randn_like(x[:, sl]), 0.5 * t[:, sl], kv_cache=cache, start_frame=start)
        outs.append(model(x[:, sl], t[:, sl], kv_cache=cache, start_frame=start))
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=0, atol=1e-10)


def test_kv_cache_with_multi_token_frames_and_conditioning():
    model, _ = random_model(chunk_frames=2, in_channels=3, height=4, width=4, patch_size=2, cond_dim=5)
    x, t = video(model, 2, 6)
    cond = torch.randn(2, 3, 5, dtype=torch.float64)
    full = model(x, t, cond)
    cache = model.new_kv_cache(2, max_frames=6)
    streamed = torch.cat([model(x[:, s:s + 2], t[:, s:s + 2], cond, kv_cache=cache, start_frame=s)
                          for s in range(0, 6, 2)], 1)
    torch.testing.assert_close(streamed, full, rtol=0, atol=1e-10)
    assert full.shape == x.shape


def test_several_chunks_in_one_cached_call_keep_block_causality():
    model, _ = random_model(chunk_frames=2)
    x, t = video(model, 2, 8)
    cache = model.new_kv_cache(2, max_frames=8)
    a = model(x[:, :2], t[:, :2], kv_cache=cache, start_frame=0)
    b = model(x[:, 2:8], t[:, 2:8], kv_cache=cache, start_frame=2)
    torch.testing.assert_close(torch.cat([a, b], 1), model(x, t), rtol=0, atol=1e-10)


@pytest.mark.parametrize("chunk,window,sink", [(1, 3, 1), (2, 6, 2), (2, 4, 0)])
def test_rolling_window_equals_banded_mask(chunk, window, sink):
    frames = 12
    model, _ = random_model(chunk_frames=chunk, window_frames=window, sink_frames=sink)
    x, t = video(model, 2, frames)
    full = model(x, t)  # the config's window makes the full forward use the banded mask
    vis = cf.frame_visibility(torch.arange(frames), torch.arange(frames), chunk, window, sink)
    assert not vis.all() and vis[-1, :sink].all()  # the band is real, and the sink is attended
    cache = model.new_kv_cache(2)
    assert cache.k.shape[3] == window  # fixed memory: W slots, whatever the length
    outs = []
    for start in range(0, frames, chunk):
        sl = slice(start, start + chunk)
        model(torch.randn_like(x[:, sl]), t[:, sl], kv_cache=cache, start_frame=start)
        outs.append(model(x[:, sl], t[:, sl], kv_cache=cache, start_frame=start))
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=0, atol=1e-10)
    # the unmasked full forward differs: the window really drops frames
    model.cfg.window_frames = None
    assert (model(x, t) - full).abs().max() > 1e-6


def _stream_frames(model, x, t, chunk):
    """Each chunk of x streamed once through a fresh cache of the model's window; the outputs."""
    cache, outs = model.new_kv_cache(x.shape[0]), []
    for start in range(0, x.shape[1], chunk):
        outs.append(model(x[:, start:start + chunk], t[:, start:start + chunk], kv_cache=cache, start_frame=start))
    return torch.cat(outs, 1)


def test_window_positions_equal_absolute_ones_until_a_frame_leaves_the_window():
    """RoPE depends on position differences only: re-indexing the live window to [0, W) changes
    nothing while the window still holds every frame since the first, and changes the output once
    frames have left it (W = 6 with a 2-frame sink, chunks of 2: frames 2 and 3 leave at frame 6)."""
    model, _ = random_model(chunk_frames=2, window_frames=6, sink_frames=2)
    x, t = video(model, 2, 12)
    absolute = _stream_frames(model, x, t, 2)
    model.cfg.rope_positions = "window"
    window = _stream_frames(model, x, t, 2)
    torch.testing.assert_close(window[:, :6], absolute[:, :6], rtol=0, atol=1e-12)
    assert (window[:, 6:] - absolute[:, 6:]).abs().amax(dim=(0, 2, 3, 4)).min() > 1e-6  # every later frame differs


def test_window_positions_make_a_chunk_independent_of_how_far_into_the_stream_it_is():
    """Under "window" positions a chunk's output is a function of the live window's content only:
    the same sink, recent frames and chunk give the same output at frame 40 as at frame 4.
    Under "absolute" positions the sink's distance grows with the stream, and the output drifts.
    (One layer: deeper layers' cached keys also carry each frame's own, different, context.)"""
    model, _ = random_model(chunk_frames=2, window_frames=6, sink_frames=2, num_layers=1)
    x, t = video(model, 1, 42, seed=3)
    short = torch.cat([x[:, :2], x[:, 38:42]], 1), torch.cat([t[:, :2], t[:, 38:42]], 1)  # sink, recent 2, chunk
    for policy, same in (("window", True), ("absolute", False)):
        model.cfg.rope_positions = policy
        far, near = _stream_frames(model, x, t, 2)[:, 40:], _stream_frames(model, *short, 2)[:, 4:]
        assert torch.allclose(far, near, rtol=0, atol=1e-12) == same, policy


def test_a_cache_keeps_the_position_policy_it_was_made_for():
    model, _ = random_model(chunk_frames=1, window_frames=3, sink_frames=1)
    cache = model.new_kv_cache(1)
    model.cfg.rope_positions = "window"  # its cache holds rotated keys; this model expects raw ones
    x, t = video(model, 1, 1)
    with pytest.raises(ValueError, match="rope_positions='absolute'"):
        checked(model)(x, t, kv_cache=cache)
    with pytest.raises(ValueError, match="rope_positions='relative' is not 'absolute' or 'window'"):
        cf.get_config("toy2d", rope_positions="relative")


def test_rolling_cache_refuses_to_go_back_past_what_it_holds():
    model, _ = random_model(chunk_frames=1, window_frames=3, sink_frames=1)
    x, t = video(model, 1, 6)
    cache = model.new_kv_cache(1)
    for s in range(6):
        model(x[:, s:s + 1], t[:, s:s + 1], kv_cache=cache, start_frame=s)
    with pytest.raises(ValueError, match="no longer in the rolling KV cache"):
        checked(model)(x[:, :1], t[:, :1], kv_cache=cache, start_frame=3)


def test_rope_has_no_table_to_overflow():
    """Rotary attention depends on relative positions only, so a clip placed at frame 10,000 (or
    a million) must give the same output as at frame 0: no table runs out, no precision is lost."""
    model, _ = random_model(chunk_frames=1)
    x, t = video(model, 2, 4)
    for start in (10_000, 1_000_000):
        torch.testing.assert_close(model(x, t, start_frame=start), model(x, t), rtol=0, atol=1e-9)
    cache = model.new_kv_cache(2, window_frames=2, sink_frames=0)
    for f in range(10_004):  # stream 10,004 frames through a rolling window: memory stays 2 slots
        if f < 10_000 - 1:
            cache.commit(f, 1)  # fast-forward the bookkeeping; the last frames are real
        else:
            model(x[:, :1], t[:, :1], kv_cache=cache, start_frame=f)
    assert cache.k.shape[3] == 2 and torch.isfinite(cache.k).all()


# --- causality -----------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 2])
def test_later_chunks_do_not_change_earlier_outputs(chunk):
    model, _ = random_model(chunk_frames=chunk)
    x, t = video(model, 2, 6)
    y = x.clone()
    y[:, 2 * chunk:] += torch.randn_like(y[:, 2 * chunk:])
    a, b = model(x, t), model(y, t)
    torch.testing.assert_close(a[:, :2 * chunk], b[:, :2 * chunk], rtol=0, atol=0)
    assert (a[:, 2 * chunk:] - b[:, 2 * chunk:]).abs().max() > 1e-3


def test_bidirectional_model_sees_the_future():
    model, _ = random_model(causal=False)
    x, t = video(model, 2, 4)
    y = x.clone()
    y[:, -1] += 1.0
    assert (model(x, t)[:, 0] - model(y, t)[:, 0]).abs().max() > 1e-3


# --- teacher forcing -----------------------------------------------------------------------------


@pytest.mark.parametrize("chunk,frames", [(1, 4), (2, 6)])
def test_teacher_forcing_equals_explicit_clean_context(chunk, frames):
    model, _ = random_model(chunk_frames=chunk)
    x, t = video(model, 2, frames)
    clean = torch.randn_like(x)
    tf = model(x, t, clean_context=clean)
    for start in range(0, frames, chunk):
        sl = slice(start, start + chunk)
        seq = torch.cat([clean[:, :start], x[:, sl]], 1)
        tt = torch.cat([torch.zeros_like(t[:, :start]), t[:, sl]], 1)
        torch.testing.assert_close(tf[:, sl], model(seq, tt)[:, start:], rtol=0, atol=1e-10)


def test_teacher_forcing_ignores_other_noisy_chunks_and_future_clean_frames():
    model, _ = random_model(chunk_frames=2)
    x, t = video(model, 2, 6)
    clean = torch.randn_like(x)
    base = model(x, t, clean_context=clean)
    x2, clean2 = x.clone(), clean.clone()
    x2[:, :2] += 1.0  # another chunk's noisy frames
    clean2[:, 2:] += 1.0  # the clean frames of chunk 1 and later
    out = model(x2, t, clean_context=clean2)
    torch.testing.assert_close(out[:, 2:4], base[:, 2:4], rtol=0, atol=0)


# --- flow matching closed forms ----------------------------------------------------------------


def test_shift_conversions_and_weights():
    sc = cf.get_config("toy2d").sample
    s = torch.rand(100, dtype=torch.float64)
    k = sc.shift
    torch.testing.assert_close(s, cf.shift_sigma(cf.shift_sigma(s, k), 1 / k))  # inverse shift
    assert cf.student_sigmas(sc) == pytest.approx([1.0, 0.9375, 0.833333, 0.625], abs=1e-5)
    x0, eps = torch.randn(2, 3, 2, 1, 1), torch.randn(2, 3, 2, 1, 1)
    sigma = torch.rand(2, 3) * 0.9 + 0.05
    xs = cf.add_noise(x0, eps, sigma)
    v = eps - x0
    torch.testing.assert_close(cf.x0_from_velocity(xs, v, sigma), x0)
    grid = cf.training_sigmas(sc)
    w = cf.bump_weight(grid, sc)
    assert w.min() == 0 and w.mean() == pytest.approx(1.0)
    t = grid * 1000
    expected = torch.exp(-2 * ((t - 500) / 1000) ** 2)
    expected = (expected - expected.min()) / (expected - expected.min()).mean()
    torch.testing.assert_close(w, expected)


def test_the_bump_weight_is_normalised_on_the_schedule_the_sigmas_are_drawn_from():
    """With fm_shift the flow-matching sigmas come from another shift than the sampler's: the bump
    weight must average 1 over that schedule (the loss keeps its scale), not over the sampler's."""
    cfg = cf.get_config("toy2d", fm_weight="bump", fm_shift=1.0, shift=5.0)
    drawn = cf.training_sigmas(cf._fm_schedule(cfg))
    assert cf._fm_schedule(cfg).shift == 1.0
    assert cf.bump_weight(drawn, cf._fm_schedule(cfg)).mean().item() == pytest.approx(1.0)
    x0, sigma, _, _, weight = cf._flow_matching_batch(cfg, torch.zeros(8, 4, 2, 1, 1), None, iter([torch.arange(8)]), 1,
                                                      torch.Generator().manual_seed(0))
    torch.testing.assert_close(weight, cf.bump_weight(sigma, cf._fm_schedule(cfg)))  # the batch's weight is that one
    assert cf.bump_weight(drawn, cfg.sample).mean().item() != pytest.approx(1.0, abs=0.01)  # the old lookup


def test_one_timestep_per_chunk():
    sc = cf.get_config("toy2d").sample
    s = cf.sample_sigmas(50, 7, 3, sc, torch.Generator().manual_seed(0))
    assert s.shape == (50, 7)
    assert (s[:, 0:3] == s[:, :1]).all() and (s[:, 3:6] == s[:, 3:4]).all()
    assert ((s > 0) & (s <= 1)).all()
    assert (s[:, 0] != s[:, 3]).any()


def _gmm_log_density(x_s, s, means, std, log_w):
    """log p_s(x_s) of the noised mixture, written out independently of the module."""
    var = (1 - s) ** 2 * std**2 + s**2
    d = x_s.shape[-1]
    comp = -((x_s[:, None] - (1 - s) * means[None]) ** 2).sum(-1) / (2 * var) - d / 2 * math.log(2 * math.pi * var)
    return torch.logsumexp(log_w + comp, -1)


@pytest.mark.parametrize("s", [0.2, 0.6, 0.95])
def test_exact_bidirectional_velocity_matches_autograd_score(s):
    toy = cf.ToyVideos(cf.get_config("toy2d").data)
    g = torch.Generator().manual_seed(0)
    x_s = cf.add_noise(toy.sample(64, g).double(), torch.randn(64, 4, 2, 1, 1, generator=g, dtype=torch.float64), s)
    flat = x_s.reshape(64, -1).requires_grad_(True)
    logp = _gmm_log_density(flat, s, toy.means.reshape(len(toy.means), -1), toy.std, toy.log_weights)
    score = torch.autograd.grad(logp.sum(), flat)[0]
    # Tweedie for x_s = (1 - s) x0 + s eps: E[eps | x_s] = -s score, E[x0 | x_s] = (x_s - s E[eps]) / (1 - s)
    e_eps = -s * score
    e_x0 = (flat - s * e_eps) / (1 - s)
    torch.testing.assert_close(toy.exact_velocity(x_s, s).reshape(64, -1), (e_eps - e_x0).detach(), rtol=1e-7, atol=1e-8)


def test_exact_ar_velocity_matches_autograd_score_of_the_conditional():
    toy = cf.ToyVideos(cf.get_config("toy2d").data)
    g = torch.Generator().manual_seed(1)
    clean = toy.sample(32, g).double()
    s, b = 0.7, 2  # frame 2 given clean frames 0, 1
    x_s = cf.add_noise(clean[:, b:b + 1], torch.randn(32, 1, 2, 1, 1, generator=g, dtype=torch.float64), s)
    flat = x_s.reshape(32, -1).requires_grad_(True)
    ctx = clean[:, :b].reshape(32, -1)
    mu_c = toy.means[:, :b].reshape(len(toy.means), -1)
    log_w = toy.log_weights[None] - ((ctx[:, None] - mu_c[None]) ** 2).sum(-1) / (2 * toy.std**2)  # p(c | m)
    log_w = log_w - torch.logsumexp(log_w, -1, keepdim=True)
    var = (1 - s) ** 2 * toy.std**2 + s**2
    mu_b = toy.means[:, b].reshape(len(toy.means), -1)
    logp = torch.logsumexp(log_w - ((flat[:, None] - (1 - s) * mu_b[None]) ** 2).sum(-1) / (2 * var), -1)
    score = torch.autograd.grad(logp.sum(), flat)[0]
    e_eps = -s * score
    v = e_eps - (flat - s * e_eps) / (1 - s)
    got = toy.exact_velocity(x_s, s, slice(b, b + 1), clean[:, :b]).reshape(32, -1)
    torch.testing.assert_close(got, v.detach(), rtol=1e-7, atol=1e-8)


def test_exact_velocity_matches_monte_carlo_posterior():
    """E[x0 | x_s] by self-normalised importance sampling over real data samples."""
    toy = cf.ToyVideos(cf.get_config("toy2d", frames=2).data)
    g = torch.Generator().manual_seed(2)
    x0 = toy.sample(400_000, g).double().reshape(400_000, -1)
    s = 0.8
    x_s = torch.tensor([[1.0, 0.5, -0.3, 1.2]], dtype=torch.float64)
    logw = -((x_s - (1 - s) * x0) ** 2).sum(-1) / (2 * s**2)
    w = torch.softmax(logw, 0)
    mc = (w[:, None] * x0).sum(0)
    exact = toy.exact_x0(x_s.reshape(1, 2, 2, 1, 1), s).reshape(-1)
    torch.testing.assert_close(exact, mc, rtol=0, atol=0.02)


def test_toy_metrics_of_the_data_itself():
    toy = cf.ToyVideos(cf.get_config("toy2d").data)
    g = torch.Generator().manual_seed(3)
    a, b = toy.sample(2000, g), toy.sample(2000, g)
    m = cf.toy_metrics(a, toy, b, 15.0)
    assert m["energy_distance"] < 0.02
    assert m["off_manifold"] == pytest.approx(math.exp(-4.5), abs=0.006)  # P(chi_2 > 3) for a 2-D Gaussian
    assert m["motion"] == pytest.approx(1.0, abs=0.03) and m["transition_accuracy"] > 0.95
    blurred = a.mean(0, keepdim=True).expand_as(a)  # an average of futures collapses to the centre
    mb = cf.toy_metrics(blurred, toy, b, 15.0)
    assert mb["off_manifold"] == 1.0 and mb["energy_distance"] > 1.0


# --- injectivity --------------------------------------------------------------------------------


def test_injectivity_floors_bidirectional_positive_ar_zero():
    cfg = cf.get_config("toy2d")
    toy = cf.ToyVideos(cfg.data)
    sig = cf.solver_sigmas(48, cfg.sample)
    g = torch.Generator().manual_seed(0)
    bi = cf.injectivity_floor(lambda e: cf.exact_bidirectional_flow(toy, e, sig), 4, 1, 96, 16, g)
    ar = cf.injectivity_floor(lambda e: cf.exact_ar_flow(toy, e, sig, 1), 4, 1, 96, 16, g)
    # an independent Monte-Carlo estimate with these settings gave about 2.4, 1.6, 1.5, 0
    assert bi[:3].min() > 1.0 and bi[0] > bi[1]
    assert bi[0] == pytest.approx(2.4, abs=0.4)
    assert bi[3] < 1e-12  # the last frame sees all the noise there is
    assert ar.abs().max() < 1e-12


def test_bidirectional_regression_target_is_a_blurred_average():
    """Prop. 3.3: the best causal student returns E[x0^i | eps^<=i], which falls off the data."""
    cfg = cf.get_config("toy2d")
    toy = cf.ToyVideos(cfg.data)
    sig = cf.solver_sigmas(48, cfg.sample)
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(64, 1, 4, 2, 1, 1, generator=g, dtype=torch.float64).repeat(1, 32, 1, 1, 1, 1)
    eps[:, :, 1:] = torch.randn(64, 32, 3, 2, 1, 1, generator=g, dtype=torch.float64)
    x = cf.exact_bidirectional_flow(toy, eps.reshape(-1, 4, 2, 1, 1), sig).reshape(64, 32, 4, 2)
    mean_frame0 = x[:, :, 0].mean(1)  # (64, 2)
    dist = torch.cdist(mean_frame0, toy.frame_points()).min(-1).values
    assert (dist > 3 * toy.std).double().mean() > 0.5


# --- ODE regression: which student step each frame regresses from ------------------------------


@pytest.mark.parametrize("per", ["batch", "sample", "chunk"])
def test_ode_step_index_draws_one_step_where_upstream_does(per):
    k = cf.ode_step_index(256, 6, 2, 4, per, torch.Generator().manual_seed(0))
    assert k.shape == (256, 6) and 0 <= int(k.min()) and int(k.max()) <= 3
    pairs_in_chunks = k.reshape(256, 3, 2)
    assert (pairs_in_chunks[..., 0] == pairs_in_chunks[..., 1]).all()  # never two steps inside a chunk
    constant_per_video = (k == k[:, :1]).all(1)
    assert {"batch": (k == k[0, 0]).all(), "sample": constant_per_video.all() and not (k == k[0, 0]).all(),
            "chunk": not constant_per_video.all()}[per]


def test_ode_regression_with_a_step_per_frame_equals_each_frame_at_its_own_step():
    """With a (B, F) step index each frame is regressed from the teacher's state at its own step:
    under teacher forcing a frame sees only clean context and itself, so its loss equals the loss
    of a whole batch at that one step."""
    model, cfg = random_model(chunk_frames=1)
    g = torch.Generator().manual_seed(0)
    K, F = len(cf.student_sigmas(cfg.sample)), 4
    pairs = {"xt": torch.randn(6, K, F, 2, 1, 1, generator=g, dtype=torch.float64),
             "x0": torch.randn(6, F, 2, 1, 1, generator=g, dtype=torch.float64),
             "clean": torch.randn(6, F, 2, 1, 1, generator=g, dtype=torch.float64)}
    idx = torch.tensor([4, 0, 2])
    k = cf.ode_step_index(3, F, 1, K, "chunk", g)
    with torch.no_grad():
        sig = cf.student_sigmas(cfg.sample)
        loss = lambda k: cf.ode_regression_loss(model, *cf.ode_pair_batch(pairs, idx, k, sig))  # noqa: E731 - AR: with the clean clip
        mixed = loss(k)
        each = torch.stack([loss(j) for j in range(K)])  # (K, B, F)
    torch.testing.assert_close(mixed, each.gather(0, k[None]).squeeze(0), rtol=1e-12, atol=1e-12)


def test_dmd_sigmas_are_drawn_as_upstream():
    """Self Forcing draws an unshifted integer timestep in [0, 1000), shifts it, then clamps to
    [0.02, 0.98]: every sigma is one of those 1000 values, the clamp holds the lowest draws at 0.02,
    and about 2% of draws fall below 0.093, the smallest sigma of a clamp-then-shift draw."""
    cfg = cf.get_config("toy2d")  # shift 5
    s = cf._dmd_sigma(cfg, 50000, torch.Generator().manual_seed(0), "cpu")
    assert s.shape == (50000, cfg.data.frames) and (s == s[:, :1]).all()  # one sigma per clip
    support = cf.shift_sigma(torch.arange(1000, dtype=torch.float64) / 1000, 5.0).clamp(0.02, 0.98).float()
    assert torch.isin(s[:, 0], support).all()
    expected_low = float((support < 0.093).double().mean())  # 21 of the 1000 timesteps
    assert expected_low > 0.015 and abs(float((s[:, 0] < 0.093).double().mean()) - expected_low) < 0.004
    assert float(s.min()) == pytest.approx(0.02) and float(s.max()) == pytest.approx(0.98)


# --- DMD ---------------------------------------------------------------------------------------------


def test_dmd_gradient_zero_when_scores_agree():
    x = torch.randn(4, 3, 2, 1, 1)
    x0 = torch.randn(4, 3, 2, 1, 1)
    assert cf.dmd_gradient(x, x0, x0).abs().max() == 0


def test_dmd_moves_fake_towards_real():
    """Gaussians N(m, 1) have x0-predictors in closed form: E[x0 | x_s] = m + (1-s)(x_s - (1-s)m)/v_s.
    The generator's samples come from N(0, 1), the data from N(2, 1); descending the DMD loss
    moves the samples towards 2, and the loss's gradient is grad / numel."""
    def x0_pred(x_s, s, m):
        v = (1 - s) ** 2 + s**2
        return m + (1 - s) * (x_s - (1 - s) * m) / v

    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 1, 1, 1, 1, generator=g, dtype=torch.float64).requires_grad_(True)
    s = 0.5
    x_s = cf.add_noise(x.detach(), torch.randn(x.shape, generator=g, dtype=torch.float64), s)
    grad = cf.dmd_gradient(x.detach(), x0_pred(x_s, s, 2.0), x0_pred(x_s, s, 0.0))
    loss = cf.dmd_loss(x, grad)
    (g_x,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(g_x, grad / grad.numel())
    assert (-grad).mean() > 0.5  # descent direction points from fake (0) to real (2)


def test_self_rollout_keeps_a_graph_only_at_the_exit_step():
    model, cfg = random_model(chunk_frames=1, dtype=torch.float32)
    cfg.data.frames = 3
    graphs = []
    hook = model.register_forward_hook(lambda m, a, out: graphs.append(out.requires_grad))
    x = cf.self_rollout(model, cf.student_sigmas(cfg.sample), batch_size=2, num_frames=3, exit_step=1,
                        rng=torch.Generator().manual_seed(0))
    hook.remove()
    # per chunk: step 0 (no grad), exit step 1 (grad), cache refresh (no grad); no refresh at the end
    assert graphs == [False, True, False] * 2 + [False, True]
    assert x.shape == (2, 3, 2, 1, 1) and x.requires_grad
    x.sum().backward()  # the cache refreshes in place; the backward pass must not see them
    assert all(p.grad is not None for p in model.blocks[0].parameters())


def test_dmd_records_fixed_rollouts_from_its_ode_init_on():
    cfg = cf.get_config("toy2d", **{**TINY, "dmd_steps": 20, "gen_update_ratio": 2})  # 10 updates: a snapshot at each
    init, base = cf.CausalDiT(cfg.model), cf.CausalDiT(cfg.model, causal=False)
    with torch.no_grad():
        for p in [*init.parameters(), *base.parameters()]:
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    _, record = cf.train_dmd(cfg, init, base, base, log=None, rng=torch.Generator().manual_seed(0))
    snap = record["snapshots"]
    assert snap["updates"] == list(range(10)) and snap["videos"].shape == (10, 4, cfg.data.frames, 2, 1, 1)
    with torch.no_grad():  # the first is the ODE init's rollout from the fixed noise
        first = cf.self_rollout(init, cf.student_sigmas(cfg.sample), batch_size=4, num_frames=cfg.data.frames,
                                rng=torch.Generator().manual_seed(0))
    torch.testing.assert_close(snap["videos"][0], first, rtol=0, atol=0)
    assert (snap["videos"][-1] - snap["videos"][0]).abs().max() > 1e-4  # and the generator moves
    norms = record["generator_grad_norm"]  # 0 at the first update: the fake score starts as the real one
    assert len(norms) == 10 and norms[0] == 0 and min(norms[1:]) > 0


# --- samplers -----------------------------------------------------------------------------------


def test_stream_yields_chunks_and_counts_evaluations():
    model, cfg = random_model(chunk_frames=2, dtype=torch.float32)
    sig = cf.student_sigmas(cfg.sample)
    chunks = list(cf.stream(model, sig, num_frames=5, batch_size=3, rng=torch.Generator().manual_seed(0)))
    assert [c.shape[1] for c in chunks] == [2, 2, 1]
    with cf.count_frame_evaluations(model) as nfe:
        cf.sample_student(model, sig, batch_size=3, num_frames=6, rng=torch.Generator().manual_seed(0))
    # 4 denoising steps per frame, plus a cache refresh for every chunk but the last
    assert nfe["frames"] / 6 == pytest.approx(4 + 4 / 6)
    a = cf.sample_student(model, sig, batch_size=3, num_frames=4, rng=torch.Generator().manual_seed(5))
    b = cf.sample_student(model, sig, batch_size=3, num_frames=4, rng=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_ar_teacher_sampler_matches_its_recompute_the_prefix_definition():
    """The cached chunk-by-chunk sampler equals running the ODE per chunk on [own clean prefix at
    t = 0 ; noisy chunk] without any cache."""
    model, cfg = random_model(chunk_frames=2, dtype=torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.2)  # a tamer field, so a short ODE stays well behaved
    cfg.data.frames = 4
    model.double()
    torch.set_default_dtype(torch.float64)
    try:
        got = cf.sample_ar_teacher(model, cf.solver_sigmas(8, cfg.sample), batch_size=2, num_frames=4,
                                   rng=torch.Generator().manual_seed(0))
        g = torch.Generator().manual_seed(0)
        sig = cf.solver_sigmas(8, cfg.sample)
        out = []
        for start in (0, 2):
            x = torch.randn(2, 2, 2, 1, 1, generator=g)
            prefix = torch.cat(out, 1) if out else x[:, :0]

            def vel(x_, s):
                seq = torch.cat([prefix, x_], 1)
                t = torch.cat([torch.zeros(2, start), torch.full((2, 2), s)], 1)
                return model(seq, t)[:, start:]
            out.append(cf.euler_ode(vel, x, sig)[0])
    finally:
        torch.set_default_dtype(torch.float32)
    torch.testing.assert_close(got, torch.cat(out, 1), rtol=0, atol=1e-10)


def test_ode_pair_grids_must_align():
    model, cfg = random_model(chunk_frames=1, dtype=torch.float32)
    cfg.sample.teacher_solver_steps = 50  # 0.75 is not on a 50-step grid
    with pytest.raises(ValueError, match="not on the teacher's 50-step grid"):
        cf.make_ode_pairs(cfg, model, torch.zeros(4, 4, 2, 1, 1), "ar")


# --- bad input ----------------------------------------------------------------------------------


def _cached(model, x, t, start):
    cache = model.new_kv_cache(2, max_frames=8)
    checked(model)(torch.randn(2, 2, 2, 1, 1), torch.rand(2, 2), kv_cache=cache, start_frame=0)  # frames 0-1 cached
    return checked(model)(x, t, kv_cache=cache, start_frame=start)


BAD_CALLS = {  # what is wrong -> (the call, the error it must give)
    "channels": (lambda m, x, t: checked(m)(torch.randn(2, 4, 3, 1, 1), t), r"x must have shape \(B, F, 2, 1, 1\)"),
    "t shape": (lambda m, x, t: checked(m)(x, torch.rand(2)), "t must have shape"),
    "clean_context shape": (lambda m, x, t: checked(m)(x, t, clean_context=torch.randn(2, 3, 2, 1, 1)), "clean_context must have the shape of x"),
    "start beyond the cache": (lambda m, x, t: _cached(m, x[:, :2], t[:, :2], 4), "start_frame=4 is beyond the KV cache"),
    "cached start off a chunk": (lambda m, x, t: _cached(m, x[:, :2], t[:, :2], 1), "not at a chunk boundary"),
    "full start off a chunk": (lambda m, x, t: checked(m)(x, t, start_frame=1), "not at a chunk boundary"),
    "batch vs cache": (lambda m, x, t: checked(m)(torch.randn(3, 2, 2, 1, 1), torch.rand(3, 2), kv_cache=m.new_kv_cache(2, max_frames=8)),
                       "batch size 3"),
    "past max_frames": (lambda m, x, t: _cached(m, torch.randn(2, 8, 2, 1, 1), torch.rand(2, 8), 2), "do not fit a KV cache of max_frames=8"),
    "cond without conditioning": (lambda m, x, t: checked(m)(x, t, cond=torch.randn(2, 1, 4)), "no conditioning"),
}


@pytest.mark.parametrize("case", BAD_CALLS)
def test_a_bad_call_gets_a_clear_error(case):
    model, _ = random_model(chunk_frames=2, dtype=torch.float32)
    call, message = BAD_CALLS[case]
    with pytest.raises(ValueError, match=message):
        call(model, torch.randn(2, 4, 2, 1, 1), torch.rand(2, 4))


def test_a_bidirectional_model_takes_no_cache():
    bidi, _ = random_model(causal=False, dtype=torch.float32)
    with pytest.raises(ValueError, match="need a causal model"):
        checked(bidi)(torch.randn(2, 4, 2, 1, 1), torch.rand(2, 4), kv_cache=bidi.new_kv_cache(2, max_frames=8))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.int64])
def test_a_video_of_another_dtype_is_refused_by_name(dtype):
    model, _ = random_model(chunk_frames=2, dtype=torch.float32)
    with pytest.raises(TypeError, match=f"x is {dtype} but the model's weights are torch.float32"):
        checked(model)(torch.zeros(2, 4, 2, 1, 1, dtype=dtype), torch.rand(2, 4))


def test_an_empty_video_and_a_float_start_frame_are_refused():
    model, _ = random_model(chunk_frames=2, dtype=torch.float32)
    with pytest.raises(ValueError, match="F >= 1"):
        checked(model)(torch.randn(2, 0, 2, 1, 1), torch.rand(2, 0))
    cache = model.new_kv_cache(2, max_frames=4)
    with pytest.raises(TypeError, match="start_frame must be an int, got 0.0"):
        checked(model)(torch.randn(2, 2, 2, 1, 1), torch.rand(2, 2), kv_cache=cache, start_frame=0.0)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_noise_levels_outside_zero_one_are_refused(bad):
    model, _ = random_model(chunk_frames=2, dtype=torch.float32)
    t = torch.rand(2, 4)
    t[1, 2] = bad
    with pytest.raises(ValueError, match=r"t holds noise levels outside \[0, 1\]"):
        checked(model)(torch.randn(2, 4, 2, 1, 1), t)


def test_a_nan_frame_is_refused_instead_of_spreading_to_earlier_frames():
    """Masked attention weights are 0, but 0 * NaN is NaN: a NaN in frame 2 would turn frames 0-1
    NaN too. The model refuses non-finite inputs instead (FloatingPointError, which the training
    loop reports as divergence)."""
    model, _ = random_model(chunk_frames=1, dtype=torch.float32)
    x, t = torch.randn(2, 4, 2, 1, 1), torch.rand(2, 4)
    x[:, 2] = float("nan")
    with pytest.raises(FloatingPointError, match="x holds NaN"):
        checked(model)(x, t)
    with pytest.raises(FloatingPointError, match="clean_context holds NaN"):
        checked(model)(torch.randn(2, 4, 2, 1, 1), t, clean_context=x)


def test_a_cache_made_for_another_model_is_refused():
    model, _ = random_model(chunk_frames=2, dtype=torch.float32)
    other, _ = random_model(chunk_frames=2, dtype=torch.float32, num_layers=3)
    with pytest.raises(ValueError, match="made for another model"):
        checked(model)(torch.randn(2, 2, 2, 1, 1), torch.rand(2, 2), kv_cache=other.new_kv_cache(2, max_frames=4))


def test_window_settings_that_conflict_with_the_model_are_refused():
    model, _ = random_model(chunk_frames=1, window_frames=3, sink_frames=1, dtype=torch.float32)
    with pytest.raises(ValueError, match="max_frames is for a full cache"):
        model.new_kv_cache(2, max_frames=40)
    with pytest.raises(ValueError, match="conflict with the model's rolling window"):
        model.new_kv_cache(2, window_frames=5)
    assert model.new_kv_cache(2, window_frames=3).window_frames == 3  # the model's own window, spelt out
    full, _ = random_model(chunk_frames=1, dtype=torch.float32)
    foreign = full.new_kv_cache(2, window_frames=5, sink_frames=1)  # a full-attention model may stream in a window
    with pytest.raises(ValueError, match="is not the model's"):
        checked(model)(torch.randn(2, 1, 2, 1, 1), torch.rand(2, 1), kv_cache=foreign)


def test_sampler_arguments_are_checked_before_any_work():
    model, cfg = random_model(chunk_frames=1, dtype=torch.float32)
    sig = cf.student_sigmas(cfg.sample)
    with cf.count_frame_evaluations(model) as nfe:
        with pytest.raises(ValueError, match="context_noise=1.5 must lie in"):
            cf.stream(model, sig, num_frames=4, batch_size=2, context_noise=1.5)
        with pytest.raises(TypeError, match="sigmas must be a list of noise levels"):
            cf.stream(model, cfg, num_frames=4, batch_size=2)  # the old signature took the Config here
        with pytest.raises(ValueError, match="strictly descending"):
            cf.sample_student(model, [0.5, 1.0], num_frames=4, batch_size=2)
    assert nfe["frames"] == 0


def test_a_refused_prompt_switch_is_named_before_any_work():
    model, cfg = random_model(chunk_frames=1, cond_dim=3, dtype=torch.float32)
    chunks = cf.stream(model, cf.student_sigmas(cfg.sample), num_frames=3, batch_size=2, cond=torch.randn(2, 1, 3),
                       rng=torch.Generator().manual_seed(0))
    next(chunks)
    with cf.count_frame_evaluations(model) as nfe, pytest.raises(ValueError, match=r"cond must have shape \(2, L, 3\)"):
        chunks.send(torch.randn(2, 1, 4))
    assert nfe["frames"] == 0  # refused before the finished chunk was written or the next one begun


def test_a_fresh_stream_takes_a_prompt_by_send_before_its_first_chunk():
    """send(cond) in place of the first next(): the first chunk comes under cond, as from a stream made
    with it (not Python's "can't send non-None value to a just-started generator")."""
    model, cfg = random_model(chunk_frames=1, cond_dim=3, dtype=torch.float32)
    cond_a, cond_b, sig = torch.randn(2, 1, 3), torch.randn(2, 1, 3), cf.student_sigmas(cfg.sample)
    chunks = cf.stream(model, sig, num_frames=3, batch_size=2, cond=cond_a, rng=torch.Generator().manual_seed(0))
    switched = torch.cat([chunks.send(cond_b), *chunks], 1)
    plain = cf.sample_student(model, sig, num_frames=3, batch_size=2, cond=cond_b, rng=torch.Generator().manual_seed(0))
    torch.testing.assert_close(switched, plain, rtol=0, atol=0)


SAMPLERS = {  # each sampler, run to its first chunk
    "sample_student": cf.sample_student, "sample_bidirectional": cf.sample_bidirectional,
    "sample_ar_teacher": cf.sample_ar_teacher, "self_rollout": cf.self_rollout,
    "stream": lambda *a, **kw: next(cf.stream(*a, **kw)),
    "stream_recompute": lambda *a, **kw: next(cf.stream_recompute(*a, **kw)),
}


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_refuses_a_bad_batch_size_or_frame_count_by_name(sampler):
    model, cfg = random_model(chunk_frames=1, dtype=torch.float32)
    for key, bad in (("batch_size", 0), ("num_frames", 0), ("num_frames", -2), ("num_frames", 2.0)):
        size = {"batch_size": 2, "num_frames": 4, key: bad}
        message = f"{key} must be an int >= 1, got {bad}"
        with cf.count_frame_evaluations(model) as nfe, pytest.raises(ValueError, match=message):
            SAMPLERS[sampler](model, cf.student_sigmas(cfg.sample), **size)
        assert nfe["frames"] == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_model_is_told_to_convert_itself_not_its_inputs(dtype):
    """The samplers draw noise in torch's default dtype: the fix is the model's dtype (or the default),
    even when the condition passed along is float32 too."""
    model, cfg = random_model(chunk_frames=1, cond_dim=3, dtype=dtype)
    sig, cond = cf.student_sigmas(cfg.sample), torch.randn(2, 1, 3)
    for sampler in ("sample_student", "sample_bidirectional", "sample_ar_teacher", "stream", "stream_recompute"):
        with pytest.raises(TypeError, match=rf"use model\.to\(torch\.float32\) or torch\.set_default_dtype\({dtype}\)"):
            SAMPLERS[sampler](model, sig, num_frames=2, batch_size=2, cond=cond)


def test_a_nan_in_the_condition_is_named_as_such():
    model, cfg = random_model(chunk_frames=1, cond_dim=3, dtype=torch.float32)
    sig, cond = cf.student_sigmas(cfg.sample), torch.randn(2, 1, 3)
    cond[1, 0, 2] = float("nan")
    for sampler in ("sample_student", "sample_bidirectional", "sample_ar_teacher", "stream", "stream_recompute"):
        with pytest.raises(FloatingPointError, match="cond holds NaN"):
            SAMPLERS[sampler](model, sig, num_frames=2, batch_size=2, cond=cond)
    with pytest.raises(FloatingPointError, match="cond holds NaN"):
        checked(model)(torch.randn(2, 2, 2, 1, 1), torch.rand(2, 2), cond)
    chunks = cf.stream(model, sig, num_frames=2, batch_size=2, cond=cond.nan_to_num())
    next(chunks)
    with pytest.raises(FloatingPointError, match="cond holds NaN"):
        chunks.send(cond)


# --- files and the command line -----------------------------------------------------------------


def test_save_atomic_keeps_the_old_file_when_a_save_fails(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    cf.save_atomic({"w": torch.ones(2)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        cf.save_atomic({"w": Unpicklable()}, path)
    assert torch.load(path, weights_only=True)["w"].sum() == 2
    assert os.listdir(tmp_path) == ["ckpt.pt"]


TINY = dict(frames=3, train_size=256, test_size=128, batch_size=32, base_steps=3, teacher_steps=3,
            ode_pairs=64, ode_steps=3, dmd_steps=6, ema_start_step=1, eval_samples=64, floor_outer=8,
            floor_inner=4, teacher_solver_steps=8, num_layers=1, cd_steps=3, cd_batch_size=16, dmd_batch_size=16)


def test_pipeline_end_to_end_writes_results(tmp_path):
    cfg = cf.get_config("toy2d", **TINY)
    results = cf.run_pipeline(cfg, str(tmp_path), log=None)
    figures.write_figures(str(tmp_path))  # the figures of the run folder: samples, steps, training health
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved) >= {"config", "rows", "injectivity_floor", "stage_seconds"}
    assert tuple(saved["rows"]) == cf.ROWS
    for row in saved["rows"].values():
        assert set(row) == {"energy_distance", "off_manifold", "motion", "transition_accuracy", "nfe_per_frame", "ms_per_frame"}
    assert saved["rows"]["bidirectional_teacher"]["nfe_per_frame"] == 8
    assert saved["rows"]["causal_forcing"]["nfe_per_frame"] == pytest.approx(4 + 2 / 3)
    # Causal Forcing++: 2 steps, the first chunk 4; each chunk but the last also writes its context once
    assert saved["rows"]["causal_forcing_pp"]["nfe_per_frame"] == pytest.approx((4 + 1 + 2 + 1 + 2) / 3)
    assert set(saved["steps"]) == {"causal_forcing", "causal_forcing_pp"}
    for row in saved["steps"].values():
        assert [row[k]["nfe_per_frame"] for k in ("1", "2", "4")] == pytest.approx([8 / 3, 10 / 3, 14 / 3])
    assert (tmp_path / "steps.png").stat().st_size > 1000
    assert saved["injectivity_floor"]["ar"] < 1e-12 < saved["injectivity_floor"]["bidirectional"]
    assert (tmp_path / "samples.png").stat().st_size > 1000
    state = torch.load(tmp_path / "models.pt", weights_only=True)
    assert set(state) == set(cf.ROWS)
    assert "injectivity floor" in cf.format_table(results)


def test_pipeline_writes_loss_histories_and_its_models_load_back(tmp_path):
    cfg = cf.get_config("toy2d", **TINY)
    cf.run_pipeline(cfg, str(tmp_path), log=None)
    losses = json.loads((tmp_path / "losses.json").read_text())
    assert set(losses) == {"bidirectional_base", "ar_teacher", "ode_student_bidirectional", "ode_student_ar",
                           "dmd_self_forcing", "dmd_causal_forcing", "consistency_student_ar", "dmd_causal_forcing_pp"}
    assert len(losses["consistency_student_ar"]) == cfg.train.cd_steps
    assert len(losses["bidirectional_base"]) == cfg.train.base_steps
    assert len(losses["dmd_causal_forcing"]["critic"]) == cfg.train.dmd_steps
    updates = -(-cfg.train.dmd_steps // cfg.train.gen_update_ratio)
    assert len(losses["dmd_causal_forcing"]["generator"]) == updates
    assert len(losses["dmd_causal_forcing"]["generator_grad_norm"]) == updates
    assert figures.main([str(tmp_path)]) == 0
    assert (tmp_path / "training_health.png").stat().st_size > 10_000
    models = cf.load_models(str(tmp_path), cfg)
    assert set(models) == set(cf.ROWS) and not models["bidirectional_teacher"].causal and models["causal_forcing"].causal
    x = cf.sample_row("causal_forcing", models["causal_forcing"], cfg, 2, rng=torch.Generator().manual_seed(0))
    assert x.shape == (2, cfg.data.frames, 2, 1, 1) and torch.isfinite(x).all()
    with pytest.raises(FileNotFoundError, match="run the pipeline there first"):
        cf.load_models(str(tmp_path / "nothing"), cfg)
    other = cf.get_config("toy2d", **{**TINY, "chunk_frames": 2})  # the same weights' shapes, another mask
    with pytest.raises(ValueError, match=r"differs from the network of the run .*\(model.chunk_frames\)"):
        cf.load_models(str(tmp_path), other)
    assert cf.load_models(str(tmp_path), cf.get_config("toy2d", **{**TINY, "attention": "dense"}))  # speed: fine


def test_command_line_rejects_unknown_keys(capsys):
    with pytest.raises(SystemExit):
        cf.main(["--set", "framez=3"])
    assert "unknown config key 'framez'" in capsys.readouterr().err


def test_guidance_combines_conditional_and_null_predictions():
    model, _ = random_model(cond_dim=3)
    x, t = video(model, 2, 4)
    cond = torch.randn(2, 2, 3, dtype=torch.float64)
    got = cf.guided_velocity(model, x, t, cond, guidance=4.0)
    v_c, v_u = model(x, t, cond), model(x, t, None)
    torch.testing.assert_close(got, v_u + 4.0 * (v_c - v_u), rtol=0, atol=1e-10)
    clean = torch.randn_like(x)
    v_c, v_u = model(x, t, cond, clean_context=clean), model(x, t, None, clean_context=clean)
    torch.testing.assert_close(cf.guided_velocity(model, x, t, cond, 4.0, clean_context=clean),
                               v_u + 4.0 * (v_c - v_u), rtol=0, atol=1e-10)


@pytest.mark.parametrize("mode", ["teacher_forcing", "diffusion_forcing"])
def test_ar_teacher_training_modes_learn(mode):
    cfg = cf.get_config("toy2d", num_layers=1, batch_size=64, teacher_steps=40, teacher_lr=3e-3)
    toy = cf.ToyVideos(cfg.data)
    g = torch.Generator().manual_seed(0)
    base = cf.CausalDiT(cfg.model, causal=False)
    model, losses = cf.train_ar_teacher(cfg, base, toy.sample(512, g), mode=mode, log=None, rng=g)
    assert model.causal and sum(losses[-10:]) < sum(losses[:10])
    # the modes really differ: only teacher forcing trains the clean-context path
    other = "diffusion_forcing" if mode == "teacher_forcing" else "teacher_forcing"
    g2 = torch.Generator().manual_seed(0)
    model2, _ = cf.train_ar_teacher(cfg, base, toy.sample(512, g2), mode=other, log=None, rng=g2)
    x, t = toy.sample(8, g).float(), torch.rand(8, 4)
    assert (model(x, t) - model2(x, t)).abs().max() > 1e-4


def test_dmd_schedule_update_ratio_and_ema():
    """Generator steps happen every gen_update_ratio critic steps; EMA starts at ema_start_step
    (0 included) and is what train_dmd returns; DMD/critic sigmas stay within [0.02, 0.98]."""
    model, cfg = random_model(chunk_frames=1, dtype=torch.float32)
    for key, value in dict(frames=2, batch_size=8, dmd_steps=7, gen_update_ratio=3, ema_start_step=0).items():
        setattr(cfg.train if hasattr(cfg.train, key) else cfg.data, key, value)
    bidi, _ = random_model(causal=False, dtype=torch.float32, seed=1)
    def run(**kw):
        for key, value in kw.items():
            setattr(cfg.train, key, value)
        return cf.train_dmd(cfg, model, bidi, bidi, log=None, rng=torch.Generator().manual_seed(0))

    out, hist = run()
    assert len(hist["generator"]) == 3 and len(hist["critic"]) == 7  # steps 0, 3, 6
    assert not any(p.requires_grad for p in out.parameters())
    assert any((a - b).abs().max() > 0 for a, b in zip(out.parameters(), model.parameters()))  # it trained
    raw, _ = run(ema_start_step=10**6)  # EMA never starts: the raw generator comes back
    no_avg, _ = run(ema_start_step=0, ema_decay=0.0)  # EMA that copies the generator: the same
    for a, b, c in zip(out.parameters(), raw.parameters(), no_avg.parameters()):
        torch.testing.assert_close(b, c, rtol=0, atol=0)
    assert any((a - b).abs().max() > 1e-6 for a, b in zip(out.parameters(), raw.parameters()))  # EMA returned
    s = cf._dmd_sigma(cfg, 20000, torch.Generator().manual_seed(0), "cpu")
    assert s.min() >= 0.02 and s.max() <= 0.98 and (s == 0.98).any()


def test_a_two_step_stream_with_a_four_step_first_chunk_counts_its_evaluations():
    model, cfg = random_model(chunk_frames=1, dtype=torch.float32)
    assert cf.student_sigmas(cfg.sample, (1000, 500)) == pytest.approx([1.0, 5 * 0.5 / (1 + 4 * 0.5)])
    with cf.count_frame_evaluations(model) as nfe:
        list(cf.stream(model, cf.student_sigmas(cfg.sample, (1000, 500)), num_frames=4, batch_size=2,
                       first_chunk_sigmas=cf.student_sigmas(cfg.sample, (1000, 750, 500, 250)),
                       rng=torch.Generator().manual_seed(0)))
    assert nfe["frames"] == 4 + 3 * 2 + 3  # 4 steps for frame 0, 2 for the others, 3 refreshes
    with pytest.raises(ValueError, match="denoising steps"):
        cf.student_sigmas(cfg.sample, ())


def test_context_noise_changes_only_frames_that_have_context():
    model, cfg = random_model(chunk_frames=1, dtype=torch.float32)
    sig, size = cf.student_sigmas(cfg.sample), dict(num_frames=3, batch_size=2)
    a = torch.cat(list(cf.stream(model, sig, **size, rng=torch.Generator().manual_seed(1))), 1)
    b = torch.cat(list(cf.stream(model, sig, **size, rng=torch.Generator().manual_seed(1), context_noise=0.3)), 1)
    torch.testing.assert_close(a[:, 0], b[:, 0], rtol=0, atol=0)  # the first frame has no context
    assert (a[:, 1:] - b[:, 1:]).abs().max() > 1e-4  # later frames see a noisier cache


def test_stream_takes_a_new_prompt_mid_video():
    model, cfg = random_model(chunk_frames=1, cond_dim=3, dtype=torch.float32)
    cond_a, cond_b = torch.randn(2, 1, 3), torch.randn(2, 1, 3)

    def run(switch_at=None):
        chunks = cf.stream(model, cf.student_sigmas(cfg.sample), num_frames=4, batch_size=2, cond=cond_a,
                           rng=torch.Generator().manual_seed(0))
        out = [next(chunks)]
        while len(out) < 4:
            out.append(chunks.send(cond_b) if len(out) == switch_at else next(chunks))
        return torch.cat(out, 1)

    plain, switched = run(), run(switch_at=2)
    torch.testing.assert_close(switched[:, :2], plain[:, :2], rtol=0, atol=0)  # the past is kept
    assert (switched[:, 2:] - plain[:, 2:]).abs().max() > 1e-4  # the new prompt takes over
    # the same as generating frames 2 and 3 by hand under cond_b on the cache that frames 0, 1 left
    g = torch.Generator().manual_seed(0)
    cache = model.new_kv_cache(2, max_frames=4)
    sig = cf.student_sigmas(cfg.sample)
    manual = []
    with torch.no_grad():
        for f in range(4):
            c = cond_a if f < 2 else cond_b
            manual.append(cf.denoise_chunk(model, torch.randn(2, 1, 2, 1, 1, generator=g), sig, c, cache, f, rng=g))
            if f < 3:
                cf.write_context(model, manual[-1], c, cache, f, 0.0, g)
    torch.testing.assert_close(switched, torch.cat(manual, 1), rtol=0, atol=0)


@pytest.mark.parametrize("window", [{}, dict(window_frames=3, sink_frames=1)], ids=["full cache", "rolling window"])
def test_a_prompt_switch_with_recache_rebuilds_the_kept_context_under_the_new_prompt(window):
    """With recache=True, send(cond_b) re-runs every chunk the cache still holds under cond_b before the
    next chunk: the same as doing it by hand. A rolling cache holds the sink and the latest frames
    only, so only those are re-cached (in frame order, skipping the frames that left)."""
    model, cfg = random_model(chunk_frames=1, cond_dim=3, dtype=torch.float32, **window)
    cond_a, cond_b = torch.randn(2, 1, 3), torch.randn(2, 1, 3)
    sig, switch = cf.student_sigmas(cfg.sample), 5

    def run(recache):
        chunks = cf.stream(model, sig, num_frames=8, batch_size=2, cond=cond_a, rng=torch.Generator().manual_seed(0),
                           recache=recache)
        out = [next(chunks)]
        while len(out) < 8:
            out.append(chunks.send(cond_b) if len(out) == switch else next(chunks))
        return torch.cat(out, 1)

    recached, kept_as_is = run(True), run(False)
    torch.testing.assert_close(recached[:, :switch], kept_as_is[:, :switch], rtol=0, atol=0)  # the past is the past
    assert (recached[:, switch:] - kept_as_is[:, switch:]).abs().max() > 1e-4  # the rebuilt context matters
    g, cache, manual = torch.Generator().manual_seed(0), cf.new_cache_for(model, 2, 8), []
    held = [0, 3, 4] if window else list(range(switch))  # sink 0 and the 2 ring slots; or every frame
    with torch.no_grad():
        for f in range(8):
            c = cond_a if f < switch else cond_b
            manual.append(cf.denoise_chunk(model, torch.randn(2, 1, 2, 1, 1, generator=g), sig, c, cache, f, rng=g))
            if f < 7:
                cf.write_context(model, manual[-1], c, cache, f, 0.0, g)
            if f == switch - 1:
                for h in held:
                    cf.write_context(model, manual[h], cond_b, cache, h, 0.0, g)
    torch.testing.assert_close(recached, torch.cat(manual, 1), rtol=0, atol=0)


def test_gradient_checkpointing_is_safe_with_a_rolling_cache():
    """Recomputing a cached call in backward would read ring slots that later chunks overwrote;
    cached calls are therefore never checkpointed, and gradients match the plain model's."""
    plain, cfg = random_model(chunk_frames=1, window_frames=2, dtype=torch.float64)
    ckpt, _ = random_model(chunk_frames=1, window_frames=2, grad_checkpointing=True, dtype=torch.float64)
    ckpt.load_state_dict(plain.state_dict())
    cfg.data.frames = 6
    torch.set_default_dtype(torch.float64)
    try:
        for m in (plain, ckpt):
            cf.self_rollout(m, cf.student_sigmas(cfg.sample), batch_size=2, num_frames=6, exit_step=0,
                            rng=torch.Generator().manual_seed(0)).pow(2).sum().backward()
    finally:
        torch.set_default_dtype(torch.float32)
    for a, b in zip(plain.parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("window", [{}, dict(window_frames=3, sink_frames=1)], ids=["full cache", "rolling window"])
def test_a_stream_continues_a_prefix_as_if_it_had_made_it(window):
    """stream(prefix=...) writes the given frames to the cache chunk by chunk and continues after them: the
    same as writing the context by hand; continuing a stream from its own first chunks (the rng where that
    stream left it) gives exactly the rest of that stream."""
    model, cfg = random_model(chunk_frames=1, cond_dim=3, dtype=torch.float32, **window)
    cond, sig = torch.randn(2, 1, 3), cf.student_sigmas(cfg.sample)
    prefix = torch.randn(2, 2, 2, 1, 1, generator=torch.Generator().manual_seed(3))
    got = torch.cat(list(cf.stream(model, sig, num_frames=3, batch_size=2, cond=cond, prefix=prefix,
                                   rng=torch.Generator().manual_seed(0), context_noise=0.2)), 1)
    g, cache, manual = torch.Generator().manual_seed(0), cf.new_cache_for(model, 2, 5), []
    with torch.no_grad():
        for f in range(2):
            cf.write_context(model, prefix[:, f:f + 1], cond, cache, f, 0.2, g)
        for f in range(2, 5):
            manual.append(cf.denoise_chunk(model, torch.randn(2, 1, 2, 1, 1, generator=g), sig, cond, cache, f, rng=g))
            if f < 4:
                cf.write_context(model, manual[-1], cond, cache, f, 0.2, g)
    torch.testing.assert_close(got, torch.cat(manual, 1), rtol=0, atol=0)
    rng = torch.Generator().manual_seed(1)
    chunks = cf.stream(model, sig, num_frames=6, batch_size=2, cond=cond, rng=rng)
    first = torch.cat([next(chunks), next(chunks)], 1)  # suspended before frame 1 is written: rng is where it left it
    rest = cf.stream(model, sig, num_frames=4, batch_size=2, cond=cond, prefix=first,
                     rng=torch.Generator().set_state(rng.get_state()))
    torch.testing.assert_close(torch.cat(list(rest), 1), torch.cat(list(chunks), 1), rtol=0, atol=0)


def test_a_prompt_switch_with_recache_rebuilds_the_prefix_too():
    model, cfg = random_model(chunk_frames=1, cond_dim=3, dtype=torch.float32)
    cond_a, cond_b, sig = torch.randn(2, 1, 3), torch.randn(2, 1, 3), cf.student_sigmas(cfg.sample)
    prefix = torch.randn(2, 2, 2, 1, 1, generator=torch.Generator().manual_seed(3))
    chunks = cf.stream(model, sig, num_frames=2, batch_size=2, cond=cond_a, prefix=prefix, recache=True,
                       rng=torch.Generator().manual_seed(0))
    got = torch.cat([next(chunks), chunks.send(cond_b)], 1)
    g, cache = torch.Generator().manual_seed(0), cf.new_cache_for(model, 2, 4)
    with torch.no_grad():
        for f in range(2):
            cf.write_context(model, prefix[:, f:f + 1], cond_a, cache, f, 0.0, g)
        x2 = cf.denoise_chunk(model, torch.randn(2, 1, 2, 1, 1, generator=g), sig, cond_a, cache, 2, rng=g)
        cf.write_context(model, x2, cond_a, cache, 2, 0.0, g)
        for f, x in enumerate([prefix[:, :1], prefix[:, 1:], x2]):  # the re-cache: the given frames too
            cf.write_context(model, x, cond_b, cache, f, 0.0, g)
        x3 = cf.denoise_chunk(model, torch.randn(2, 1, 2, 1, 1, generator=g), sig, cond_b, cache, 3, rng=g)
    torch.testing.assert_close(got, torch.cat([x2, x3], 1), rtol=0, atol=0)


def test_a_bad_prefix_is_named_before_any_work():
    model, cfg = random_model(chunk_frames=2, dtype=torch.float32)
    sig, ok = cf.student_sigmas(cfg.sample), torch.zeros(2, 4, 2, 1, 1)
    bad = {"2 videos of 3 frames: it needs batch_size=2 videos of whole chunks of chunk_frames=2": ok[:, :3],
           "prefix has 1 videos of 4 frames: it needs batch_size=2": ok[:1],
           r"prefix must have shape \(B, F, 2, 1, 1\)": ok[..., 0], "NaN": ok.clone().fill_(float("nan")),
           "prefix is torch.float64": ok.double()}
    for match, prefix in bad.items():
        with pytest.raises((ValueError, TypeError, FloatingPointError), match=match):
            cf.stream(model, sig, num_frames=2, batch_size=2, prefix=prefix)


@pytest.mark.parametrize("kw", [dict(chunk_frames=2), dict(chunk_frames=1, window_frames=3, sink_frames=1)])
def test_streaming_with_cache_equals_recomputing_the_prefix(kw):
    """The cache is an optimisation only: the same samples as re-running every earlier frame."""
    model, cfg = random_model(dtype=torch.float32, **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.3)  # a tame random field: 4-step chains of a random net can blow up
    sig, size = cf.student_sigmas(cfg.sample), dict(num_frames=7, batch_size=2)
    cached = torch.cat(list(cf.stream(model, sig, **size, rng=torch.Generator().manual_seed(0))), 1)
    recomputed = torch.cat(list(cf.stream_recompute(model, sig, **size, rng=torch.Generator().manual_seed(0))), 1)
    torch.testing.assert_close(cached, recomputed, rtol=1e-4, atol=1e-5)


# --- failing loudly: a diverging stage stops with a clear error, and nothing NaN is kept -------------


def test_training_loop_stops_at_the_first_non_finite_loss():
    seen = []

    def step(i):
        seen.append(i)
        return {"flow_matching": torch.tensor(float("nan") if i == 2 else 1.0)}
    with pytest.raises(cf.Diverged, match=r"stage 'base' at step 3 of 5 \(flow_matching loss nan\).*lower base_lr"):
        cf.train_loop("base", 5, step, log=None, hint="lower base_lr")
    assert seen == [0, 1, 2]


def test_optimizer_step_refuses_a_non_finite_gradient_and_leaves_the_weights():
    model = torch.nn.Linear(2, 1)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(torch.tensor([[float("inf"), 1.0]])).sum()
    with pytest.raises(FloatingPointError, match="gradient norm"):
        cf._step(opt, model, loss, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_diverging_run_exits_with_an_error_and_saves_no_finished_stage(tmp_path, capsys):
    out = tmp_path / "run"
    sets = [f"--set={k}={v}" for k, v in {**TINY, "base_steps": 20, "base_lr": 1e4}.items() if k != "device"]
    rc = cf.main(["--out", str(out), "--device", "cpu", *sets])
    err = capsys.readouterr().err
    assert rc == 1 and "stage 'base'" in err and "base_lr" in err and "Traceback" not in err
    assert not (out / "stages" / "bidirectional_base.pt").exists() and not (out / "results.json").exists()


def test_dmd_generator_loss_guides_against_the_given_uncond():
    """Guided, the real score's x0 is uncond + g (cond - uncond); uncond is the null condition
    (zeros) unless given, e.g. Wan's negative prompt."""
    model, _ = random_model(causal=False, cond_dim=10)
    other, _ = random_model(causal=False, seed=1, cond_dim=10)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 2, 1, 1, generator=g, dtype=torch.float64)
    sigma, noise = torch.rand(2, 4, generator=g, dtype=torch.float64), torch.randn(2, 4, 2, 1, 1, generator=g, dtype=torch.float64)
    cond, negative = torch.randn(2, 3, 10, generator=g, dtype=torch.float64), torch.randn(1, 3, 10, generator=g, dtype=torch.float64)
    x_s = cf.add_noise(x, noise, sigma)
    for uncond in (None, negative):
        loss = cf.dmd_generator_loss(x, model, other, sigma, noise, cond, 4.0, uncond)
        with torch.no_grad():
            u = model(x_s, sigma, torch.zeros_like(cond) if uncond is None else uncond.expand(2, -1, -1))
            real = u + 4.0 * (model(x_s, sigma, cond) - u)
            grad = cf.dmd_gradient(x, cf.x0_from_velocity(x_s, real, sigma), cf.x0_from_velocity(x_s, other(x_s, sigma, cond), sigma))
        assert torch.allclose(loss, 0.5 * grad.pow(2).mean(), rtol=1e-10, atol=0)


def test_json_results_are_strict_json(tmp_path):
    path = str(tmp_path / "r.json")
    cf.save_atomic({"a": float("nan"), "b": [1.0, float("inf")], "c": "x"}, path)
    text = open(path).read()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}")) == \
        {"a": None, "b": [1.0, None], "c": "x"}


def test_named_dmd_losses_equal_their_definitions():
    model, cfg = random_model(causal=False)
    other, _ = random_model(causal=False, seed=1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 2, 1, 1, generator=g, dtype=torch.float64, requires_grad=True)
    sigma, noise = torch.rand(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, 2, 1, 1, generator=g, dtype=torch.float64)
    loss = cf.dmd_generator_loss(x, model, other, sigma, noise)
    with torch.no_grad():  # by hand: noise, both scores' x0, the normalised difference
        x_s = cf.add_noise(x, noise, sigma)
        grad = cf.dmd_gradient(x, cf.x0_from_velocity(x_s, model(x_s, sigma), sigma),
                               cf.x0_from_velocity(x_s, other(x_s, sigma), sigma))
    assert torch.allclose(loss, 0.5 * grad.pow(2).mean(), rtol=1e-12, atol=0)
    loss.backward()
    assert torch.allclose(x.grad, grad / grad.numel(), rtol=1e-10, atol=1e-18)  # only x carries a gradient
    critic = cf.critic_loss(other, x, sigma, noise)
    velocity = other(cf.add_noise(x.detach(), noise, sigma), sigma)
    assert torch.allclose(critic, (velocity - (noise - x.detach())).pow(2).mean(), rtol=1e-12, atol=0)
    assert critic.requires_grad
    x.grad = None
    critic.backward()
    assert x.grad is None  # no gradient into the generator's samples


@pytest.mark.parametrize("key,value", [
    ("grad_clip", -1.0), ("base_lr", float("nan")), ("gen_lr", 0.0), ("critic_lr", float("inf")), ("batch_size", 0),
    ("test_size", 0), ("eval_samples", 0), ("shift", 0.0), ("gen_update_ratio", 0), ("ode_pairs", 0), ("num_heads", 0),
    ("denoising_steps", ()), ("denoising_steps", ("a",)), ("teacher_solver_steps", 10), ("ema_decay", 1.0),
    ("dmd_min_sigma", 0.99),
])
def test_nonsense_settings_are_refused_up_front_by_name(key, value):
    with pytest.raises(ValueError, match="invalid config") as e:
        cf.get_config("toy2d", **{key: value})
    assert key in str(e.value) or (key == "teacher_solver_steps" and "grid" in str(e.value)) \
        or (key == "dmd_min_sigma" and "DMD sigmas" in str(e.value))


def test_command_line_turns_bad_values_into_usage_errors(capsys):
    with pytest.raises(SystemExit) as e:
        cf.main(["--set", "num_heads=0", "--out", "never-written"])
    assert e.value.code == 2 and "num_heads=0 must be >= 1" in capsys.readouterr().err
    assert not os.path.exists("never-written")


def test_seed_can_be_set_like_any_other_field():
    import argparse

    cfg = cf._config_from_flags(argparse.ArgumentParser(), "toy2d", ["seed=3"], None, seed=None)  # no --seed
    assert cfg.seed == 3


def test_saves_are_flushed_to_disk_before_the_rename(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(cf.os, "fsync", lambda fd: synced.append(fd) or real(fd))
    cf.save_atomic({"w": torch.ones(2)}, str(tmp_path / "a.pt"))
    assert len(synced) == 2  # the file, then its folder (the rename)


def test_saved_files_get_the_permissions_open_would_give(tmp_path):
    cf.save_atomic({"a": 1}, str(tmp_path / "r.json"))
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o666 & ~umask  # not owner-only


def test_a_corrupt_stage_file_is_named_and_a_left_temporary_is_ignored(tmp_path):
    cfg = cf.get_config("toy2d", **TINY)
    cf.run_pipeline(cfg, str(tmp_path), log=None)
    stages = tmp_path / "stages"
    (stages / ".tmp-12345-ar_teacher.pt").write_bytes(b"half a save")  # what a kill during a save leaves
    (stages / "ar_teacher.pt").write_bytes(b"")  # an empty file under the final name
    with pytest.raises(ValueError, match=r"ar_teacher\.pt' is empty or corrupt .*delete it"):
        cf.run_pipeline(cfg, str(tmp_path), log=None)


def test_a_flipped_byte_in_a_stage_file_fails_its_checksum(tmp_path):
    import zipfile
    cfg = cf.get_config("toy2d", **TINY)
    cf.run_pipeline(cfg, str(tmp_path), log=None)
    path = tmp_path / "stages" / "ar_teacher.pt"
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size > 64)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = int.from_bytes(raw[info.header_offset + 26: info.header_offset + 28], "little"), \
        int.from_bytes(raw[info.header_offset + 28: info.header_offset + 30], "little")  # the local header's own lengths
    raw[info.header_offset + 30 + name_len + extra_len + 16] ^= 0x01  # one bit of a weight
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"ar_teacher\.pt' is corrupt: record .* fails its CRC-32 checksum; delete it"):
        cf.run_pipeline(cfg, str(tmp_path), log=None)


@pytest.mark.parametrize("argv,message", [
    (["--device", "nosuch"], "not a device torch knows"),
    (["bench", "--repeats", "-1"], "--repeats -1: must be >= 0"),
    (["bench", "--batch-size", "0"], "--batch-size 0: must be >= 1"),
    (["bench", "--frames", "0"], "--frames 0: must be >= 1"),
    (["--set", 'denoising_steps=["a"]'], "denoising_steps"),
])
def test_command_line_misuse_is_a_usage_error(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        if argv[0] == "bench":
            bench.main(argv[1:])
        else:
            cf.main(argv + ["--out", str(tmp_path / "run")])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing written before the error


@pytest.mark.parametrize("argv,key", [
    (["--set", "frames=4", "--set", "frames=6"], "frames"), (["--seed", "1", "--set", "seed=2"], "seed"),
    (["--device", "cpu", "--set", "device=cpu"], "device"), (["--set", "name=mnist"], "name"),
])
def test_a_setting_given_twice_or_the_preset_name_by_set_is_a_usage_error(argv, key, capsys, tmp_path, monkeypatch):
    """A key given twice would silently take its last value; the preset's name is --config's."""
    def ran(*args, **kwargs):
        raise AssertionError("the flags were accepted")
    monkeypatch.setattr(cf, "run_pipeline", ran)
    monkeypatch.setattr(bench, "benchmark_stream", ran)
    for main in (cf.main, bench.main) if "--seed" not in argv else (cf.main,):  # bench parses --set with cf's helper
        with pytest.raises(SystemExit) as e:
            main(argv + ["--out", str(tmp_path / "run")] if main is cf.main else argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"error: {key}" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_refused_run_leaves_nothing_that_refuses_the_corrected_command(tmp_path, capsys, monkeypatch):
    """Bad input found while loading the data (a setting the data refuses, a folder without MNIST) is a
    clear error that writes no config.json, so the corrected command runs in the same folder."""
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit) as e:
        cf.main(["--out", out, "--device", "cpu", "--set", "in_channels=3"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "error: toy2d frames are points" in err and "Traceback" not in err
    assert not os.path.exists(os.path.join(out, "config.json"))
    sets = [f"--set={k}={v}" for k, v in {**TINY, "base_steps": 20, "base_lr": 1e4}.items()]
    assert cf.main(["--out", out, "--device", "cpu", *sets]) == 1  # runs: its first stage diverges
    assert "stage 'base'" in capsys.readouterr().err
    monkeypatch.setenv("CAUSAL_FORCING_MNIST", str(tmp_path))  # a folder without the MNIST files
    for argv in (["--config", "mnist"], ["--config", "mnist", "--mnist-dir", str(tmp_path)]):
        with pytest.raises(SystemExit) as e:
            cf.main(argv + ["--out", str(tmp_path / "digits"), "--device", "cpu"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "error: no MNIST test images in" in err and "Traceback" not in err
        assert not os.path.exists(tmp_path / "digits" / "config.json")


def test_an_out_that_is_a_file_is_a_usage_error(capsys, tmp_path):
    path = tmp_path / "a_file"
    path.write_text("x")
    with pytest.raises(SystemExit) as e:
        cf.main(["--out", str(path)])
    assert e.value.code == 2 and "is a file" in capsys.readouterr().err


@pytest.mark.parametrize("threads", ["0", "-2"])
def test_a_thread_count_below_one_is_a_usage_error(threads, capsys):
    with pytest.raises(SystemExit) as e:
        cf.main(["--threads", threads])
    assert e.value.code == 2 and f"--threads {threads}: give 1 or more" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["", '{"seed": 0', "[]", '{"seed": 0}'])
def test_a_damaged_config_json_is_named_with_the_fix(tmp_path, text):
    (tmp_path / "config.json").write_text(text)
    for call in (lambda: cf.run_config(str(tmp_path)),
                 lambda: cf.run_pipeline(cf.get_config("toy2d", **TINY), str(tmp_path), log=None)):
        with pytest.raises(ValueError, match=r"config.json' is not a config this code wrote .*put the run's config"):
            call()


@pytest.mark.parametrize("device", ["meta", "xpu"])
def test_a_device_this_code_does_not_run_on_is_refused_by_get_config(device):
    with pytest.raises(ValueError, match=f"device='{device}': this code runs on cuda, mps or cpu"):
        cf.get_config("toy2d", device=device)


def test_a_finished_digit_run_reads_its_own_digits_whatever_the_environment_says(tmp_path, monkeypatch):
    """The environment variable names the MNIST folder of a new config only; config.json records it, and a run
    made on the sprites (mnist_dir null) is read back on the sprites."""
    monkeypatch.setenv(cf.MNIST_ENV, str(tmp_path / "elsewhere"))
    assert cf.get_config("mnist").data.mnist_dir == str(tmp_path / "elsewhere")  # a new config takes it
    assert cf.get_config("mnist", mnist_dir=None).data.mnist_dir is None  # an explicit None: the sprites
    run = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "mnist_run")
    assert cf.run_config(run).data.mnist_dir is None
    assert cf.load_digits()[2] == "digit sprites (toy_data)"


def test_a_frechet_distance_of_one_sample_and_an_unknown_mnist_split_are_named():
    with pytest.raises(ValueError, match="needs 2 or more feature vectors a set, got 1 and 5"):
        cf.frechet_distance(torch.randn(1, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="split='val': MNIST has a 'test' and a 'train' split"):
        cf.load_digits("/nonexistent", split="val")


def test_class_balanced_held_out_videos_for_fewer_videos_than_digits():
    cfg = cf.get_config("mnist", device="cpu")
    digits = cf.digit_split(cfg.data)["test"]
    videos, labels = cf.balanced_digit_videos(cfg.data, 4, digits, torch.Generator().manual_seed(0))
    assert videos.shape[0] == 4 and labels[:, 0].tolist() == [0, 1, 2, 3]


def test_stages_remember_their_config_when_config_json_is_deleted(tmp_path):
    cfg = cf.get_config("toy2d", **TINY)
    cf.run_pipeline(cfg, str(tmp_path), log=None)
    (tmp_path / "config.json").unlink()
    other = cf.get_config("toy2d", **{**TINY, "frames": 4}, seed=7)
    with pytest.raises(ValueError, match=r"another config \(differs in data\.frames, seed\)"):
        cf.run_pipeline(other, str(tmp_path), log=None)
    assert not (tmp_path / "config.json").exists()  # nothing claims the folder for the other config
    again = cf.run_pipeline(cfg, str(tmp_path), log=None)  # the same config loads every stage
    assert set(again["rows"]) == set(cf.ROWS)


# --- Causal Forcing++: causal consistency distillation ----------------------------------------------


class _Affine(torch.nn.Module):
    """A stand-in network whose velocity is known in closed form: v = a x + b t (+ c * cond) + d * clean."""

    def __init__(self, a, b, c=0.0, d=0.0):
        super().__init__()
        self.a, self.b, self.c, self.d = a, b, c, d

    def forward(self, x, t, cond=None, clean_context=None):
        v = self.a * x + self.b * t[..., None, None, None]
        if cond is not None:
            v = v + self.c * cond.sum((1, 2)).reshape(-1, 1, 1, 1, 1)
        return v + self.d * clean_context


def test_consistency_loss_against_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    x0, noise = (torch.randn(3, 4, 2, 1, 1, generator=g, dtype=torch.float64) for _ in range(2))
    cond = cf.label_cond(torch.tensor([1, 4, 7])).double()
    student, ema, teacher = _Affine(0.3, -0.2, 0.1, 0.05), _Affine(-0.1, 0.4, 0.2, -0.3), _Affine(0.5, 0.7, 0.6, 0.2)
    t, t_next, w = 0.8, 0.6, 3.0
    got = cf.consistency_distillation_loss(student, ema, teacher, x0, noise, t, t_next, cond, guidance=w)
    # by hand: the teacher's guided velocity is uncond + w (cond - uncond) = a x + b t + d x0 + w c (the label's one-hot sums to 1)
    x_t = (1 - t) * x0 + t * noise
    v_teacher = 0.5 * x_t + 0.7 * t + 0.2 * x0 + w * 0.6
    x_next = x_t + v_teacher * (t_next - t)
    target = x_next - t_next * (-0.1 * x_next + 0.4 * t_next + 0.2 + -0.3 * x0)
    pred = x_t - t * (0.3 * x_t - 0.2 * t + 0.1 + 0.05 * x0)
    assert got.shape == (3, 4)
    assert torch.allclose(got, ((pred - target) ** 2).mean((2, 3, 4)), rtol=1e-12, atol=0)


def test_consistency_loss_gradient_reaches_only_the_student():
    cfg = cf.get_config("toy2d", frames=4, chunk_frames=2, num_layers=1, device="cpu")
    nets = [cf._random_weights(cf.CausalDiT(cfg.model, causal=True), seed=s) for s in range(3)]
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 4, 2, 1, 1, generator=g), torch.randn(2, 4, 2, 1, 1, generator=g)
    cf.consistency_distillation_loss(*nets, x0, noise, 0.7, 0.5).mean().backward()
    assert all(p.grad is not None for p in nets[0].parameters() if p.requires_grad)
    assert all(p.grad is None for net in nets[1:] for p in net.parameters())  # EMA and teacher: targets only


def test_consistency_target_of_a_chunk_sees_only_its_own_noise_and_the_clean_past():
    """Teacher, EMA and student all run under the teacher-forcing mask: chunk b's loss depends on
    chunk b's noise and on the clean chunks before it, never on other chunks' noise (the AR
    teacher's injectivity, without ODE pairs) and never on later clean frames."""
    cfg = cf.get_config("toy2d", frames=6, chunk_frames=2, num_layers=2, device="cpu")
    student, ema, teacher = (cf._random_weights(cf.CausalDiT(cfg.model, causal=True).double(), seed=s) for s in range(3))
    g = torch.Generator().manual_seed(2)
    x0, noise = (torch.randn(2, 6, 2, 1, 1, generator=g, dtype=torch.float64) for _ in range(2))
    loss = lambda x0_, noise_: cf.consistency_distillation_loss(student, ema, teacher, x0_, noise_, 0.9, 0.8)  # noqa: E731
    base = loss(x0, noise)
    other_noise = noise.clone()
    other_noise[:, [0, 1, 4, 5]] = torch.randn(2, 4, 2, 1, 1, generator=g, dtype=torch.float64)  # all but chunk 1
    assert torch.equal(loss(x0, other_noise)[:, 2:4], base[:, 2:4])
    later_clean = x0.clone()
    later_clean[:, 4:] += 1.0  # clean frames of chunk 2 change: chunk 1's loss may not
    assert torch.equal(loss(later_clean, noise)[:, 2:4], base[:, 2:4])
    earlier_clean = x0.clone()
    earlier_clean[:, :2] += 1.0  # its clean context changes: chunk 1's target does
    assert not torch.allclose(loss(earlier_clean, noise)[:, 2:4], base[:, 2:4])


def test_consistency_grid_and_the_pairs_it_draws():
    s = cf.get_config("toy2d", cd_grid_steps=None).sample  # by default the teachers' grid (upstream: both 48)
    grid = cf.consistency_sigmas(s)
    assert len(grid) == s.teacher_solver_steps and grid[0] == 1.0 and grid[-1] > 0
    assert grid == pytest.approx(cf.solver_sigmas(s.teacher_solver_steps, s)[:-1].tolist())
    s = cf.get_config("toy2d", cd_grid_steps=16).sample  # its own grid (upstream's discrete_cd_N)
    assert cf.consistency_sigmas(s) == pytest.approx(cf.solver_sigmas(16, s)[:-1].tolist())
    assert len(cf.ode_pair_sigmas(s)[1]) == s.teacher_solver_steps + 1  # the ODE pairs keep the teachers' grid
    for key, value in (("cd_grid_steps", 1), ("cd_grid_steps", 0), ("cd_batch_size", 0)):
        with pytest.raises(ValueError, match=key):
            cf.get_config("toy2d", **{key: value})


def test_consistency_stage_keeps_an_ema_of_the_student(monkeypatch):
    cfg = cf.get_config("toy2d", frames=4, chunk_frames=2, num_layers=1, batch_size=8, cd_batch_size=4, cd_steps=3,
                        cd_ema_decay=0.75, teacher_solver_steps=8, cd_grid_steps=6, device="cpu")
    teacher = cf._random_weights(cf.CausalDiT(cfg.model, causal=True), seed=0)
    start = {k: v.clone() for k, v in teacher.state_dict().items()}
    seen = []
    real_loss = cf.consistency_distillation_loss

    def spy(student, ema, frozen, x0, noise, t, t_next, cond=None, guidance=1.0):
        seen.append(({k: v.clone() for k, v in ema.state_dict().items()}, {k: v.clone() for k, v in student.state_dict().items()}, t, t_next))
        assert frozen is teacher and len(x0) == cfg.train.cd_batch_size  # its own batch size, not batch_size
        return real_loss(student, ema, frozen, x0, noise, t, t_next, cond, guidance)
    monkeypatch.setattr(cf, "consistency_distillation_loss", spy)
    data = cf.ToyVideos(cfg.data).sample(64, torch.Generator().manual_seed(0))
    student, losses = cf.train_consistency(cfg, teacher, data, log=None, rng=torch.Generator().manual_seed(0))
    assert len(losses) == 3 and all(map(math.isfinite, losses))
    assert all(torch.equal(v, start[k]) for k, v in teacher.state_dict().items())  # the teacher stays frozen
    grid = cf.consistency_sigmas(cfg.sample)
    assert len(grid) == 6
    for ema, _, t, t_next in seen:  # a pair of neighbouring grid sigmas
        assert any(t == grid[n] and t_next == grid[n + 1] for n in range(len(grid) - 1))
    assert all(torch.equal(seen[0][0][k], start[k]) for k in start)  # the EMA starts as the teacher
    for i in (1, 2):  # then moves a quarter of the way to the student after each step
        for k in start:
            want = 0.75 * seen[i - 1][0][k] + 0.25 * seen[i][1][k]
            assert torch.allclose(seen[i][0][k], want, rtol=1e-5, atol=1e-7), k


def test_a_stream_never_switches_gradients_off_for_its_caller():
    """The samplers run without gradients, but a stream's caller keeps its own grad mode between
    chunks, and a stream left unfinished (or a finished one wrapping another) cannot leave gradients
    off for the code that runs after it."""
    import gc

    cfg = cf.get_config("toy2d", cond_dim=10)
    model = cf.CausalDiT(cfg.model)
    sigmas = cf.student_sigmas(cfg.sample)
    chunks = cf.stream(model, sigmas, num_frames=4, batch_size=2)
    for chunk in chunks:
        assert torch.is_grad_enabled() and not chunk.requires_grad
        break
    del chunks, chunk
    gc.collect()
    assert torch.is_grad_enabled()
    cond = cf.label_cond(torch.tensor([[1], [2]]))
    for _ in long_stream.switched_stream(model, sigmas, num_frames=4, batch_size=2, cond=cond, switches={2: cond.flip(0)}):
        assert torch.is_grad_enabled()
    gc.collect()
    assert torch.is_grad_enabled()
    for _ in cf.stream_recompute(model, sigmas, num_frames=4, batch_size=2):
        assert torch.is_grad_enabled()
        break
    gc.collect()
    assert torch.is_grad_enabled()


class _Stop(Exception):
    pass


def _interrupt(cfg, out, at="[base] step     2/"):
    """Runs the pipeline until the log says `at` (a checkpoint of the stage is saved before it)."""
    def log(message):
        if message.strip().startswith(at):
            raise _Stop
    with pytest.raises(_Stop):
        cf.run_pipeline(cfg, out, log=log)


@pytest.mark.parametrize("change", [{"seed": 7}, {"num_layers": 2}])
def test_a_checkpoint_of_another_config_is_refused(tmp_path, change):
    """A stage's checkpoint records its config: with config.json gone, a run with another seed or model
    size is refused (naming the file and the fix) instead of resuming the other run's stage."""
    _interrupt(cf.get_config("toy2d", **TINY, checkpoint_every=1), str(tmp_path))
    (tmp_path / "config.json").unlink()
    other = cf.get_config("toy2d", **{**TINY, "checkpoint_every": 1, **change})
    key = "seed" if "seed" in change else "model.num_layers"
    with pytest.raises(ValueError, match=rf"bidirectional_base\.partial\.pt' is of another config \(differs in "
                                         rf"{key}\); delete it, or use another --out folder"):
        cf.run_pipeline(other, str(tmp_path), log=None)


def test_a_checkpoint_whose_optimizer_has_no_lr_schedule_is_refused_by_name(tmp_path):
    """The cosine schedule lives in the optimizer's param group: a checkpoint whose optimizer state lacks it
    (a LambdaLR beside the optimizer) cannot resume the stage bit for bit, so it is refused, with the fix."""
    model = torch.nn.Linear(2, 2)
    path = str(tmp_path / "stage.partial.pt")
    old = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.save({"step": 1, "objs": {"opt": {"opt": old.state_dict(), "schedule": {"last_epoch": 1}}}, "extra": {},
                "torch_rng": torch.get_rng_state(), "seconds": 0.0, "config": None}, path)
    opt = cf._adamw(model.parameters(), 1e-3, cf.get_config("toy2d").train, cosine_steps=5)
    with pytest.raises(ValueError, match=r"stage\.partial\.pt' does not fit this stage .*; delete it"):
        cf.StageCheckpoint(path, every=1).restore(opt=opt)


def test_a_link_planted_at_a_save_s_temporary_name_is_not_followed(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    (tmp_path / "run").mkdir()
    os.symlink(outside, tmp_path / "run" / f".tmp-{os.getpid()}-r.json")
    cf.save_atomic({"a": 1}, str(tmp_path / "run" / "r.json"))
    assert outside.read_text() == "keep me" and json.loads((tmp_path / "run" / "r.json").read_text()) == {"a": 1}


def test_a_run_of_another_config_that_claims_the_folder_while_the_data_loads_stops_this_one(tmp_path, monkeypatch):
    """Two runs of different configs started together on an empty folder both pass the first check: the
    folder is checked again once config.json is written, so the later one is refused."""
    other = cf.get_config("toy2d", **{**TINY, "seed": 7})
    load = cf.pipeline_data

    def claimed_meanwhile(*args, **kwargs):
        cf.save_atomic(other.to_dict(), str(tmp_path / "config.json"))
        return load(*args, **kwargs)
    monkeypatch.setattr(cf, "pipeline_data", claimed_meanwhile)
    with pytest.raises(ValueError, match="holds a run with another config"):
        cf.run_pipeline(cf.get_config("toy2d", **TINY), str(tmp_path), log=None)


def test_a_checkpoint_that_does_not_fit_the_model_is_a_clear_error(tmp_path):
    path = str(tmp_path / "stage.partial.pt")
    cf.StageCheckpoint(path, every=1).save(1, 5, {}, model=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"stage\.partial\.pt' does not fit this stage \(RuntimeError: .*size "
                                         r"mismatch.*\); delete it"):
        cf.StageCheckpoint(path, every=1).restore(model=torch.nn.Linear(3, 3))


def test_a_full_disk_keeps_the_previous_file_and_says_so(tmp_path, monkeypatch):
    import errno
    import io

    path = str(tmp_path / "stage.pt")
    cf.save_atomic({"w": torch.ones(2)}, path)

    class FullDisk(io.FileIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(cf.os, "fdopen", lambda fd, mode: io.BufferedWriter(FullDisk(fd, "wb")))
    for obj, name in (({"w": torch.zeros(10**6)}, "stage.pt"), ({"a": 1}, "r.json")):  # torch.save, JSON
        with pytest.raises(OSError, match=rf"cannot write .*{name}'.*No space left on device.*previous file"):
            cf.save_atomic(obj, str(tmp_path / name))
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["w"].sum() == 2 and os.listdir(tmp_path) == ["stage.pt"]


def test_every_file_a_run_writes_arrives_whole_by_a_rename(tmp_path, monkeypatch):
    """No file of a run folder is written in place (an interrupted write would leave it empty or cut):
    each is written to a temporary file, flushed to disk, then renamed over its name."""
    renamed = []
    replace = os.replace
    monkeypatch.setattr(cf.os, "replace", lambda a, b: (renamed.append(os.path.abspath(b)), replace(a, b)))
    cf.run_pipeline(cf.get_config("toy2d", **TINY, checkpoint_every=1), str(tmp_path), log=None)
    written = {os.path.join(d, f) for d, _, files in os.walk(tmp_path) for f in files}
    assert written and written <= set(renamed)
