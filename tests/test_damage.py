"""Every kind of file the project writes and later reads back, fed generated damage: each file cut short, emptied,
a range zeroed in place (the size kept), bytes flipped, and for JSON every top-level field (and the fields of its
first record) removed, given a value of another kind, or another value of its kind. The command that reads the file must answer with one
`error:` line or go on with a `warning:` naming what it passed over (resume's fallback to the checkpoint before),
never a traceback; it must never lose a file that was there (a set-aside file keeps its bytes somewhere under the
folder); and where the file carries a checksum (checkpoints, the offline pool) damage is never used silently.
The table of file kinds and what each damage gets is in docs/reliability.md."""
import copy
import hashlib
import json
import os
import shutil

import pytest

import ablate
import evaluate
import page
import sample
import toy
import train
from model import build_model
from reward import build_reward
from videos import write_video

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = os.path.join(ROOT, "prompts/train.txt")
TINY = ["--model", "tiny", "--reward", "pixel", "--size", "16x16", "--frames", "4", "--sample-steps", "2",
        "--batch-size", "1", "--lr", "1e-3", "--prompts", PROMPTS, "--save-every", "1"]
ONLINE, OFFLINE, LORA = TINY + ["--n", "2"], TINY + ["--method", "offline", "--n", "2", "--offline-pairs", "2"], \
    TINY + ["--n", "2", "--lora-rank", "2"]


# ----------------------------------------------------------------------------------------------------------
# Damage, generated


def byte_damages(data: bytes) -> dict[str, bytes]:
    """Cut short, empty, an eighth zeroed in the middle, the first 4 KB zeroed (a torch.save zip still looks whole:
    its directory sits at the end), eight bytes flipped across the file."""
    n = len(data)
    damaged = {"truncated": data[: n // 2], "empty": b""}
    if n:
        width = max(1, n // 8)
        start = (n - width) // 2
        damaged["zeroed"] = data[:start] + bytes(width) + data[start + width:]
        damaged["zeroed-head"] = bytes(min(4096, n)) + data[4096:]
        flipped = bytearray(data)
        for i in range(8):
            flipped[(i * n) // 8 + (n // 16)] ^= 0xFF
        damaged["flipped"] = bytes(flipped)
    return damaged


def other_kind(value):
    """A JSON value of another kind than `value`."""
    if isinstance(value, bool):
        return "yes"
    if isinstance(value, (int, float)):
        return "x"
    if isinstance(value, str):
        return 7
    if isinstance(value, list):
        return {"a": 1}
    return [1] if isinstance(value, dict) else []


def other_value(value):
    """A value of the same kind, changed (a rank of 2 that says 3): what only a checksum can notice."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    return value[:-1] if isinstance(value, list) else dict(list(value.items())[:-1]) if value else None


def json_places(value) -> list[list]:
    """Where fields sit: each top-level key, and each key of the first record of a list or object of records."""
    places = []
    for key, v in value.items():
        places.append([key])
        first = v[0] if isinstance(v, list) and v else next(iter(v.values()), None) if isinstance(v, dict) else None
        inner = 0 if isinstance(v, list) else next(iter(v), None) if isinstance(v, dict) else None
        if isinstance(first, dict):
            places += [[key, inner, k] for k in first]
    return places


def json_damages(data: bytes, indent: int | None = 1) -> dict[str, bytes]:
    """Every place of json_places removed, given a value of another kind, and given another value of its kind."""
    value = json.loads(data)
    damaged = {}
    for place in json_places(value):
        for kind in ("missing", "wrong-kind", "changed"):
            v = copy.deepcopy(value)
            parent = v
            for step in place[:-1]:
                parent = parent[step]
            if kind == "missing":
                del parent[place[-1]]
            else:
                parent[place[-1]] = (other_kind if kind == "wrong-kind" else other_value)(parent[place[-1]])
            damaged[f"{kind}:{'.'.join(map(str, place))}"] = json.dumps(v, indent=indent).encode()
    return damaged


def jsonl_damages(data: bytes) -> dict[str, bytes]:
    """metrics.jsonl: json_damages of its first row, the other rows kept, and the bytes damages of the whole."""
    first, rest = data.split(b"\n", 1)
    return {name: d + b"\n" + rest for name, d in json_damages(first, indent=None).items()}


# ----------------------------------------------------------------------------------------------------------
# The files, made by the project's own commands once per session, copied for each case


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("made")
    folders = {}
    for name, flags in (("online", ONLINE), ("offline", OFFLINE), ("lora", LORA)):
        folders[name] = str(root / name)
        train.main(flags + ["--steps", "2", "--out", folders[name]])
    videos = root / "results"  # two evaluations and a study of them, as evaluate.py and its page write them
    for run in ("before", "after"):
        folder = videos / run
        os.makedirs(folder)
        for i, prompt in enumerate(("a red circle", "a blue bar")):
            import torch

            write_video(str(folder / f"{prompt}-0.mp4"), torch.full((4, 16, 16, 3), 60 * i + len(run), dtype=torch.uint8),
                        fps=8)
        evaluate.main([str(folder), "--metrics", "temporal_flickering", "--out", str(videos / f"{run}.json"),
                       "--name", run])
    a, b = (json.load(open(videos / f"{run}.json")) for run in ("before", "after"))
    study, pairs = page.study_pairs(a, b, seed=0)
    judgements = [{"pair": i, "prompt": p["prompt"], "videos": p["videos"], "runs": p["runs"], "choice": c}
                  for i, (p, c) in enumerate(zip(pairs, ("left", "tie")))]
    (videos / "study.json").write_text(json.dumps({"study": study, "runs": ["before", "after"],
                                                   "judgements": judgements}))
    folders["results"] = str(videos)
    cache = root / "ablate"  # ablate.py's evaluation cache of a policy
    os.makedirs(cache)
    folders["ablate"] = str(cache)
    ablate.cached_eval(str(cache / "eval.json"), *ABLATE(), None, ABLATE_KEYS())
    return folders


_ablate = {}


def ABLATE():  # noqa: N802 - the shipped toy model, one sampling step, two prompts: a cheap real evaluation
    if not _ablate:
        model = build_model("toy")
        model.sample_steps = 1
        _ablate["args"] = (model, build_reward("toy"), ["a red circle moving left", "a blue bar moving up"])
    return _ablate["args"]


def ABLATE_KEYS():  # noqa: N802
    return ABLATE()[1].dims + [f"judged_{d}" for d in toy.ShapeJudge.dims]


def resume(flags):
    def train_resume(d):
        train.main(flags + ["--steps", "3", "--out", d, "--resume"])
    return train_resume


def plot_run(d):
    evaluate.main(["--run", d])


def study(d):
    evaluate.main(["--study", f"{d}/study.json"])


def ablate_cache(d):
    ablate.cached_eval(f"{d}/eval.json", *ABLATE(), None, ABLATE_KEYS())


def sample_from(d):
    sample.main(["--model", "tiny", "--size", "16x16", "--frames", "4", "--sample-steps", "2", "--n", "1",
                 "--prompts", os.path.join(ROOT, "prompts/eval.txt"), "--checkpoint", os.path.join(d, "checkpoint-2"),
                 "--out", os.path.join(d, "samples-now")])


def compare(d):
    evaluate.main(["--compare", f"{d}/before.json", f"{d}/after.json", "--html", f"{d}/page.html", "--study-html",
                   f"{d}/study.html"])


# (file kind, the folder made above, the damaged file in it, the command that reads it, damages, checksummed)
KINDS = [
    *[("checkpoint", "online", f"checkpoint-2/{f}", resume(ONLINE), "bytes", True)
      for f in ("model.safetensors", "ref.safetensors", "optimizer.pt", "rng.pt", "config.json")],
    ("checkpoint", "online", "checkpoint-2/model.safetensors", sample_from, "bytes", True),
    ("run state", "online", "checkpoint-2/state.json", resume(ONLINE), "bytes+json", True),
    *[("adapter", "lora", f"checkpoint-2/{f}", resume(LORA), "bytes", True)
      for f in ("pytorch_lora_weights.safetensors", "reference_lora.safetensors")],
    ("adapter config", "lora", "checkpoint-2/lora_config.json", resume(LORA), "bytes+json", True),
    ("adapter", "lora", "checkpoint-2/pytorch_lora_weights.safetensors", sample_from, "bytes", True),
    ("adapter config", "lora", "checkpoint-2/lora_config.json", sample_from, "bytes+json", True),
    ("metrics", "online", "metrics.jsonl", resume(ONLINE), "bytes+jsonl", False),
    ("metrics", "online", "metrics.jsonl", plot_run, "bytes+jsonl", False),
    ("run args", "online", "args.json", plot_run, "bytes+json", False),
    ("offline pool", "offline", "offline_pairs.pt", resume(OFFLINE), "bytes", True),
    ("evaluation results", "results", "after.json", compare, "bytes+json", False),
    ("study results", "results", "study.json", study, "bytes+json", False),
    ("ablate cache", "ablate", "eval.json", ablate_cache, "bytes+json", False),
]


def cases():
    """One test per (file, reader): the damages themselves are generated from the file as it was made, so a new
    field is damaged too."""
    return [pytest.param(i, kind[4], id=f"{kind[2]}>{kind[3].__name__}") for i, kind in enumerate(KINDS)]


def damages(data: bytes, which: str) -> dict[str, bytes]:
    found = {}
    if "bytes" in which:
        found.update(byte_damages(data))
    if which.endswith("jsonl"):
        found.update(jsonl_damages(data))
    elif "json" in which:
        found.update(json_damages(data))
    return found


def contents(folder: str) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(folder) for f in files}


def spread(found: dict[str, bytes], fields: int | None) -> dict[str, bytes]:
    """Every byte damage, and `fields` of the field damages spread evenly over the file's fields (None: all)."""
    named = [k for k in found if ":" in k]
    keep = named if fields is None or len(named) <= fields else named[:: -(-len(named) // fields)]
    return {k: v for k, v in found.items() if ":" not in k or k in keep}


def check(made, tmp_path, capsys, index: int, which: str, fields: int | None):
    kind, source, file, command, _, checksummed = KINDS[index]
    clean = str(tmp_path / "undamaged")  # the reader works on the file as it was written
    shutil.copytree(made[source], clean)
    command(clean)
    original = open(os.path.join(made[source], file), "rb").read()
    failures = []
    for name, data in spread(damages(original, which), fields).items():
        folder = str(tmp_path / name.replace(":", "_").replace(".", "_").replace("/", "_"))
        shutil.copytree(made[source], folder)
        with open(os.path.join(folder, file), "wb") as f:
            f.write(data)
        before = contents(folder)
        capsys.readouterr()
        try:
            command(folder)
            code = None
        except SystemExit as e:
            code = e.code
        out, err = capsys.readouterr()
        said = [line for line in err.splitlines() if line.startswith(("warning:", "error:"))]
        if code is not None:
            if not (isinstance(code, str) and code.startswith("error: ") and "\n" not in code):
                failures.append(f"{name}: exit {code!r} is not one error line")
            said.append(code)
        if "Traceback" in err:
            failures.append(f"{name}: a traceback on stderr")
        noticed = any(os.path.basename(file) in line or os.path.dirname(file) and os.path.dirname(file) in line
                      for line in said)
        if checksummed and data != original and not noticed:
            failures.append(f"{name}: the damaged {file} was used without a word ({said})")
        after = contents(folder)
        kept_files = {hashlib.sha256(b).digest() for b in after.values()}
        kept_lines = {line for b in after.values() for line in b.splitlines()}
        for path, b in before.items():
            whole = hashlib.sha256(b).digest() in kept_files
            lines = path.endswith(".jsonl") and all(line in kept_lines for line in b.splitlines() if line.strip())
            replaced_after_a_word = path == file and noticed and code is None  # a damaged cache named and remade
            if not (whole or lines or replaced_after_a_word):
                failures.append(f"{name}: {path} was lost")
    assert not failures, f"{kind} {file}:\n" + "\n".join(failures)


@pytest.mark.parametrize("index, which", cases())
def test_every_damage_of_every_file_kind_is_one_line_or_a_safe_fallback(made, tmp_path, capsys, index, which):
    """Every byte damage, and field damages at 8 places spread over the file (the slow tier: every field)."""
    check(made, tmp_path, capsys, index, which, fields=8)


@pytest.mark.slow
@pytest.mark.parametrize("index, which", cases())
def test_every_field_damage_of_every_file_kind_is_one_line_or_a_safe_fallback(made, tmp_path, capsys, index, which):
    check(made, tmp_path, capsys, index, which, fields=None)


def test_the_generator_reaches_every_field_and_damage():
    """The damages are generated from the file, not listed: a field added to a file kind is damaged too."""
    record = {"a": 1, "b": [{"c": "x", "d": 2.0}], "e": {"f": {"g": True}}}
    names = set(json_damages(json.dumps(record).encode()))
    assert {"missing:a", "wrong-kind:a", "changed:a", "missing:b.0.c", "wrong-kind:b.0.d", "missing:e.f.g"} <= names
    assert set(byte_damages(b"0123456789" * 100)) == {"truncated", "empty", "zeroed", "zeroed-head", "flipped"}
    assert all(len(d) == 1000 for k, d in byte_damages(b"0123456789" * 100).items() if k.startswith(("zeroed", "flip")))
