"""The transformer's configuration: a small dataclass, read off a checkpoint by `rectiflux.weights`."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FluxConfig:
    in_channels: int = 64  # 64 packed latents; Fill adds 320 channels of conditioning, Canny/Depth 64
    out_channels: int | None = None  # None: same as in_channels
    num_heads: int = 24
    head_dim: int = 128
    depth: int = 19  # double-stream blocks
    depth_single: int = 38
    mlp_ratio: float = 4.0
    joint_attention_dim: int = 4096  # T5 width
    pooled_projection_dim: int = 768  # CLIP pooled width
    axes_dim: tuple[int, ...] = field(default=(16, 56, 56))
    theta: int = 10_000
    guidance_embed: bool = True

    def __post_init__(self) -> None:
        self.axes_dim = tuple(self.axes_dim)
        if self.out_channels is None:
            self.out_channels = self.in_channels
        if sum(self.axes_dim) != self.head_dim or any(a % 2 for a in self.axes_dim):
            raise ValueError(f"RoPE axes {self.axes_dim} must be even and sum to head_dim {self.head_dim}")

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @classmethod
    def from_diffusers(cls, cfg: dict) -> FluxConfig:
        """From a diffusers `FluxTransformer2DModel` config.json dict."""
        if cfg.get("patch_size", 1) != 1:
            raise ValueError(f"patch_size {cfg['patch_size']} is not FLUX.1 (expected 1)")
        return cls(
            in_channels=cfg.get("in_channels", 64), out_channels=cfg.get("out_channels"),
            num_heads=cfg.get("num_attention_heads", 24), head_dim=cfg.get("attention_head_dim", 128),
            depth=cfg.get("num_layers", 19), depth_single=cfg.get("num_single_layers", 38),
            joint_attention_dim=cfg.get("joint_attention_dim", 4096),
            pooled_projection_dim=cfg.get("pooled_projection_dim", 768),
            axes_dim=tuple(cfg.get("axes_dims_rope", (16, 56, 56))), guidance_embed=cfg.get("guidance_embeds", False),
        )

    def to_diffusers(self) -> dict:
        return {
            "_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": self.in_channels,
            "out_channels": self.out_channels, "num_layers": self.depth, "num_single_layers": self.depth_single,
            "attention_head_dim": self.head_dim, "num_attention_heads": self.num_heads,
            "joint_attention_dim": self.joint_attention_dim, "pooled_projection_dim": self.pooled_projection_dim,
            "guidance_embeds": self.guidance_embed, "axes_dims_rope": list(self.axes_dim),
        }
