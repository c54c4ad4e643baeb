"""Reading blocks lazily or streaming them, the fused-kernel helpers, and the opt-in step cache."""

import pytest
import torch
import torch.nn.functional as F
from test_transformer import CONFIGS, diffusers_forward, make_inputs, ours_forward, random_diffusers, rel_err

from rectiflux.flux.layers import apply_rope, linear_of_concat, rope, rope_rotations, rotate, rotate_joint
from rectiflux.sampling.cache import FirstBlockCache
from rectiflux.weights.checkpoint import CheckpointError, read_rows, read_spans
from rectiflux.weights.transformer import load_transformer, save_transformer


@pytest.fixture(scope="module")
def dev_like(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dev-like")
    ref = random_diffusers(CONFIGS["dev-like"])
    ref.save_pretrained(folder)
    bfl = folder.parent / "dev-like-bfl.safetensors"
    save_transformer(load_transformer(folder), bfl, layout="bfl")
    return ref, folder, bfl


def block_devices(model) -> set[str]:
    return {p.device.type for block in [*model.double_blocks, *model.single_blocks] for p in block.parameters()}


@pytest.mark.parametrize("blocks", ["memory", "lazy", "stream"])
@pytest.mark.parametrize("layout", ["diffusers", "bfl"])
def test_every_block_mode_matches_diffusers(dev_like, blocks, layout):
    ref, folder, bfl = dev_like
    model = load_transformer(folder if layout == "diffusers" else bfl, blocks=blocks)
    final_layer = {p.device.type for p in model.final_layer.parameters()}
    if blocks != "memory":
        assert block_devices(model) == final_layer == {"meta"}  # nothing of the blocks was read at load
    inputs = make_inputs(ref)
    expected = diffusers_forward(ref, inputs)
    for _ in range(2):  # the second call reuses the lazy blocks and re-reads the streamed ones
        assert rel_err(ours_forward(model, inputs), expected) < 1e-5
        final_layer = {p.device.type for p in model.final_layer.parameters()}
        assert block_devices(model) == final_layer == ({"meta"} if blocks == "stream" else {"cpu"})


def test_lazy_model_materializes_and_casts(dev_like):
    ref, folder, _ = dev_like
    model = load_transformer(folder, blocks="lazy", dtype="bfloat16").materialize()
    assert model.block_weights is None and block_devices(model) == {"cpu"}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="keeps its blocks on disk"):
        load_transformer(folder, blocks="stream").materialize()
    with pytest.raises(ValueError, match="blocks mode"):
        load_transformer(folder, blocks="sometimes")


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_lazy_blocks_map_only_on_the_cpu_and_read_ahead_elsewhere(dev_like, device, monkeypatch):
    """On the CPU a lazy block maps the file; on any other device (meta stands in for a GPU: CI has none) the
    block is copied there, so it is read into fresh memory, and the next block is read meanwhile."""
    bfl = dev_like[2]
    model = load_transformer(bfl, blocks="lazy")
    weights = model.block_weights
    calls = []
    read = weights.units.read
    monkeypatch.setattr(weights.units, "read", lambda unit, mapped=False: calls.append((unit, mapped)) or
                        read(unit, mapped=mapped))
    weights.before("double_blocks.0", model.double_blocks[0], torch.device(device))
    if weights.pending is not None:
        weights.pending[1].result()
    if device == "cpu":
        assert calls == [("double_blocks.0", True)] and weights.pending is None
    else:
        assert calls == [("double_blocks.0", False), ("double_blocks.1", False)]
        assert weights.pending[0] == "double_blocks.1"
    assert block_devices(model) >= {device}
    weights.before("double_blocks.1", model.double_blocks[1], torch.device(device))
    if weights.pending is not None:  # the block after it, being read ahead in the background
        weights.pending[1].result()
    # the block read ahead is used, not read again
    assert [c for c in calls if c[0] == "double_blocks.1"] == [("double_blocks.1", device == "cpu")]


@pytest.mark.parametrize("layout", ["diffusers", "bfl"])
def test_streamed_blocks_on_the_cpu_use_the_mapped_file_and_give_its_pages_back(dev_like, layout, monkeypatch):
    import rectiflux.weights.offload as offload

    ref, folder, bfl = dev_like
    model = load_transformer(folder if layout == "diffusers" else bfl, blocks="stream")
    weights = model.block_weights
    advised = []
    monkeypatch.setattr(offload, "advise_mapped",
                        lambda tensors, advice: advised.append((advice, {t.data_ptr() for t in tensors})))
    inputs = make_inputs(ref)
    assert rel_err(ours_forward(model, inputs), diffusers_forward(ref, inputs)) < 1e-5
    if weights.pending is not None:
        weights.pending[1].result()
    names = list(weights.next)
    views = {name: {t.data_ptr() for t in weights.units.mapped_tensors(name)} for name in names}
    assert all(views.values())  # every block has tensors used as stored (in the diffusers layout, not q/k/v)
    assert [a for a in advised if a[0] == "drop"] == [("drop", views[name]) for name in names]
    assert [a for a in advised if a[0] == "populate"] == [("populate", views[name]) for name in [*names[1:], names[0]]]


def test_pages_are_never_given_back_unless_the_tensors_are_really_file_mappings(dev_like, monkeypatch):
    import rectiflux.weights.offload as offload
    import rectiflux.weights.transformer as transformer_weights

    ref, _, bfl = dev_like
    monkeypatch.setattr(transformer_weights, "file_backed", lambda tensors: False)  # as if safetensors had copied
    model = load_transformer(bfl, blocks="stream")
    advised = []
    monkeypatch.setattr(offload, "advise_mapped", lambda tensors, advice: advised.extend(tensors))
    inputs = make_inputs(ref)
    assert rel_err(ours_forward(model, inputs), diffusers_forward(ref, inputs)) < 1e-5
    assert advised == [] and model.block_weights.units.mapped_tensors("double_blocks.0") == []


def test_streamed_blocks_are_copied_where_mapped_pages_cannot_be_given_back(dev_like, monkeypatch):
    import rectiflux.weights.offload as offload

    ref, _, bfl = dev_like
    monkeypatch.setattr(offload, "CAN_DROP_MAPPED_PAGES", False)  # as on macOS or Windows
    model = load_transformer(bfl, blocks="stream")
    reads = []
    read = model.block_weights.units.read
    monkeypatch.setattr(model.block_weights.units, "read", lambda unit, mapped=False: reads.append(mapped) or
                        read(unit, mapped=mapped))
    inputs = make_inputs(ref)
    assert rel_err(ours_forward(model, inputs), diffusers_forward(ref, inputs)) < 1e-5
    assert reads and not any(reads)
    assert load_transformer(bfl, blocks="lazy").block_weights.mapped  # a lazy model keeps its pages anyway


@pytest.mark.parametrize("blocks", ["lazy", "stream"])
def test_mismatched_checkpoint_is_refused_at_load(tmp_path, dev_like, blocks):
    _, _, bfl = dev_like
    from safetensors.torch import load_file, save_file

    state = load_file(bfl)
    state["single_blocks.1.linear2.weight"] = state["single_blocks.1.linear2.weight"][:, :-1].contiguous()
    del state["double_blocks.0.img_mlp.0.bias"]
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="missing double_blocks.0.img_mlp.0.bias.*wrong shape single_blocks.1"):
        load_transformer(tmp_path / "bad.safetensors", blocks=blocks, axes_dim=(4, 6, 6))


def test_read_rows_joins_row_ranges_of_stored_tensors(tmp_path):
    from safetensors.torch import save_file

    a, b = torch.randn(5, 3), torch.randn(4, 3).to(torch.bfloat16).float()
    save_file({"a": a, "b": b, "c": torch.arange(6, dtype=torch.int8)}, tmp_path / "x.safetensors")
    spans = read_spans(tmp_path / "x.safetensors")
    assert spans["a"].shape == (5, 3) and spans["c"].dtype == torch.int8
    joined = read_rows([(spans["b"], 1, 4), (spans["a"], 0, 2)])
    assert torch.equal(joined, torch.cat([b[1:4], a[:2]]))
    assert torch.equal(read_rows([(spans["c"], 2, 5)]), torch.tensor([2, 3, 4], dtype=torch.int8))
    data = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "short.safetensors").write_bytes(data[:-20])
    with pytest.raises(CheckpointError, match="cannot read"):
        read_spans(tmp_path / "short.safetensors")


def test_complex_rotation_equals_the_reference_rope():
    ids = torch.stack([torch.zeros(40), torch.arange(40.0) // 5, torch.arange(40.0) % 5 + 100], dim=-1)
    cos, sin = rope(ids, (8, 12, 12), 10_000)
    x = torch.randn(2, 3, 40, 32)  # (B, H, L, D) for apply_rope; rotate takes (B, L, H, D)
    expected = apply_rope(x, cos, sin)
    rotations = rope_rotations(ids, (8, 12, 12), 10_000)[:, None, :]
    assert torch.allclose(rotate(x.transpose(1, 2), rotations).transpose(1, 2), expected, atol=1e-6)
    out = torch.empty(2, 40, 3, 32, dtype=torch.bfloat16)
    assert rotate(x.transpose(1, 2).contiguous(), rotations, out=out) is out
    assert torch.allclose(out.float().transpose(1, 2), expected, atol=1e-2)
    streams = [x.transpose(1, 2)[:, :15], x.transpose(1, 2)[:, 15:]]
    with torch.no_grad():  # written in place into one joint tensor
        joint = rotate_joint(streams, rotations)
    assert torch.allclose(joint.transpose(1, 2), expected, atol=1e-6)
    grad_x = x.transpose(1, 2).clone().requires_grad_()
    rotate_joint([grad_x[:, :15], grad_x[:, 15:]], rotations).sum().backward()  # autograd: concatenated instead
    assert grad_x.grad is not None and torch.isfinite(grad_x.grad).all()


def test_linear_of_concat_equals_the_linear_of_the_concatenation():
    linear = torch.nn.Linear(7 + 5, 4)
    parts = [torch.randn(2, 3, 7), torch.randn(2, 3, 5)]
    expected = F.linear(torch.cat(parts, -1), linear.weight, linear.bias)
    with torch.no_grad():
        assert torch.allclose(linear_of_concat(linear, parts), expected, atol=1e-6)
    assert torch.allclose(linear_of_concat(linear, parts), expected, atol=1e-6)  # autograd path


def test_cache_threshold_zero_never_skips_and_a_repeated_step_is_reused(dev_like):
    ref, folder, _ = dev_like
    model = load_transformer(folder)
    inputs = make_inputs(ref)
    plain = ours_forward(model, inputs)
    off = FirstBlockCache(0.0)
    for _ in range(3):
        assert torch.equal(ours_forward(model, {**inputs, "cache": off}), plain)
    assert off.skipped == 0 and off.computed == 3
    cache = FirstBlockCache(0.05)
    first = ours_forward(model, {**inputs, "cache": cache})
    again = ours_forward(model, {**inputs, "cache": cache})  # same input: no change, so the blocks are skipped
    assert cache.skipped == 1 and cache.computed == 1
    assert torch.equal(first, plain) and rel_err(again, plain) < 1e-5
    moved = {**inputs, "img": inputs["img"] + 3.0}  # a large change runs every block again
    assert rel_err(ours_forward(model, {**moved, "cache": cache}), ours_forward(model, moved)) < 1e-6
    assert cache.computed == 2
    with pytest.raises(ValueError, match="threshold"):
        FirstBlockCache(-0.1)


def test_cache_change_accumulates_over_skipped_steps():
    cache = FirstBlockCache(0.25)
    base = torch.ones(1, 4, 8)
    assert cache.lookup(base) is None  # nothing stored yet
    cache.store(torch.full((1, 4, 8), 2.0))
    hits = [cache.lookup(base * (1 + 0.1 * (i + 1))) is not None for i in range(4)]
    # relative changes of about 0.1, 0.09, 0.08: the sum passes 0.25 at the third step
    assert hits[:2] == [True, True] and hits[2] is False
