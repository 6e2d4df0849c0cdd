"""What every command-line tool shares at its edge with the user: the bad-input exception, Hub ids or local
folders, prompt files, file names made from prompts, output paths checked before long work, and the wrapper
that turns bad input, a full disk or Ctrl-C into one `error: ...` line and a non-zero exit.

No torch here: this module is imported first, so that Ctrl-C during the slow imports is one line too.
"""
import contextlib
import functools
import hashlib
import json
import os
import re
import signal
import sys


class UserError(Exception):
    """Bad input from the user: printed as one line by the command-line tools, never as a traceback."""


_sigint_seen = False


def _on_sigint(signum, frame):
    """Ctrl-C raises KeyboardInterrupt as usual, and is remembered: a KeyboardInterrupt raised inside a C
    extension's import can come out as another error (numpy's "cannot load module more than once per process")."""
    global _sigint_seen
    _sigint_seen = True
    raise KeyboardInterrupt


def _quiet_interrupt(kind, value, tb, default=sys.excepthook):
    """Ctrl-C before a tool's main() is running (during `import torch`, say): one line, not a traceback."""
    if issubclass(kind, KeyboardInterrupt) or _sigint_seen:
        print("error: interrupted", file=sys.stderr)
    else:
        default(kind, value, tb)


if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where a parent chose to ignore Ctrl-C
    signal.signal(signal.SIGINT, _on_sigint)
sys.excepthook = _quiet_interrupt


def command(interrupted: str = "interrupted"):
    """Wraps a tool's `main(argv)`: UserError, Ctrl-C and the operating system's refusals (disk full, read-only,
    permission denied) end with one `error: ...` line and exit status 1. Anything else is a bug in this code and
    keeps its traceback. Under torchrun every rank meets the same error and rank 0 alone prints it."""
    def wrap(main):
        @functools.wraps(main)
        def guarded(argv=None):
            try:
                return main(argv)
            except UserError as e:
                message = str(e)
            except KeyboardInterrupt:
                message = interrupted
            except OSError as e:
                where = f": {e.filename}" if e.filename else ""
                message = f"{e.strerror or e}{where}"
            except Exception:
                if not _sigint_seen:
                    raise  # a bug in this code: its traceback is the report
                message = interrupted  # Ctrl-C that surfaced as another error on its way out
            sys.exit(f"error: {message}" if os.environ.get("RANK", "0") == "0" else 1)
        return guarded
    return wrap


# ----------------------------------------------------------------------------------------------------------
# Weights: Hugging Face ids or local folders


def resolve(path: str, what: str, hub_id: str, patterns: list[str] | None = None) -> str:
    """A local folder as is; otherwise a Hub id fetched (or found in the local Hub cache)."""
    if os.path.isdir(path):
        return path
    looks_local = path.startswith((".", "/", "~")) or path.count("/") != 1
    if looks_local:
        raise UserError(f"{what}: folder {path!r} does not exist; download the weights with "
                        f"`huggingface-cli download {hub_id} --local-dir {path}`")
    hint = f"download it with `huggingface-cli download {path} --local-dir DIR` and pass DIR"
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path, allow_patterns=patterns)
    except Exception as e:  # offline, gated, missing: one line with the way out
        raise UserError(f"{what}: cannot get {path!r} ({type(e).__name__}); {hint}") from None


# ----------------------------------------------------------------------------------------------------------
# Random streams: every random draw of a run (prompt order, candidate noise, DPO noise and t, ReFL's stopping
# step, evaluation noise) is seeded from --seed, the stream's name and its counters, through a hash, so two
# streams never draw the same numbers (an arithmetic seed such as seed * P + counter * n + j collides).


def stream_seed(stream: str, seed: int, *ids: int) -> int:
    """A 63-bit seed for torch.Generator().manual_seed, unique to (stream, seed, ids)."""
    key = ":".join([stream, str(seed), *map(str, ids)]).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


# ----------------------------------------------------------------------------------------------------------
# Text files


def read_text(path: str, what: str) -> str:
    """A whole UTF-8 text file; a missing, unreadable or binary file is one line naming it."""
    if not os.path.isfile(path):
        raise UserError(f"{what} {path!r} not found")
    try:
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path!r} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                        f"{e.start}); save it as UTF-8") from None
    if "\x00" in text:
        raise UserError(f"{what} {path!r} holds a NUL byte: a binary file, not text")
    return text


def read_json(path: str, what: str) -> dict:
    """A JSON object from a UTF-8 file; missing, cut short, or not an object: one line naming it."""
    try:
        value = json.loads(read_text(path, what))
    except ValueError:
        raise UserError(f"{what} {path!r} is damaged (not JSON: cut short?)") from None
    if not isinstance(value, dict):
        raise UserError(f"{what} {path!r} is not a JSON object")
    return value


def check_fields(value, schema: dict, where: str) -> dict:
    """`value` is a JSON object holding every key of `schema` with a value of that kind: int (not a bool), float
    (any JSON number), str, bool, list, dict, or a tuple of kinds (None for null). One line naming `where` and the
    first key that is missing or of another kind: what every reader of a file this project wrote checks before
    indexing it."""
    if not isinstance(value, dict):
        raise UserError(f"{where} is damaged: not a JSON object")
    for key, kinds in schema.items():
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        v = value.get(key, KeyError)
        ok = any(v is None if k is None else isinstance(v, (int, float)) and not isinstance(v, bool) if k is float
                 else isinstance(v, int) and not isinstance(v, bool) if k is int else isinstance(v, k) for k in kinds)
        if not ok:
            got = "missing" if v is KeyError else f"a {type(v).__name__}"
            raise UserError(f"{where} is damaged: '{key}' is {got}, not {' or '.join(_kind(k) for k in kinds)}")
    return value


def _kind(k) -> str:
    return {None: "null", float: "a number", int: "an integer", str: "a string", bool: "true/false",
            list: "a list", dict: "an object"}.get(k, getattr(k, "__name__", str(k)))


def file_sha256(path: str) -> str:
    """The file's sha256, read in 16 MB chunks (checkpoints record it; `sha256sum` prints the same)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


METRICS_TEXT = ("method", "reward_dim")  # the only metrics fields that are not numbers


def read_metrics(path: str) -> list[dict]:
    """train.py's metrics.jsonl, a row per optimizer step. A run killed mid-write (or a crash that left the file's
    tail zero-filled) cuts its last line short: that line is dropped with a warning. A bad line before the last is
    damage, not a kill: one line naming it. Blank lines are skipped."""
    with open(path, "rb") as f:  # bytes: json reads them, and a cut or NUL-filled tail is just a bad line
        lines = [(i, line) for i, line in enumerate(f.read().splitlines(), 1) if line.strip()]
    rows = []
    for i, line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        integer = lambda v: isinstance(v, int) and not isinstance(v, bool)
        numbers = isinstance(row, dict) and all(v is None or isinstance(v, (int, float)) and not isinstance(v, bool)
                                                for k, v in row.items() if k not in METRICS_TEXT)
        if numbers and integer(row.get("step")) and integer(row.get("ref_updates", 0)):
            rows.append(row)
        elif i == lines[-1][0]:
            print(f"warning: {path} line {i} is cut short (a run stopped mid-write?); dropped", file=sys.stderr)
        else:
            raise UserError(f"{path} line {i} is not a train.py metrics row (JSON numbers with an integer 'step'): "
                            "the file is damaged")
    return rows


PROMPTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")


def default_prompts(model: str, kind: str) -> str:
    """The shipped prompt file for a model: the toy world's own prompts for `toy`, general ones otherwise."""
    names = {"toy": {"train": "toy.txt", "eval": "toy_eval.txt"}}.get(model, {"train": "train.txt", "eval": "eval.txt"})
    return os.path.join(PROMPTS_DIR, names[kind])


PROMPT_COLUMNS = ("text", "prompt", "caption", "name")  # a csv's prompt column, the first present (WebVid: name)


def load_prompts(path: str) -> list[str]:
    """A .txt file (one prompt per line) or a .csv file (its column text, prompt, caption or name)."""
    text = read_text(path, "prompt file")
    if path.lower().endswith(".csv"):
        import csv
        import io

        reader = csv.DictReader(io.StringIO(text))
        column = next((c for c in PROMPT_COLUMNS if c in (reader.fieldnames or [])), None)
        if column is None:
            raise UserError(f"{path} has no prompt column (one of {', '.join(PROMPT_COLUMNS)}; its columns: "
                            f"{reader.fieldnames})")
        prompts = [(row[column] or "").strip() for row in reader]
    else:
        prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise UserError(f"prompt file {path!r} holds no prompts")
    return prompts


# ----------------------------------------------------------------------------------------------------------
# File names made from prompts


def video_names(prompts: list[str], n: int) -> list[list[str]]:
    """n mp4 names per prompt, VBench's layout `{prompt}-{i}.mp4` wherever that is safe and unique.
    A '/', control characters or a leading '-', '.' or '~' become spaces or are dropped; the name is capped at
    180 bytes. A prompt listed twice continues its numbering (`-5` ... after `-0` ... `-4`, more samples of the
    same prompt); two different prompts that clean to the same name get a short hash of the prompt."""
    cleaned = [re.sub(r"[\x00-\x1f\x7f/\\]", " ", p).strip().lstrip("-.~ ") or "video" for p in prompts]
    cleaned = [c.encode("utf-8")[:180].decode("utf-8", "ignore").rstrip() for c in cleaned]
    owners, seen, out = {}, {}, []
    for prompt, name in zip(prompts, cleaned):
        if owners.setdefault(name.lower(), prompt) != prompt:  # another prompt has it (case-insensitive disks too)
            name = f"{name} #{hashlib.sha1(prompt.encode()).hexdigest()[:8]}"
        first = seen.get(prompt, 0)
        seen[prompt] = first + n
        out.append([f"{name}-{first + i}.mp4" for i in range(n)])
    return out


# ----------------------------------------------------------------------------------------------------------
# Outputs: checked before the long work that fills them


def writable_dir(path: str, what: str) -> str:
    """Make the folder (and its parents) and prove a file can be written in it; one line if not."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{what} {path!r} is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UserError(f"{what} {path!r} cannot be written: {e.strerror or e}") from None
    return path


# ----------------------------------------------------------------------------------------------------------
# Flag domains: every tool declares each flag's domain once, in a table of (flag, in its domain, the refusal), and
# checks it before anything loads (README: Reliability; tests/test_flags.py walks every tool's table)


ANY = lambda v, a: True  # noqa: E731 - a flag whose every value of its type is in its domain (a seed, a name; a path,
# which the reader that opens it checks)


def refuse_empty(args, parser):
    """An empty or blank string given to a flag is a typo or an unset shell variable, never 'the default': refused
    (a flag whose own default is the empty string excepted)."""
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str) and not v.strip() and v != action.default:
                name = action.option_strings[-1] if action.option_strings else action.dest.upper()
                raise UserError(f"{name} is empty: give a value, or leave the flag out for its default")


def known_device(name: str) -> bool:
    """cpu, or a CUDA GPU that is visible (cuda, cuda:I): the devices the models run on."""
    import torch  # here, not at the top: this module stays light to import

    try:
        device = torch.device(name)
    except RuntimeError:
        return False
    if device.type == "cpu":
        return device.index in (None, 0)
    return device.type == "cuda" and torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()


def check_domains(args, domains: list, **fmt):
    """Each (flag, ok(value, args), refusal) of a tool's table: a given value outside its domain is one line,
    '--flag ' + the refusal ({v}: the value; other fields from fmt). A flag left at None is not checked."""
    for flag, ok, refusal in domains:
        value = getattr(args, flag)
        for v in value if isinstance(value, list) else [value]:
            if v is not None and not ok(v, args):
                raise UserError(f"--{flag.replace('_', '-')} " + refusal.format(v=v, **fmt))


@contextlib.contextmanager
def writing(path: str):
    """Around torch.save and safetensors writes: a failed write (a full disk, a file-size limit, a disk gone) is one
    line naming the path and the space left, as a failed open() or write() already is (command() prints OSError).
    torch.save reports such a failure as a bare RuntimeError ("unexpected pos ..."), safetensors as its own error;
    only file writes happen inside, so either means the write failed."""
    try:
        yield
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - RuntimeError (torch.save), SafetensorError
        if type(e).__name__ not in ("RuntimeError", "SafetensorError"):
            raise
        import shutil

        folder = os.path.dirname(os.path.abspath(path))
        while not os.path.isdir(folder):
            folder = os.path.dirname(folder)
        free = shutil.disk_usage(folder).free / 2 ** 20
        reason = str(e).strip().splitlines()[0][:120] if "serializ" in str(e) else "the write failed"
        raise UserError(f"cannot write {path}: {reason} ({free:.0f} MB free on its disk: full?)") from None


def write_atomically(path: str, lines: list[str]):
    """The file whole or not at all: written beside it, then renamed over it (a kill leaves the old one)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(lines)
    os.replace(tmp, path)


def writable_file(path: str, what: str) -> str:
    """A file path whose folder exists and takes a new file, and that is not itself a folder; one line if not."""
    if os.path.isdir(path):
        raise UserError(f"{what} {path!r} is a folder, not a file")
    writable_dir(os.path.dirname(path) or ".", f"{what}'s folder")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise UserError(f"{what} {path!r} is read-only")
    return path


# ----------------------------------------------------------------------------------------------------------
# Weights files: checked before a model loads


def check_safetensors(path: str, what: str) -> str:
    """A safetensors file whose header reads and whose size matches it; one line if it is missing, empty,
    truncated (a copy or a save cut short) or not safetensors at all. Only the header is read: cheap enough to do
    before a model takes minutes to load, so the bad file is named first."""
    if not os.path.isfile(path):
        raise UserError(f"{what} {path!r} not found")
    from safetensors import SafetensorError, safe_open  # lazily: this module stays light to import

    try:
        with safe_open(path, "numpy") as f:  # "numpy": no torch import just to read a header
            f.keys()
    except (SafetensorError, OSError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{what} {path!r} is not a readable safetensors file (truncated or corrupt?): "
                        f"{reason}") from None
    return path
