"""examples/continuation.py: the seam statistics' definitions on videos whose answers are known, and the
command on the shipped digit run."""

import json
import os

import pytest
import torch

import causal_forcing as cf
from examples import continuation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def square_video(steps):
    """A 3x3 bright square on a dark 16x16 canvas, its top-left column moved by each of `steps` in turn."""
    video, x = -torch.ones(1, len(steps) + 1, 1, 16, 16, dtype=torch.float64), 4
    for f, dx in enumerate([0] + list(steps)):
        x += dx
        video[0, f, 0, 6:9, x:x + 3] = 1
    return video


def test_seam_statistics_on_a_square_that_carries_on_or_turns_back():
    classifier = cf.DigitClassifier(16).eval()
    data = square_video([1, 1, 1, 1, 1])  # one pixel right per frame
    back = square_video([1, -1, -1, -1, -1])  # the same first chunk, then back from the seam at frame 2
    same = continuation.seam_statistics(data, data, torch.zeros(1, 1, dtype=torch.long), 2, 2, classifier)
    turned = continuation.seam_statistics(back, data, torch.zeros(1, 1, dtype=torch.long), 2, 2, classifier)
    assert same["seam_speed_px"] == pytest.approx(1) and same["seam_velocity_error_px"] == pytest.approx(0)
    assert same["seam_velocity_cosine"] == pytest.approx(1) and same["seam_turn_cosine"] == pytest.approx(1)
    assert same["seam_jump"] == pytest.approx(1) and same["centroid_error_px"] == pytest.approx([0] * 4)
    assert turned["seam_velocity_error_px"] == pytest.approx(2) and turned["seam_velocity_cosine"] == pytest.approx(-1)
    assert turned["seam_turn_cosine"] == pytest.approx(-1)
    assert turned["centroid_error_px"] == pytest.approx([2, 4, 6, 8])  # 2 px apart at the seam, 2 more a frame
    assert 0 <= same["digit_kept"] <= 1


def test_the_continuation_command_on_the_shipped_run(tmp_path, capsys):
    run = os.path.join(ROOT, "docs", "mnist_run")
    if not os.path.isfile(os.path.join(run, "models.pt")):
        pytest.skip("no shipped digit run in docs/mnist_run")
    assert continuation.main(["--run", run, "--videos", "12", "--out", str(tmp_path / "c.json")]) == 0
    report = json.loads((tmp_path / "c.json").read_text())
    assert report["videos"] == 12 and report["prefix_frames"] == 2
    assert report["run"] == os.path.join("docs", "mnist_run")
    assert set(report) >= {"continued", "from noise", "data"}
    assert report["data"]["seam_velocity_cosine"] == pytest.approx(1)
    assert len(report["continued"]["centroid_error_px"]) == report["frames"] - 2
    assert "digit kept" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        continuation.main(["--run", str(tmp_path / "nothing")])
    assert "no trained digit models" in capsys.readouterr().err
