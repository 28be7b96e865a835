"""Regenerates toy_data/digit_sprites.npz: 28x28 grey-scale digit sprites for moving-digit videos
when real MNIST is not at hand (no download is ever needed).

Each sprite is a digit 0-9 drawn with one of matplotlib's bundled DejaVu fonts (Sans, Serif, Mono;
normal or bold), with a random stroke width, rotation, scale, shear and offset, rasterised with
anti-aliasing and centred by its centre of mass like MNIST digits. Deterministic for a seed.

    python toy_data/make_digit_sprites.py [--per-digit 100] [--seed 0]

Output: images uint8 (N, 28, 28), labels uint8 (N,), N = 10 * per_digit.
"""

import argparse
import os

import numpy as np


def render(digit: int, rng: np.random.Generator, size: int = 28, oversample: int = 4) -> np.ndarray:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patheffects as pe
    import matplotlib.pyplot as plt
    from matplotlib.transforms import Affine2D

    px = size * oversample
    fig = plt.figure(figsize=(1, 1), dpi=px)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.axis("off")
    family = rng.choice(["DejaVu Sans", "DejaVu Serif", "DejaVu Sans Mono"])
    weight = rng.choice(["normal", "bold"])
    stroke = rng.uniform(0.0, 2.5) * oversample
    shear = rng.uniform(-0.25, 0.25)
    text = ax.text(0.5, 0.5, str(digit), ha="center", va="center", fontsize=rng.uniform(52, 70) * oversample / 4,
                   family=family, weight=weight, color="white", rotation=rng.uniform(-15, 15))
    text.set_path_effects([pe.withStroke(linewidth=stroke, foreground="white")])
    text.set_transform(Affine2D().skew(shear, 0).translate(-shear * 0.5, 0) + ax.transData)
    fig.patch.set_facecolor("black")
    fig.canvas.draw()
    img = np.asarray(fig.canvas.buffer_rgba())[..., 0].astype(np.float64)
    plt.close(fig)
    img = img.reshape(size, oversample, size, oversample).mean(axis=(1, 3))  # anti-aliased downsample
    return centre(img, size)


def centre(img: np.ndarray, size: int) -> np.ndarray:
    """Fit the digit into a 20x20 box and centre it by its centre of mass in the 28x28 frame,
    as MNIST was made."""
    ys, xs = np.nonzero(img > 10)
    box = img[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
    scale = 20 / max(box.shape)
    h, w = max(1, round(box.shape[0] * scale)), max(1, round(box.shape[1] * scale))
    yi = (np.arange(h) + 0.5) / scale - 0.5  # bilinear resize
    xi = (np.arange(w) + 0.5) / scale - 0.5
    y0, x0 = np.clip(np.floor(yi).astype(int), 0, box.shape[0] - 1), np.clip(np.floor(xi).astype(int), 0, box.shape[1] - 1)
    y1, x1 = np.clip(y0 + 1, 0, box.shape[0] - 1), np.clip(x0 + 1, 0, box.shape[1] - 1)
    fy, fx = np.clip(yi - y0, 0, 1)[:, None], np.clip(xi - x0, 0, 1)[None, :]
    small = (box[y0][:, x0] * (1 - fy) * (1 - fx) + box[y1][:, x0] * fy * (1 - fx)
             + box[y0][:, x1] * (1 - fy) * fx + box[y1][:, x1] * fy * fx)
    out = np.zeros((size, size))
    top, left = (size - h) // 2, (size - w) // 2
    out[top: top + h, left: left + w] = small
    mass = out.sum()
    cy = (out.sum(1) * np.arange(size)).sum() / mass
    cx = (out.sum(0) * np.arange(size)).sum() / mass
    out = np.roll(out, (round(size / 2 - 0.5 - cy), round(size / 2 - 0.5 - cx)), axis=(0, 1))
    return np.clip(out * 255 / max(out.max(), 1e-9), 0, 255).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-digit", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "digit_sprites.npz"))
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    labels = np.repeat(np.arange(10, dtype=np.uint8), args.per_digit)
    images = np.stack([render(int(d), rng) for d in labels])
    np.savez_compressed(args.out, images=images, labels=labels)
    print(f"wrote {args.out}: {images.shape[0]} sprites, {os.path.getsize(args.out) / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
