"""Every command-line tool meets bad input with one `error: ...` line on stderr and exit status 1: no traceback,
and no work started first (outputs are checked before the scoring, sampling or pretraining that would fill them).
Each case calls the tool's main(argv) in this process (conftest.refusal); tests/test_command_line.py runs one
refusal per tool as a real process, for the wrapper itself."""
import importlib
import json
import os
import xml.etree.ElementTree as ET

import pytest
import torch
from conftest import refusal

import evaluate
from videos import write_video

UNWRITABLE = "/proc/onlinevpo-test"  # we run as root, so chmod stops nothing; /proc takes no new folders
SAMPLE = ["--model", "tiny", "--size", "16x16", "--frames", "4", "--sample-steps", "2", "--n", "1",
          "--prompts", "{d}/p.txt", "--out", "{d}/samples"]  # a later repeat of a flag wins (argparse)
EVALUATE = ["{d}/videos", "--metrics", "temporal_flickering,dynamic_degree", "--device", "cpu"]
ROW = {"step": 1, "reward_mean": 0.5, "reward_w": 0.6, "reward_l": 0.4, "ref_updates": 0}


def metrics_file(folder, rows: list[str]):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        f.write("".join(rows))


def row(step: int) -> str:
    return json.dumps({**ROW, "step": step, "ref_updates": step // 2}) + "\n"


@pytest.fixture(scope="module")
def d(tmp_path_factory) -> str:
    """One folder of bad (and good) inputs shared by every case."""
    from safetensors.torch import save_file

    d = str(tmp_path_factory.mktemp("bad"))
    open(f"{d}/afile", "w").close()
    open(f"{d}/p.txt", "w").write("a red ball\n")
    open(f"{d}/latin.txt", "wb").write("a caf\u00e9 at night\n".encode("latin-1"))
    open(f"{d}/latin.json", "wb").write('[{"prompt_en": "caf\u00e9", "dimension": []}]'.encode("latin-1"))
    open(f"{d}/binary.json", "wb").write(b'[{"prompt": "x"}]\x00\x00\x00\x00')
    os.makedirs(f"{d}/videos")
    write_video(f"{d}/videos/a ball-0.mp4", torch.full((4, 16, 16, 3), 90, dtype=torch.uint8), fps=8)
    os.makedirs(f"{d}/empty")
    os.makedirs(f"{d}/strip.png")
    metrics_file(f"{d}/run-damaged", [row(1), '{"step": 2, "reward_me\n', row(3)])
    metrics_file(f"{d}/run-curve-folder", [row(1), row(2)])
    os.makedirs(f"{d}/run-curve-folder/reward_curve.svg")
    save_file({"w": torch.zeros(64, 64)}, f"{d}/good.safetensors")
    good = open(f"{d}/good.safetensors", "rb").read()
    for name, data in (("truncated", good[:len(good) // 2]), ("empty", b""), ("corrupt", os.urandom(300))):
        os.makedirs(f"{d}/ckpt-{name}")
        open(f"{d}/ckpt-{name}/model.safetensors", "wb").write(data)
    os.makedirs(f"{d}/ckpt-none")
    return d


# id, tool, arguments ({d}: the fixture's folder), a phrase the one line must hold
CASES = [
    ("evaluate-out-under-file", "evaluate.py", EVALUATE + ["--out", "{d}/afile/out.json"], "is a file, not a folder"),
    ("evaluate-out-folder", "evaluate.py", EVALUATE + ["--out", "{d}/empty"], "is a folder, not a file"),
    ("evaluate-plot-folder", "evaluate.py", EVALUATE + ["--plot", "{d}/empty"], "--plot '"),
    ("evaluate-plot-unwritable", "evaluate.py", EVALUATE + ["--plot", UNWRITABLE + "/p.svg"], "cannot be written"),
    ("evaluate-curve-folder", "evaluate.py", ["--run", "{d}/run-curve-folder"], "reward_curve.svg' is a folder"),
    ("evaluate-curve-unwritable", "evaluate.py", ["--run", "{d}/run-curve-folder", "--plot", UNWRITABLE + "/c.svg"],
     "cannot be written"),
    ("evaluate-metrics-damaged", "evaluate.py", ["--run", "{d}/run-damaged"], "metrics.jsonl line 2 is not a"),
    ("evaluate-full-info-latin1", "evaluate.py", EVALUATE + ["--full-info", "{d}/latin.json"], "is not UTF-8 text"),
    ("evaluate-empty-folder", "evaluate.py", ["{d}/empty"], "no .mp4 files in"),
    ("agreement-manifest-latin1", "agreement.py", ["{d}/latin.json", "--reward", "pixel", "--device", "cpu"],
     "manifest '{d}/latin.json' is not UTF-8 text"),
    ("agreement-manifest-binary", "agreement.py", ["{d}/binary.json", "--reward", "pixel", "--device", "cpu"],
     "holds a NUL byte"),
    ("toy-out-file", "toy.py", ["--out", "{d}/afile"], "--out '{d}/afile' is a file, not a folder"),
    ("toy-out-under-file", "toy.py", ["--out", "{d}/afile/toy"], "cannot be written"),
    ("toy-out-unwritable", "toy.py", ["--out", UNWRITABLE + "/toy"], "cannot be written"),
    ("toy-steps-zero", "toy.py", ["--steps", "0"], "--steps must be at least 1, got 0"),
    ("toy-replaces-shipped", "toy.py", ["--steps", "5"], "toy/model.safetensors exists (the shipped toy model"),
    ("sample-checkpoint-truncated", "sample.py", SAMPLE + ["--checkpoint", "{d}/ckpt-truncated"],
     "not a readable safetensors file (truncated or corrupt?)"),
    ("sample-checkpoint-empty", "sample.py", SAMPLE + ["--checkpoint", "{d}/ckpt-empty"],
     "not a readable safetensors file"),
    ("sample-checkpoint-corrupt", "sample.py", SAMPLE + ["--checkpoint", "{d}/ckpt-corrupt"],
     "not a readable safetensors file"),
    ("sample-checkpoint-no-weights", "sample.py", SAMPLE + ["--checkpoint", "{d}/ckpt-none"],
     "holds no model.safetensors"),
    ("sample-out-file", "sample.py", SAMPLE + ["--out", "{d}/afile"], "is a file, not a folder"),
    ("sample-strip-folder", "sample.py", SAMPLE + ["--strip", "{d}/strip.png"], "is a folder, not a file"),
    ("sample-gif-folder", "sample.py", SAMPLE + ["--gif", "{d}/strip.png"], "is a folder, not a file"),
    ("sample-beside-missing", "sample.py", SAMPLE + ["--beside", "{d}/nowhere"], "is not a folder"),
    ("sample-beside-other-prompts", "sample.py", SAMPLE + ["--beside", "{d}/videos"],
     "sample it with the same --prompts and --n"),
    ("sample-prompts-latin1", "sample.py", SAMPLE + ["--prompts", "{d}/latin.txt"], "is not UTF-8 text"),
    ("sample-device", "sample.py", SAMPLE + ["--device", "nope"], "not a device torch sees here"),
    ("sample-frames", "sample.py", SAMPLE + ["--frames", "-3"], "--frames must be at least 1"),
    ("sample-n", "sample.py", SAMPLE + ["--n", "0"], "--n must be at least 1, got 0"),
]


@pytest.mark.parametrize("tool,args,phrase", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line(d, capsys, tool, args, phrase):
    main = importlib.import_module(tool.removesuffix(".py")).main
    # refusal() also holds stdout empty: nothing started, no progress, no "skipping <metric>" from the scoring setup
    line = refusal(main, [a.replace("{d}", d) for a in args], capsys)
    assert phrase.replace("{d}", d) in line, line


def test_reward_curve_drops_a_last_line_cut_short_with_a_warning(d, capsys):
    run = f"{d}/run-killed"  # three steps, a blank line, then a fourth cut off mid-write by a kill
    metrics_file(run, [row(1), row(2), "\n", row(3), row(4)[:25]])
    capsys.readouterr()
    evaluate.main(["--run", run])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "metrics.jsonl line 5" in lines[0], err
    svg = ET.parse(f"{run}/reward_curve.svg").getroot()
    curves = [e for e in svg.iter() if e.tag.endswith("polyline")]
    assert [len(e.get("points").split()) for e in curves] == [3, 3, 3]  # the three whole steps, drawn
