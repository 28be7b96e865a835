"""Steer a live digit stream by hand (notebooks/06_interactive.ipynb).

`Player` turns a user's presses into `stream` calls: a digit pressed while chunk k - 1 is on screen is
sent with `chunks.send(new_cond)` for chunk k (the next chunk boundary), exactly as a switch made by
hand (examples/long_stream.py: switched_stream); a change of the number of steps or of the re-cache
policy, both fixed when a stream is made, starts a new stream that continues the last chunk shown
(stream(..., prefix=)); `restart` starts from noise or continues given frames. It streams one video
through a rolling window, so it plays for as long as one likes in fixed memory.

`LiveApp` puts a Player behind ipywidgets: an image that plays the stream, buttons 0-9, a re-cache
toggle, 1/2/4 steps, play/pause, restart, "continue a held-out video", and a readout of the time per
chunk and the frames shown per second. It plays as an asyncio task on the kernel's event loop, so the
buttons are handled between frames while it plays.
"""

from __future__ import annotations

import asyncio
import collections
import io
import os
import sys
import time
from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import causal_forcing as cf  # noqa: E402
from examples.long_stream import windowed  # noqa: E402


class Player:
    """One video streamed chunk by chunk (batch 1) under a digit a user changes while it plays.

    window_frames, sink_frames: the rolling window the generator streams through (default: the training
    clip length and a sink of one chunk, window RoPE positions; see docs/long_stream.json). A generator
    that has its own window keeps it."""

    def __init__(self, generator: cf.CausalDiT, cfg: cf.Config, *, digit: int = 0, steps: int = 4,
                 recache: bool = False, seed: int = 0, window_frames: Optional[int] = None,
                 sink_frames: Optional[int] = None, length: int = 1 << 20):
        chunk = generator.cfg.chunk_frames
        if generator.cfg.window_frames is None:
            generator = windowed(generator, window_frames or cfg.data.frames,
                                 chunk if sink_frames is None else sink_frames, "window")
        self.generator, self.cfg, self.chunk = generator, cfg, chunk
        self.device = next(generator.parameters()).device
        self.length = max(chunk, length - length % chunk)  # frames per stream; a stream that ends is continued
        self.digit, self.steps, self.recache = digit, steps, recache
        self.rng = torch.Generator().manual_seed(seed)
        self.restart()

    def cond(self, digit: int) -> torch.Tensor:
        return cf.label_cond(torch.tensor([[digit]])).to(self.device)

    def _new_stream(self, prefix: Optional[torch.Tensor] = None):
        self.prefix, self.started = prefix, False
        self.chunks = cf.stream(self.generator, **cf.streaming_steps(self.cfg.sample, self.steps), num_frames=self.length,
                                batch_size=1, cond=self.cond(self.digit), prefix=prefix, recache=self.recache, rng=self.rng)

    def restart(self, prefix: Optional[torch.Tensor] = None, digit: Optional[int] = None) -> None:
        """A new stream: from noise, or continuing `prefix` (1, P, C, H, W) (whose chunks next_chunk
        returns first, so that they are shown), under `digit` (default: the current one)."""
        self.digit = self.digit if digit is None else digit
        self.pending, self.last = None, None
        self.given = [] if prefix is None else list(prefix.to(self.device).split(self.chunk, 1))
        self._new_stream(prefix if prefix is None else prefix.to(self.device))

    def press(self, digit: int) -> None:
        """Ask for `digit` from the next chunk on (the last press before it counts)."""
        if digit not in range(10):
            raise ValueError(f"digit must be one of 0-9, got {digit!r}")
        self.pending = digit

    def set_steps(self, steps: int) -> None:
        """Stream with 1, 2 or 4 steps from the next chunk on (a new stream continuing the last chunk)."""
        if steps not in (1, 2, 4):
            raise ValueError(f"steps must be 1, 2 or 4, got {steps!r}")
        self.steps = steps
        self._continue()

    def set_recache(self, recache: bool) -> None:
        """Keep (False) or re-cache (True) the context at later switches (a new stream continuing the last chunk)."""
        self.recache = bool(recache)
        self._continue()

    def _continue(self) -> None:
        """The stream again under the current settings: after the last chunk shown, or from its start if
        it has made nothing yet."""
        self._new_stream(self.last if self.started else self.prefix)

    def next_chunk(self) -> tuple[torch.Tensor, bool]:
        """The next chunk to show (1, chunk, C, H, W) and whether it was given (a prefix chunk) rather than
        generated. A pending press is sent with it: chunks.send(cond(digit))."""
        if self.given:
            self.last = self.given.pop(0)
            return self.last, True
        switch, self.pending = self.pending, None
        if switch is not None:
            self.digit = switch
            if not self.started:  # a stream that has made nothing yet starts under the new digit
                self._new_stream(self.prefix)
                switch = None
        try:
            chunk = self.chunks.send(self.cond(switch)) if switch is not None else next(self.chunks)
        except StopIteration:  # the stream's length is reached: a new one continues it
            self._new_stream(self.last)
            return self.next_chunk()
        self.started, self.last = True, chunk
        return chunk, False


def png(frame: torch.Tensor, scale: int = 16) -> bytes:
    """A frame (1, H, W) in [-1, 1] as PNG bytes, each pixel a scale x scale block (no smoothing)."""
    from PIL import Image

    pixels = cf.to_pixels(frame[0].cpu()).repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    buf = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buf, format="PNG")
    return buf.getvalue()


class LiveApp:
    """A Player behind ipywidgets (`.widget` to display; `play()` starts it). `classifier` reads the digit
    in every frame shown; `held_out` (videos (N, F, 1, H, W), labels (N, 1)) are the videos the
    "continue" button continues from their first chunk. Plays at up to `fps` frames per second."""

    def __init__(self, player: Player, classifier: Optional[cf.DigitClassifier] = None, held_out=None,
                 fps: float = 30.0, scale: int = 16):
        import ipywidgets as w

        self.player, self.classifier, self.held_out, self.fps, self.scale = player, classifier, held_out, fps, scale
        self.image = w.Image(format="png", width=16 * scale, height=16 * scale)
        self.digits = [w.Button(description=str(d), layout=w.Layout(width="40px")) for d in range(10)]
        for d, button in enumerate(self.digits):
            button.on_click(lambda _, d=d: self.player.press(d))
        self.recache = w.ToggleButton(value=player.recache, description="re-cache at switches")
        self.recache.observe(lambda change: self.player.set_recache(change["new"]), "value")
        self.steps = w.ToggleButtons(options=[1, 2, 4], value=player.steps, description="steps",
                                     style={"button_width": "40px"})
        self.steps.observe(lambda change: self.player.set_steps(change["new"]), "value")
        self.play_button = w.ToggleButton(value=False, description="play / pause", icon="play")
        self.play_button.observe(lambda change: self.play() if change["new"] else self.pause(), "value")
        self.restart_button = w.Button(description="restart from noise")
        self.restart_button.on_click(lambda _: self.player.restart())
        self.continue_button = w.Button(description="continue a held-out video", disabled=held_out is None)
        self.continue_button.on_click(lambda _: self.continue_video())
        self.readout = w.HTML()
        for widget, name in ((self.image, "frame"), (self.readout, "readout"), (self.play_button, "play")):
            widget.add_class(f"cf-live-{name}")
        for button in self.digits:
            button.add_class("cf-live-digit")
        controls = w.VBox([w.HBox(self.digits), w.HBox([self.steps, self.recache]),
                           w.HBox([self.play_button, self.restart_button, self.continue_button]), self.readout])
        self.widget = w.HBox([self.image, controls])
        self.task, self.playing, self.next_video, self.shown = None, False, 0, collections.deque(maxlen=64)
        self.frames_shown, self.chunks_made = 0, 0
        self.times, self.chunk_ms = collections.deque(maxlen=61), collections.deque(maxlen=20)
        self.reads, self.reads_digit = [], None

    def continue_video(self) -> None:
        """Show the next held-out video's first chunk, then the generator's continuation of it under its label."""
        videos, labels = self.held_out
        k, self.next_video = self.next_video % len(videos), self.next_video + 1
        self.player.restart(prefix=videos[k:k + 1, :self.player.chunk], digit=int(labels[k, 0]))

    def step(self) -> list[bytes]:
        """The player's next chunk, read by the classifier and noted in the readout's counts: its frames as PNGs."""
        t0 = time.perf_counter()
        chunk, given = self.player.next_chunk()
        self.chunk_ms.append(1000 * (time.perf_counter() - t0))
        self.chunks_made += 1
        reads = cf.read_frames(self.classifier, chunk)[1][0].tolist() if self.classifier else [None] * chunk.shape[1]
        if self.reads_digit != self.player.digit:  # a new digit: count its reads from here
            self.reads, self.reads_digit = [], self.player.digit
        self.reads += [] if given else reads
        for frame, read in zip(chunk[0].cpu(), reads):
            self.shown.append((frame, read, given))
        return [png(frame, self.scale) for frame in chunk[0]]

    def show(self, frame: bytes, readout: bool = True) -> None:
        """Put a frame on screen (and update the readout: the loop does so once per chunk, one message less a frame)."""
        self.image.value = frame
        self.frames_shown += 1
        self.times.append(time.perf_counter())
        if readout:
            self.readout.value = self.status()

    def frames_per_second(self) -> float:
        """Frames shown per second of wall time, over the last 60 frames (NaN before two)."""
        t = self.times
        return (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 and t[-1] > t[0] else float("nan")

    def status(self) -> str:
        """The readout: the latest chunk, what the classifier reads in it, the time per chunk and the frame rate."""
        p = self.player
        chunk = list(self.shown)[-p.chunk:]  # (frame, read, given) of the latest chunk's frames
        kept, given, reads = sum(r == p.digit for r in self.reads), chunk[0][2], " ".join(str(r) for _, r, _ in chunk)
        what = "given frames (a held-out video)" if given else f"asked for {p.digit}"
        reading = "" if self.classifier is None else (f", the classifier reads {reads} ({kept} of {len(self.reads)} "
                                                      f"frames read as {p.digit} since it was asked for)")
        cache = "re-cached" if p.recache else "kept"
        return (f"<div>chunk {self.chunks_made}: {what}{reading}</div>"
                f"<div><span class='cf-ms'>{sum(self.chunk_ms) / len(self.chunk_ms):.1f}</span> ms per chunk, "
                f"<span class='cf-fps'>{self.frames_per_second():.1f}</span> frames per second shown; "
                f"{p.steps} steps, context {cache} at a switch</div>")

    async def _play(self) -> None:
        due = time.perf_counter()
        try:
            while self.playing:
                for i, frame in enumerate(self.step()):
                    due = max(due + 1 / self.fps, time.perf_counter() - 1 / self.fps)  # late: no catching up
                    await asyncio.sleep(max(0.002, due - time.perf_counter()))  # buttons are handled here
                    if not self.playing:
                        return
                    self.show(frame, readout=i == 0)
        except Exception as e:  # a stopped stream says why, in the readout (a task's error shows nowhere else)
            self.readout.value = f"<div>stopped: {type(e).__name__}: {e}</div>"
            self.pause()

    def play(self) -> None:
        """Start playing as a task on the running event loop (the kernel's): the cell returns at once."""
        if self.task is None or self.task.done():
            self.playing = True
            self.task = asyncio.ensure_future(self._play())
        self.play_button.value = True

    def pause(self) -> None:
        self.playing = False
        self.play_button.value = False

    async def wait(self, frames: int, timeout: float = 60.0) -> None:
        """Await (in a cell: `await app.wait(48)`) until `frames` more frames have been shown, or `timeout` s."""
        goal, end = self.frames_shown + frames, time.perf_counter() + timeout
        while self.frames_shown < goal and time.perf_counter() < end and self.playing:
            await asyncio.sleep(0.05)

    def still(self, frames: int = 16):
        """A matplotlib figure of the last `frames` frames shown, each titled with the digit the classifier read."""
        import matplotlib.pyplot as plt

        shown = list(self.shown)[-frames:]
        fig, axes = plt.subplots(1, len(shown), figsize=(0.9 * len(shown), 1.3), squeeze=False)
        for ax, (frame, read, given) in zip(axes[0], shown):
            ax.imshow(frame[0].numpy(), cmap="gray", vmin=-1, vmax=1)
            ax.set_title(("given " if given else "") + ("" if read is None else f"reads {read}"), fontsize=7)
            ax.axis("off")
        fig.tight_layout()
        return fig
