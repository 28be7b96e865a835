"""The GPU path's checks, where CUDA is present: `python -m pytest -m gpu`. The fast paths
(FlexAttention block masks, bf16 autocast, gradient checkpointing, torch.compile) against the readable
ones. Elsewhere every test here is skipped, saying why. The timings are not tests: they are measured by
`python examples/bench.py --suite gpu --out docs/gpu_bench.json`, which runs these checks too."""

import pytest
import torch

from examples import bench

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("precision,backend,tol", [("fp32", "dense", 1e-5), ("fp32", "flex", 1e-5), ("bf16", "flex", 5e-2)])
def test_fast_paths_agree_with_the_readable_ones(precision, backend, tol):
    rows = bench.exactness_checks("cuda", precision, backend, tol)
    bad = [r for r in rows if not r["ok"]]
    assert rows and not bad, bad


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_training_steps_with_the_fast_paths_stay_finite_and_close_to_fp32(compiled):
    fast = dict(precision="bf16", attention="flex", grad_checkpointing=True, compile=compiled)
    result = bench.training_checks("cuda", fast)
    assert bench._all_ok(result), result


def test_a_compiled_stream_stops_recompiling_after_its_first_chunks():
    result = bench.recompile_check("cuda")
    assert bench._all_ok(result), result
