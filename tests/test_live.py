"""The live player of notebooks/06_interactive.ipynb (examples/live.py) without a browser: presses become
exactly the send() calls of a switch made by hand, settings and held-out videos continue through
stream(..., prefix=), and the widget app plays as an asyncio task."""

import asyncio

import pytest
import torch

import causal_forcing as cf
from examples import live
from examples import long_stream


def tiny_digit_model():
    cfg = cf.get_config("mnist", device="cpu", num_layers=1, dim=32, num_heads=2, ffn_dim=64)
    return cf._random_weights(cf.CausalDiT(cfg.model).eval(), std=0.05).requires_grad_(False), cfg


def by_hand(player, digit, switches, num_frames, seed, steps=4, recache=False, prefix=None, rng=None):
    """The same stream as the player's, with its switches sent by hand (long_stream.switched_stream)."""
    kw = cf.streaming_steps(player.cfg.sample, steps)
    if prefix is not None:  # no switch: the plain stream after the given frames
        return torch.cat(list(cf.stream(player.generator, **kw, num_frames=num_frames, batch_size=1,
                                        cond=player.cond(digit), prefix=prefix, rng=rng)), 1)
    return torch.cat(list(long_stream.switched_stream(
        player.generator, **kw, num_frames=num_frames,
        batch_size=1, cond=player.cond(digit), switches={f: player.cond(d) for f, d in switches.items()},
        recache=recache, rng=torch.Generator().manual_seed(seed))), 1)


@pytest.mark.parametrize("recache", [False, True], ids=["keep cache", "re-cache"])
def test_a_digit_pressed_at_chunk_k_gives_the_stream_switched_by_hand_at_chunk_k(recache):
    model, cfg = tiny_digit_model()
    player = live.Player(model, cfg, digit=3, recache=recache, seed=0)
    frames = []
    for k in range(7):  # past the rolling window of 8 frames
        if k == 3:
            player.press(4)  # a press the next one overrides before the chunk boundary
            player.press(7)
        frames.append(player.next_chunk()[0])
    torch.testing.assert_close(torch.cat(frames, 1), by_hand(player, 3, {6: 7}, 14, 0, recache=recache),
                               rtol=0, atol=0)
    assert player.digit == 7


def test_the_widget_buttons_send_what_the_player_sends():
    pytest.importorskip("ipywidgets")
    model, cfg = tiny_digit_model()
    app = live.LiveApp(live.Player(model, cfg, digit=1, seed=2))
    pngs = []
    for k in range(4):
        if k == 2:
            app.digits[5].click()
        pngs += app.step()
    frames = torch.cat([f[None, None] for f, _, _ in app.shown], 1)
    torch.testing.assert_close(frames, by_hand(app.player, 1, {4: 5}, 8, 2), rtol=0, atol=0)
    assert len(pngs) == 8 and all(p.startswith(b"\x89PNG") for p in pngs)
    state = app.player.rng.get_state()
    app.steps.value = 2  # a new stream with 2 steps continues the last chunk shown
    after = torch.cat([app.player.next_chunk()[0] for _ in range(2)], 1)
    expected = by_hand(app.player, 5, {}, 4, None, steps=2, prefix=frames[:, -2:],
                       rng=torch.Generator().set_state(state))
    torch.testing.assert_close(after, expected, rtol=0, atol=0)


def test_a_held_out_video_is_shown_then_continued_and_a_press_before_the_stream_starts_counts():
    model, cfg = tiny_digit_model()
    player = live.Player(model, cfg, digit=0, seed=1)
    video = torch.rand(1, 4, 1, 16, 16) * 2 - 1
    state = player.rng.get_state()
    player.restart(prefix=video, digit=6)
    shown = [player.next_chunk() for _ in range(2)]
    assert [given for _, given in shown] == [True, True]
    torch.testing.assert_close(torch.cat([c for c, _ in shown], 1), video, rtol=0, atol=0)
    player.press(8)  # before the continuation has made a frame: it starts under 8
    got = torch.cat([player.next_chunk()[0] for _ in range(3)], 1)
    expected = by_hand(player, 8, {}, 6, None, prefix=video, rng=torch.Generator().set_state(state))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="steps must be 1, 2 or 4"):
        player.set_steps(3)
    with pytest.raises(ValueError, match="digit must be one of 0-9"):
        player.press(10)


def test_the_app_plays_as_a_task_and_pauses():
    pytest.importorskip("ipywidgets")
    model, cfg = tiny_digit_model()
    app = live.LiveApp(live.Player(model, cfg, seed=0), cf.DigitClassifier(16).eval(), fps=200)

    async def run():
        app.play()
        await app.wait(6, timeout=120)
        app.pause()
        await asyncio.sleep(0.05)
    asyncio.run(run())
    assert app.frames_shown >= 6 and bytes(app.image.value).startswith(b"\x89PNG") and app.task.done()
    assert "frames per second shown" in app.readout.value and "the classifier reads" in app.readout.value
    fig = app.still(8)
    assert len(fig.axes) == 8
    fig.clf()
