"""The opt-in step cache: skip the transformer's later blocks on denoising steps whose first block changed little."""

from __future__ import annotations

from torch import Tensor


class FirstBlockCache:
    """Opt-in step cache (first-block caching): skip the transformer's blocks after the first on steps where the
    first double block's image residual has barely changed, adding instead what those blocks added at the last
    step that ran them all.

    The change is the mean absolute difference of the first block's residual from the previous step's, relative
    to the previous one's mean magnitude; it accumulates over skipped steps, so a run of small changes still
    triggers a full step once their sum reaches `threshold` (TeaCache's rule). 0 never skips; FLUX users run
    0.05-0.25 (`python -m benchmarks.cache` measures speed and PSNR). Use one cache per sequence of steps: a
    true-CFG sampler keeps one for the conditional and one for the negative prompt.
    """

    def __init__(self, threshold: float):
        if not threshold >= 0:
            raise ValueError(f"cache threshold must be >= 0, got {threshold}")
        self.threshold = threshold
        self.previous: Tensor | None = None  # the first block's residual at the previous step
        self.rest: Tensor | None = None  # what the other blocks added at the last fully computed step
        self.accumulated = 0.0
        self.skipped = self.computed = 0

    def lookup(self, first_residual: Tensor) -> Tensor | None:
        """The residual to reuse for this step, or None when the step must run every block."""
        previous, self.previous = self.previous, first_residual
        if previous is None or self.rest is None or previous.shape != first_residual.shape:
            return None
        change = ((first_residual - previous).abs().mean() / previous.abs().mean().clamp_min(1e-12)).item()
        self.accumulated += change
        if self.accumulated >= self.threshold:
            return None
        self.skipped += 1
        return self.rest

    def store(self, rest_residual: Tensor) -> None:
        self.rest, self.accumulated = rest_residual, 0.0
        self.computed += 1
