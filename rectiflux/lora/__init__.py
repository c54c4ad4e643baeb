"""LoRA: community formats read into one form (`formats`) and applied to a pipeline's models, side by side or
fused (`adapters`); `FluxPipeline.load_lora_weights` and friends are the API."""
