"""Training: the rectified-flow and autoencoder objectives and the resumable, distributed `Trainer`."""

# our module names ending so: the attention and MLP projections of every block, what LoRA trainers adapt by default
# (here, where the command line can read them without importing torch)
DEFAULT_TARGETS = ("attn.qkv", "attn.proj", "mlp.0", "mlp.2", "linear1", "linear2")
