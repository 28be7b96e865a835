"""The programs in examples/ fail clearly and leave no half-written files: every error names the
argument or file and the fix, before any work is spent (exit code 2, no traceback); files are written
whole or not at all, with the permissions open() would give."""

import os
import signal
import subprocess
import sys

import pytest
import torch

from examples import figures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


# --- figures.py: files written whole or not at all ---------------------------------------------------


def test_a_killed_figure_write_leaves_the_old_file_and_a_later_run_removes_its_temporary(tmp_path):
    """kill -9 in the middle of writing samples.gif: the old file is intact (not a 0-byte one) and only
    a temporary of this file's naming is left, which remove_stale_temporaries deletes (others' stay)."""
    path = tmp_path / "samples.gif"
    path.write_bytes(b"the old figure")
    code = f"""
import os, signal, torch
from PIL import Image
from examples import figures
def save(self, f, *args, **kwargs):
    f.write(b"half a figure")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
Image.Image.save = save
figures.save_gif({{"a": torch.zeros(2, 3, 1, 4, 4)}}, {str(path)!r})
"""
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == -signal.SIGKILL, run.stderr
    assert path.read_bytes() == b"the old figure"
    left = [n for n in os.listdir(tmp_path) if n != "samples.gif"]
    assert len(left) == 1 and left[0].startswith(".tmp-") and left[0].endswith("-samples.gif")
    others = [".tmp-other", ".tmp-abcdefgh-samples.gif.bak", ".tmp-abcdefgh-steps.gif", "samples.gif.tmp",
              ".tmp-123-steps.gif"]
    for name in others + [".tmp-4321-samples.gif"]:  # the last as causal_forcing.save_atomic names its temporary
        (tmp_path / name).write_bytes(b"")
    figures.remove_stale_temporaries(str(path))
    assert sorted(os.listdir(tmp_path)) == sorted(others + ["samples.gif"])


def test_atomic_file_removes_its_temporary_on_failure_and_gives_open_permissions(tmp_path, umask_022):
    path = tmp_path / "training_health.png"
    with pytest.raises(RuntimeError):
        with figures.atomic_file(str(path)) as f:
            f.write(b"half")
            raise RuntimeError("failed while drawing")
    assert os.listdir(tmp_path) == []
    figures.save_gif({"a": torch.zeros(2, 3, 1, 4, 4)}, str(path.with_suffix(".gif")))
    assert os.listdir(tmp_path) == ["training_health.gif"]
    assert os.stat(path.with_suffix(".gif")).st_mode & 0o777 == 0o644  # 0o666 & ~umask, not mkstemp's 0o600


def test_check_writable_names_the_flag_and_the_problem(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(ValueError, match="--out .*a_file.* is a file; give a folder"):
        figures.check_writable(str(a_file), "--out", folder=True)
    with pytest.raises(ValueError, match="--out .* is a folder; give a file name"):
        figures.check_writable(str(tmp_path), "--out")
    with pytest.raises(ValueError, match="--out .*x.json.* cannot be written"):
        figures.check_writable(str(a_file / "x.json"), "--out")  # its folder would be a file
    figures.check_writable(str(tmp_path / "new" / "x.json"), "--out")
    assert os.path.isdir(tmp_path / "new")


# --- bench.py ------------------------------------------------------------------------------------------


def usage_error(main, argv, capsys) -> str:
    """Runs a program's main on argv, expecting argparse's usage error (exit 2); returns what it said."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_bench_refuses_an_out_it_cannot_write_before_the_benchmark(tmp_path, monkeypatch, capsys):
    from examples import bench

    def never(*args, **kwargs):
        raise AssertionError("the benchmark ran before --out was checked")

    monkeypatch.setattr(bench, "benchmark_stream", never)
    monkeypatch.setattr(bench, "gpu_suite", never)
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for suite in ("speed", "gpu"):
        err = usage_error(bench.main, ["--config", "toy2d", "--device", "cpu", "--suite", suite,
                                       "--out", str(a_file / "bench.json")], capsys)
        assert "--out" in err and "cannot be written" in err
    err = usage_error(bench.main, ["--config", "toy2d", "--device", "cpu", "--out", str(tmp_path)], capsys)
    assert "is a folder" in err


def test_bench_set_name_is_a_usage_error(capsys):
    from examples import bench

    err = usage_error(bench.main, ["--config", "toy2d", "--device", "cpu", "--set", "name=x"], capsys)
    assert "name" in err


# --- long_stream.py ------------------------------------------------------------------------------------

SHIPPED_RUN = os.path.join(ROOT, "docs", "mnist_run")


@pytest.fixture
def no_models(monkeypatch):
    """Fails the test if the models are loaded: every check comes first."""
    import causal_forcing as cf

    def never(*args, **kwargs):
        raise AssertionError("models loaded before the flags were checked")

    monkeypatch.setattr(cf, "load_models", never)


def test_long_stream_out_an_existing_file_is_a_usage_error(tmp_path, capsys, no_models):
    from examples import long_stream

    a_file = tmp_path / "results"
    a_file.write_text("")
    err = usage_error(long_stream.main, ["--run", SHIPPED_RUN, "--out", str(a_file)], capsys)
    assert "--out" in err and "is a file; give a folder" in err and "Traceback" not in err


def test_long_stream_refuses_a_batch_the_machine_cannot_hold_before_any_work(tmp_path, capsys, no_models):
    import causal_forcing as cf
    from examples import long_stream

    out = tmp_path / "out"
    err = usage_error(long_stream.main, ["--run", SHIPPED_RUN, "--batch-size", "100000000", "--out", str(out)], capsys)
    assert "--batch-size 100000000" in err and "GiB" in err and "lower --batch-size or --frames" in err
    assert not out.exists()  # nothing made for a refused run
    cfg = cf.run_config(SHIPPED_RUN)
    assert long_stream.stream_memory_bytes(cfg, 1024, 64, cfg.data.frames) < 2**30  # the defaults stay allowed


def run_folder(tmp_path, entries, **model_changes) -> str:
    """A run folder with the shipped run's config.json (model fields changed) and a models.pt of `entries`."""
    import json

    with open(os.path.join(SHIPPED_RUN, "config.json")) as f:
        config = json.load(f)
    config["model"].update(model_changes)
    (tmp_path / "config.json").write_text(json.dumps(config))
    models = torch.load(os.path.join(SHIPPED_RUN, "models.pt"), weights_only=True)
    torch.save({k: models[k] for k in entries}, tmp_path / "models.pt")
    return str(tmp_path)


def test_long_stream_names_a_models_file_without_the_generator(tmp_path, capsys):
    from examples import long_stream

    run = run_folder(tmp_path, ["bidirectional_teacher", "digit_classifier"])
    err = usage_error(long_stream.main, ["--run", run, "--out", str(tmp_path / "out")], capsys)
    assert "models.pt has no 'causal_forcing' entry" in err and "python causal_forcing.py --config mnist" in err


def test_long_stream_names_a_models_file_of_another_config(tmp_path, capsys):
    from examples import long_stream

    run = run_folder(tmp_path, ["causal_forcing", "digit_classifier"], ffn_dim=192)
    err = usage_error(long_stream.main, ["--run", run, "--out", str(tmp_path / "out")], capsys)
    assert "models.pt does not fit the config in" in err and "config.json" in err and "size mismatch" in err
    assert "different runs" in err


@pytest.mark.parametrize("program", ["digit_probe", "continuation"])
def test_a_probe_refuses_an_out_it_cannot_write_before_any_work(program, tmp_path, capsys, no_models):
    import importlib

    main = importlib.import_module(f"examples.{program}").main
    err = usage_error(main, ["--run", SHIPPED_RUN, "--out", str(tmp_path)], capsys)  # a folder, not a file
    assert "--out" in err and "is a folder; give a file name" in err and "Traceback" not in err


def test_cd_probe_refuses_settings_of_the_network_or_data_it_keeps(tmp_path, capsys, no_models):
    import json

    import causal_forcing as cf
    from examples import cd_probe

    (tmp_path / "config.json").write_text(json.dumps(cf.get_config("toy2d", device="cpu").to_dict()))
    err = usage_error(cd_probe.main, ["--run", str(tmp_path), "--set", "dim=48", "--set", "frames=6"], capsys)
    assert "--set data.frames, model.dim: the probe keeps the run's network and data" in err
