"""Weights: checkpoint I/O (`checkpoint`), the one BFL <-> diffusers name table (`layout`), the loaders of each
model, blocks read on demand (`offload`), and where models come from (`sources`: folders, BFL files, the HF cache,
the embedded models)."""
