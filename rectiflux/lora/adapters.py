"""LoRA adapters on a pipeline's models: side products beside each base layer (the default), or fused into it.

Unfused, each adapted module gets a forward hook that adds `weight * (x @ D.T) @ U.T` per active adapter (D the
stacked down projections, U the up projections with their scales, zero outside the rows each one changes), on float
and 8-bit base layers alike; weights change per call with no reload. Dense kinds (LoKr, LoHa, full patches) add
`x @ delta.T`. Fused, the deltas are added to the weights in float32 and rounded once into the base dtype (8-bit
weights are re-quantised from the float checkpoint); the originals are kept, so `unfuse` restores them exactly.
Blocks read later (lazy or streamed transformers) get their hooks, and their fused weights, as they are read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..runtime.heap import weights_in_their_own_mappings
from .formats import Adapter, Delta, LoraError, Names, parse, read_file


@dataclass
class SideProduct:
    """One adapter's change of one module, ready to apply: low-rank factors (the down projections stacked, each up
    projection kept with the rows of the output it writes), a dense delta, a bias."""

    down: Tensor | None = None  # (R, in): every low-rank delta's down projection
    ups: list[tuple[Tensor, int, int, int, int]] = field(default_factory=list)  # (up, row from, to, rank from, to)
    dense: Tensor | None = None  # (out, in)
    bias: Tensor | None = None  # (out,)
    _cast: dict = field(default_factory=dict)

    @classmethod
    def of(cls, deltas: list[Delta], out_features: int, in_features: int) -> SideProduct:
        downs, ups, dense, bias, rank = [], [], None, None, 0
        for d in deltas:
            start, stop = d.rows or (0, out_features)
            if d.kind == "lora":
                down, up = d.tensors["down"].float().flatten(1), d.tensors["up"].float().flatten(1) * d.scale
                if d.swap_halves:
                    up = torch.cat(up.chunk(2, dim=0)[::-1])
                downs.append(down)
                ups.append((up, start, stop, rank, rank + down.shape[0]))
                rank += down.shape[0]
            elif d.kind != "bias":
                dense = torch.zeros(out_features, in_features) if dense is None else dense
                dense[start:stop] += d.weight()
            if d.bias is not None:
                bias = torch.zeros(out_features) if bias is None else bias
                b = d.bias.float()
                bias[start:stop] += torch.cat(b.chunk(2)[::-1]) if d.swap_halves else b
        return cls(torch.cat(downs) if downs else None, ups, dense, bias)

    def delta_weight(self, out_features: int) -> Tensor | None:
        """The whole change of the weight, (out, in) float32, for fusing."""
        if self.down is None and self.dense is None:
            return None
        w = self.dense.clone() if self.dense is not None else self.down.new_zeros(out_features, self.down.shape[1])
        for up, start, stop, r0, r1 in self.ups:
            w[start:stop] += up @ self.down[r0:r1]
        return w

    def _like(self, x: Tensor) -> tuple:
        key = (x.dtype, x.device)
        if key not in self._cast:
            def cast(t):
                return None if t is None else t.to(x.device, x.dtype)
            self._cast[key] = (cast(self.down), [(cast(up), *rest) for up, *rest in self.ups], cast(self.dense),
                               cast(self.bias))
        return self._cast[key]

    def add_to(self, out: Tensor, x: Tensor, weight: float) -> Tensor:
        """`out + weight * (this change applied to x)`: in place into `out` at inference (each up projection adds
        straight into its rows of the output, no temporary of the output's size), into a new tensor while gradients
        are recorded."""
        down, ups, dense, bias = self._like(x)
        x2d = x.reshape(-1, x.shape[-1])
        y2d = out.reshape(-1, out.shape[-1])
        if torch.is_grad_enabled() or not y2d.is_contiguous() or y2d.data_ptr() != out.data_ptr():
            y2d = y2d.clone()
        if down is not None:
            low = x2d @ down.t()
            for up, start, stop, r0, r1 in ups:
                y2d[:, start:stop].addmm_(low[:, r0:r1], up.t(), alpha=weight)
        if dense is not None:
            y2d.addmm_(x2d, dense.t(), alpha=weight)
        if bias is not None:
            y2d.add_(bias, alpha=weight)
        return y2d.view(out.shape)


class Adapters:
    """The LoRAs of one pipeline: loaded, activated with weights, applied unfused or fused, removed."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.loaded: dict[str, Adapter] = {}
        self.sides: dict[str, dict[tuple[str, str], SideProduct]] = {}
        self.active: list[str] = []
        self.weights: dict[str, float] = {}
        self.fused: dict[str, float] = {}  # adapter -> the weight it was fused with
        self.call_scale = 1.0
        self._hooks: dict[tuple[str, str], tuple[nn.Module, object]] = {}
        self._originals: dict[tuple[str, str], dict[str, Tensor]] = {}
        self._replaced: dict[str, dict[str, Tensor]] = {}  # adapter -> original tensors it replaced
        self._widened: tuple[str, Tensor, int, str] | None = None  # (adapter, img_in weight, in_channels, kind)

    # ------------------------------------------------------------------------------------------------------------
    def models(self) -> dict[str, nn.Module]:
        models = {"transformer": self.pipe.transformer}
        if self.pipe.text_encoders is not None:
            models["clip"], models["t5"] = self.pipe.text_encoders.clip, self.pipe.text_encoders.t5
        return models

    def names(self) -> Names:
        models = self.models()
        return Names(models["transformer"], models.get("clip"), models.get("t5"))

    def load(self, source, adapter_name: str | None = None, weight_name: str | None = None) -> Adapter:
        """Read and place a LoRA; nothing of the pipeline changes unless all of it fits."""
        name = adapter_name or f"default_{len(self.loaded)}"
        if name in self.loaded:
            raise LoraError(f"an adapter named {name!r} is loaded already: pick another adapter_name or delete it")
        tensors, metadata, path = read_file(source, weight_name)
        adapter = parse(tensors, self.names(), metadata, name, path)
        if adapter.in_channels is not None:
            self._check_widening(adapter)
        models = self.models()
        sides = {}
        by_module: dict[tuple[str, str], list[Delta]] = {}
        for d in adapter.deltas:
            by_module.setdefault((d.component, d.module), []).append(d)
        for (component, module), deltas in by_module.items():
            target = models[component].get_submodule(module)
            in_features = adapter.in_channels if module == "img_in" and adapter.in_channels else \
                getattr(target, "in_features", None) or target.weight.shape[1]
            rows = getattr(target, "out_features", None) or target.weight.shape[0]  # bnb weights are bytes
            sides[component, module] = SideProduct.of(deltas, rows, in_features)
        # every check is done: from here on the pipeline changes
        readers = getattr(self.pipe.transformer.block_weights, "on_read", None)
        if readers is not None and self.block_read not in readers:
            readers.append(self.block_read)
        if adapter.in_channels is not None:
            self._widen(adapter)
        self._replace(adapter)
        self.loaded[name], self.sides[name] = adapter, sides
        self.active, self.weights[name] = [name], 1.0
        self._attach_all()
        return adapter

    def _check_widening(self, adapter: Adapter) -> None:
        if self.pipe.kind != "flux":
            raise LoraError(f"the LoRA {adapter.source or adapter.name} turns a text-to-image model into a control "
                            f"model; this pipeline is a {self.pipe.kind} model")
        if self._widened is not None:
            raise LoraError("a control LoRA is loaded already: unload it first")
        cfg = self.pipe.autoencoder.config
        if adapter.in_channels != 2 * 4 * cfg.latent_channels:
            raise LoraError(f"the LoRA widens img_in to {adapter.in_channels} inputs; a control model of this "
                            f"autoencoder reads {8 * cfg.latent_channels}")

    def _widen(self, adapter: Adapter) -> None:
        """A control LoRA: img_in reads the control image's latents too (zero weights for them, then the LoRA)."""
        t = self.pipe.transformer
        old = t.img_in.weight
        wide = torch.cat([old.detach(), old.new_zeros(old.shape[0], adapter.in_channels - old.shape[1])], dim=1)
        self._widened = (adapter.name, old, t.config.in_channels, self.pipe.kind)
        t.img_in.weight = nn.Parameter(wide, requires_grad=False)
        t.img_in.in_features = adapter.in_channels
        t.config.in_channels, self.pipe.kind = adapter.in_channels, "control"

    def _unwiden(self, name: str) -> None:
        if self._widened is None or self._widened[0] != name:
            return
        _, old, in_channels, kind = self._widened
        t = self.pipe.transformer
        t.img_in.weight = old if isinstance(old, nn.Parameter) else nn.Parameter(old, requires_grad=False)
        t.img_in.in_features = old.shape[1]
        t.config.in_channels, self.pipe.kind = in_channels, kind
        self._widened = None
        self._originals.pop(("transformer", "img_in"), None)

    def _replace(self, adapter: Adapter) -> None:
        t = self.pipe.transformer
        kept = {}
        for key, tensor in adapter.replacements.items():
            module_name, _, attr = key.rpartition(".")
            module = t.get_submodule(module_name)
            old = getattr(module, attr)
            kept[key] = old
            setattr(module, attr, nn.Parameter(tensor.to(old.device, old.dtype), requires_grad=False))
        self._replaced[adapter.name] = kept

    def _restore_replaced(self, name: str) -> None:
        t = self.pipe.transformer
        for key, old in self._replaced.pop(name, {}).items():
            module_name, _, attr = key.rpartition(".")
            setattr(t.get_submodule(module_name), attr, old)

    # ------------------------------------------------------------------------------------------------------------
    def set(self, names: str | list[str], weights: float | list[float] | None = None) -> None:
        names = [names] if isinstance(names, str) else list(names)
        if weights is None or isinstance(weights, (int, float)):
            weights = [1.0 if weights is None else float(weights)] * len(names)
        weights = list(weights)
        if len(weights) != len(names):
            raise ValueError(f"got {len(weights)} adapter weights for {len(names)} adapters")
        missing = [n for n in names if n not in self.loaded]
        if missing:
            raise ValueError(f"no adapter named {', '.join(map(repr, missing))} is loaded "
                             f"(loaded: {', '.join(self.loaded) or 'none'})")
        for w in weights:
            if not isinstance(w, (int, float)) or w != w or w in (float("inf"), float("-inf")):
                raise ValueError(f"adapter weights must be finite numbers, got {w!r}")
        self.active = names
        self.weights.update(zip(names, map(float, weights), strict=True))

    def delete(self, names: str | Iterable[str]) -> None:
        names = [names] if isinstance(names, str) else list(names)
        missing = [n for n in names if n not in self.loaded]
        if missing:
            raise ValueError(f"no adapter named {', '.join(map(repr, missing))} is loaded")
        if set(names) & set(self.fused):
            self.unfuse()
        for name in names:
            self._restore_replaced(name)
            self._unwiden(name)
            del self.loaded[name], self.sides[name]
            self.weights.pop(name, None)
        self.active = [n for n in self.active if n not in names]
        self._attach_all()

    def unload(self) -> None:
        self.unfuse()
        self.delete(list(self.loaded))

    @contextlib.contextmanager
    def scaled(self, scale: float | None) -> Iterator[None]:
        """During one call: every active adapter's weight times `scale` (joint_attention_kwargs' "scale")."""
        previous, self.call_scale = self.call_scale, 1.0 if scale is None else float(scale)
        try:
            yield
        finally:
            self.call_scale = previous

    # ------------------------------------------------------------------------------------------------------------
    # side products

    def _modules_of(self, names: Iterable[str]) -> set[tuple[str, str]]:
        return {key for n in names for key in self.sides[n]}

    def _attach_all(self) -> None:
        """Hooks exactly on the modules some loaded, unfused adapter changes (re-read from the model, whose modules
        a lazily read block may have replaced)."""
        wanted = self._modules_of(n for n in self.loaded if n not in self.fused)
        for key in list(self._hooks):
            if key not in wanted:
                self._hooks.pop(key)[1].remove()
        models = self.models()
        for component, module_name in wanted:
            self._attach(models[component], component, module_name)

    def _attach(self, model: nn.Module, component: str, module_name: str) -> None:
        module = model.get_submodule(module_name)
        held = self._hooks.get((component, module_name))
        if held is not None and held[0] is module:
            return
        if held is not None:
            held[1].remove()
        key = (component, module_name)
        self._hooks[key] = (module, module.register_forward_hook(lambda m, args, out: self._add(key, args[0], out)))

    def _add(self, key: tuple[str, str], x: Tensor, out: Tensor) -> Tensor:
        for name in self.active:
            side = self.sides[name].get(key)
            weight = self.weights[name] * self.call_scale
            if side is None or name in self.fused or weight == 0:
                continue
            out = side.add_to(out, x, weight)
        return out

    def block_read(self, name: str, block: nn.Module) -> None:
        """A transformer block just read from disk: give it its hooks, and its fused weights."""
        prefix = name + "."
        transformer = self.pipe.transformer
        for component, module_name in list(self._hooks):
            if component == "transformer" and module_name.startswith(prefix):
                self._attach(transformer, component, module_name)
        for component, module_name in self._fused_modules():
            if component == "transformer" and module_name.startswith(prefix):
                self._fuse_module(component, module_name, keep=getattr(transformer.block_weights, "mode", "") !=
                                  "stream")

    # ------------------------------------------------------------------------------------------------------------
    # fusing

    def fuse(self, lora_scale: float = 1.0, adapter_names: list[str] | None = None) -> None:
        names = list(adapter_names) if adapter_names is not None else list(self.active)
        missing = [n for n in names if n not in self.loaded]
        if missing:
            raise ValueError(f"no adapter named {', '.join(map(repr, missing))} is loaded")
        again = [n for n in names if n in self.fused]
        if again:
            raise ValueError(f"{', '.join(map(repr, again))} fused already: unfuse_lora() first")
        self._check_fusable(names)
        for n in names:
            self.fused[n] = self.weights.get(n, 1.0) * float(lora_scale)
        models = self.models()
        on_disk = getattr(self.pipe.transformer.block_weights, "on_disk", lambda unit: False)
        # weights that outlive the call take their own mappings, not the heap the activations reuse
        with weights_in_their_own_mappings():
            for component, module_name in self._modules_of(names):
                unit = ".".join(module_name.split(".")[:2])
                if component == "transformer" and on_disk(unit):
                    continue  # merged when the block is read
                if models[component].get_submodule(module_name).weight.is_meta:
                    continue
                self._fuse_module(component, module_name, keep=True)
        self._attach_all()

    def _fused_modules(self) -> set[tuple[str, str]]:
        return self._modules_of(self.fused)

    def _check_fusable(self, names: list[str]) -> None:
        from ..quantize.gguf import GGUFLinear
        from ..quantize.linear import QuantizedLinear
        from ..quantize.nf4 import BnbLinear

        transformer = self.pipe.transformer
        for component, module_name in self._modules_of(names):
            module = self.models()[component].get_submodule(module_name)
            if isinstance(module, (GGUFLinear, BnbLinear)):
                form = f"GGUF {module.qtype.name}" if isinstance(module, GGUFLinear) else "bitsandbytes 4-bit"
                raise ValueError(f"{module_name} holds {form} weights, which cannot be written back after a merge: "
                                 "use the LoRA unfused")
            if isinstance(module, QuantizedLinear) and getattr(transformer, "checkpoint", None) is None:
                raise ValueError(f"{module_name} holds 8-bit weights whose float weights are not at hand (an 8-bit "
                                 "file): use the LoRA unfused")

    def _fuse_module(self, component: str, module_name: str, keep: bool) -> None:
        """Merge every fused adapter's change of one module into its weights (from the originals, so merging twice
        never accumulates)."""
        from ..quantize.linear import QuantizedLinear, quantize_weight

        module = self.models()[component].get_submodule(module_name)
        key = (component, module_name)
        quantized = isinstance(module, QuantizedLinear)
        names = ("weight", "weight_scale", "bias") if quantized else ("weight", "bias")
        if key not in self._originals:
            original = {n: getattr(module, n).detach() for n in names if getattr(module, n, None) is not None}
            if keep:
                self._originals[key] = {n: t.to("cpu", copy=True) for n, t in original.items()}
        else:
            original = self._originals[key]
        if quantized:
            weight = self._float_weight(module_name)
        else:
            weight = original["weight"].float()
        weight = weight.to(module.weight.device)
        bias = original["bias"].float().to(weight.device) if "bias" in original else None
        for name, scale in self.fused.items():
            side = self.sides[name].get(key)
            if side is None:
                continue
            change = side.delta_weight(weight.shape[0])
            if change is not None:
                weight = weight + scale * change.to(weight.device)
            if side.bias is not None and bias is not None:
                bias = bias + scale * side.bias.to(weight.device)
        if quantized:
            codes, scales = quantize_weight(weight, module.weights)
            module.weight, module.weight_scale = codes.to(module.weight.device), scales.to(module.weight.device)
        else:
            module.weight = nn.Parameter(weight.to(original["weight"].dtype), requires_grad=module.weight.requires_grad)
        if bias is not None:
            module.bias = nn.Parameter(bias.to(original["bias"].dtype), requires_grad=module.bias.requires_grad)

    def _float_weight(self, module_name: str) -> Tensor:
        """The float weight of a quantised module, read again from the transformer's checkpoint."""
        units = self.pipe.transformer.checkpoint
        unit = ".".join(module_name.split(".")[:2]) if module_name.startswith(("double_blocks.", "single_blocks.")) \
            else module_name.split(".")[0]
        if module_name + ".weight" in getattr(units, "bnb", {}):  # a bitsandbytes 4-bit weight, quantised again
            return units.bnb_weight(module_name + ".weight", dequantized=True)[module_name + ".weight"]
        state = units.read(unit)
        name = module_name[len(unit) + 1:]
        weight = state[name + ".weight"]
        qtype = getattr(units, "quantized", {}).get(module_name + ".weight")
        if qtype is not None and weight.dtype == torch.uint8:  # a GGUF file's bytes, quantised again at load
            from ..quantize.gguf import dequantize

            return dequantize(weight, qtype, units.shape(module_name + ".weight"))
        weight = weight.float()
        if name + ".weight_scale" in state:  # a float8 file's weights, kept as stored beside their scales
            weight = weight * state[name + ".weight_scale"].float()[:, None]
        return weight

    def unfuse(self) -> None:
        """Put back the weights every fused module had before (kept copies: exact, never by subtracting)."""
        if not self.fused:
            return
        models = self.models()
        with weights_in_their_own_mappings():
            self._put_back(models)
        self._originals.clear()
        self.fused.clear()
        self._attach_all()

    def _put_back(self, models: dict[str, nn.Module]) -> None:
        for (component, module_name), original in self._originals.items():
            module = models[component].get_submodule(module_name)
            for n, t in original.items():
                current = getattr(module, n)
                t = t.to(current.device)
                if isinstance(current, nn.Parameter):
                    setattr(module, n, nn.Parameter(t, requires_grad=current.requires_grad))
                else:
                    setattr(module, n, t)
