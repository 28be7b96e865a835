"""Text to video with real Wan2.1 components around the module's streaming generator.

    pip install -r requirements-wan.txt
    python examples/generate.py --wan-dir WAN --checkpoint causal_forcing.pt --prompt "a red fox runs through snow"

A Wan2.1 folder in Diffusers' layout (Wan-AI/Wan2.1-T2V-1.3B-Diffusers) holds tokenizer/, text_encoder/
(umT5-XXL), transformer/ (the DiT, Diffusers' parameter names, which `causal_forcing.load_wan_weights`
maps to Wan's) and vae/ (AutoencoderKLWan). umT5 text features go in, latents stream out chunk by chunk
(`causal_forcing.stream`), and each chunk is decoded by Wan's VAE and written to the .mp4 as the stream
goes. The optional packages are imported only inside the functions that need them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import io
import json
import math
import os
import re
import sys
import time
import warnings
from typing import Optional

import torch
from einops import rearrange

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import causal_forcing as cf  # noqa: E402
from examples.figures import (atomic_file, check_writable, publish, remove_stale_temporaries,  # noqa: E402
                              temporary_beside)


# A Wan2.1 folder in Diffusers' layout (Wan-AI/Wan2.1-T2V-1.3B-Diffusers) holds tokenizer/,
# text_encoder/ (umT5-XXL), transformer/ (the DiT, Diffusers' parameter names) and vae/
# (AutoencoderKLWan); the DiT's Diffusers names are mapped to Wan's in causal_forcing.py's II.2 (diffusers_to_wan).
# Reading them needs the optional packages of requirements-wan.txt, imported only inside these
# functions: `import causal_forcing` never needs them. Read in order: the model config, the text
# encoder, the VAE decoding chunk by chunk, the video file, the prompts file, then `generate`.

WAN_NEGATIVE_PROMPT = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
                       "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，"
                       "形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")  # Wan2.1's default
WAN_FPS = 16  # Wan2.1's frame rate
WAN_PACKAGES = {"diffusers": "diffusers", "transformers": "transformers", "safetensors": "safetensors",
                "imageio": "imageio", "imageio_ffmpeg": "imageio-ffmpeg"}  # module -> pip name


def _require(*modules: str, what: str = "this") -> None:
    """Imports the optional packages `what` needs, or says which are missing and how to install them."""
    import importlib

    missing = []
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(WAN_PACKAGES.get(module, module))
    if missing:
        raise ImportError(f"{what} needs {', '.join(missing)}: pip install -r requirements-wan.txt "
                          f"(or pip install {' '.join(missing)})")


def _check_video_size(height: int, width: int, step: int = 16) -> None:
    if height <= 0 or width <= 0 or height % step or width % step:
        raise ValueError(f"height and width ({height}x{width}) must be positive multiples of {step} (the VAE's 8x times "
                         "the patch's 2x); Wan2.1 makes 480x832")


def wan_model_config(transformer_config: dict, height: int, width: int, chunk_frames: int = 3,
                     spatial_compression: int = 8) -> cf.ModelConfig:
    """The ModelConfig of a Wan2.1 text-to-video DiT described by Diffusers' transformer/config.json,
    for videos of height x width pixels (latents 8x smaller)."""
    c = transformer_config
    patch = tuple(c.get("patch_size", (1, 2, 2)))
    problems = [f"{k}={c.get(k)!r} (this DiT needs {want!r})" for k, want in
                (("image_dim", None), ("added_kv_proj_dim", None), ("qk_norm", "rms_norm_across_heads"),
                 ("cross_attn_norm", True)) if c.get(k, want) != want]
    if patch[0] != 1 or patch[1] != patch[2]:
        problems.append(f"patch_size={list(patch)} (this DiT needs [1, p, p])")
    if c.get("out_channels", c["in_channels"]) != c["in_channels"]:
        problems.append(f"out_channels={c['out_channels']} differs from in_channels={c['in_channels']}")
    if problems:
        raise ValueError("not a Wan2.1 text-to-video transformer: " + "; ".join(problems))
    _check_video_size(height, width, spatial_compression * patch[1])
    return cf.ModelConfig(in_channels=c["in_channels"], height=height // spatial_compression,
                       width=width // spatial_compression, patch_size=patch[1],
                       dim=c["num_attention_heads"] * c["attention_head_dim"], ffn_dim=c["ffn_dim"],
                       num_heads=c["num_attention_heads"], num_layers=c["num_layers"], freq_dim=c["freq_dim"],
                       cond_dim=c["text_dim"], text_len=512, eps=c.get("eps", 1e-6), chunk_frames=chunk_frames)


def _clean_prompt(text: str) -> str:
    """Wan's prompt cleaning: ftfy's text repair (curly quotes, mojibake, fullwidth characters; where
    ftfy is installed, as Diffusers does), HTML entities undone twice, runs of whitespace made one."""
    import html

    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    return " ".join(html.unescape(html.unescape(text)).split())


class WanTextEncoder:
    """umT5 features of prompts, as Wan conditions on them: each prompt cleaned, tokenized (with its
    end token, at most text_len tokens), encoded, cut to its own length and padded with zero rows to
    text_len. Features are kept per prompt, so a prompt used again costs nothing."""

    def __init__(self, wan_dir: str, device="cpu", dtype=torch.float32, text_len: int = 512):
        _require("transformers", what="the umT5 text encoder")
        from transformers import AutoTokenizer, UMT5EncoderModel

        self.tokenizer = AutoTokenizer.from_pretrained(os.path.join(wan_dir, "tokenizer"))
        self.encoder = UMT5EncoderModel.from_pretrained(os.path.join(wan_dir, "text_encoder"), dtype=dtype)
        self.encoder = self.encoder.to(device).eval().requires_grad_(False)
        self.device, self.text_len, self.known = torch.device(device), text_len, {}

    @torch.no_grad()
    def __call__(self, prompts: list) -> torch.Tensor:
        """(len(prompts), text_len, d_model) float32 on the encoder's device."""
        new = [p for p in dict.fromkeys(prompts) if p not in self.known]
        if new:
            cleaned = [_clean_prompt(p) for p in new]
            self._warn_if_cut(new, cleaned)
            tokens = self.tokenizer(cleaned, padding="max_length", max_length=self.text_len,
                                    truncation=True, add_special_tokens=True, return_attention_mask=True,
                                    return_tensors="pt")
            mask = tokens.attention_mask.to(self.device)
            feats = self.encoder(tokens.input_ids.to(self.device), mask).last_hidden_state.float()
            for p, f, n in zip(new, feats, mask.sum(1).tolist()):
                self.known[p] = torch.cat([f[:n], f.new_zeros(self.text_len - n, f.shape[1])])
        return torch.stack([self.known[p] for p in prompts])

    def _warn_if_cut(self, prompts: list, cleaned: list) -> None:
        """Warns of each prompt longer than text_len tokens (its end token included): umT5 reads only the
        first text_len, as Wan does, and the rest would be dropped without a word."""
        for prompt, ids in zip(prompts, self.tokenizer(cleaned, add_special_tokens=True, verbose=False)["input_ids"]):
            if len(ids) > self.text_len:
                shown = prompt if len(prompt) <= 80 else prompt[:77] + "..."
                warnings.warn(f"the prompt {shown!r} has {len(ids)} tokens; umT5 reads the first {self.text_len}, so "
                              f"its last {len(ids) - self.text_len} are dropped: shorten it", stacklevel=3)


def load_wan_vae(wan_dir: str, device="cpu", dtype=torch.float32):
    """Diffusers' AutoencoderKLWan from wan_dir/vae, in eval mode."""
    _require("diffusers", what="the Wan VAE")
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(os.path.join(wan_dir, "vae"), torch_dtype=dtype)
    if getattr(vae.config, "patch_size", None) is not None:
        raise ValueError("this VAE patchifies its input (Wan2.2's); generate decodes Wan2.1's VAE")
    return vae.to(device).eval().requires_grad_(False)


class StreamingVAEDecoder:
    """Decodes Wan latents chunk by chunk, as the stream makes them, into video frames in [-1, 1].

    Wan's VAE is causal in time: it decodes one latent frame at a time, each convolution keeping the
    last frames it saw in a cache, and the first latent frame gives 1 video frame, every later one 4
    (81 frames from 21 latents). Keeping that cache between calls makes decoding a video chunk by
    chunk equal to decoding it whole (tested). Latents are the DiT's (normalised); Wan's per-channel
    latent mean and std are undone first. This drives Diffusers' decoder the way its own _decode
    loop does (its cache lists _feat_map and _conv_idx), so a Diffusers release that changes that
    loop shows up as a failing test, not as a wrong video. The cache lives in the VAE: one decoder
    per VAE at a time. Tiled decoding (vae.enable_tiling()) is another loop and is refused."""

    def __init__(self, vae):
        if getattr(vae, "use_tiling", False):
            raise ValueError("the VAE decodes in tiles (use_tiling); streaming decodes whole frames: vae.disable_tiling()")
        self.vae, self.first = vae, True
        p = next(vae.parameters())
        self.mean = torch.tensor(vae.config.latents_mean, dtype=p.dtype, device=p.device).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(vae.config.latents_std, dtype=p.dtype, device=p.device).view(1, -1, 1, 1, 1)
        vae.clear_cache()

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (B, f, C, h, w) -> video frames (B, T, 3, H, W), T = 4 f (4 f - 3 for the first chunk)."""
        vae = self.vae
        z = rearrange(latents, "b f c h w -> b c f h w").to(self.mean.dtype) * self.std + self.mean
        x, out = vae.post_quant_conv(z), []
        for i in range(x.shape[2]):
            vae._conv_idx = [0]
            kw = {"first_chunk": True} if self.first else {}
            out.append(vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx, **kw))
            self.first = False
        return rearrange(torch.cat(out, 2).clamp(-1, 1), "b c t h w -> b t c h w")

    def close(self) -> None:
        self.vae.clear_cache()


def to_uint8_frames(video: torch.Tensor):
    """(T, 3, H, W) in [-1, 1] -> numpy (T, H, W, 3) uint8, rounded to the nearest level (Wan's
    cache_video and Diffusers' export_to_video truncate instead: at most 1 level darker)."""
    return ((video.float().permute(0, 2, 3, 1) + 1) / 2).clamp(0, 1).mul(255).round().byte().cpu().numpy()


class VideoFile:
    """An .mp4 (H.264, WAN_FPS) written frame by frame as the video is decoded, through imageio-ffmpeg,
    into a temporary beside it (.tmp-<8 characters>-<name>) renamed over `path` only when the video is
    whole (an interrupted run never leaves half a video under the final name; `generate` removes the
    temporaries a killed run leaves). gif=True also writes the .gif beside it at close."""

    def __init__(self, path: str, fps: int = WAN_FPS, gif: bool = False):
        _require("imageio", "imageio_ffmpeg", what="writing .mp4 files")
        import imageio

        fd, self.tmp = temporary_beside(path)
        os.close(fd)
        self.path, self.fps, self.frames, self.gif = path, fps, 0, [] if gif else None
        self.writer = imageio.get_writer(self.tmp, format="FFMPEG", fps=fps, codec="libx264", quality=8,
                                         macro_block_size=1, ffmpeg_log_level="error")

    def write(self, video: torch.Tensor) -> None:
        """Appends frames (T, 3, H, W) in [-1, 1]."""
        for frame in to_uint8_frames(video):
            self.writer.append_data(frame)
            if self.gif is not None:
                self.gif.append(frame)
            self.frames += 1

    def close(self) -> None:
        self.writer.close()
        publish(self.tmp, self.path)
        if self.gif:
            from PIL import Image

            gif_path = os.path.splitext(self.path)[0] + ".gif"
            with atomic_file(gif_path) as f:
                images = [Image.fromarray(fr) for fr in self.gif]
                images[0].save(f, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / self.fps), loop=0)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()
        with contextlib.suppress(OSError):
            os.remove(self.tmp)


def read_prompts(path: str) -> list:
    r"""A prompts file (UTF-8 text): one video per line; '#' starts a comment line. A prompt switch
    inside a video is written after a '|' as "<latent frame>: <prompt>"; a '|' that belongs to a
    prompt is written \|. E.g.
        a red fox runs through deep snow
        a quiet city street at night | 12: the same street in heavy rain | 18: the street at dawn
        a neon sign reading OPEN \| CLOSED
    Returns, per video, a list of (first latent frame, prompt)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark at the start is not part of the first line
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        byte = data[e.start:e.start + 1]
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte {e.start} of the file is {byte!r}): save the prompts "
                         "file as UTF-8") from None
    videos = []
    for n, line in enumerate(io.StringIO(text, newline=None), 1):  # lines as open() splits them
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = [p.replace("\\|", "|").strip() for p in re.split(r"(?<!\\)\|", line)]  # \| is a literal bar
        schedule = [(0, parts[0])]
        for part in parts[1:]:
            frame, sep, prompt = part.partition(":")
            if not sep or not frame.strip().isdigit() or not prompt.strip():
                raise ValueError(f"{path}:{n}: a prompt switch is written '| <latent frame>: <prompt>' (a bar inside "
                                 f"a prompt: \\|), got {part!r}")
            schedule.append((int(frame), prompt.strip()))
        videos.append(schedule)
    if not videos:
        raise ValueError(f"{path} holds no prompts (one per line)")
    return videos


def _check_schedules(schedules: list, frames: int, chunk_frames: int) -> None:
    for schedule in schedules:
        at = [f for f, _ in schedule]
        if not all(p.strip() for _, p in schedule):
            raise ValueError("a prompt is empty")
        if at[0] != 0 or at != sorted(set(at)) or at[-1] >= frames or any(f % chunk_frames for f in at):
            raise ValueError(f"prompt switch frames {at[1:]} must increase, lie inside the video's {frames} latent frames "
                             f"and be multiples of chunk_frames={chunk_frames} (switches happen between chunks)")


def load_wan_generator(wan_dir: str, checkpoint: Optional[str], height: int, width: int, chunk_frames: int = 3,
                       key: Optional[str] = None, log=print) -> cf.CausalDiT:
    """The DiT `generate` runs, on the CPU in float32: a Causal/Self Forcing generator from
    `checkpoint` (causal, chunks of chunk_frames; entry `key`, default generator_ema if present, else
    generator), or without it the bidirectional base in wan_dir/transformer. Shapes come from
    wan_dir/transformer/config.json (Wan2.1-T2V-1.3B's where there is none). Built on the meta
    device, so no random initialisation of a billion parameters is spent before the weights load."""
    config_path = os.path.join(wan_dir, "transformer", "config.json")
    _check_video_size(height, width)
    if os.path.isfile(config_path):
        with open(config_path) as f:
            cfg = wan_model_config(json.load(f), height, width, chunk_frames)
    else:
        cfg = dataclasses.replace(cf.get_config("wan-1.3b").model, height=height // 8, width=width // 8, chunk_frames=chunk_frames)
    with torch.device("meta"):
        model = cf.CausalDiT(cfg, causal=checkpoint is not None)
    cf.load_wan_weights(model, checkpoint or os.path.join(wan_dir, "transformer"), key=key, log=log)
    return model.float().eval().requires_grad_(False)  # fp32 weights, as Wan keeps them; bf16 autocast on CUDA


def _output_files(out: str, count: int) -> list:
    """The .mp4 files of `count` videos: `out`, or for several out's stem with _000, _001, ... Each is
    checked to be writable now, not after its video, and the temporaries that a killed earlier run
    of it left are removed (its .gif's too)."""
    if os.path.isdir(out) or os.path.splitext(out)[1].lower() != ".mp4":
        what = "is a folder" if os.path.isdir(out) else "must end in .mp4, the video's format"
        raise ValueError(f"out {out!r} {what}: give the .mp4 file to write (with gif=True, --gif, the .gif is written "
                         "beside it as <stem>.gif)")
    files = [out] if count == 1 else [f"{os.path.splitext(out)[0]}_{i:03d}.mp4" for i in range(count)]
    for path in files:
        check_writable(path, "out")
        for written in (path, os.path.splitext(path)[0] + ".gif"):
            remove_stale_temporaries(written)
    return files


def generate(prompts, *, wan_dir: str, checkpoint: Optional[str] = None, frames: int = 21, out: str = "video.mp4",
             seed: int = 0, device: str = "auto", height: int = 480, width: int = 832, chunk_frames: int = 3,
             checkpoint_key: Optional[str] = None, denoising_steps: Optional[tuple] = None,
             first_chunk_steps: Optional[tuple] = None, shift: float = 5.0, steps: int = 50, guidance: float = 5.0,
             negative_prompt: str = WAN_NEGATIVE_PROMPT, recache: bool = False, gif: bool = False,
             text_device: Optional[str] = None, return_videos: bool = False, log=print) -> dict:
    """Text to video with real Wan2.1 components, written as .mp4 files as the video streams.

    prompts: a string, a list of strings (one video each), or per video a list of (latent frame,
      prompt) switches as `read_prompts` returns them (a generator checkpoint only).
    checkpoint: a Causal Forcing / Self Forcing generator (.pt; entry checkpoint_key, default
      "generator_ema" when present, else "generator"): latents stream chunk by chunk (chunk_frames 3
      chunk-wise, 1 frame-wise) with `denoising_steps` (default Wan's 4 warped steps; Causal
      Forcing++'s 2-step model: (1000, 500) with first_chunk_steps (1000, 750, 500, 250)), and each
      chunk is decoded and written before the next is made. Without it, the bidirectional base in
      wan_dir/transformer makes the whole clip in `steps` Euler steps with classifier-free `guidance`
      against `negative_prompt` (Wan's sampler, with Euler instead of UniPC), then decodes it.
    frames: latent frames (Wan: 21, giving 81 video frames at 16 fps). out: the .mp4 (with several
      videos, out's stem gets _000, _001, ...). Returns the files and the timings: seconds per
      chunk, seconds to the first decoded frames, video frames per second of the whole loop (the
      first video's include the device's warm-up: kernel loading and autotuning)."""
    dev = cf.resolve_device(device)
    text_dev = cf.resolve_device(text_device or dev)
    schedules = [[(0, p)] if isinstance(p, str) else [(int(f), t) for f, t in p]
                 for p in ([prompts] if isinstance(prompts, str) else prompts)]
    # --- 1. every check that needs no weights ------------------------------------------------------
    _require("diffusers", "transformers", "safetensors", "imageio", "imageio_ffmpeg", what="generate")
    if not schedules:
        raise ValueError("no prompts given")
    if frames < 1 or chunk_frames < 1 or steps < 1:
        raise ValueError(f"frames={frames}, chunk_frames={chunk_frames} and steps={steps} must be >= 1")
    missing = [d for d in ("tokenizer", "text_encoder", "vae") + (() if checkpoint else ("transformer",))
               if not os.path.isdir(os.path.join(wan_dir, d))]
    if missing:
        raise FileNotFoundError(f"{wan_dir!r} lacks {', '.join(m + '/' for m in missing)}: give the folder of "
                                "'hf download Wan-AI/Wan2.1-T2V-1.3B-Diffusers --local-dir <folder>'")
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"no checkpoint file at {checkpoint!r}")
    if checkpoint is None and any(len(s) > 1 for s in schedules):
        raise ValueError("prompt switches need a streaming generator (--checkpoint); the base makes the clip at once")
    _check_schedules(schedules, frames, chunk_frames)
    _check_video_size(height, width)
    sample = cf.SampleConfig(shift=shift)
    sigmas = cf.student_sigmas(sample, denoising_steps) if checkpoint else cf.solver_sigmas(steps, sample)
    first_sigmas = cf.student_sigmas(sample, first_chunk_steps) if checkpoint and first_chunk_steps else None
    files = _output_files(out, len(schedules))

    # --- 2. the DiT and the VAE on the CPU: a checkpoint that does not fit is said before umT5 loads -
    model = load_wan_generator(wan_dir, checkpoint, height, width, chunk_frames, checkpoint_key, log)
    vae = load_wan_vae(wan_dir)

    # --- 3. every prompt's text features, then the encoder is freed (umT5-XXL: ~11 GB in bf16) ------
    t0 = time.perf_counter()
    encoder = WanTextEncoder(wan_dir, text_dev, torch.bfloat16 if torch.device(text_dev).type == "cuda" else torch.float32)
    features = {p: encoder([p])[0].to(dev) for s in schedules for _, p in s}
    uncond = encoder([negative_prompt]).to(dev) if checkpoint is None and guidance != 1.0 else None
    del encoder
    gc.collect()  # the encoder sits in reference cycles: only a collection frees it
    if torch.device(text_dev).type == "cuda":
        torch.cuda.empty_cache()
    log(f"encoded {len(features)} prompt(s) in {time.perf_counter() - t0:.1f} s")
    model, vae = model.to(dev), vae.to(dev)
    log(f"{'generator' if checkpoint else 'bidirectional base'}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B "
        f"parameters; {model.cfg.height}x{model.cfg.width} latents ({height}x{width} pixels), {frames} latent frames, on {dev}")

    # --- 4. each video: latents chunk by chunk -> VAE -> .mp4 ---------------------------------------
    report = {"files": [], "chunk_seconds": [], "first_frame_seconds": [], "frames_per_second": [], "video_frames": []}
    if return_videos:
        report["videos"] = []
    for path, schedule in zip(files, schedules):
        rng = torch.Generator().manual_seed(seed)
        cond = features[schedule[0][1]][None]
        if checkpoint:
            live = cf.stream(model, sigmas, num_frames=frames, batch_size=1, cond=cond, rng=rng,
                             first_chunk_sigmas=first_sigmas, recache=recache)
            switch = {f: features[p][None] for f, p in schedule[1:]}  # at chunk boundaries (_check_schedules)
            chunks = (live.send(switch[f]) if f in switch else next(live) for f in range(0, frames, model.cfg.chunk_frames))
        else:  # the base denoises the whole clip at once: one "chunk", made when the generator is first asked
            chunks = (cf.sample_bidirectional(model, sigmas, batch_size=1, num_frames=frames, cond=cond, guidance=guidance,
                                           uncond=uncond, rng=rng) for _ in range(1))
        _stream_to_file(chunks, path, StreamingVAEDecoder(vae), gif, dev, report, return_videos, log)
    return report


def _stream_to_file(chunks, path, decoder, gif, device, report, keep, log) -> None:
    """Decodes each latent chunk as it arrives and appends its frames to the .mp4; times every chunk."""
    def sync():
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()

    writer, times, first, kept = VideoFile(path, gif=gif), [], None, []
    try:
        sync()
        start = time.perf_counter()
        for i, latents in enumerate(chunks):
            video = decoder(latents)[0]
            writer.write(video)
            sync()
            times.append(time.perf_counter() - start - sum(times))
            first = sum(times) if first is None else first
            if keep:
                kept.append(video.cpu())
            log(f"  {path}: chunk {i + 1}, {video.shape[0]} frames in {times[-1]:.2f} s")
        elapsed = time.perf_counter() - start
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        decoder.close()
    for k, v in (("files", path), ("chunk_seconds", times), ("first_frame_seconds", first),
                 ("frames_per_second", writer.frames / elapsed), ("video_frames", writer.frames)):
        report[k].append(v)
    if keep:
        report["videos"].append(torch.cat(kept))
    log(f"wrote {path}: {writer.frames} frames; first frames after {first:.2f} s, {writer.frames / elapsed:.1f} "
        f"frames/s ({len(times)} chunks, {elapsed:.1f} s)")


def _steps_flag(parser, name: str, text: Optional[str]) -> Optional[tuple]:
    if text is None:
        return None
    try:
        steps = tuple(int(s) for s in text.split(","))
    except ValueError:
        parser.error(f"{name} takes comma-separated timesteps such as 1000,750,500,250, got {text!r}")
    if not steps or not all(0 < s <= 1000 for s in steps) or list(steps) != sorted(set(steps), reverse=True):
        parser.error(f"{name} timesteps must be strictly descending in (0, 1000], got {text!r}")
    return steps


def main(argv) -> int:
    parser = argparse.ArgumentParser(prog="examples/generate.py", description="Text to video with real Wan2.1 "
                                     "components: umT5 text features, latents streamed chunk by chunk by a Causal "
                                     "Forcing / Self Forcing generator (or the bidirectional base with --steps), each "
                                     "chunk decoded by Wan's VAE and written to the .mp4 as the stream goes. Needs "
                                     "'pip install -r requirements-wan.txt'.")
    parser.add_argument("--wan-dir", required=True, help="a Wan2.1 Diffusers folder (tokenizer/, text_encoder/, vae/, "
                        "transformer/): hf download Wan-AI/Wan2.1-T2V-1.3B-Diffusers --local-dir <folder>")
    parser.add_argument("--checkpoint", default=None, help="a Causal Forcing / Self Forcing generator .pt (its "
                        "generator_ema weights when present); without it, the bidirectional base of --wan-dir")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--prompt", help="the prompt of one video")
    which.add_argument("--prompts", metavar="FILE", help="a UTF-8 file, one video per line; '| <latent frame>: "
                       "<prompt>' after a prompt switches to a new one at that frame; \\| is a bar inside a prompt; "
                       "lines starting with '#' are comments (see read_prompts)")
    parser.add_argument("--frames", type=int, default=21, help="latent frames (default 21: 81 video frames, 5 s at 16 fps)")
    parser.add_argument("--out", default="video.mp4", help="the .mp4 (several prompts: <stem>_000.mp4, ...; default video.mp4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0)")
    parser.add_argument("--device", default="auto", help="cuda, mps or cpu (default: auto)")
    parser.add_argument("--gif", action="store_true", help="also write a .gif beside each .mp4")
    parser.add_argument("--height", type=int, default=480, help="pixels (default 480)")
    parser.add_argument("--width", type=int, default=832, help="pixels (default 832)")
    parser.add_argument("--chunk-frames", type=int, default=3, help="latent frames per chunk: 3 chunk-wise (default), 1 frame-wise")
    gen = parser.add_argument_group("with --checkpoint (a streaming generator)")
    gen.add_argument("--checkpoint-key", default=None, help="the checkpoint's entry to load: generator_ema (default when "
                     "present) or generator (the official chunk-wise command, run without --use_ema, loads generator)")
    gen.add_argument("--denoising-steps", default=None, help="the generator's timesteps, before warping (default "
                     "1000,750,500,250; Causal Forcing++ 2-step: 1000,500)")
    gen.add_argument("--first-chunk-steps", default=None, help="the first chunk's timesteps (Causal Forcing++: "
                     "1000,750,500,250; default: --denoising-steps)")
    gen.add_argument("--recache", action="store_true", help="at a prompt switch, re-encode the kept context under the new prompt")
    base = parser.add_argument_group("without --checkpoint (the bidirectional base)")
    base.add_argument("--steps", type=int, default=None, help="Euler steps (default 50)")
    base.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (default 5)")
    base.add_argument("--negative-prompt", default=None, help="the negative prompt (default Wan2.1's)")
    parser.add_argument("--shift", type=float, default=5.0, help="noise-schedule shift (default 5, Wan's and the generators')")
    args = parser.parse_args(argv)
    if args.frames < 1 or (args.steps is not None and args.steps < 1) or args.chunk_frames < 1:
        parser.error("--frames, --steps and --chunk-frames must be >= 1")
    if not (math.isfinite(args.shift) and args.shift > 0) or not math.isfinite(args.guidance or 0.0):
        parser.error(f"--shift must be a finite number > 0 and --guidance finite, got {args.shift} and {args.guidance}")
    given = lambda *names: [n for n in names if getattr(args, n.lstrip("-").replace("-", "_")) not in (None, False)]  # noqa: E731
    wrong = given("--steps", "--guidance", "--negative-prompt") if args.checkpoint else \
        given("--checkpoint-key", "--denoising-steps", "--first-chunk-steps", "--recache")
    if wrong:
        parser.error(f"{', '.join(wrong)} only appl{'ies' if len(wrong) == 1 else 'y'} "
                     f"{'without' if args.checkpoint else 'with'} --checkpoint; leave {'it' if len(wrong) == 1 else 'them'} out")
    steps = _steps_flag(parser, "--denoising-steps", args.denoising_steps)
    first = _steps_flag(parser, "--first-chunk-steps", args.first_chunk_steps)
    base_flags = {k: v for k, v in (("steps", args.steps), ("guidance", args.guidance),
                                    ("negative_prompt", args.negative_prompt)) if v is not None}
    try:
        prompts = read_prompts(args.prompts) if args.prompts else [args.prompt]
        generate(prompts, wan_dir=args.wan_dir, checkpoint=args.checkpoint, frames=args.frames, out=args.out,
                 seed=args.seed, device=args.device, height=args.height, width=args.width, chunk_frames=args.chunk_frames,
                 checkpoint_key=args.checkpoint_key, denoising_steps=steps, first_chunk_steps=first, shift=args.shift,
                 recache=args.recache, gif=args.gif, **base_flags)
    except (ImportError, OSError, ValueError, KeyError) as e:  # what is missing or wrong, and what to do: no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
