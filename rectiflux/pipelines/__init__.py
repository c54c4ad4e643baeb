"""Pipelines: `FluxPipeline` (`flux.py`) with the stages every task shares, one small module per task
(`text_to_image`, `fill`, `control`, `kontext`, and the Redux prior in `redux`), and `load`."""
