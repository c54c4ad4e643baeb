"""LoRA files in every community format, read into one form: weight deltas on our modules.

Recognised from the keys:
- peft / diffusers (ai-toolkit, fal): `transformer.<diffusers module>.lora_A/lora_B.weight`, optional `.alpha` keys
  and the `lora_adapter_metadata` header diffusers writes (rank and alpha there; else alpha = rank);
- the same suffixes on BFL module names, `diffusion_model.` prefixed or not, with biases and full tensors (BFL's
  Canny/Depth control LoRAs, which also widen `img_in`);
- kohya sd-scripts and LyCORIS (`lora_unet_double_blocks_0_img_attn_qkv.lora_down/lora_up.weight` + `.alpha`,
  `lokr_w1` / `lokr_w2` and their factors, `hada_w1_a` ...; `lora_te1_` for CLIP), ComfyUI's dotted and prefixed
  variants, OneTrainer's `lora_transformer_` (diffusers names with underscores), and `.diff` / `.diff_b` patches;
- XLabs (`double_blocks.N.processor.qkv_lora1/qkv_lora2/proj_lora1/proj_lora2`, `single_blocks.N.processor.qkv_lora
  /proj_lora`, `.down/.up.weight`, no alpha).

Our transformer keeps BFL's fused projections, so a LoRA for diffusers' separate q, k, v (or a single block's MLP
input) lands on its rows of the fused weight (`weights.layout.diffusers_rows`), never on a second copy of the model.
Every key is placed and every shape checked before anything is returned: a file with keys nothing can place, or
for another model size, is refused with one line that names them.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..weights.checkpoint import SAFETENSORS_SUFFIXES, CheckpointError, read_state_dict
from ..weights.layout import CLIP_KEYS, SWAPPED, T5_KEYS, diffusers_rows, rename

LORA_FILE = "pytorch_lora_weights.safetensors"  # what diffusers writes in a LoRA folder
PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "unet.")
TEXT_PREFIXES = {"text_encoder.": "clip", "text_encoders.clip_l.transformer.": "clip", "text_encoders.clip_l.": "clip",
                 "text_encoder_2.": "t5", "text_encoders.t5xxl.transformer.": "t5", "text_encoders.t5xxl.": "t5"}
UNDERSCORE_PREFIXES = {"lora_unet_": "transformer", "lora_transformer_": "transformer", "lora_te1_": "clip",
                       "lora_te_": "clip", "lora_te2_": "t5"}
# the tensor names of each kind of delta, after the module name
SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_A.bias", "lora_B.bias", "lora_down.weight", "lora_up.weight",
            "lora_mid.weight", "down.weight", "up.weight", "alpha", "lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b",
            "lokr_w2_a", "lokr_w2_b", "lokr_t2", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1",
            "hada_t2", "diff", "diff_b", "dora_scale")
XLABS = {"qkv_lora1": "img_attn.qkv", "qkv_lora2": "txt_attn.qkv", "proj_lora1": "img_attn.proj",
         "proj_lora2": "txt_attn.proj"}


class LoraError(CheckpointError):
    """A LoRA that cannot be read or placed; the message is one line for the user."""


@dataclass
class Delta:
    """A change of one module's weight: `rows` of it (all when None) by `kind`:
    lora: scale * up @ down; lokr: scale * kron(w1, w2); loha: scale * (w1_a @ w1_b) * (w2_a @ w2_b); full: weight.
    `bias`, when given, is added to the module's bias (times the adapter's weight)."""

    component: str  # "transformer", "clip" or "t5"
    module: str  # our name of the module in that component
    kind: str
    tensors: dict[str, Tensor]
    scale: float = 1.0
    rows: tuple[int, int] | None = None
    bias: Tensor | None = None
    swap_halves: bool = False  # diffusers' (scale, shift) order of the final layer's modulation

    def weight(self, dtype: torch.dtype = torch.float32) -> Tensor | None:
        """The dense change of the rows, in `dtype` (computed in float32); None for a bias-only patch."""
        if self.kind == "bias":
            return None
        t = {k: v.float() for k, v in self.tensors.items()}
        if self.kind == "lora":
            w = t["up"].flatten(1) @ t["down"].flatten(1)
        elif self.kind == "lokr":
            w1 = t["w1"] if "w1" in t else t["w1_a"] @ t["w1_b"]
            w2 = t["w2"] if "w2" in t else t["w2_a"] @ t["w2_b"]
            w = torch.kron(w1, w2.flatten(1))
        elif self.kind == "loha":
            w = (t["w1_a"] @ t["w1_b"]) * (t["w2_a"] @ t["w2_b"])
        else:
            w = t["weight"]
        w = w * self.scale
        if self.swap_halves:
            w = torch.cat(w.chunk(2, dim=0)[::-1])
        return w.to(dtype)

    @property
    def shape(self) -> tuple[int, int]:
        t = self.tensors
        if self.kind == "lora":
            return t["up"].shape[0], t["down"].flatten(1).shape[1]
        if self.kind == "lokr":
            w1 = t["w1"].shape if "w1" in t else (t["w1_a"].shape[0], t["w1_b"].shape[1])
            w2 = t["w2"].shape if "w2" in t else (t["w2_a"].shape[0], t["w2_b"].shape[1])
            return w1[0] * w2[0], w1[1] * w2[1]
        if self.kind == "loha":
            return t["w1_a"].shape[0], t["w1_b"].shape[1]
        return tuple(t["weight"].shape[:2])


@dataclass
class Adapter:
    """One LoRA file, placed: its deltas, the tensors it replaces outright (a control LoRA's norm scales), and the
    input width it widens `img_in` to (a control LoRA's, else None)."""

    name: str
    deltas: list[Delta]
    replacements: dict[str, Tensor] = field(default_factory=dict)
    in_channels: int | None = None
    format: str = "peft"
    source: str | None = None


def read_file(source: str | os.PathLike | dict, weight_name: str | None = None) -> tuple[dict[str, Tensor], dict,
                                                                                         str | None]:
    """(tensors, metadata, path) of a LoRA given as a .safetensors file, a folder holding one, or a dict."""
    if isinstance(source, dict):
        if not all(isinstance(v, Tensor) for v in source.values()):
            raise LoraError("a LoRA state dict maps names to tensors")
        return dict(source), {}, None
    path = Path(source)
    if path.is_dir():
        name = weight_name or (LORA_FILE if (path / LORA_FILE).exists() else None)
        if name is None:
            files = sorted(path.glob("*.safetensors"))
            if len(files) != 1:
                raise LoraError(f"{path} holds {len(files)} .safetensors files: pass weight_name= to pick one")
            name = files[0].name
        path = path / name
    if not path.exists():
        raise LoraError(f"no LoRA file at {path}")
    if path.suffix not in SAFETENSORS_SUFFIXES:
        raise LoraError(f"{path} is not a safetensors file (.safetensors or .sft; pickled LoRAs are never read)")
    from safetensors import safe_open

    tensors = read_state_dict(path, mmap=False)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - read_state_dict already validated the file; keep the message
        raise LoraError(f"cannot read {path}: {e}") from None
    return tensors, metadata, str(path)


# ----------------------------------------------------------------------------------------------------------------
# module names

class Names:
    """Every name a LoRA may give a module, mapped to (component, our module, rows, swap)."""

    def __init__(self, transformer: nn.Module, clip: nn.Module | None = None, t5: nn.Module | None = None):
        self.known: dict[str, tuple[str, str, tuple[int, int] | None, bool]] = {}
        self.modules: dict[tuple[str, str], nn.Module] = {}
        self.params: dict[str, tuple[int, ...]] = {k: tuple(v.shape) for k, v in
                                                   transformer.state_dict(keep_vars=True).items()}
        for component, model in (("transformer", transformer), ("clip", clip), ("t5", t5)):
            if model is None:
                continue
            for name, module in model.named_modules():
                if hasattr(module, "weight") and name:
                    self.modules[component, name] = module
                    self._add(component, name, name)
        for theirs, (ours, start, stop) in diffusers_rows(transformer.config).items():
            if ("transformer", ours) in self.modules:
                rows = None if stop < 0 else (start, stop)
                self._add("transformer", theirs, ours, rows, swap=ours == SWAPPED)
        for component, model, rules in (("clip", clip, CLIP_KEYS), ("t5", t5, T5_KEYS)):
            if model is None:
                continue
            # transformers' own names (text_model.encoder.layers.0.self_attn.q_proj), as LoRA files use them
            for theirs in _transformers_names(model, rules):
                ours = next(iter(rename({theirs + ".weight": None}, rules))).removesuffix(".weight")
                if (component, ours) in self.modules:
                    self._add(component, theirs, ours)

    def _add(self, component: str, name: str, ours: str, rows=None, swap: bool = False) -> None:
        entry = (component, ours, rows, swap)
        self.known.setdefault(f"{component}:{name}", entry)
        self.known.setdefault(f"{component}:{name.replace('.', '_')}", entry)

    def find(self, component: str, name: str):
        return self.known.get(f"{component}:{name}")


def _transformers_names(model: nn.Module, rules) -> list[str]:
    """The transformers names of a text encoder's weighted modules, found by inverting our renaming rules on the
    patterns transformers uses (only those that exist in the model are kept by the caller)."""
    names = []
    for name, module in model.named_modules():
        if not hasattr(module, "weight") or not name:
            continue
        if rules is CLIP_KEYS:
            m = re.fullmatch(r"layers\.(\d+)\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2|layer_norm1|layer_norm2)", name)
            if m:
                inner = "self_attn" if m[2].endswith("proj") else "mlp" if m[2].startswith("fc") else None
                names.append(f"text_model.encoder.layers.{m[1]}." + (f"{inner}.{m[2]}" if inner else m[2]))
        else:
            m = re.fullmatch(r"blocks\.(\d+)\.(q|k|v|o|wi|wi_0|wi_1|wo)", name)
            if m:
                part = "layer.0.SelfAttention" if m[2] in "qkvo" else "layer.1.DenseReluDense"
                names.append(f"encoder.block.{m[1]}.{part}.{m[2]}")
    return names


def _split(key: str) -> tuple[str, str] | None:
    """(module, suffix) of a LoRA key."""
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    return None


def _locate(module: str, names: Names) -> tuple[str, str, tuple[int, int] | None, bool] | None:
    """Our (component, module, rows, swap) for a module name as a LoRA file spells it."""
    for prefix, component in UNDERSCORE_PREFIXES.items():
        if module.startswith(prefix):
            found = names.find(component, module[len(prefix):])
            if found is None and component == "clip":
                found = names.find(component, "text_model_" + module[len(prefix):])
            return found
    m = re.fullmatch(r"(?:diffusion_model\.)?(double|single)_blocks\.(\d+)\.processor\.(\w+)", module)
    if m:  # XLabs
        block, i, part = m[1], m[2], m[3]
        if block == "double":
            return names.find("transformer", f"double_blocks.{i}.{XLABS.get(part, part)}")
        if part == "proj_lora":
            return names.find("transformer", f"single_blocks.{i}.linear2")
        if part == "qkv_lora":
            found = names.find("transformer", f"single_blocks.{i}.linear1")
            if found:
                h = names.modules["transformer", found[1]].in_features
                return found[0], found[1], (0, 3 * h), False
        return None
    for prefix, component in TEXT_PREFIXES.items():
        if module.startswith(prefix):
            return names.find(component, module[len(prefix):])
    for prefix in PREFIXES:
        module = module.removeprefix(prefix)
    return names.find("transformer", module)


# ----------------------------------------------------------------------------------------------------------------
# parsing

def _format_of(keys) -> str:
    joined = " ".join(keys[:2000])
    if "lokr_w" in joined:
        return "lokr"
    if "hada_w" in joined:
        return "loha"
    if ".processor." in joined and (".down.weight" in joined or ".up.weight" in joined):
        return "xlabs"
    if "lora_down" in joined or re.search(r"\blora_(unet|te\d?|transformer)_", joined):
        return "kohya"
    if ".diff" in joined and "lora_" not in joined:
        return "diff"
    return "peft"


def _metadata_alphas(metadata: dict) -> dict[str, dict]:
    """peft's rank and alpha per component, from diffusers' `lora_adapter_metadata` header."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError:
        raise LoraError("the lora_adapter_metadata header is not JSON") from None
    out: dict[str, dict] = {}
    for key, value in meta.items():
        component, _, field_name = key.partition(".")
        out.setdefault(component, {})[field_name] = value
    return out


def _peft_scale(config: dict, module: str, rank: int) -> float:
    def pattern(name: str, default):
        table = config.get(name) or {}
        for pat, value in table.items():
            if module == pat or module.endswith("." + pat) or re.fullmatch(pat, module):
                return value
        return default
    r = pattern("rank_pattern", config.get("r", rank))
    alpha = pattern("alpha_pattern", config.get("lora_alpha", r))
    return float(alpha) / float(r)


def parse(state: dict[str, Tensor], names: Names, metadata: dict | None = None, name: str = "default",
          source: str | None = None) -> Adapter:
    """Place every tensor of a LoRA state dict on our modules; refuse the file whole if any is left or misfits."""
    if not state:
        raise LoraError(f"the LoRA {source or name} holds no tensors")
    fmt = _format_of(list(state))
    meta = _metadata_alphas(metadata or {})
    groups: dict[str, dict[str, Tensor]] = {}
    unplaced: list[str] = []
    replacements: dict[str, Tensor] = {}
    for key, tensor in state.items():
        split = _split(key)
        if split is None:
            # a whole tensor under its own name: a control LoRA's norm scales (BFL names, perhaps prefixed)
            plain = key
            for prefix in PREFIXES:
                plain = plain.removeprefix(prefix)
            if plain in names.params and plain.endswith(".scale"):
                replacements[plain] = tensor
            else:
                unplaced.append(key)
            continue
        groups.setdefault(split[0], {})[split[1]] = tensor
    deltas: list[Delta] = []
    in_channels = None
    for module, tensors in groups.items():
        where = _locate(module, names)
        if where is None:
            unplaced.extend(f"{module}.{s}" for s in tensors)
            continue
        component, ours, rows, swap = where
        delta = _delta(tensors, component, ours, rows, swap, meta, module)
        if delta is None:
            unplaced.extend(f"{module}.{s}" for s in tensors)
            continue
        target = names.modules[component, ours]
        # a linear's in_features and out_features, not its weight's shape: GGUF and bitsandbytes weights are bytes
        expected_in = getattr(target, "in_features", None) or (target.weight.shape[1] if target.weight.ndim > 1
                                                               else None)
        expected_rows = (rows[1] - rows[0]) if rows else getattr(target, "out_features", None) or \
            target.weight.shape[0]
        got_rows, got_in = delta.shape if delta.kind != "bias" else (expected_rows, expected_in)
        if component == "transformer" and ours == "img_in" and got_in > expected_in and got_rows == expected_rows:
            in_channels = got_in  # a control LoRA: img_in widened to read the control image's latents too
        elif (got_rows, got_in) != (expected_rows, expected_in):
            raise LoraError(f"the LoRA {source or name} is for another model: {module} changes a "
                            f"{got_rows}x{got_in} weight, {ours} here is {expected_rows}x{expected_in}")
        if delta.bias is not None and tuple(delta.bias.shape) != (expected_rows,):
            raise LoraError(f"the LoRA {source or name} is for another model: {module}'s bias is "
                            f"{tuple(delta.bias.shape)}, {ours} here has {expected_rows} rows")
        deltas.append(delta)
    for key, tensor in replacements.items():
        if tuple(tensor.shape) != names.params[key]:
            raise LoraError(f"the LoRA {source or name} is for another model: {key} is {tuple(tensor.shape)}, "
                            f"{names.params[key]} here")
    if unplaced:
        shown = ", ".join(sorted(unplaced)[:3])
        raise LoraError(f"the LoRA {source or name} ({fmt} format) has {len(unplaced)} tensor(s) no module of this "
                        f"pipeline takes: {shown}{' ...' if len(unplaced) > 3 else ''}")
    return Adapter(name, deltas, replacements, in_channels, fmt, source)


KNOWN = {"alpha", "lora_A.weight", "lora_B.weight", "lora_A.bias", "lora_B.bias", "lora_down.weight", "lora_up.weight",
         "down.weight", "up.weight", "diff", "diff_b", "lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a",
         "lokr_w2_b", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}


def _delta(t: dict[str, Tensor], component: str, ours: str, rows, swap: bool, meta: dict,
           module: str) -> Delta | None:
    """The delta of one module's tensors, or None when they are of a kind this loader does not apply (DoRA's
    magnitudes, LoCon's mid weights, Tucker factors of convolutions)."""
    if set(t) - KNOWN:
        return None
    alpha = float(t["alpha"].float().reshape(-1)[0]) if "alpha" in t else None
    if "lora_A.weight" in t and "lora_B.weight" in t:  # peft
        down, up = t["lora_A.weight"], t["lora_B.weight"]
        rank = down.shape[0]
        config = meta.get("transformer" if component == "transformer" else "text_encoder", {})
        scale = alpha / rank if alpha is not None else _peft_scale(config, module.split(".", 1)[-1], rank)
        bias = t["lora_B.bias"].float() if "lora_B.bias" in t else None
        if "lora_A.bias" in t:  # a bias on the down projection reaches the output through up
            through = up.float() @ t["lora_A.bias"].float()
            bias = through if bias is None else bias + through
        return Delta(component, ours, "lora", {"down": down, "up": up}, scale, rows,
                     None if bias is None else bias * scale, swap)
    for down_key, up_key in (("lora_down.weight", "lora_up.weight"), ("down.weight", "up.weight")):
        if down_key in t and up_key in t:  # kohya (alpha / rank), XLabs (no alpha: 1)
            rank = t[down_key].shape[0]
            return Delta(component, ours, "lora", {"down": t[down_key], "up": t[up_key]}, (alpha or rank) / rank,
                         rows, None, swap)
    if any(k.startswith("lokr_") for k in t):
        parts = {k.removeprefix("lokr_"): v for k, v in t.items() if k.startswith("lokr_")}
        if not ({"w1", "w1_a"} & parts.keys() and {"w2", "w2_a"} & parts.keys()):
            return None
        # LyCORIS divides alpha by the rank of the factor that is low-rank; full factors have no rank, and scale 1
        dim = parts["w2_b"].shape[0] if "w2_b" in parts else parts["w1_b"].shape[0] if "w1_b" in parts else None
        return Delta(component, ours, "lokr", parts, alpha / dim if alpha is not None and dim else 1.0, rows, None,
                     swap)
    if "hada_w1_a" in t:
        parts = {k.removeprefix("hada_"): v for k, v in t.items() if k.startswith("hada_")}
        if len(parts) != 4:
            return None
        rank = parts["w1_b"].shape[0]
        return Delta(component, ours, "loha", parts, (alpha or rank) / rank, rows, None, swap)
    if "diff" in t or "diff_b" in t:
        return Delta(component, ours, "full" if "diff" in t else "bias", {"weight": t["diff"]} if "diff" in t else {},
                     1.0, rows, t["diff_b"].float() if "diff_b" in t else None, swap)
    return None
