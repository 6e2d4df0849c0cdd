"""LoRA adapters (peft) on any backend's network, and the DPO reference as a second adapter instead of a copy.

    python train.py --lora-rank 64 ...            # train adapters; the base weights stay frozen

The network carries two adapters of the same shape on the same layers: "policy", the one the optimizer trains,
and "reference", G_ref. Both start at B = 0, so at step 0 each adds exactly nothing: the reference is the base
network, as with the adapters disabled (Alg. 1 line 1). The curriculum update (Alg. 1 line 14) copies the policy
adapter into the reference adapter, so the reference becomes exactly the policy without a second copy of the
network: the reference costs 2 * rank * (d_in + d_out) numbers per adapted layer.

Checkpoints hold the adapters in the layout diffusers' `load_lora_weights` reads (keys `transformer.<module>.
lora_A.weight`), so a CogVideoX or Wan adapter loads straight into the diffusers pipeline. STDiT3 has no pipeline:
its policy adapter is also saved in peft's own layout (adapter_config.json, adapter_model.safetensors), which
`peft.PeftModel.from_pretrained(stdit3, checkpoint)` loads onto the base network.
"""
import contextlib
import json
import os
import warnings

import torch
import torch.nn as nn

import parallel
from inputs import UserError

POLICY, REFERENCE = "policy", "reference"
ADAPTER_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default name: load_lora_weights(folder) finds it
REFERENCE_FILE = "reference_lora.safetensors"
CONFIG_FILE = "lora_config.json"
PEFT_FILE = "adapter_model.safetensors"  # peft's name, beside its adapter_config.json
# Attention and feed-forward linears of every block (not the embedders, not the final layer).
TARGETS = {
    # our STDiT3 port: self-attention qkv/proj, cross-attention q/kv/proj, MLP fc1/fc2, spatial and temporal blocks
    "stdit3": r".*blocks\.\d+\.(attn\.(qkv|proj)|cross_attn\.(q_linear|kv_linear|proj)|mlp\.(fc1|fc2))",
    # diffusers CogVideoX (transformer_blocks.i.attn1, .ff) and Wan (blocks.i.attn1/attn2, .ffn)
    "diffusers": r".*blocks\.\d+\.((attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)|(ff|ffn)\.net\.(0\.proj|2))",
}


def default_targets(net: nn.Module) -> str:
    return TARGETS["diffusers" if hasattr(net, "add_adapter") else "stdit3"]


def lora_layers(net: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in net.modules() if isinstance(m, LoraLayer)]


def add_adapters(net: nn.Module, rank: int, alpha: float | None = None, dropout: float = 0.0,
                 targets: str | None = None, seed: int = 0) -> dict:
    """Freeze the network and give it the policy and reference adapters (peft; for a diffusers model through its own
    PEFT integration, `add_adapter`). A is drawn from `seed` (peft's Kaiming init), B is 0. Returns the adapter
    config, as saved next to the weights."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise UserError("--lora-rank needs peft: pip install peft") from None
    if rank < 1:
        raise UserError(f"--lora-rank must be at least 1, got {rank}")
    config = dict(rank=rank, alpha=float(alpha if alpha is not None else rank), dropout=dropout,
                  targets=targets or default_targets(net))
    check_rank(net, rank, config["targets"])
    peft_config = LoraConfig(r=rank, lora_alpha=config["alpha"], lora_dropout=dropout,
                             target_modules=config["targets"], init_lora_weights=True)
    net.requires_grad_(False)
    for name in (POLICY, REFERENCE):
        try:
            with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)  # the same adapters whatever ran before in this process
                warnings.simplefilter("ignore")  # peft warns that a second adapter is a second adapter
                if hasattr(net, "add_adapter"):  # diffusers ModelMixin (PeftAdapterMixin)
                    net.add_adapter(peft_config, adapter_name=name)
                else:
                    inject_adapter_in_model(peft_config, net, adapter_name=name)
        except ValueError as e:  # peft: "Target modules ... not found in the base model"
            raise UserError(f"--lora-targets {config['targets']!r} matches no layer of the network "
                            f"({str(e).splitlines()[0][:120]})") from None
    for layer in lora_layers(net):  # the reference starts as the policy: both B = 0 (peft's default init)
        copy_adapter(layer, POLICY, REFERENCE)
    use(net, POLICY)
    return config


def store_base(net: nn.Module, dtype: torch.dtype):
    """With adapters the base network is frozen, so it is stored in the compute dtype (bf16), as diffusers' LoRA
    training scripts load the transformer in weight_dtype. What diffusers keeps in fp32 (_keep_in_fp32_modules:
    Wan's norms, time embedder and modulation tables) stays fp32, and so do both adapters: the policy's, which the
    optimizer updates, and the reference's, which must equal it exactly after a curriculum update.
    Under bf16 autocast every adapted matmul already runs in bf16: the base's memory halves (a 14B Wan expert 57 ->
    29 GB) for the same compute."""
    keep = {k for m in net.modules() for k in (getattr(m, "_keep_in_fp32_modules", None) or [])}
    for name, p in net.named_parameters():
        if not p.requires_grad and ".lora_" not in name and not keep & set(name.split(".")):
            p.data = p.data.to(dtype)


def check_rank(net: nn.Module, rank: int, targets: str):
    """B A of an (out x in) linear has rank at most min(in, out): a larger r adds parameters and memory, never
    expressiveness (a rank of 100,000 on 64-wide layers would run for minutes before anyone noticed). Checked on the
    targeted linears before any adapter is made; one line naming the narrowest."""
    import re

    if not valid_pattern(targets):
        raise UserError(f"--lora-targets {targets!r} is not a valid regular expression")
    widths = {name: min(m.in_features, m.out_features) for name, m in net.named_modules()
              if isinstance(m, nn.Linear) and re.fullmatch(targets, name)}
    if widths and rank > min(widths.values()):
        name = min(widths, key=widths.get)
        raise UserError(f"--lora-rank {rank} is larger than the narrowest adapted layer ({name}: {widths[name]} "
                        f"wide), where B A has rank at most {widths[name]}; use --lora-rank <= {widths[name]}")


def use(net: nn.Module, name: str):
    """Route every adapted layer through adapter `name`; only that adapter requires grad (peft's set_adapter), so
    the policy's and the reference's forwards take the same numeric path under autocast."""
    for layer in lora_layers(net):
        layer.set_adapter(name)


@contextlib.contextmanager
def reference(net: nn.Module):
    """G_ref for the duration: the same network through the reference adapter, in eval mode (no LoRA dropout)."""
    was_training = net.training
    use(net, REFERENCE)
    net.eval()
    try:
        yield net
    finally:
        use(net, POLICY)
        net.train(was_training)


@torch.no_grad()
def copy_adapter(layer: nn.Module, source: str, target: str):
    for part in (layer.lora_A, layer.lora_B):
        part[target].weight.copy_(part[source].weight)


def update_reference(net: nn.Module):
    """Alg. 1 line 14 with adapters: G_ref <- G_theta, the policy adapter copied into the reference adapter."""
    for layer in lora_layers(net):
        copy_adapter(layer, POLICY, REFERENCE)


def trainable(net: nn.Module) -> list[nn.Parameter]:
    return [p for p in net.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------------------------------------
# Files: the adapter as diffusers saves it, and the merged full weights


def adapter_state(net: nn.Module, name: str = POLICY) -> dict[str, torch.Tensor]:
    """The adapter's weights under diffusers' keys: transformer.<module>.lora_A.weight / .lora_B.weight."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(net, adapter_name=name)
    full = lambda v: v.full_tensor() if hasattr(v, "full_tensor") else v  # FSDP2: gathered on every rank
    prefix = "" if parallel.two_experts(net) else "transformer."  # TwoExperts' children carry the pipeline's names
    return {f"{prefix}{k}": full(v).detach().contiguous().cpu() for k, v in state.items()}


def second_expert_file(file: str) -> str:
    """Where the low-noise expert's adapter goes, in the layout diffusers loads with
    `pipe.load_lora_weights(folder, weight_name=..., load_into_transformer_2=True)`: keys transformer.*."""
    return file.removesuffix(".safetensors") + "_transformer_2.safetensors"


def split_experts(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """An adapter state as its two files' tensors: the network's (TwoExperts: the high-noise expert's), and the
    low-noise expert's under transformer.* (what load_into_transformer_2 reads; empty for one network)."""
    first = {k: v for k, v in state.items() if not k.startswith("transformer_2.")}
    second = {"transformer." + k.removeprefix("transformer_2."): v for k, v in state.items() if k not in first}
    return first, second


def save_files(folder: str, states: dict[str, dict], config: dict, model_name: str, peft_layout: bool = False):
    """A checkpoint's adapters (adapter_state of POLICY and REFERENCE) and their config (rank, alpha, dropout,
    targets, and the base network they were trained on); with `peft_layout` the policy adapter once more as peft
    saves it (PeftModel.from_pretrained reads it)."""
    from peft import LoraConfig

    # the LoRA config as diffusers writes it (save_lora_weights' metadata), so load_lora_weights scales by alpha / r
    peft_config = LoraConfig(r=config["rank"], lora_alpha=config["alpha"], lora_dropout=config["dropout"],
                             target_modules=config["targets"]).to_dict()
    packed = {f"transformer.{k}": sorted(v) if isinstance(v, set) else v for k, v in peft_config.items()}
    metadata = {"format": "pt", "model": model_name, "lora_adapter_metadata": json.dumps(packed, indent=2,
                                                                                         sort_keys=True)}
    os.makedirs(folder, exist_ok=True)
    for name, file in ((POLICY, ADAPTER_FILE), (REFERENCE, REFERENCE_FILE)):
        first, second = split_experts(states[name])
        save_sorted(first, os.path.join(folder, file), metadata)
        if second:
            save_sorted(second, second_expert_file(os.path.join(folder, file)), metadata)
    with open(os.path.join(folder, CONFIG_FILE), "w") as f:
        json.dump({**config, "model": model_name}, f, indent=1)
    if peft_layout:  # peft's names: adapter_config.json, adapter_model.safetensors, keys base_model.model.<module>
        LoraConfig(r=config["rank"], lora_alpha=config["alpha"], lora_dropout=config["dropout"],
                   target_modules=config["targets"]).save_pretrained(folder)
        policy = {"base_model.model." + k.removeprefix("transformer."): v for k, v in states[POLICY].items()}
        save_sorted(policy, os.path.join(folder, PEFT_FILE), {"format": "pt"})


def save_sorted(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]):
    """safetensors.save_file with the header's keys sorted: safetensors writes its metadata in a hash map's order,
    which changes from process to process, so two identical runs would write files with different sha256. The
    tensors' offsets count from the end of the header, so re-writing it (padded to 8 bytes, as the format asks)
    moves nothing else."""
    from safetensors.torch import save

    data = save(tensors, metadata)
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8: 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header + data[8 + n:])


def read_config(folder: str) -> dict:
    """A checkpoint's lora_config.json, every field of its kind and in its range; one line naming it otherwise."""
    from inputs import check_fields, read_json

    file = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(file):
        raise UserError(f"{file} is missing: a LoRA checkpoint names its rank, alpha and targets there")
    config = check_fields(read_json(file, "LoRA config"), {"rank": int, "alpha": float, "dropout": float,
                                                           "targets": str, "model": str, "base": (str, None)},
                          f"LoRA config {file}")
    if config["rank"] < 1 or not config["alpha"] > 0 or not 0 <= config["dropout"] < 1 or not valid_pattern(
            config["targets"]):
        raise UserError(f"LoRA config {file} is damaged: rank, alpha, dropout or targets out of range")
    return {k: config[k] for k in ("rank", "alpha", "dropout", "targets", "model", "base")}


def valid_pattern(pattern: str) -> bool:
    import re

    try:
        re.compile(pattern)
    except re.error:
        return False
    return bool(pattern.strip())


def check_same(saved: dict, config: dict, path: str):
    """Resume only into adapters of the same shape and placement."""
    for key, flag in (("rank", "--lora-rank"), ("alpha", "--lora-alpha"), ("targets", "--lora-targets")):
        if saved[key] != config[key]:
            raise UserError(f"{path} holds adapters with {key} {saved[key]!r}, this run asks for {config[key]!r}: "
                            f"resume with the same {flag}")


def load_adapter(file: str, net: nn.Module, model_name: str, name: str = POLICY):
    """An adapter saved by save_files (or by diffusers' save_lora_weights) into adapter `name`; refuses one made
    for another model or for other layers."""
    from peft import set_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not os.path.isfile(file):
        raise UserError(f"no adapter file {file}")
    with safe_open(file, "pt") as f:
        made_for = (f.metadata() or {}).get("model")
    if made_for is not None and made_for != model_name:
        raise UserError(f"{file} is an adapter of model {made_for!r}, not {model_name!r}")
    state = load_file(file)
    if parallel.two_experts(net):  # the low-noise expert's adapter from its own file, back under transformer_2.*
        other = second_expert_file(file)
        if not os.path.isfile(other):
            raise UserError(f"no adapter file {other} (the low-noise expert's, beside {os.path.basename(file)})")
        state.update({"transformer_2." + k.removeprefix("transformer."): v for k, v in load_file(other).items()})
    own = adapter_state(net, name)  # the adapters the config built: every tensor of the file must fit one of them
    if {k: tuple(v.shape) for k, v in state.items()} != {k: tuple(v.shape) for k, v in own.items()}:
        raise UserError(f"{file} does not fit this network's adapters: its tensors' names or shapes are not those of "
                        "its lora_config.json (another model, rank or --lora-targets, or a damaged file)")
    if not parallel.two_experts(net):
        state = {k.removeprefix("transformer."): v for k, v in state.items()}
    result = set_peft_model_state_dict(net, state, adapter_name=name)
    if getattr(result, "unexpected_keys", None):
        raise UserError(f"{file} does not fit this network's adapters (another model, rank or --lora-targets?)")


def merged_network(net: nn.Module) -> nn.Module | None:
    """A plain copy of the network (no adapters, on the CPU) holding the merged weights: what save_weights writes
    as a full checkpoint. For an FSDP2-sharded network every rank calls it (the weights are gathered) and rank 0
    gets the copy, the others None."""
    state = merged_state(net)
    return parallel.plain_twin(net, state) if state is not None else None


@torch.no_grad()
def merged_state(net: nn.Module) -> dict[str, torch.Tensor] | None:
    """The plain network's state dict with the policy adapter merged in: W + (alpha / r) B A per adapted linear, the
    layout of a full checkpoint (loadable as --dit, no peft needed). Computed from the full state dict, so an
    FSDP2-sharded network merges like a whole one (gathered on rank 0; the other ranks get None)."""
    if hasattr(net, "reshard"):  # FSDP2: the whole state on rank 0's CPU (collective)
        state = parallel.state_dicts().get_model_state_dict(net, options=parallel.full())
        if not parallel.is_main():
            return None
    else:
        state = net.state_dict()
    adapted = {id(m) for m in lora_layers(net)}
    for name, module in net.named_modules():
        if id(module) in adapted and POLICY in module.lora_A:
            a, b = state[f"{name}.lora_A.{POLICY}.weight"], state[f"{name}.lora_B.{POLICY}.weight"]
            weight = state[f"{name}.base_layer.weight"]  # every target is a Linear (peft: W + scaling B A)
            state[f"{name}.base_layer.weight"] = weight + (module.scaling[POLICY] * (b.float() @ a.float())).to(weight)
    return {k.replace(".base_layer.", "."): v.detach().contiguous().cpu() for k, v in state.items() if ".lora_" not in k}
