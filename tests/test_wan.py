"""Wan2.1 compatibility: parameter names and shapes, checkpoint loading, the forward maths against an
independent re-implementation of Wan's, and the speed options that must not change the maths."""

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

import causal_forcing as cf
from examples import bench


def official_wan_shapes(dim, ffn, layers, in_dim=16, text_dim=4096, freq_dim=256, patch=2):
    """Every parameter of the official WanModel (T2V), written from its published key table."""
    shapes = {
        "patch_embedding.weight": (dim, in_dim, 1, patch, patch), "patch_embedding.bias": (dim,),
        "text_embedding.0.weight": (dim, text_dim), "text_embedding.0.bias": (dim,),
        "text_embedding.2.weight": (dim, dim), "text_embedding.2.bias": (dim,),
        "time_embedding.0.weight": (dim, freq_dim), "time_embedding.0.bias": (dim,),
        "time_embedding.2.weight": (dim, dim), "time_embedding.2.bias": (dim,),
        "time_projection.1.weight": (6 * dim, dim), "time_projection.1.bias": (6 * dim,),
        "head.head.weight": (patch * patch * in_dim, dim), "head.head.bias": (patch * patch * in_dim,),
        "head.modulation": (1, 2, dim),
    }
    for i in range(layers):
        b = f"blocks.{i}."
        for attn in ("self_attn", "cross_attn"):
            for lin in "qkvo":
                shapes[f"{b}{attn}.{lin}.weight"] = (dim, dim)
                shapes[f"{b}{attn}.{lin}.bias"] = (dim,)
            shapes[f"{b}{attn}.norm_q.weight"] = (dim,)
            shapes[f"{b}{attn}.norm_k.weight"] = (dim,)
        shapes[f"{b}norm3.weight"] = shapes[f"{b}norm3.bias"] = (dim,)
        shapes[f"{b}ffn.0.weight"], shapes[f"{b}ffn.0.bias"] = (ffn, dim), (ffn,)
        shapes[f"{b}ffn.2.weight"], shapes[f"{b}ffn.2.bias"] = (dim, ffn), (dim,)
        shapes[f"{b}modulation"] = (1, 6, dim)
    return shapes


@pytest.mark.parametrize("name,dim,ffn,layers,params", [("wan-1.3b", 1536, 8960, 30, 1_418_996_800),
                                                         ("wan-14b", 5120, 13824, 40, None)])
def test_presets_have_exactly_the_official_parameters(name, dim, ffn, layers, params):
    cfg = cf.get_config(name)
    with torch.device("meta"):  # shapes only: no memory is allocated
        model = cf.CausalDiT(cfg.model)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == official_wan_shapes(dim, ffn, layers)
    if params:
        assert len(got) == 825 and sum(math.prod(s) for s in got.values()) == params
    assert model.tokens_per_frame == 1560 and cfg.data.frames == 21 and cfg.model.chunk_frames == 3


SMALL = dict(in_channels=4, height=4, width=6, patch_size=2, dim=48, ffn_dim=64, num_heads=4, num_layers=2,
             freq_dim=16, cond_dim=8, text_len=5, device="cpu")


def synthetic_official(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.3 for k, s in official_wan_shapes(48, 64, 2, 4, 8, 16).items()}


@pytest.mark.parametrize("layout", ["bare", "generator", "generator_ema_fsdp", "compiled"])
def test_load_every_checkpoint_layout(tmp_path, layout):
    state = synthetic_official()
    file = {"bare": state,
            "generator": {"generator": {"model." + k: v for k, v in state.items()}},
            "generator_ema_fsdp": {"generator_ema": {"model._fsdp_wrapped_module." + k: v for k, v in state.items()},
                                   "generator": {"model." + k: 0 * v for k, v in state.items()}},
            "compiled": {"model": {"_orig_mod." + k: v for k, v in state.items()}}}[layout]
    path = str(tmp_path / "ckpt.pt")
    torch.save(file, path)
    model = cf.CausalDiT(cf.get_config("toy2d", **SMALL).model)
    cf.load_wan_weights(model, path)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)  # generator_ema wins over generator


def test_load_safetensors(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    state = synthetic_official()
    path = str(tmp_path / "diffusion_pytorch_model.safetensors")
    safetensors.save_file(state, path)
    model = cf.load_wan_weights(cf.CausalDiT(cf.get_config("toy2d", **SMALL).model), path)
    torch.testing.assert_close(model.blocks[1].ffn[2].weight, state["blocks.1.ffn.2.weight"], rtol=0, atol=0)


def test_load_errors_name_every_key(tmp_path):
    state = synthetic_official()
    del state["blocks.0.modulation"]
    state["blocks.0.extra.weight"] = torch.zeros(3)
    state["head.head.weight"] = torch.zeros(5, 48)
    path = str(tmp_path / "bad.pt")
    torch.save(state, path)
    model = cf.CausalDiT(cf.get_config("toy2d", **SMALL).model)
    with pytest.raises(ValueError, match=r"1 missing, 1 unexpected, 1 with other shapes") as e:
        cf.load_wan_weights(model, path)
    assert "blocks.0.modulation" in str(e.value) and "blocks.0.extra.weight" in str(e.value)
    assert "head.head.weight: file (5, 48)" in str(e.value)
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        cf.load_wan_weights(model, str(tmp_path / "missing.pt"))
    torch.save({"optimizer": {"lr": torch.ones(1)}, "step": torch.ones(1)}, path)
    with pytest.raises(KeyError, match="no state dict"):
        cf.load_wan_weights(model, path)


def test_a_legacy_torch_file_is_named_as_not_a_zip_archive(tmp_path):
    """Files saved before PyTorch 1.6 are not zip archives: they are refused with what to do."""
    path = str(tmp_path / "legacy.pt")
    torch.save(synthetic_official(), path, _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match=r"legacy\.pt' is not a torch\.save zip archive.*PyTorch 1\.6"):
        cf.load_wan_weights(cf.CausalDiT(cf.get_config("toy2d", **SMALL).model), path)


def flip_a_data_byte(path):
    """Flips one byte inside the first tensor's bytes of a torch zip file: torch.load reads it silently."""
    import zipfile
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename)
    raw = bytearray(open(path, "rb").read())
    name_len, extra_len = int.from_bytes(raw[info.header_offset + 26: info.header_offset + 28], "little"), \
        int.from_bytes(raw[info.header_offset + 28: info.header_offset + 30], "little")  # the local header's own lengths
    raw[info.header_offset + 30 + name_len + extra_len + 8] ^= 0xFF
    open(path, "wb").write(bytes(raw))


@pytest.mark.parametrize("damage", ["empty", "truncated", "flipped byte", "not a checkpoint"])
def test_a_damaged_checkpoint_is_named_with_what_to_do(tmp_path, damage):
    path = str(tmp_path / "ckpt.pt")
    torch.save(synthetic_official(), path)
    raw = open(path, "rb").read()
    if damage == "empty":
        open(path, "wb").close()
    elif damage == "truncated":
        open(path, "wb").write(raw[: len(raw) // 2])
    elif damage == "flipped byte":
        flip_a_data_byte(path)
    else:
        open(path, "wb").write(b"<html>rate limited</html>")
    model = cf.CausalDiT(cf.get_config("toy2d", **SMALL).model)
    with pytest.raises(ValueError, match="download it again") as e:
        cf.load_wan_weights(model, path)
    assert "ckpt.pt" in str(e.value) and "mmap" not in str(e.value)
    if damage == "flipped byte":
        assert "CRC-32" in str(e.value)


def test_a_checkpoint_written_without_checksums_loads(tmp_path):
    """torch can write zip records without a CRC-32 (stored as 0): nothing to verify, not corrupt."""
    if not hasattr(torch.serialization, "set_crc32_options"):
        pytest.skip("this torch always writes checksums")
    state, path = synthetic_official(), str(tmp_path / "nocrc.pt")
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(state, path)
    finally:
        torch.serialization.set_crc32_options(True)
    model = cf.load_wan_weights(cf.CausalDiT(cf.get_config("toy2d", **SMALL).model), path)
    torch.testing.assert_close(model.head.head.weight, state["head.head.weight"], rtol=0, atol=0)


def rewrite_record(path, name_end, deflate=False, declared=None):
    """Rewrites a torch zip file so that its record `name_end` is deflated and/or declares `declared` bytes (a zip
    bomb's ingredients: a few bytes that inflate to GiBs, or a size the file cannot hold)."""
    import zipfile
    with zipfile.ZipFile(path) as z:
        records = [(info, z.read(info)) for info in z.infolist()]
    with zipfile.ZipFile(path, "w") as z:
        for info, data in records:
            if info.filename.endswith(name_end):
                info.compress_type = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
            z.writestr(info, data)
    if declared is not None:  # the record's size in its local header (offset 22) and its central one (offset 24)
        raw = bytearray(open(path, "rb").read())
        with zipfile.ZipFile(path) as z:
            info = next(i for i in z.infolist() if i.filename.endswith(name_end))
        raw[info.header_offset + 22: info.header_offset + 26] = declared.to_bytes(4, "little")
        name, at = info.filename.encode(), raw.index(b"PK\x01\x02")
        while raw[at + 46: at + 46 + len(name)] != name:
            at = raw.index(b"PK\x01\x02", at + 4)
        raw[at + 24: at + 28] = declared.to_bytes(4, "little")
        open(path, "wb").write(bytes(raw))


@pytest.mark.parametrize("damage,phrase", [
    (dict(deflate=True), "record .*data/0 is compressed, which torch.save never does"),
    (dict(deflate=True, declared=3 << 30), "record .*data/0 is compressed"),  # 3 GiB from a few bytes
    (dict(declared=3 << 30), "record .*data/0 declares 3221225472 bytes"),
])
def test_a_zip_bomb_is_refused_before_torch_reads_it(tmp_path, monkeypatch, damage, phrase):
    """torch.save stores every record as it is: a compressed record, or one declaring more bytes than the file holds,
    is refused before torch.load (which would inflate it into memory) reads anything."""
    path = str(tmp_path / "ckpt.pt")
    torch.save(synthetic_official(), path)
    rewrite_record(path, "data/0", **damage)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load read a zip bomb"))
    with pytest.raises(ValueError, match=phrase + ".*download it again"):
        cf.load_wan_weights(cf.CausalDiT(cf.get_config("toy2d", **SMALL).model), path)


def test_archive_problem_names_the_failing_record(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    torch.save(synthetic_official(), path)
    assert cf._archive_problem(path) is None
    flip_a_data_byte(path)
    assert re.fullmatch(r"record \S+/data/\d+ fails its CRC-32 checksum", cf._archive_problem(path))


# Wan's parameter names to Diffusers' (WanTransformer3DModel), written from the two published key tables.
DIFFUSERS_NAMES = [("head.head.", "proj_out."), ("head.modulation", "scale_shift_table"),
                   ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
                   ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
                   ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
                   ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
                   ("time_projection.1.", "condition_embedder.time_proj."), ("modulation", "scale_shift_table"),
                   ("self_attn.o.", "attn1.to_out.0."), ("cross_attn.o.", "attn2.to_out.0."),
                   *((f"{a}.{x}.", f"{b}.to_{x}.") for a, b in (("self_attn", "attn1"), ("cross_attn", "attn2"))
                     for x in "qkv"),
                   *((f"{a}.norm_{x}.", f"{b}.norm_{x}.") for a, b in (("self_attn", "attn1"), ("cross_attn", "attn2"))
                     for x in "qk"),
                   ("norm3.", "norm2."),
                   ("ffn.0.", "ffn.net.0.proj."), ("ffn.2.", "ffn.net.2.")]


def as_diffusers(name):
    """A Wan parameter name in Diffusers' layout: the first DIFFUSERS_NAMES entry that matches (after "blocks.i.")."""
    block = re.match(r"blocks\.\d+\.", name)
    head, rest = (block.group(), name[block.end():]) if block else ("", name)
    for wan, diffusers in DIFFUSERS_NAMES:
        if rest.startswith(wan) and (wan.endswith(".") or rest == wan):
            return head + diffusers + rest[len(wan):]
    return name  # patch_embedding.* is the same in both


def diffusers_folder(tmp_path, shards=2):
    """A Diffusers transformer/ folder of synthetic_official's weights in `shards` safetensors files and their index."""
    save_file = pytest.importorskip("safetensors.torch").save_file
    state, folder = synthetic_official(), tmp_path / "transformer"
    folder.mkdir()
    names = sorted((as_diffusers(k), v) for k, v in state.items())
    weight_map = {}
    for i in range(shards):
        shard = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = dict(names[i::shards])
        save_file(part, str(folder / shard))
        weight_map.update(dict.fromkeys(part, shard))
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return state, folder


def test_a_sharded_diffusers_folder_loads(tmp_path):
    state, _ = diffusers_folder(tmp_path)
    model = cf.load_wan_weights(cf.CausalDiT(cf.get_config("toy2d", **SMALL).model), str(tmp_path))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)


@pytest.mark.parametrize("index", [{"weight_map": ["a.safetensors"]}, {"metadata": {}}, [], "{not json"])
def test_a_malformed_shard_index_is_named(tmp_path, index):
    _, folder = diffusers_folder(tmp_path)
    text = index if isinstance(index, str) else json.dumps(index)
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(text)
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model\.safetensors\.index\.json"):
        cf.load_wan_weights(cf.CausalDiT(cf.get_config("toy2d", **SMALL).model), str(tmp_path))


@pytest.mark.parametrize("where", ["parent", "absolute", "subfolder", "folder"])
def test_a_shard_index_cannot_name_files_outside_its_folder(tmp_path, where):
    _, folder = diffusers_folder(tmp_path, shards=1)
    shard = folder / "diffusion_pytorch_model-00001-of-00001.safetensors"
    moved = {"parent": tmp_path / "x.safetensors", "absolute": tmp_path / "x.safetensors",
             "subfolder": folder / "sub" / "x.safetensors", "folder": tmp_path / "x.safetensors"}[where]
    moved.parent.mkdir(exist_ok=True)
    shard.rename(moved)
    if where == "folder":  # a folder under the shard's name is no shard
        (folder / "x.safetensors").mkdir()
    name = {"parent": "../x.safetensors", "absolute": str(moved), "subfolder": "sub/x.safetensors",
            "folder": "x.safetensors"}[where]
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": dict.fromkeys(json.loads(index.read_text())["weight_map"], name)}))
    with pytest.raises(ValueError, match="not files in its folder"):
        cf.load_wan_weights(cf.CausalDiT(cf.get_config("toy2d", **SMALL).model), str(tmp_path))


def wan_reference_forward(p, x, t, context, cfg, num_heads):
    """Wan2.1's forward, written from its specification independently of causal_forcing:
    x (B, C, F, H, W) Wan's layout, t (B,) in [0, 1000], context (B, L, text_dim)."""
    B, C, Fr, H, W = x.shape
    D, pt = p["patch_embedding.bias"].shape[0], 2
    h, w = H // pt, W // pt
    y = F.conv3d(x, p["patch_embedding.weight"], p["patch_embedding.bias"], stride=(1, pt, pt))
    tok = y.flatten(2).transpose(1, 2)  # (B, F*h*w, D), w fastest

    def lin(v, name):
        return F.linear(v, p[name + ".weight"], p[name + ".bias"])

    half = cfg.freq_dim // 2
    omega = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64) / half)
    sinus = torch.cat([torch.cos(t.double()[:, None] * omega), torch.sin(t.double()[:, None] * omega)], 1).to(x.dtype)
    e = lin(F.silu(lin(sinus, "time_embedding.0")), "time_embedding.2")
    e0 = lin(F.silu(e), "time_projection.1").view(B, 6, D)
    ctx = F.pad(context, (0, 0, 0, cfg.text_len - context.shape[1]))
    c = lin(F.gelu(lin(ctx, "text_embedding.0"), approximate="tanh"), "text_embedding.2")

    d = D // num_heads  # 3-D RoPE with complex numbers: pairs split frame / height / width
    d_hw = 2 * (d // 6)
    sizes = [d - 2 * d_hw, d_hw, d_hw]
    ff, yy, xx = torch.meshgrid(torch.arange(Fr), torch.arange(h), torch.arange(w), indexing="ij")
    freqs = torch.cat([torch.polar(torch.ones(1, dtype=torch.float64),
                                   pos.reshape(-1, 1).double() * 10000.0 ** (-torch.arange(0, n, 2, dtype=torch.float64) / n))
                       for pos, n in zip((ff, yy, xx), sizes)], 1)  # (N, d/2) complex

    def rope(v):
        vc = torch.view_as_complex(v.double().reshape(B, -1, num_heads, d // 2, 2))
        return torch.view_as_real(vc * freqs[None, :, None]).flatten(3).to(v.dtype)

    def rms(v, name):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6) * p[name]

    def attn(q_in, kv_in, pre, use_rope):
        q = rms(lin(q_in, pre + ".q"), pre + ".norm_q.weight")
        k = rms(lin(kv_in, pre + ".k"), pre + ".norm_k.weight")
        v = lin(kv_in, pre + ".v")
        q, k, v = (z.reshape(B, -1, num_heads, d) for z in (q, k, v))
        if use_rope:
            q, k = rope(q), rope(k)
        att = torch.softmax(torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(d), -1)
        return lin(torch.einsum("bhnm,bmhd->bnhd", att, v).reshape(B, -1, D), pre + ".o")

    def ln(v):
        return F.layer_norm(v, (D,), eps=1e-6)

    for i in range(cfg.num_layers):
        b = f"blocks.{i}"
        s1, c1, g1, s2, c2, g2 = (p[b + ".modulation"] + e0).chunk(6, dim=1)
        tok = tok + g1 * attn(ln(tok) * (1 + c1) + s1, ln(tok) * (1 + c1) + s1, b + ".self_attn", True)
        n3 = F.layer_norm(tok, (D,), p[b + ".norm3.weight"], p[b + ".norm3.bias"], 1e-6)
        tok = tok + attn(n3, c, b + ".cross_attn", False)
        ff_in = ln(tok) * (1 + c2) + s2
        tok = tok + g2 * lin(F.gelu(lin(ff_in, b + ".ffn.0"), approximate="tanh"), b + ".ffn.2")
    shift, scale = (p["head.modulation"] + e[:, None]).chunk(2, dim=1)
    out = lin(ln(tok) * (1 + scale) + shift, "head.head")  # (B, N, 4*C), channel fastest
    out = out.view(B, Fr, h, w, 1, pt, pt, C).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return out.reshape(B, C, Fr, H, W)


def test_forward_matches_wan_reference_maths(tmp_path):
    cfg = cf.get_config("toy2d", **SMALL)
    state = {k: v.double() for k, v in synthetic_official(1).items()}
    model = cf.CausalDiT(cfg.model, causal=False).double()
    model.load_state_dict(state)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, 6, generator=g, dtype=torch.float64)  # (B, F, C, H, W)
    sigma = torch.rand(2, generator=g, dtype=torch.float64)
    context = torch.randn(2, 3, 8, generator=g, dtype=torch.float64)  # 3 rows, padded to text_len 5
    ours = model(x, sigma[:, None].expand(2, 3), context)
    ref = wan_reference_forward(state, x.permute(0, 2, 1, 3, 4), sigma * 1000, context, cfg.model, 4)
    torch.testing.assert_close(ours.permute(0, 2, 1, 3, 4), ref, rtol=1e-9, atol=1e-9)
    # the causal model with the whole clip in one chunk and one timestep is exactly WanModel
    causal = cf.CausalDiT(cf.get_config("toy2d", **{**SMALL, "chunk_frames": 3}).model).double()
    causal.load_state_dict(state)
    torch.testing.assert_close(causal(x, sigma[:, None].expand(2, 3), context), ours, rtol=0, atol=1e-12)


def test_text_padding_and_its_limit():
    model = cf.CausalDiT(cf.get_config("toy2d", **SMALL).model)
    model.load_state_dict(synthetic_official(2))  # random weights: a fresh model outputs exactly 0
    x, t = torch.randn(1, 2, 4, 4, 6), torch.rand(1, 2)
    short = torch.randn(1, 2, 8)
    padded = model(x, t, short)
    assert padded.abs().max() > 1e-3
    torch.testing.assert_close(padded, model(x, t, torch.cat([short, torch.zeros(1, 3, 8)], 1)))
    unpadded = cf.CausalDiT(cf.get_config("toy2d", **{**SMALL, "text_len": None}).model)
    unpadded.load_state_dict(synthetic_official(2))
    assert (unpadded(x, t, short) - padded).abs().max() > 1e-4  # the zero rows are attended, as in Wan
    with pytest.raises(ValueError, match="more than text_len=5"):
        cf.check_inputs(model, x, t, torch.randn(1, 6, 8))


# --- speed options: none may change the maths ----------------------------------------------------

FLEX = dict(dim=64, num_heads=4, num_layers=2, ffn_dim=64, device="cpu")


@pytest.mark.parametrize("kw", [dict(chunk_frames=2), dict(chunk_frames=1, window_frames=3, sink_frames=1),
                                dict(chunk_frames=2, in_channels=3, height=10, width=14, patch_size=2)])
def test_flex_attention_block_masks_equal_dense_masks(kw):
    """Including frames of 35 tokens (sequences that are no multiple of the 128-token blocks) and the
    cached path (several chunks in one call, and a rolling window)."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    dense = cf.CausalDiT(cf.get_config("toy2d", attention="dense", **FLEX, **kw).model)
    flex = cf.CausalDiT(cf.get_config("toy2d", attention="flex", **FLEX, **kw).model)
    with torch.no_grad():
        for p in dense.parameters():
            p.normal_(0, 0.3)
    flex.load_state_dict(dense.state_dict())
    c = dense.cfg
    x, t = torch.randn(2, 6, c.in_channels, c.height, c.width), torch.rand(2, 6)
    clean = torch.randn_like(x)
    with torch.no_grad():  # FlexAttention has no backward on a CPU; on CUDA it has
        torch.testing.assert_close(flex(x, t), dense(x, t), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(flex(x, t, clean_context=clean), dense(x, t, clean_context=clean), rtol=1e-5, atol=1e-5)
        caches = [cf.new_cache_for(m, 2, 6) for m in (flex, dense)]
        # a rolling window takes a chunk per call (its sink and ring make the mask); a full cache
        # takes the last four frames, two chunks, in one call (block-causal among them)
        calls = [(s, s + c.chunk_frames) for s in range(0, 6, c.chunk_frames)] if c.window_frames else [(0, 2), (2, 6)]
        for a, b in calls:
            torch.testing.assert_close(flex(x[:, a:b], t[:, a:b], kv_cache=caches[0], start_frame=a),
                                       dense(x[:, a:b], t[:, a:b], kv_cache=caches[1], start_frame=a), rtol=1e-5, atol=1e-5)


def test_flex_block_mask_is_built_per_block_not_per_token():
    """A Wan-sized teacher-forcing mask (2 x 21 frames x 1560 tokens) at 128-token granularity."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    vis = cf.teacher_forcing_visibility(torch.arange(21), 3)
    bm = cf._flex_block_mask(vis, 1560)
    assert bm.shape[-2:] == (65520, 65520) and bm.kv_num_blocks.shape[-1] == 512
    assert 0.2 < bm.sparsity() / 100 < 0.9  # most of the future is skipped, not masked token by token


def test_bf16_autocast_paths_run_and_stay_close_to_fp32():
    """precision="bf16" on a CPU exercises the dtypes of the CUDA path: autocast, a bf16 KV cache,
    the fp32 time embedding and head, rotary positions in fp32."""
    kw = dict(chunk_frames=2, in_channels=3, height=4, width=4, patch_size=2, cond_dim=8, text_len=4, **FLEX)
    fp32 = cf.CausalDiT(cf.get_config("toy2d", **kw).model)
    bf16 = cf.CausalDiT(cf.get_config("toy2d", precision="bf16", **kw).model)
    with torch.no_grad():
        for p in fp32.parameters():
            p.normal_(0, 0.1)
    bf16.load_state_dict(fp32.state_dict())
    x, t, cond = torch.randn(2, 4, 3, 4, 4), torch.rand(2, 4), torch.randn(2, 2, 8)
    cache = bf16.new_kv_cache(2, max_frames=4)
    assert cache.k.dtype == torch.bfloat16
    out = torch.cat([bf16(x[:, s:s + 2], t[:, s:s + 2], cond, kv_cache=cache, start_frame=s) for s in (0, 2)], 1)
    ref = fp32(x, t, cond)
    assert out.dtype == torch.float32 and (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_gradient_checkpointing_gives_the_same_gradients():
    cfg = cf.get_config("toy2d", chunk_frames=2, device="cpu")
    plain = cf.CausalDiT(cfg.model).double()
    with torch.no_grad():
        for p in plain.parameters():
            p.normal_(0, 0.3)
    ckpt = cf.CausalDiT(cf.get_config("toy2d", chunk_frames=2, grad_checkpointing=True).model).double()
    ckpt.load_state_dict(plain.state_dict())
    x, t = torch.randn(2, 4, 2, 1, 1, dtype=torch.float64), torch.rand(2, 4, dtype=torch.float64)
    for m in (plain, ckpt):
        m(x, t, clean_context=x.flip(1)).pow(2).sum().backward()
    for a, b in zip(plain.parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


def test_compile_keeps_parameter_names_and_device_auto_resolves():
    cfg = cf.get_config("toy2d", compile=True)
    assert set(cf.CausalDiT(cfg.model).state_dict()) == set(cf.CausalDiT(cf.get_config("toy2d").model).state_dict())
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert cf.get_config("toy2d").device == expected and cf.get_config("toy2d", device="cpu").device == "cpu"


def test_forward_flops_match_pytorchs_flop_counter():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = cf.get_config("toy2d", **{**SMALL, "chunk_frames": 2})
    model = cf.CausalDiT(cfg.model)
    cache = model.new_kv_cache(1, max_frames=6)
    x, t, cond = torch.randn(1, 2, 4, 4, 6), torch.rand(1, 2), torch.randn(1, 3, 8)
    with torch.no_grad():
        model(torch.randn(1, 2, 4, 4, 6), t, cond, kv_cache=cache, start_frame=0)
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):  # attention as matmuls
            model(x, t, cond, kv_cache=cache, start_frame=2)  # 2 new frames that see 4
    assert counter.get_total_flops() == bench.forward_flops(cfg.model, 2, 4, 5)


def test_benchmark_reports_measured_numbers(tmp_path):
    out = tmp_path / "bench.json"
    bench.main(["--config", "toy2d", "--device", "cpu", "--frames", "4", "--repeats", "1", "--out", str(out)])
    import json

    r = json.loads(out.read_text())
    assert r["frames"] == 4 and r["latent_frames_per_second"] > 0 and r["time_to_first_chunk_s"] > 0
    assert r["tflops_per_second"] > 0 and r["peak_gpu_memory_gib"] is None


def test_streaming_benchmarks_report_side_by_side_numbers():
    cfg = cf.get_config("toy2d", device="cpu", num_layers=1)
    rows = bench.benchmark_cache(cfg, lengths=(4, 8))
    assert [r["frames"] for r in rows] == [4, 8] and all(r["cached_s"] > 0 and r["recompute_s"] > 0 for r in rows)
    flat = bench.benchmark_flat_cost(cfg, window_frames=2, at_chunks=(2, 6), probe=2)
    assert set(flat["seconds_per_chunk"]) == {2, 6} and flat["kv_cache_bytes"] == 2 * 1 * 1 * 4 * 2 * 1 * 16 * 4


# --- the GPU suite (bench --suite gpu): its checks run on a CPU too, and must be able to fail ------


def test_gpu_suite_exactness_checks_pass_and_catch_a_cache_that_forgets(monkeypatch):
    rows = bench.exactness_checks("cpu", "fp32", "flex", 1e-5)
    names = {r["check"] for r in rows}
    assert {"kv_cache_vs_full_causal", "rolling_cache_vs_banded_mask", "causal_flex_vs_dense",
            "teacher_forcing_flex_vs_dense", "windowed_teacher_forcing_flex_vs_dense"} <= names
    assert all(r["ok"] for r in rows), rows
    # a cache whose values are lost once written: later chunks attend to zeros, and the check says so
    commit = cf.KVCache.commit

    def forgetful(self, start, n):
        commit(self, start, n)
        self.v.zero_()
    monkeypatch.setattr(cf.KVCache, "commit", forgetful)
    broken = {r["check"]: r for r in bench.exactness_checks("cpu", "fp32", "dense", 1e-5)}
    assert not broken["kv_cache_vs_full_causal"]["ok"] and broken["kv_cache_vs_full_causal"]["rel_err"] > 1e-3


def test_gpu_suite_bf16_checks_compare_with_fp32():
    rows = {r["check"]: r for r in bench.exactness_checks("cpu", "bf16", "dense", 5e-2)}
    assert rows["causal_vs_fp32"]["ok"] and 1e-4 < rows["causal_vs_fp32"]["rel_err"]  # bf16 rounds, visibly


@pytest.mark.slow
def test_gpu_suite_command_writes_every_section(tmp_path):
    import json

    out = tmp_path / "gpu.json"
    rc = bench.main(["--suite", "gpu", "--device", "cpu", "--sections", "exactness,training", "--out", str(out)])
    r = json.loads(out.read_text())
    assert rc == 0 and r["ok"] and r["device"] == "cpu" and "torch" in r
    assert all(row["ok"] for row in r["exactness"])
    stages = r["training"]["stages"]
    assert set(stages) == {"base", "ar_teacher", "ode_student", "dmd_critic", "dmd_generator"}
    assert all(len(s["fast"]) == 3 and s["finite"] for s in stages.values())
    assert r["training"]["fast"]["precision"] == "bf16" and r["training"]["fast"]["grad_checkpointing"]


def test_gpu_suite_refuses_unknown_sections(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--suite", "gpu", "--device", "cpu", "--sections", "exactnes"])
    assert e.value.code == 2 and "exactnes" in capsys.readouterr().err


def test_profile_ranks_where_the_time_goes():
    cfg = cf.get_config("toy2d", device="cpu", num_layers=1)
    rows = bench.profile_stream(cfg, 4, top=5)
    assert len(rows) == 5 and all(r["ms"] >= 0 and 0 <= r["share"] <= 1 for r in rows)
    assert [r["ms"] for r in rows] == sorted((r["ms"] for r in rows), reverse=True)
