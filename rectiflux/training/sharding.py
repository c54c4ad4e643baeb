"""FSDP2 for the trainers (`--fsdp`): models sharded over the processes, and checkpoints written in shards.

`shard` applies `torch.distributed.fsdp.fully_shard` to a model's units (each transformer block, each level of
the autoencoder) and then to its root, so every parameter becomes a DTensor sharded on its first dimension over
one mesh of all the processes (gloo on CPU, NCCL on CUDA). Because the placement of a parameter does not depend on
which unit holds it, two models sharded alike (the model and its EMA) hold the same rows of each tensor on each
rank, and elementwise work on them (the EMA's lerp, AdamW) runs on the local shards as it would on whole tensors.

A sharded checkpoint is a folder of safetensors files, one per rank and step, and a JSON manifest that commits
them: every rank writes its shard (atomically), all wait, rank 0 replaces the manifest (atomically), all wait, and
only then are the older shards removed. A process killed at any moment leaves a manifest that names a complete
set of shards. The manifest records the world size and the global shape of every tensor, checked on resume.
"""

from __future__ import annotations

import copy
import itertools
import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import Tensor, nn

from ..weights.checkpoint import read_json, save_state_dict, write_json

MANIFEST = "checkpoint.json"  # beside the unsharded runs' checkpoint.safetensors
SHARD_DIR = "checkpoint-shards"
FORMAT = "rectiflux-sharded-checkpoint"
_SHARD_NAME = re.compile(r"^\.?(\d+)-rank(\d+)-of-(\d+)\.safetensors")


def _fsdp():
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard
    except ImportError:  # torch < 2.6 kept it private
        raise RuntimeError(f"--fsdp needs torch.distributed.fsdp.fully_shard (torch >= 2.6); this is torch "
                           f"{torch.__version__}") from None
    return fully_shard, FSDPModule


def is_dtensor(t: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """This rank's part of a tensor: the local shard of a DTensor (its storage: in-place work on it changes the
    DTensor), a plain tensor itself."""
    return t.to_local() if is_dtensor(t) else t


def full(t: Tensor) -> Tensor:
    """The whole tensor: a DTensor gathered from every rank (a collective: every rank calls it, in the same order),
    a plain tensor itself."""
    return t.full_tensor() if is_dtensor(t) else t


def local_slice(whole: Tensor, like: Tensor) -> Tensor:
    """The rows of `whole` that `like` (a DTensor sharded on dim 0, or a plain tensor) holds on this rank: the
    chunks of torch.chunk, as DTensor's Shard(0) splits, the last ranks' possibly empty."""
    if not is_dtensor(like):
        return whole
    from torch.distributed.tensor import Shard

    if tuple(like.placements) != (Shard(0),):
        raise ValueError(f"expected a tensor sharded on its first dimension, got placements {like.placements}")
    mesh = like.device_mesh
    chunks = torch.chunk(whole, mesh.size(), dim=0)
    rank = mesh.get_local_rank()
    return chunks[rank] if rank < len(chunks) else whole[:0]


def device_mesh(device: torch.device):
    """One dimension over every process, on the device's type (the backend follows: gloo on CPU, NCCL on CUDA)."""
    from torch.distributed.device_mesh import init_device_mesh

    if device.type == "cuda":
        torch.cuda.set_device(device)
    return init_device_mesh(device.type, (dist.get_world_size(),))


def units_of(model: nn.Module) -> list[nn.Module]:
    """The pieces sharded as units of their own: the transformer's blocks, the autoencoder's levels."""
    from ..flux.autoencoder import AutoEncoder
    from ..flux.transformer import Flux

    if isinstance(model, Flux):
        return [*model.double_blocks, *model.single_blocks]
    if isinstance(model, AutoEncoder):
        return [*model.encoder.down, *model.decoder.up]
    return []


def shard(root: nn.Module, units: Iterable[nn.Module], mesh, frozen: bool = False) -> nn.Module:
    """fully_shard each unit, then the root (which takes every parameter left). A frozen model (an EMA, a teacher:
    no backward) frees its gathered weights after each forward, the root's too."""
    fully_shard, FSDPModule = _fsdp()
    # the trainers use a sharded root's output out of place (in a loss): the in-place hazard it warns of is not here
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    for unit in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=True)
    fully_shard(root, mesh=mesh, reshard_after_forward=True if frozen else None)
    if dist.get_backend() == "gloo":
        # sum, then divide by the world size (as DDP does), rather than asking gloo for an average
        for module in root.modules():
            if isinstance(module, FSDPModule) and hasattr(module, "set_force_sum_reduction_for_comms"):
                module.set_force_sum_reduction_for_comms(True)
    return root


def meta_copy(module: nn.Module) -> nn.Module:
    """The module's structure and settings with its tensors on the meta device: a copy that costs no memory, from
    which sharded or whole copies are built. Functions and sources it refers to are shared, not copied."""
    memo: dict[int, object] = {}
    for t in itertools.chain(module.parameters(), module.buffers()):
        empty = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else empty
    for name in ("attention", "checkpoint", "block_weights"):
        if hasattr(module, name):
            value = getattr(module, name)
            memo[id(value)] = value
    return copy.deepcopy(module, memo)


def _tensors(module: nn.Module) -> dict[str, Tensor]:
    return dict(itertools.chain(module.named_parameters(), module.named_buffers()))


def sharded_copy(skeleton: nn.Module, source: nn.Module, mesh, device: torch.device, frozen: bool = True,
                 shard_root: bool = True) -> nn.Module:
    """A copy of `source` sharded like it: the skeleton's structure, sharded on the meta device, then given this
    rank's rows of every tensor of `source` (sharded: its local shards; whole: the rows this rank keeps). With
    `shard_root=False` only the units are sharded (the caller shards a root above it)."""
    module = copy.deepcopy(skeleton)
    units = units_of(module)
    if shard_root:
        shard(module, units, mesh, frozen=frozen)
    else:
        fully_shard, _ = _fsdp()
        for unit in units:
            fully_shard(unit, mesh=mesh, reshard_after_forward=True)
    module.to_empty(device=device)
    targets, sources = _tensors(module), _tensors(source)
    if targets.keys() != sources.keys():
        raise ValueError("the copy's tensors are not the model's")
    with torch.no_grad():
        for name, target in targets.items():
            value = sources[name]
            value = local(value) if is_dtensor(value) else local_slice(value.to(device), target)
            local(target).copy_(value)
    return module


def whole_copy(skeleton: nn.Module, sharded: nn.Module, keep: bool) -> nn.Module | None:
    """The sharded module gathered into a plain one of the skeleton's structure, on `keep`'s rank (the others
    take part in the gathering, one tensor at a time, and get None)."""
    state = {}
    for name, t in sharded.state_dict().items():
        value = full(t.detach())
        if keep:
            state[name] = value
    if not keep:
        return None
    module = copy.deepcopy(skeleton)
    module.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in _tensors(module).items() if t.is_meta]
    if left:
        raise RuntimeError(f"{left[0]} was not gathered")
    return module


def release(module: nn.Module) -> None:
    """Drop a module's weights (to the meta device), keeping its structure, to be given back by `restore`."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None:
                sub._parameters[name] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for name, b in list(sub._buffers.items()):
            if b is not None:
                sub._buffers[name] = torch.empty_like(b, device="meta")


def restore(module: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Give a released module its weights back, gathered from a sharded copy's state (collective)."""
    module.load_state_dict({name: full(t.detach()) for name, t in state.items()}, strict=True, assign=True)


# ----------------------------------------------------------------------------------------------------------------
# sharded checkpoints

def shard_name(step: int, rank: int, world: int) -> str:
    return f"{step:08d}-rank{rank}-of-{world}.safetensors"


def save_sharded(folder: Path, step: int, state: Mapping[str, Tensor], metadata: Mapping[str, str]) -> Path:
    """Every rank writes its part of `state` (DTensors' local shards, plain tensors whole); rank 0 then commits
    them with the manifest. Collective: every rank calls it with the same keys."""
    rank, world = dist.get_rank(), dist.get_world_size()
    shards = folder / SHARD_DIR
    file = shards / shard_name(step, rank, world)
    save_state_dict({k: local(v) for k, v in state.items()}, file,
                    {"format": "pt", "step": str(step), "rank": str(rank), "world_size": str(world)})
    dist.barrier()  # every shard of this step is on disk
    manifest = folder / MANIFEST
    if rank == 0:
        write_json({"format": FORMAT, "step": step, "world_size": world,
                    "files": [f"{SHARD_DIR}/{shard_name(step, r, world)}" for r in range(world)],
                    "shapes": {k: list(v.shape) for k, v in state.items()}, **metadata}, manifest)
    dist.barrier()  # the manifest names this step's shards: the older ones can go
    for old in shards.iterdir():
        found = _SHARD_NAME.match(old.name)
        if not found:
            continue
        old_step, old_rank, old_world = (int(g) for g in found.groups())
        mine = old_rank == rank and old_world == world
        other_world = old_world != world and rank == 0  # what a run of another size left: nobody writes those now
        if (mine and old_step != step) or (mine and old.name.startswith(".")) or other_world:
            old.unlink(missing_ok=True)
    return manifest


def checkpoint_path(out: Path, sharded: bool) -> Path:
    """A run's checkpoint: the kind it writes, unless only the other kind is there (check_kind then refuses it)."""
    manifest, whole = out / MANIFEST, out / "checkpoint.safetensors"
    mine, other = (manifest, whole) if sharded else (whole, manifest)
    return other if other.exists() and not mine.exists() else mine


def check_kind(path: Path, sharded: bool, world: int) -> None:
    """A checkpoint resumes a run of its kind: a sharded one a sharded run, an unsharded one an unsharded run."""
    if path.suffix == ".json" and not sharded:
        written = read_json(path).get("world_size", "several")
        raise ValueError(f"{path} was written sharded by {written} processes and this run is unsharded "
                         f"({world} process{'es' if world > 1 else ''}): resume it with --fsdp under {written}")
    if path.suffix != ".json" and sharded:
        raise ValueError(f"{path} was written by an unsharded run: resume it without --fsdp")


def read_manifest(path: Path, world: int) -> dict:
    """The manifest of a sharded checkpoint, refused (one line) unless written by `world` processes."""
    manifest = read_json(path)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a sharded rectiflux checkpoint")
    if manifest["world_size"] != world:
        raise ValueError(f"{path} was written by {manifest['world_size']} processes and this run has {world}: resume "
                         f"it under the same number (torchrun --nproc-per-node {manifest['world_size']})")
    return manifest


def check_shapes(path: Path, manifest: dict, shapes: Mapping[str, tuple[int, ...]], required: Iterable[str]) -> None:
    """Every tensor of the checkpoint has a place of its shape in the run, and every required tensor is there."""
    saved = manifest["shapes"]
    for name, shape in saved.items():
        if name not in shapes:
            raise ValueError(f"{path} holds {name}, which this run's model does not have: it was written for "
                             "another model")
        if tuple(shape) != tuple(shapes[name]):
            raise ValueError(f"{path} holds {name} of shape {tuple(shape)} where this run's is "
                             f"{tuple(shapes[name])}: it was written for another model or config")
    missing = [n for n in required if n not in saved]
    if missing:
        raise ValueError(f"{path} lacks {missing[0]} ({len(missing)} tensors of this run's model missing)")


def load_sharded(path: Path, manifest: dict, targets: Mapping[str, Tensor]) -> None:
    """Copy this rank's shard into `targets` (DTensors: their local shards; plain tensors: whole), in place."""
    rank = dist.get_rank()
    file = path.parent / manifest["files"][rank]
    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata() or {}
        if (meta.get("step"), meta.get("rank"), meta.get("world_size")) != (str(manifest["step"]), str(rank),
                                                                             str(manifest["world_size"])):
            raise ValueError(f"{file} is not rank {rank}'s shard of step {manifest['step']}")
        keys = set(f.keys())
        with torch.no_grad():
            for name in manifest["shapes"]:
                if name not in keys:
                    raise ValueError(f"{file} lacks {name}")
                value, target = f.get_tensor(name), local(targets[name])
                if value.shape != target.shape:
                    raise ValueError(f"{file} holds {name}'s rows of shape {tuple(value.shape)} where this rank "
                                     f"keeps {tuple(target.shape)}")
                target.copy_(value)
