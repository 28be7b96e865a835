"""The figures of a finished run folder of `python causal_forcing.py`.

    python examples/figures.py runs/toy2d
    python examples/figures.py runs/mnist

Writes into the run folder:
    samples.png / samples.gif   every row's evaluation samples: on the toy each row's frames over the data,
                                on moving digits an animation with a column per row (row i asks for digit i % 10)
    steps.png / steps.gif       the same for the Causal Forcing (++) students streamed with 1, 2 and 4 steps
    training_health.png         every stage's loss per step, DMD's critic and generator losses and gradient
                                norm, and on moving digits the generator's fixed rollouts as DMD trains
The samples and the rollouts come from the run's saved stages (out/stages/evaluation.pt and the DMD
stages), the losses from out/losses.json; a folder without stages/ (docs/mnist_run) gets the
training-health figure without rollouts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import tempfile

import torch
import torch.nn.functional as F_
from einops import rearrange

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import causal_forcing as cf  # noqa: E402


# --- files written whole or not at all (used by every program in examples/) ------------------------


def temporary_beside(path: str) -> tuple[int, str]:
    """A new empty file (its descriptor and path) in `path`'s folder, named .tmp-<8 characters>-<name>,
    to be written and then `publish`ed over `path`."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    return tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="-" + name)


def publish(tmp: str, path: str) -> None:
    """Renames the finished temporary `tmp` over `path`: its bytes flushed to disk first, its permissions
    those open() would give (0o666 less the umask, not mkstemp's owner-only 0600), the folder flushed
    after, so that neither a kill nor a power loss leaves a truncated or empty file under `path`."""
    fd = os.open(tmp, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
    with contextlib.suppress(OSError):  # where the system lets a folder be opened
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str):
    """Yields a binary file that replaces `path` when the block ends (see `publish`); the old file
    survives until the new one is whole, and a write that fails removes its temporary."""
    fd, tmp = temporary_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        publish(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def remove_stale_temporaries(path: str) -> None:
    """Deletes the temporaries that writes of `path` killed before they finished left beside it: only
    files named .tmp-<8 characters>-<path's name> (this file's) or .tmp-<process id>-<path's name>
    (causal_forcing.save_atomic's), never another program's."""
    folder, name = os.path.split(os.path.abspath(path))
    ours = re.compile(r"\.tmp-([a-z0-9_]{8}|[0-9]+)-" + re.escape(name))
    for entry in os.listdir(folder) if os.path.isdir(folder) else []:
        if ours.fullmatch(entry):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, entry))


def check_writable(path: str, flag: str, folder: bool = False) -> None:
    """A ValueError naming `flag` when `path` (a file, or with folder=True a folder) cannot be written,
    raised before any work is spent: a folder given for a file or the reverse, or a place that cannot
    be made or written to. Makes the folder."""
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is a file; give a folder")
    if not folder and os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is a folder; give a file name")
    where = path if folder else os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(where, exist_ok=True)
        with tempfile.TemporaryFile(dir=where):
            pass
    except OSError as e:
        raise ValueError(f"{flag} {path!r} cannot be written ({e.strerror or e}); give a place that can") from None


# --- the figures -----------------------------------------------------------------------------------


def _pyplot():
    """matplotlib's pyplot, drawing without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: str, dpi: int) -> None:
    """Writes a matplotlib figure as a PNG, atomically, and closes it."""
    fig.tight_layout()
    with atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=dpi)
    _pyplot().close(fig)


def plot_samples(samples: dict, data: torch.Tensor, path: str, max_points: int = 600) -> None:
    """Toy runs: a scatter panel per row, its frames (colour = frame index) over the data (grey)."""
    cols = -(-len(samples) // 2)
    fig, axes = _pyplot().subplots(2, cols, figsize=(4.4 * cols, 8.6), sharex=True, sharey=True, squeeze=False)
    ref = rearrange(data[:max_points], "b f c h w -> (b f) (c h w)")
    for ax, (row, x) in zip(axes.flat, samples.items()):
        pts = rearrange(x[:max_points], "b f c h w -> b f (c h w)")
        ax.scatter(ref[:, 0], ref[:, 1], s=3, c="0.8", label="data")
        for f in range(pts.shape[1]):
            ax.scatter(pts[:, f, 0], pts[:, f, 1], s=3, label=f"frame {f}")
        ax.set(title=row.replace("_pp", "++").replace("_", " "), aspect="equal", xlabel="x1", ylabel="x2")
    for ax in axes.flat[len(samples):]:
        ax.axis("off")
    axes.flat[0].legend(loc="upper right", fontsize=7, markerscale=3)
    fig.suptitle("Generated frames (colour = frame index) against the data (grey)")
    _save_figure(fig, path, dpi=90)


def plot_training_health(losses: dict, path: str) -> None:
    """What tells healthy training from broken: every stage's loss per step (log scale; flow matching
    should fall and level off), DMD's critic loss (bounded, not climbing), the generator's DMD loss and
    gradient norm at each update (no blow-up), and for image frames the generator's fixed rollouts every
    few updates from its ODE init (stable digits that sharpen, no drift or collapse)."""
    dmd = {k.replace("dmd_", ""): v for k, v in losses.items() if k.startswith("dmd_")}
    snaps = {k: v["snapshots"] for k, v in dmd.items() if "snapshots" in v and v["snapshots"]["videos"].numel()
             and v["snapshots"]["videos"].shape[-1] > 1}  # image frames only
    fig = _pyplot().figure(figsize=(16, 8 + 2.6 * len(snaps)))
    grid = fig.add_gridspec(2 + len(snaps), 4)
    ax = fig.add_subplot(grid[0, :2])
    for name, rec in losses.items():
        if isinstance(rec, list) and rec:  # a stage with one loss: flow matching, ODE regression, the classifier's
            v = torch.tensor(rec, dtype=torch.float64).reshape(1, 1, -1)
            k = max(1, v.shape[-1] // 50)  # a running mean over ~2% of the steps
            ax.plot(F_.avg_pool1d(v, k, stride=1).flatten().tolist(), label=name)
    ax.set(yscale="log", xlabel="step", ylabel="loss (running mean)", title="every stage before DMD")
    ax.legend(fontsize=7)
    panels = ((grid[0, 2], "critic", "step", "DMD critic (fake score) loss"),
              (grid[0, 3], "generator", "generator update", "DMD generator loss"),
              (grid[1, :2], "generator_grad_norm", "generator update", "DMD generator gradient norm (before clipping)"))
    for place, key, xlabel, title in panels:
        ax = fig.add_subplot(place)
        for name, rec in dmd.items():
            ax.plot(rec.get(key, []), label=name)
        ax.set(yscale="log", xlabel=xlabel, title=title)
        ax.legend(fontsize=7)
    for r, (name, snap) in enumerate(snaps.items()):
        v = snap["videos"]  # (S, 4, F, 1, H, W)
        strip = rearrange(v[:, :2, :, 0].clamp(-1, 1), "s b f h w -> (s h) (b f w)")  # two videos per row
        ax = fig.add_subplot(grid[2 + r, :])
        ax.imshow(strip.numpy(), cmap="gray", vmin=-1, vmax=1, aspect="equal")
        ax.set_yticks([(i + 0.5) * v.shape[-2] for i in range(len(v))], [f"update {u}" for u in snap["updates"]],
                      fontsize=7)
        ax.set_xticks([])
        ax.set_title(f"{name}: two fixed rollouts ({v.shape[2]} frames each) as DMD trains", fontsize=9)
    _save_figure(fig, path, dpi=80)


def save_gif(columns: dict, path: str, scale: int = 3, ms_per_frame: int = 250) -> None:
    """An animated GIF of moving-digit videos: one column per entry of `columns` (name -> (N, F, 1,
    H, W) in [-1, 1], the same N and F for all), one row per video, the name above each column.
    Written atomically with Pillow, which matplotlib already depends on."""
    from PIL import Image, ImageDraw

    vids = [cf.to_pixels(v[:, :, 0]) for v in columns.values()]  # (N, F, H, W) uint8
    N, F, H, W = vids[0].shape
    pad, header = 2, 26
    cell_w = W * scale + pad
    sheet_w, sheet_h = len(vids) * cell_w + pad, header + N * (H * scale + pad) + pad
    frames = []
    for f in range(F):
        img = Image.new("L", (sheet_w, sheet_h), 96)
        draw = ImageDraw.Draw(img)
        for j, (name, v) in enumerate(zip(columns, vids)):
            x = pad + j * cell_w
            short = name.replace("ode_student_from_", "ode_").replace("diffusion_forcing", "df")
            for k, word in enumerate(short.replace("bidirectional", "bidir").split("_")[:3]):
                draw.text((x, 1 + 7 * k), word[:cell_w // 6], fill=255)
            for i in range(N):
                tile = Image.fromarray(v[i, f].numpy()).resize((W * scale, H * scale), Image.NEAREST)
                img.paste(tile, (x, header + pad + i * (H * scale + pad)))
        frames.append(img)
    with atomic_file(path) as f:
        frames[0].save(f, format="GIF", save_all=True, append_images=frames[1:], duration=ms_per_frame, loop=0)


def write_figures(out: str) -> list[str]:
    """Draws the figures of the run in folder `out` (see the top of this file); returns their paths."""
    cfg = cf.run_config(out, device="cpu")
    for name in ("training_health.png", "samples.png", "samples.gif", "steps.png", "steps.gif"):
        remove_stale_temporaries(os.path.join(out, name))  # of a run of this program that was killed
    with open(os.path.join(out, "losses.json")) as f:
        losses = json.load(f)
    stages = os.path.join(out, "stages")
    for name in [n for n in losses if n.startswith("dmd_")]:  # the rollouts are kept in the stage files only
        path = os.path.join(stages, f"{name}.pt")
        if os.path.isfile(path):
            losses[name]["snapshots"] = cf._load_saved(path)["result"]["losses"]["snapshots"]
    written = [os.path.join(out, "training_health.png")]
    plot_training_health(losses, written[0])
    evaluation = os.path.join(stages, "evaluation.pt")
    if not os.path.isfile(evaluation):
        return written
    samples = cf._load_saved(evaluation)["result"][2]  # {"samples": {row: videos}, "steps": {...}}
    data = cf.PipelineRun(cfg, None, None).data  # the run's held-out videos, made again from its seed
    digits = cfg.data.dataset == "moving_digits"
    if digits:  # the GIFs' data column: a held-out video of each digit (any video if none shows it)
        found = [torch.nonzero(data.test_labels[:, 0] == k).flatten().tolist() for k in range(10)]
        first = data.test[[ids[0] if ids else k % len(data.test) for k, ids in enumerate(found)]]
    for name, group in samples.items():
        if not group:
            continue
        written.append(os.path.join(out, name + (".gif" if digits else ".png")))
        if digits:
            save_gif({"data": first, **{row: v[:10] for row, v in group.items()}}, written[-1])
        else:
            plot_samples(group, data.test, written[-1])
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="examples/figures.py", description="The figures of a finished run of "
                                     "causal_forcing.py: samples, steps and training_health, written into its folder.")
    parser.add_argument("run", help="the run folder (--out of causal_forcing.py; default there: runs/<config>)")
    args = parser.parse_args(argv)
    try:
        written = write_figures(args.run)
    except (ValueError, OSError) as e:  # a missing or unreadable run, a folder that cannot be written
        parser.error(str(e))
    print("wrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
