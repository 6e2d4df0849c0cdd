"""Checkpoints and the run folder: OUT/checkpoint-<step>/ saved, checked, loaded and resumed; one run per folder
(OUT/.lock); a resumed older timeline set aside, never deleted (README: Reliability)."""
import atexit
import glob
import hashlib
import json
import os
import re
import shutil
import time
import zipfile

import torch

import lora
import parallel
from inputs import UserError, check_fields, check_safetensors, file_sha256, read_json, writable_dir, writing
from parallel import warn

# ----------------------------------------------------------------------------------------------------------
# Checkpoints: OUT/checkpoint-<step>/ written to a temporary folder, then renamed (atomic on one filesystem).
# Full (unsharded) weights and optimizer state: a checkpoint resumes on any number of ranks, DDP or FSDP2.


def save_checkpoint(out: str, model, ref, opt, state: dict, args, adapters: dict | None = None) -> str:
    """Every rank calls this (gathering sharded weights is collective); rank 0 writes. state.json, written last,
    records every file's size and sha256, so a file cut short, zeroed or flipped later (a full disk, a bad copy, a
    failing disk) is recognised before it loads, not half-loaded.
    With LoRA (`adapters`, the adapter config) the folder holds the two adapters instead of the network, the
    policy's in diffusers' layout (load_lora_weights), and with --merge-lora also the merged full weights."""
    states = merged = None
    if adapters:
        policy = reference = None
        states = {name: lora.adapter_state(model.dit, name) for name in (lora.POLICY, lora.REFERENCE)}
        merged = lora.merged_network(model.dit) if args.merge_lora else None
    else:
        policy, reference = parallel.savable(model.dit), parallel.savable(ref) if ref is not None else None
    opt_state = parallel.optimizer_state(model.dit, opt)
    final = os.path.join(out, f"checkpoint-{state['step']}")
    if parallel.is_main():
        tmp = os.path.join(out, f".tmp-checkpoint-{state['step']}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            with writing(tmp):
                write_files(tmp, model, policy, reference, opt_state, state, args, adapters, states, merged)
        except (OSError, UserError):
            shutil.rmtree(tmp, ignore_errors=True)  # a full disk: free what was written; the last checkpoint stands
            raise
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    parallel.barrier()
    return final


def write_files(tmp: str, model, policy, reference, opt_state, state: dict, args, adapters, states, merged):
    """The checkpoint's files into its temporary folder, state.json (sizes and sha256 of the others) last."""
    if adapters:
        lora.save_files(tmp, states, {**adapters, "base": args.dit}, model.name,
                        peft_layout=not hasattr(model.dit, "add_adapter"))  # no pipeline loads STDiT3's
        if merged is not None:
            model.save_weights(tmp, net=merged)  # loadable as --dit, like a full fine-tuning checkpoint
    else:
        model.save_weights(tmp, net=policy)  # policy: model.safetensors + config.json, loadable as --dit
    if reference is not None:
        model.save_weights(tmp, net=reference, file="ref.safetensors")
    torch.save(opt_state, os.path.join(tmp, "optimizer.pt"))
    torch.save({"torch": torch.get_rng_state()}, os.path.join(tmp, "rng.pt"))
    with open(os.path.join(tmp, "args.json"), "w") as f:
        json.dump(vars(args), f, indent=1)
    files = {name: {"bytes": os.path.getsize(os.path.join(tmp, name)), "sha256": file_sha256(os.path.join(tmp, name))}
             for name in files_under(tmp) if name != "args.json"}  # args.json is for people: never loaded
    record = {**state, "files": files}
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump({**record, "sha256": state_digest(record)}, f, indent=1)


def files_under(folder: str) -> list[str]:
    """Every file below the folder, as a path relative to it (wan2.2-14b's second expert sits in transformer_2/)."""
    return sorted(os.path.relpath(os.path.join(root, f), folder) for root, _, names in os.walk(folder) for f in names)


def state_digest(record: dict) -> str:
    """state.json's own checksum, over its other fields: a flipped digit in a count is noticed too."""
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def checkpoints(out: str) -> list[str]:
    """OUT/checkpoint-<step> folders, oldest first (not .tmp-checkpoint-*, not checkpoint-8.bak)."""
    found = [p for p in glob.glob(os.path.join(out, "checkpoint-*")) if re.fullmatch(r"checkpoint-\d+",
                                                                                     os.path.basename(p))]
    return sorted(found, key=step_of)


def step_of(path: str) -> int:
    return int(path.rstrip("/").rsplit("-", 1)[1])


def latest_checkpoint(out: str) -> str | None:
    found = checkpoints(out)
    return found[-1] if found else None


STATE = {"model": str, "step": int, "prompts_seen": int, "ties": int, "bad_steps": int, "skipped_nan": int,
         "ref_updates": int}  # state.json's fields (and "files": each file's bytes and sha256)


def read_state(path: str) -> dict:
    """A checkpoint's state.json: every field of STATE of its kind, its step the folder's; one line otherwise."""
    file = os.path.join(path, "state.json")
    if not os.path.isfile(file):
        raise UserError(f"{path} is not a train.py checkpoint (no state.json)")
    state = check_fields(read_json(file, "checkpoint state"), STATE, f"checkpoint state {file}")
    digest = state.pop("sha256", None)  # checkpoints of earlier versions have none (and record sizes only)
    this_version = isinstance(state.get("files"), dict) and any(isinstance(v, dict) for v in state["files"].values())
    if (digest is not None or this_version) and digest != state_digest(state):
        raise UserError(f"checkpoint state {file} is damaged: its fields do not match its sha256")
    if re.fullmatch(r"checkpoint-\d+", os.path.basename(path.rstrip("/"))) and state["step"] != step_of(path):
        raise UserError(f"checkpoint state {file} is damaged: it says step {state['step']}, its folder another")
    if min(state[k] for k in STATE if k != "model") < 0:
        raise UserError(f"checkpoint state {file} is damaged: a negative count")
    return state


def check_checkpoint(path: str) -> dict:
    """The checkpoint's state if every file is whole (the size and sha256 recorded at save; checkpoints of earlier
    versions recorded sizes only); a UserError naming the damaged file otherwise."""
    state = read_state(path)
    files = recorded_files(path, state.pop("files", None))
    names = files or [n for n in os.listdir(path) if n.endswith(".safetensors")] + ["optimizer.pt", "rng.pt"]
    for name in names:
        verify_file(path, name, files.get(name) if files else None)
    return state


def recorded_files(path: str, files) -> dict | None:
    """state.json's record of the files: {name: {"bytes", "sha256"}} (or {name: bytes} from earlier versions)."""
    if files is not None and not (isinstance(files, dict) and files and all(
            isinstance(v, int) or isinstance(v, dict) and isinstance(v.get("bytes"), int)
            and isinstance(v.get("sha256"), str) for v in files.values())):
        raise UserError(f"{path} is damaged: state.json's file list is not one this code wrote")
    return files


def verify_file(path: str, name: str, saved: int | dict | None):
    """One file of a checkpoint against what state.json recorded for it (bytes, sha256); safetensors and
    torch.save files also by their own structure (for checkpoints that recorded no sha256)."""
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        raise UserError(f"{path} is damaged: {name} is missing")
    size = saved if isinstance(saved, int) else saved["bytes"] if saved else None
    if size is not None and os.path.getsize(file) != size:
        raise UserError(f"{path} is damaged: {name} has {os.path.getsize(file)} bytes, {size} were saved")
    if isinstance(saved, dict) and file_sha256(file) != saved["sha256"]:
        raise UserError(f"{path} is damaged: {name} is not the file that was saved (its sha256 differs)")
    if name.endswith(".safetensors"):
        check_safetensors(file, f"{path}:")
    elif name.endswith(".pt") and not zipfile.is_zipfile(file):  # torch.save writes a zip archive
        raise UserError(f"{path} is damaged: {name} is not a torch.save file (cut short?)")


def verified(path: str, name: str) -> str:
    """A file of a checkpoint folder checked against its state.json (where there is one) before it loads: sample.py
    loads a checkpoint's weights without resuming it."""
    files = recorded_files(path, read_state(path).get("files")) if os.path.isfile(os.path.join(path, "state.json")) \
        else None
    verify_file(path, name, files.get(name) if files else None)
    return os.path.join(path, name)


def load_checkpoint(path: str, model, ref, adapters: dict | None = None) -> dict:
    """Weights into the plain (not yet wrapped or sharded) networks; the optimizer follows in load_optimizer.
    With LoRA, the two adapters; a checkpoint of the other kind, or of other adapters, is refused in one line."""
    state = check_checkpoint(path)
    saved = lora.read_config(path) if os.path.isfile(os.path.join(path, lora.CONFIG_FILE)) else None
    if saved and not adapters:
        raise UserError(f"{path} holds LoRA adapters (rank {saved['rank']}): resume with --lora-rank {saved['rank']}")
    if adapters and not saved:
        raise UserError(f"{path} holds full weights, not LoRA adapters: resume it without --lora-rank")
    if adapters:
        lora.check_same(saved, adapters, path)
        lora.load_adapter(os.path.join(path, lora.ADAPTER_FILE), model.dit, model.name, lora.POLICY)
        lora.load_adapter(os.path.join(path, lora.REFERENCE_FILE), model.dit, model.name, lora.REFERENCE)
        return state
    model.load_weights(os.path.join(path, "model.safetensors"))
    if ref is not None:
        model.load_weights(os.path.join(path, "ref.safetensors"), net=ref)
    return state


def load_optimizer(path: str, model, opt):
    """AdamW's state and the RNG. Checked whole by check_checkpoint; a file that still does not fit (a checkpoint of
    an earlier version, which recorded no sha256, damaged inside) is one line naming it."""
    try:
        saved = torch.load(os.path.join(path, "optimizer.pt"), weights_only=True)
        rng = torch.load(os.path.join(path, "rng.pt"), weights_only=True)["torch"]
        parallel.load_optimizer_state(model.dit, opt, saved)
        torch.set_rng_state(rng)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        raise UserError(f"{path} is damaged: its optimizer.pt or rng.pt does not load into this run "
                        f"({str(e).strip().splitlines()[0][:100] if str(e).strip() else type(e).__name__}); "
                        "resume from the checkpoint before it (--resume OUT/checkpoint-<step>)") from None


def finite_weights(path: str) -> bool:
    """Every weights file of the checkpoint holds finite numbers: model.safetensors (the Open-Sora family), the
    diffusers layout (diffusion_pytorch_model*.safetensors, wan2.2-14b's transformer_2/ too) or LoRA adapters."""
    from safetensors.torch import load_file

    try:
        files = [f for f in files_under(path) if f.endswith(".safetensors")]
        return bool(files) and all(bool(torch.isfinite(t).all()) for f in files
                                   for t in load_file(os.path.join(path, f)).values())
    except Exception:  # noqa: BLE001 - a damaged file is not a good checkpoint
        return False


def last_good_checkpoint(out: str, bad_since: int) -> str | None:
    """After a NaN stop: the newest checkpoint whose weights are finite and did not produce the first bad step
    (weights saved at step s make step s + 1's samples)."""
    return next((p for p in reversed(checkpoints(out)) if step_of(p) < bad_since - 1 and finite_weights(p)), None)


# ----------------------------------------------------------------------------------------------------------
# The run folder: one run at a time, never mixed with another, metrics rewritten atomically


HELD_LOCKS = []  # this process's OUT/.lock files; a killed run's stale lock is recognised by its dead pid


@atexit.register
def release_locks():
    while HELD_LOCKS:
        lock = HELD_LOCKS.pop()
        if os.path.exists(lock):
            os.remove(lock)


def live_holder(lock: str) -> int | None:
    """The process id in OUT/.lock if that process is alive and not this one; None for no lock or a stale one."""
    try:
        with open(lock) as f:
            pid = int(f.read().strip())
        if pid <= 0 or pid == os.getpid():
            return None
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except PermissionError:  # it exists, and is another user's
        return pid
    except (OSError, ValueError):  # no lock, an unreadable one, or a dead process: a killed run's stale lock
        return None
    return pid


def claim(out: str, resume: bool, overwrite: bool):
    """--out is writable, no other live run writes to it (OUT/.lock holds the writer's pid), and a fresh run does
    not mix with an old one there."""
    writable_dir(out, "--out")
    lock = os.path.join(out, ".lock")
    holder = live_holder(lock)
    if holder is not None:
        raise UserError(f"another run (pid {holder}) is writing to {out}; wait for it, or give another --out (if no "
                        f"run is, delete {lock})")
    with open(lock, "w") as f:
        f.write(str(os.getpid()))
    HELD_LOCKS.append(lock)
    metrics = os.path.join(out, "metrics.jsonl")
    old = checkpoints(out) + ([metrics] if os.path.isfile(metrics) and os.path.getsize(metrics) else [])
    if old and not resume and not overwrite:
        raise UserError(f"{out} already holds a run ({os.path.basename(old[-1])}); continue it with --resume, or "
                        "delete it with --overwrite")
    if overwrite:
        for path in checkpoints(out) + [os.path.join(out, "samples")]:
            shutil.rmtree(path, ignore_errors=True)
        for name in ("metrics.jsonl", "offline_pairs.pt", "args.json"):
            if os.path.isfile(os.path.join(out, name)):
                os.remove(os.path.join(out, name))


def set_aside_newer(out: str, step: int) -> str | None:
    """Resuming from an older checkpoint: the newer checkpoints and eval samples belong to a timeline that is being
    replaced. They move to OUT/superseded-<time>/, never deleted, so a later --resume cannot jump onto them; the
    folder is returned (None if nothing was newer), and run.start_metrics puts their metrics rows beside them."""
    newer = [p for p in checkpoints(out) + glob.glob(os.path.join(out, "samples", "step-*"))
             if re.fullmatch(r"(checkpoint|step)-\d+", os.path.basename(p)) and step_of(p) > step]
    folder = os.path.join(out, f"superseded-{time.strftime('%Y%m%d-%H%M%S')}")
    if newer and parallel.is_main():
        for path in newer:
            target = os.path.join(folder, os.path.relpath(path, out))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(path, target)
        warn(f"resuming from step {step}: moved {', '.join(os.path.relpath(p, out) for p in newer)} to {folder}")
    parallel.barrier()
    return folder if newer else None
