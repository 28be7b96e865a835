"""Real Wan components end to end, offline: Diffusers-format weights against diffusers' own
WanTransformer3DModel, `generate` with the bidirectional base against diffusers' WanPipeline, streamed
VAE decoding against one-shot decoding, a Causal/Self Forcing generator checkpoint streamed to an .mp4
with a prompt switch, and the module importing without any of the optional packages. Every component
is tiny and random, built here (requirements-wan.txt installs the packages; without them these skip)."""

import os
import subprocess
import sys

import pytest
import torch

import causal_forcing as cf
from examples import generate as wan
from examples import long_stream

HERE = os.path.dirname(os.path.abspath(__file__))
OPTIONAL = ("diffusers", "transformers", "safetensors", "imageio", "imageio_ffmpeg")


def need_optional():
    for module in OPTIONAL:
        pytest.importorskip(module, reason=f"{module} is not installed: pip install -r requirements-wan.txt")


WORDS = "a an the cat dog fox runs sits walks on in at snow beach street rain night dawn red quiet city".split()
HEIGHT, WIDTH = 32, 48  # pixels: latents 4x6, 2x3 tokens per frame
TRANSFORMER = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
                   text_dim=32, freq_dim=16, ffn_dim=48, num_layers=2, rope_max_seq_len=32)


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    """A Wan2.1 folder in Diffusers' layout, every component tiny and random."""
    need_optional()
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    root = tmp_path_factory.mktemp("wan")
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])  # as T5's
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
                            ).save_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    UMT5EncoderModel(UMT5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)
                     ).save_pretrained(root / "text_encoder")
    AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                     temperal_downsample=[False, True, True]).save_pretrained(root / "vae")
    WanTransformer3DModel(**TRANSFORMER).save_pretrained(root / "transformer")
    return str(root)


def diffusers_transformer(wan_dir, dtype=torch.float64):
    """diffusers' own model with the folder's weights (built and loaded by hand: its from_pretrained
    would want the accelerate package for this model class)."""
    from diffusers import WanTransformer3DModel
    from safetensors.torch import load_file

    model = WanTransformer3DModel(**TRANSFORMER)
    model.load_state_dict(load_file(os.path.join(wan_dir, "transformer", "diffusion_pytorch_model.safetensors")))
    return model.to(dtype).eval()


def our_model(wan_dir, causal=False, chunk_frames=3):
    import json

    with open(os.path.join(wan_dir, "transformer", "config.json")) as f:
        return cf.CausalDiT(wan.wan_model_config(json.load(f), HEIGHT, WIDTH, chunk_frames), causal=causal)


# --- Diffusers-format weights ----------------------------------------------------------------------


def test_name_map_covers_every_parameter_one_to_one(wan_dir):
    theirs = diffusers_transformer(wan_dir).state_dict()
    ours = our_model(wan_dir).state_dict()
    as_wan = cf.diffusers_to_wan(theirs)
    assert set(as_wan) == set(ours) and len(as_wan) == len(theirs)
    assert all(as_wan[k].shape == ours[k].shape for k in ours)
    with pytest.raises(ValueError, match="not Diffusers-layout"):
        cf.diffusers_to_wan({**theirs, "blocks.0.attn2.add_k_proj.weight": torch.zeros(1)})


@pytest.mark.parametrize("given", ["folder", "file", "download"])
def test_diffusers_weights_load_and_match_diffusers_forward(wan_dir, given):
    """Every parameter of diffusers' WanTransformer3DModel read by load_wan_weights (from its folder,
    its .safetensors file, or the whole download); the same velocity as diffusers' forward, float64."""
    path = {"folder": os.path.join(wan_dir, "transformer"), "download": wan_dir,
            "file": os.path.join(wan_dir, "transformer", "diffusion_pytorch_model.safetensors")}[given]
    model = cf.load_wan_weights(our_model(wan_dir), path).double().eval()
    theirs = diffusers_transformer(wan_dir)
    g = torch.Generator().manual_seed(1)
    B, F = 2, 3
    x = torch.randn(B, F, 16, HEIGHT // 8, WIDTH // 8, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.8, 0.3], dtype=torch.float64)
    text = torch.randn(B, 7, 32, generator=g, dtype=torch.float64)
    text512 = torch.cat([text, text.new_zeros(B, 512 - 7, 32)], 1)  # Wan's zero rows, as the pipeline pads
    with torch.no_grad():
        ours = model(x, sigma[:, None].expand(B, F), text)
        ref = theirs(hidden_states=x.permute(0, 2, 1, 3, 4), timestep=sigma * 1000, encoder_hidden_states=text512,
                     return_dict=False)[0].permute(0, 2, 1, 3, 4)
    assert ref.abs().mean() > 0.1  # a real comparison, not of zeros
    # diffusers runs its timestep features, norms and residual adds in float32 (.float() inside every
    # block), so even in float64 the two agree to float32 rounding; a misnamed parameter costs O(1)
    assert (ours - ref).abs().max() / ref.abs().max() < 1e-6


def test_model_config_refuses_other_wan_models():
    cfg = dict(TRANSFORMER, image_dim=1280)
    with pytest.raises(ValueError, match="image_dim"):
        wan.wan_model_config(cfg, 480, 832)
    with pytest.raises(ValueError, match="multiples of 16"):
        wan.wan_model_config(TRANSFORMER, 480, 830)


# --- the VAE and the video file --------------------------------------------------------------------


@pytest.mark.parametrize("chunks", [(3, 3), (1, 2, 3), (1, 1, 1, 1, 1, 1)])
def test_streamed_vae_decoding_equals_one_shot(wan_dir, chunks):
    vae = wan.load_wan_vae(wan_dir)
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(1, sum(chunks), 16, HEIGHT // 8, WIDTH // 8, generator=g)
    decoder = wan.StreamingVAEDecoder(vae)
    parts, start = [], 0
    for n in chunks:
        parts.append(decoder(latents[:, start:start + n]))
        start += n
    streamed = torch.cat(parts, 1)
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        whole = vae.decode(latents.permute(0, 2, 1, 3, 4) * std + mean, return_dict=False)[0].permute(0, 2, 1, 3, 4)
    assert streamed.shape == (1, 1 + 4 * (sum(chunks) - 1), 3, HEIGHT, WIDTH) == whole.shape
    assert [p.shape[1] for p in parts][0] == 1 + 4 * (chunks[0] - 1)  # the first frames come out with the first chunk
    assert whole.std() > 0.01 and (streamed - whole).abs().max() < 1e-5


def test_video_file_is_written_whole_or_not_at_all(tmp_path):
    need_optional()
    import imageio

    path = str(tmp_path / "v.mp4")
    f = wan.VideoFile(path, gif=True)
    f.write(torch.rand(5, 3, 24, 40) * 2 - 1)
    assert not os.path.exists(path)  # nothing under the final name until the video is whole
    f.close()
    reader = imageio.get_reader(path)
    assert reader.count_frames() == 5 and reader.get_meta_data()["size"] == (40, 24)
    assert os.path.getsize(str(tmp_path / "v.gif")) > 0
    g = wan.VideoFile(path)
    g.write(torch.zeros(2, 3, 24, 40))
    g.abort()  # an interrupted video: the earlier file survives, no temporary is left
    assert imageio.get_reader(path).count_frames() == 5 and not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]


# --- generate ---------------------------------------------------------------------------------------


def test_generate_with_the_base_equals_diffusers_wan_pipeline(wan_dir, tmp_path):
    """The bidirectional base through `generate` against diffusers' own WanPipeline: same components,
    Euler flow-matching scheduler on the same shifted grid, same noise, same prompt and negative
    prompt, classifier-free guidance 5; the decoded videos agree."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import AutoTokenizer, UMT5EncoderModel

    frames, steps, seed = 3, 4, 7
    prompt, negative = "a red fox runs  on the snow", "a quiet city street"
    sigmas = cf.solver_sigmas(steps, cf.SampleConfig(shift=5.0))

    class SameGrid(FlowMatchEulerDiscreteScheduler):  # Wan's grid shift(linspace(1, 0, steps + 1)), Euler steps
        def set_timesteps(self, num_inference_steps=None, device=None, **kw):
            super().set_timesteps(sigmas=sigmas[:-1].tolist(), device=device)

    pipe = WanPipeline(tokenizer=AutoTokenizer.from_pretrained(os.path.join(wan_dir, "tokenizer")),
                       text_encoder=UMT5EncoderModel.from_pretrained(os.path.join(wan_dir, "text_encoder")),
                       transformer=diffusers_transformer(wan_dir, torch.float32),
                       vae=AutoencoderKLWan.from_pretrained(os.path.join(wan_dir, "vae")),
                       scheduler=SameGrid(shift=1.0))
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(1, frames, 16, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(seed))
    ref = pipe(prompt, negative_prompt=negative, height=HEIGHT, width=WIDTH, num_frames=1 + 4 * (frames - 1),
               num_inference_steps=steps, guidance_scale=5.0, latents=noise.permute(0, 2, 1, 3, 4),
               output_type="pt", max_sequence_length=512).frames[0]  # (T, 3, H, W) in [0, 1]
    report = wan.generate(prompt, wan_dir=wan_dir, frames=frames, out=str(tmp_path / "base.mp4"), seed=seed, device="cpu",
                         height=HEIGHT, width=WIDTH, steps=steps, guidance=5.0, negative_prompt=negative,
                         return_videos=True, log=lambda *a: None)
    ours = (report["videos"][0] + 1) / 2
    assert ours.shape == ref.shape == (9, 3, HEIGHT, WIDTH)
    assert ref.std() > 0.01 and (ours - ref).abs().max() < 1e-4
    assert report["video_frames"] == [9] and os.path.getsize(report["files"][0]) > 0


def generator_checkpoint(wan_dir, path, chunk_frames):
    """A Causal Forcing-layout generator file: EMA weights under FSDP's prefix, beside other weights."""
    model = cf._random_weights(our_model(wan_dir, causal=True, chunk_frames=chunk_frames), seed=3)
    state = model.state_dict()
    torch.save({"generator_ema": {"model._fsdp_wrapped_module." + k: v for k, v in state.items()},
                "generator": {"model." + k: torch.zeros_like(v) for k, v in state.items()}}, path)
    return model.eval()


@pytest.mark.parametrize("chunk_frames,recache", [(3, False), (1, True)])
def test_generate_streams_a_generator_checkpoint_with_a_prompt_switch(wan_dir, tmp_path, chunk_frames, recache):
    import imageio

    ckpt = str(tmp_path / "causal_forcing.pt")
    model = generator_checkpoint(wan_dir, ckpt, chunk_frames)
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("# one video, one switch\na cat sits on the beach | 3: a dog runs in the rain\n")
    schedule = wan.read_prompts(str(prompts_file))
    assert schedule == [[(0, "a cat sits on the beach"), (3, "a dog runs in the rain")]]
    out = str(tmp_path / "stream.mp4")
    report = wan.generate(schedule, wan_dir=wan_dir, checkpoint=ckpt, frames=6, out=out, seed=5, device="cpu",
                         height=HEIGHT, width=WIDTH, chunk_frames=chunk_frames, recache=recache, gif=True,
                         return_videos=True, log=lambda *a: None)
    reader = imageio.get_reader(out)
    assert reader.count_frames() == 21 == report["video_frames"][0] and reader.get_meta_data()["size"] == (WIDTH, HEIGHT)
    assert os.path.getsize(out[:-4] + ".gif") > 0
    assert len(report["chunk_seconds"][0]) == 6 // chunk_frames and report["first_frame_seconds"][0] > 0
    # the same video by hand: the stream with the switch, then one-shot decoding
    text = wan.WanTextEncoder(wan_dir)
    latents = long_stream.stream_video(model, cf.student_sigmas(cf.SampleConfig()), num_frames=6, batch_size=1,
                              cond=text(["a cat sits on the beach"]), switches={3: text(["a dog runs in the rain"])},
                              recache=recache, rng=torch.Generator().manual_seed(5))
    video = wan.StreamingVAEDecoder(wan.load_wan_vae(wan_dir))(latents)[0]
    assert video.std() > 0.01 and (report["videos"][0] - video).abs().max() < 1e-5


def test_generate_refuses_bad_input_before_any_work(wan_dir, tmp_path):
    ckpt = str(tmp_path / "g.pt")
    generator_checkpoint(wan_dir, ckpt, 3)
    common = dict(wan_dir=wan_dir, checkpoint=ckpt, out=str(tmp_path / "v.mp4"), device="cpu", height=HEIGHT, width=WIDTH)
    with pytest.raises(FileNotFoundError, match="Wan2.1-T2V-1.3B-Diffusers"):
        wan.generate("a cat", **{**common, "wan_dir": str(tmp_path / "nowhere")})
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        wan.generate("a cat", **{**common, "checkpoint": str(tmp_path / "missing.pt")})
    with pytest.raises(ValueError, match="multiples of chunk_frames"):
        wan.generate([[(0, "a cat"), (4, "a dog")]], frames=6, **common)
    with pytest.raises(ValueError, match="need a streaming generator"):
        wan.generate([[(0, "a cat"), (3, "a dog")]], frames=6, **{**common, "checkpoint": None})
    with pytest.raises(ValueError, match="multiples of 16"):
        wan.generate("a cat", **{**common, "width": 40})
    with pytest.raises(ValueError, match="is a folder"):
        wan.generate("a cat", **{**common, "out": str(tmp_path)})
    no_base = tmp_path / "no_base"  # without transformer/config.json the size is still checked first
    no_base.mkdir()
    for d in ("tokenizer", "text_encoder", "vae"):
        os.symlink(os.path.join(wan_dir, d), no_base / d)
    with pytest.raises(ValueError, match="multiples of 16"):
        wan.generate("a cat", **{**common, "wan_dir": str(no_base), "width": 40})
    with pytest.raises(ValueError, match="tiles"):
        vae = wan.load_wan_vae(wan_dir)
        vae.enable_tiling()
        wan.StreamingVAEDecoder(vae)
    bad = tmp_path / "bad.txt"
    bad.write_text("a cat | later: a dog\n")
    with pytest.raises(ValueError, match="bad.txt:1"):
        wan.read_prompts(str(bad))
    assert not os.path.exists(tmp_path / "v.mp4")


def test_checkpoint_entry_is_chosen_and_said(wan_dir, tmp_path):
    """generator_ema by default, generator on request (the official chunk-wise command loads it)."""
    ckpt = str(tmp_path / "g.pt")
    ema = generator_checkpoint(wan_dir, ckpt, 3)
    said = []
    model = wan.load_wan_generator(wan_dir, ckpt, HEIGHT, WIDTH, 3, log=said.append)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ema.state_dict().values()))
    model = wan.load_wan_generator(wan_dir, ckpt, HEIGHT, WIDTH, 3, key="generator", log=said.append)
    assert all(not v.any() for v in model.state_dict().values())
    assert "'generator_ema' weights" in said[0] and "'generator' weights" in said[1]
    with pytest.raises(KeyError, match="no entry 'critic'"):
        wan.load_wan_generator(wan_dir, ckpt, HEIGHT, WIDTH, 3, key="critic")


def test_generate_command_line(wan_dir, tmp_path):
    help_text = subprocess.run([sys.executable, os.path.join(HERE, "..", "examples", "generate.py"), "--help"],
                               capture_output=True, text=True).stdout
    for flag in ("--wan-dir", "--checkpoint", "--prompt", "--prompts", "--frames", "--out", "--seed", "--device", "--gif",
                 "--checkpoint-key", "--denoising-steps", "--first-chunk-steps", "--recache", "--steps"):
        assert flag in help_text
    ckpt = str(tmp_path / "g.pt")
    generator_checkpoint(wan_dir, ckpt, 3)
    out = str(tmp_path / "cli.mp4")
    args = ["--wan-dir", wan_dir, "--checkpoint", ckpt, "--prompt", "a fox", "--frames", "3", "--out", out,
            "--device", "cpu", "--height", str(HEIGHT), "--width", str(WIDTH)]
    assert wan.main(args) == 0 and os.path.getsize(out) > 0
    assert wan.main([*args[:1], str(tmp_path / "nowhere"), *args[2:]]) == 2  # a clear error, exit 2
    with pytest.raises(SystemExit) as e:  # a base-only flag with a generator: a usage error, not ignored
        wan.main([*args, "--steps", "8"])
    assert e.value.code == 2


def cli_args(wan_dir, tmp_path, out):
    """The command line of a 3-frame video from a tiny generator checkpoint (written to tmp_path/g.pt)."""
    ckpt = str(tmp_path / "g.pt")
    generator_checkpoint(wan_dir, ckpt, 3)
    return ["--wan-dir", wan_dir, "--checkpoint", ckpt, "--prompt", "a fox", "--frames", "3", "--out", out,
            "--device", "cpu", "--height", str(HEIGHT), "--width", str(WIDTH)]


def test_generate_out_must_be_an_mp4(wan_dir, tmp_path, capsys):
    """--out x.gif --gif wrote the .mp4 to x.gif and then the GIF over it: an --out that is not an .mp4
    is refused before any work, naming it; the GIF is always <stem>.gif beside the .mp4."""
    out = str(tmp_path / "x.gif")
    assert wan.main([*cli_args(wan_dir, tmp_path, out), "--gif"]) == 2
    err = capsys.readouterr().err
    assert f"out {out!r} must end in .mp4" in err and "<stem>.gif" in err and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["g.pt"]  # nothing written
    with pytest.raises(ValueError, match="must end in .mp4"):
        wan.generate("a fox", wan_dir=wan_dir, out=str(tmp_path / "video"), device="cpu", height=HEIGHT, width=WIDTH)


def test_generate_removes_its_stale_temporaries_and_writes_open_permissions(wan_dir, tmp_path):
    """A run killed while writing leaves .tmp-<8 characters>-<name> beside its video: the next run of the
    same --out removes those (and only those), and its videos get 0o666 & ~umask, not mkstemp's 0o600."""
    ours = [".tmp-abcd1234-cli.mp4", ".tmp-abcd1234-cli.gif"]
    others = [".tmp-abcd1234-other.mp4", ".tmp-x.mp4", "cli.mp4.tmp"]
    for name in ours + others:
        (tmp_path / name).write_bytes(b"")
    old = os.umask(0o022)
    try:
        assert wan.main([*cli_args(wan_dir, tmp_path, str(tmp_path / "cli.mp4")), "--gif"]) == 0
    finally:
        os.umask(old)
    assert sorted(os.listdir(tmp_path)) == sorted(others + ["cli.mp4", "cli.gif", "g.pt"])
    assert [os.stat(tmp_path / n).st_mode & 0o777 for n in ("cli.mp4", "cli.gif")] == [0o644, 0o644]


def test_prompts_file_not_utf8_names_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "prompts.txt"
    bad.write_bytes("a red fox\n# a comment\na caf\u00e9 \xff at night\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"prompts.txt:3: not UTF-8 text \(byte 27 of the file is b'\\xe9'\)"):
        wan.read_prompts(str(bad))
    assert wan.main(["--wan-dir", str(tmp_path), "--prompts", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "prompts.txt:3: not UTF-8" in err and "save the prompts file as UTF-8" in err
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeff# a comment\na caf\u00e9\n".encode("utf-8"))  # a byte-order mark is not part of line 1
    assert wan.read_prompts(str(bom)) == [[(0, "a caf\u00e9")]]


def test_a_bar_inside_a_prompt_is_written_backslash_bar(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a sign reading OPEN \\| CLOSED | 3: a dog \\|\\| a cat\nno \\| switch here\n")
    assert wan.read_prompts(str(prompts)) == [[(0, "a sign reading OPEN | CLOSED"), (3, "a dog || a cat")],
                                              [(0, "no | switch here")]]
    help_text = subprocess.run([sys.executable, os.path.join(HERE, "..", "examples", "generate.py"), "--help"],
                               capture_output=True, text=True).stdout
    assert "\\| is a bar inside a prompt" in " ".join(help_text.split())


def test_a_prompt_longer_than_the_text_length_is_said(wan_dir):
    """umT5 reads text_len tokens (512 in Wan); a longer prompt is cut as Wan cuts it, with a warning
    that names the prompt and how many tokens are dropped."""
    text = wan.WanTextEncoder(wan_dir, text_len=8)
    long = "a red fox runs on the snow at night"  # 9 words and the end token: 10 tokens
    with pytest.warns(UserWarning, match=r"the prompt 'a red fox runs on the snow at night' has 10 tokens; umT5 reads "
                      r"the first 8, so its last 2 are dropped"):
        cut = text([long])
    assert cut.shape == (1, 8, 32)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        text(["a red fox runs"])  # 5 tokens: no warning


def test_module_imports_and_runs_without_the_optional_packages():
    """`import causal_forcing` and the default pipeline's pieces need only torch, numpy and einops;
    generate, without its packages, says what to install."""
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {OPTIONAL!r} + ('matplotlib', 'PIL'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import torch, causal_forcing as cf
cfg = cf.get_config('toy2d')
model = cf.CausalDiT(cfg.model)
video = cf.sample_student(model, cf.student_sigmas(cfg.sample), batch_size=2, num_frames=4)
assert video.shape == (2, 4, 2, 1, 1)
from examples import generate as wan
try:
    wan.generate('a cat', wan_dir='.')
except ImportError as e:
    assert 'requirements-wan.txt' in str(e), e
    print('ok')
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.path.join(HERE, ".."))
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


@pytest.mark.parametrize("flag,value", [("--shift", "0"), ("--shift", "nan"), ("--guidance", "nan")])
def test_a_shift_or_guidance_that_is_no_number_to_sample_with_is_a_usage_error(flag, value, tmp_path, capsys):
    """Checked with the other flags, before the text encoder, the VAE and the DiT are loaded."""
    with pytest.raises(SystemExit) as e:
        wan.main(["--wan-dir", str(tmp_path), "--prompt", "a fox", flag, value])
    assert e.value.code == 2 and "--shift must be a finite number > 0 and --guidance finite" in capsys.readouterr().err
