"""Moving digits: the generator's physics, the IDX reader (and its errors), the digit sources."""

import gzip
import os
import struct

import numpy as np
import pytest
import torch

import causal_forcing as cf

SHARED_MNIST = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mnist")


def write_idx(path, array: np.ndarray, compress=False):
    header = b"\x00\x00\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip(tmp_path, compress):
    arr = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    path = str(tmp_path / ("x.idx3-ubyte" + (".gz" if compress else "")))
    write_idx(path, arr, compress)
    assert np.array_equal(cf.read_idx(path).numpy(), arr)


def test_idx_errors_name_the_problem(tmp_path):
    arr = np.zeros((4, 28, 28), dtype=np.uint8)
    good = tmp_path / "good.idx"
    write_idx(str(good), arr)
    raw = good.read_bytes()
    (tmp_path / "short.idx").write_bytes(raw[:-10])
    with pytest.raises(ValueError, match=r"expected 3152 bytes for shape \(4, 28, 28\), found 3142"):
        cf.read_idx(str(tmp_path / "short.idx"))
    (tmp_path / "magic.idx").write_bytes(b"\x01\x02" + raw[2:])
    with pytest.raises(ValueError, match="is not a uint8 IDX file"):
        cf.read_idx(str(tmp_path / "magic.idx"))
    (tmp_path / "cut.idx.gz").write_bytes(gzip.compress(raw)[:-20])  # a truncated download
    with pytest.raises(ValueError, match="corrupt or truncated"):
        cf.read_idx(str(tmp_path / "cut.idx.gz"))
    flipped = bytearray(gzip.compress(raw))
    flipped[len(flipped) // 2] ^= 0xFF  # a bit flip inside the deflate stream: zlib.error, or a CRC error
    (tmp_path / "flip.idx.gz").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match=r"flip\.idx\.gz: cannot be read .*corrupt or truncated"):
        cf.read_idx(str(tmp_path / "flip.idx.gz"))
    with pytest.raises(FileNotFoundError, match="no IDX file"):
        cf.read_idx(str(tmp_path / "absent.idx"))


def test_mnist_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no MNIST test images"):
        cf.load_digits(str(tmp_path))
    write_idx(str(tmp_path / "t10k-images-idx3-ubyte"), np.zeros((3, 28, 28), dtype=np.uint8))
    write_idx(str(tmp_path / "t10k-labels-idx1-ubyte.gz"), np.zeros(2, dtype=np.uint8), compress=True)
    with pytest.raises(ValueError, match="disagree"):
        cf.load_digits(str(tmp_path))


@pytest.mark.skipif(not os.path.isdir(SHARED_MNIST), reason="the real MNIST test set is not on this machine")
def test_real_mnist_test_set():
    images, labels, source = cf.load_digits(SHARED_MNIST)
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8
    assert labels[:5].tolist() == [7, 2, 1, 0, 4] and torch.bincount(labels).min() > 850
    assert "MNIST" in source


def test_bundled_sprites_without_mnist(monkeypatch):
    monkeypatch.delenv(cf.MNIST_ENV, raising=False)
    images, labels, source = cf.load_digits()
    assert images.shape[1:] == (28, 28) and torch.bincount(labels).tolist() == [100] * 10
    assert "sprites" in source
    ink = images.float().mean((1, 2))
    assert (ink > 10).all() and (images[:, 0].float().mean() < 5)  # a digit in the middle, dark border


def test_moving_digits_physics():
    speed, size, ds = 0.1, 64, 28
    video, labels, tops = cf.moving_digits(200, frames=20, size=size, num_digits=2, speed=speed,
                                           rng=torch.Generator().manual_seed(0), return_positions=True)
    assert video.shape == (200, 20, 64, 64) and labels.shape == (200, 2) and tops.shape == (200, 20, 2, 2)
    span = size - ds
    assert tops.min() >= 0 and tops.max() <= span  # every digit stays on the canvas
    step = (tops[:, 1:] - tops[:, :-1]).double()  # (N, F-1, D, 2) pixels per frame
    free = ((tops[:, :-1] > 0) & (tops[:, :-1] < span)).all(-1) & ((tops[:, 1:] > 0) & (tops[:, 1:] < span)).all(-1)
    # away from the walls a digit moves speed * span pixels per frame (up to rounding to pixels)
    assert (step.norm(dim=-1)[free] - speed * span).abs().max() <= 1.5
    # at a wall the velocity component flips: the next step goes back into the canvas
    # (over two steps: rounding to pixels can reach the edge one frame before the clamp)
    at_wall = (tops[:, 1:-2] == 0) | (tops[:, 1:-2] == span)
    before, after = step[:, :-2][at_wall], (step[:, 1:-1] + step[:, 2:])[at_wall]
    hit = before.abs() >= 2  # moved into the wall by a visible step; a digit stuck there gives 0 after
    assert hit.sum() > 20 and (before[hit] * after[hit] < 0).all()
    # the digits are drawn where the positions say: the brightest pixel lies inside a digit's box
    n, f = 3, 7
    yx = torch.nonzero(video[n, f] == video[n, f].max())[0]
    assert any(((tops[n, f, d] <= yx) & (yx < tops[n, f, d] + ds)).all() for d in range(2))


def test_moving_digits_determinism_and_small_canvas():
    a = cf.moving_digits(8, frames=10, size=32, num_digits=1, digit_size=14, rng=torch.Generator().manual_seed(3))
    b = cf.moving_digits(8, frames=10, size=32, num_digits=1, digit_size=14, rng=torch.Generator().manual_seed(3))
    c = cf.moving_digits(8, frames=10, size=32, num_digits=1, digit_size=14, rng=torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
    assert a[0].shape == (8, 10, 32, 32)
    with pytest.raises(ValueError, match="does not fit"):
        cf.moving_digits(1, size=20)



def test_missing_mnist_files_are_an_error_at_the_command_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:  # a usage error: argparse's exit status 2
        cf.main(["--config", "mnist", "--mnist-dir", str(tmp_path), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "error: no MNIST test images in" in err and "Traceback" not in err
