"""pipeline_bench.py: our batched sampling against N diffusers pipeline calls, on the tiny random pipelines."""
import pytest

import pipeline_bench
from conftest import refusal


def test_batched_sampling_matches_the_pipeline_called_once_per_video(diffusers_folders):
    r = pipeline_bench.benchmark("wan", diffusers_folders["wan"], n=2, steps=2, size="32x32", frames=9, repeats=1)
    assert r["latent_shape"] == [16, 3, 4, 4] and r["ours_s"] > 0 and r["pipeline_s"] > 0
    assert r["max_latent_diff"] < 1e-4


@pytest.mark.parametrize("argv, message", [
    (["--n", "0"], "error: --n must be at least 1, got 0"),
    (["--steps", "-1"], "error: --steps must be at least 1, got -1"),
    (["--device", "nope"], "error: --device 'nope': not a device torch sees here"),
    (["--dit", "/nonexistent", "--device", "cpu"], "error: transformer of /nonexistent: folder '/nonexistent' does not"),
])
def test_bad_flags_are_one_line(argv, message, capsys):
    assert refusal(pipeline_bench.main, argv, capsys).startswith(message)
