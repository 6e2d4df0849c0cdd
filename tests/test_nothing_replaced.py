"""Nothing a user made is replaced or hidden without a word: a second sample.py run, a resume from an older
checkpoint, a full disk (README: Reliability)."""
import json
import os
import resource
import signal
import subprocess
import sys

from conftest import refusal

import sample
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "tiny", "--reward", "pixel", "--size", "16x16", "--frames", "4", "--sample-steps", "2", "--n", "2",
        "--batch-size", "1", "--lr", "1e-3", "--prompts", os.path.join(ROOT, "prompts/train.txt")]


def test_a_second_sample_run_into_the_same_folder_is_refused_unless_told(tmp_path, capsys):
    argv = ["--model", "tiny", "--size", "16x16", "--frames", "4", "--sample-steps", "2", "--n", "1",
            "--out", str(tmp_path)]
    sample.main(argv)
    first = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)}
    line = refusal(sample.main, argv + ["--seed", "1"], capsys)
    assert "already holds" in line and "--overwrite" in line
    assert {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)} == first  # untouched
    sample.main(argv + ["--seed", "1", "--overwrite"])
    assert {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)} != first


def test_resuming_an_older_checkpoint_keeps_the_newer_rows_beside_the_newer_checkpoints(tmp_path):
    train.main(TINY + ["--steps", "3", "--save-every", "1", "--out", str(tmp_path)])
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    train.main(TINY + ["--steps", "2", "--save-every", "1", "--out", str(tmp_path),
                       "--resume", str(tmp_path / "checkpoint-1")])
    aside = [f for f in os.listdir(tmp_path) if f.startswith("superseded-")]
    assert len(aside) == 1
    kept = (tmp_path / aside[0] / "metrics.jsonl").read_text().splitlines()
    assert kept == rows[1:]  # steps 2 and 3 of the first timeline, with its checkpoints 2 and 3
    assert sorted(os.listdir(tmp_path / aside[0])) == ["checkpoint-2", "checkpoint-3", "metrics.jsonl"]
    assert [json.loads(r)["step"] for r in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_leaves_no_half_checkpoint(tmp_path):
    """A file-size limit stands in for a full disk: every write past it fails as a write on a full disk does."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    done = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *TINY, "--steps", "1", "--out",
                           str(tmp_path)], capture_output=True, text=True, preexec_fn=limit, cwd=ROOT)
    lines = [line for line in done.stderr.splitlines() if line.strip() and "it/s" not in line and "%|" not in line]
    assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: cannot write"), done.stderr
    assert "Traceback" not in done.stderr
    assert not [f for f in os.listdir(tmp_path) if "checkpoint" in f]  # the half-written folder removed
