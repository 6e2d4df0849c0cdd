"""The command-line wrapper itself, in real processes: one refusal per tool, and Ctrl-C during the imports and
during training. Every other refusal is checked in-process (conftest.refusal) through the same main(argv)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "tiny", "--size", "16x16", "--frames", "4", "--sample-steps", "2", "--n", "2", "--batch-size", "2"]
# one refusal per tool, each the whole command as a user types it, and the one line it must print
REFUSALS = {
    "train.py": (TINY + ["--n", "1"], "error: --n must be at least 2: a preference pair needs two candidates"),
    "sample.py": (["--model", "tiny", "--n", "0"], "error: --n must be at least 1, got 0"),
    "evaluate.py": (["/nonexistent"], "error: '/nonexistent' is not a folder"),
    "agreement.py": (["/nonexistent.json", "--reward", "pixel"], "error: manifest '/nonexistent.json' not found"),
    "reward.py": (["score", "/nonexistent.mp4", "--reward", "pixel"], "error: cannot read video /nonexistent.mp4"),
    "toy.py": (["--steps", "0"], "error: --steps must be at least 1, got 0"),
    "bench.py": (["--n", "1", "--device", "cpu"], "error: --n must be at least 2: a preference pair needs two candidates"),
    "ablate.py": (["--runs", "nope"], "error: --runs 'nope' is no run here; choose from "),
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def start(tool: str, args: list[str], cwd: str = ROOT) -> subprocess.Popen:
    # Ctrl-C as a terminal delivers it: a test run started in the background (`cmd &` in a script) ignores SIGINT,
    # and its children would inherit that (inputs.py keeps a parent's choice to ignore Ctrl-C)
    return subprocess.Popen([sys.executable, os.path.join(ROOT, tool), *args], cwd=cwd, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def refuse(tools: list[str], cwd: str) -> dict:
    """Each tool's refusal as a real process, the processes started together (each pays its imports), in an empty
    folder so that nothing a tool wrote could hide."""
    procs = {tool: start(tool, REFUSALS[tool][0], cwd) for tool in tools}
    return {tool: (*p.communicate(timeout=300), p.returncode) for tool, p in procs.items()}


def check_refusal(tool: str, out: str, err: str, code: int, cwd: str):
    assert code == 1 and out == "" and os.listdir(cwd) == [], (code, out, os.listdir(cwd))
    assert len(err.splitlines()) == 1 and err.startswith(REFUSALS[tool][1]), err


def test_train_refuses_in_one_line_with_status_1(tmp_path):
    check_refusal("train.py", *refuse(["train.py"], str(tmp_path))["train.py"], str(tmp_path))


@pytest.mark.slow
def test_every_other_tool_refuses_in_one_line_with_status_1(tmp_path):
    tools = [t for t in REFUSALS if t != "train.py"]
    for tool, result in refuse(tools, str(tmp_path)).items():
        check_refusal(tool, *result, str(tmp_path))


def test_ctrl_c_during_the_imports_is_one_line(tmp_path):
    """Ctrl-C early, at several moments: whether it lands in `import torch` (seconds; inputs.py set the quiet hook
    in its first milliseconds) or, on a machine with warm caches, already in main(), it is one line. At 0.2 s it
    is in the imports on any machine we know."""
    during_imports = 0
    for i, delay in enumerate((0.2, 0.5)):
        p = start("train.py", TINY + ["--out", str(tmp_path / f"run{i}")])
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
        lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "it/s" not in line
                 and "s/it" not in line]  # a progress bar's redraws aside
        assert p.returncode != 0 and out == "" and len(lines) == 1 and lines[0].startswith("error: interrupted"), err
        if lines == ["error: interrupted"]:  # in the imports: nothing was written
            during_imports += 1
            assert not (tmp_path / f"run{i}").exists()
    assert during_imports >= 1


def test_ctrl_c_during_training_is_one_line_and_resume_continues(tmp_path):
    out = tmp_path / "run"
    p = start("train.py", TINY + ["--out", str(out), "--steps", "1000", "--save-every", "1"])
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "checkpoint-2").exists():
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "it/s" not in line
             and "s/it" not in line]  # the progress bar's redraws aside
    assert p.returncode == 1 and "Traceback" not in err, err[-2000:]
    assert lines == ["error: interrupted; resume with --resume (continues from the latest checkpoint)"], lines
    steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 2  # every finished step is kept
    train.main(TINY + ["--out", str(out), "--steps", str(len(steps) + 1), "--resume"])
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")][-1] == len(steps) + 1
