"""Sampling: the noise schedule (`schedule`), latents in the transformer's shapes (`latents`), the step cache
(`cache`) and the one denoising loop (`denoise`)."""
