"""FLUX's two text encoders: CLIP-L for the pooled vector, T5 for the token sequence.

Both models are written here (CLIPTextEncoder, T5Encoder; `rectiflux.weights.text_encoders` reads them with
safetensors); the tokenizers are transformers' fast ones. The models compute what transformers' CLIPTextModel and
T5EncoderModel compute, operation for operation (so bfloat16 and float16 round the same way), without transformers'
model machinery: importing and loading it was most of a pipeline's load time. `encode` reproduces diffusers'
`FluxPipeline.encode_prompt` bit for bit, except that a prompt too long for T5 is an error instead of a silent
truncation: T5 carries everything the image is conditioned on, so a dropped tail is a dropped instruction. CLIP
still truncates at 77 tokens without a word, as everywhere else: only its pooled summary is used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import CLIPTokenizerFast, T5TokenizerFast

MAX_T5_LENGTH = 512  # T5's relative positions were trained up to this length; diffusers refuses more too


def quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


def gelu_tanh(x: Tensor) -> Tensor:
    """GELU's tanh approximation, written out as T5 (and GPT-2) compute it: in the input's dtype, op by op."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu, "gelu_new": gelu_tanh, "gelu_pytorch_tanh": gelu_tanh,
               "relu": F.relu}


def _activation(name: str, what: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"{what}: activation {name!r} is not supported (known: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


def _embedding(n: int, d: int) -> nn.Embedding:
    """An uninitialised embedding: the models are built on the meta device and filled from checkpoints, and
    nn.Embedding's own normal_ init on meta goes through torch's reference ops, which import torch._dynamo
    (1.4 s, measured: it was most of a pipeline's load time)."""
    return nn.Embedding(n, d, _weight=torch.empty(n, d))


# ---------------------------------------------------------------------------------------------------------------
# CLIP text encoder

@dataclass
class CLIPConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_positions: int
    eps: float
    activation: str
    eos_token_id: int

    @classmethod
    def from_transformers(cls, d: dict) -> CLIPConfig:
        d = d.get("text_config", d)
        return cls(vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
                   num_layers=d["num_hidden_layers"], num_heads=d["num_attention_heads"],
                   max_positions=d["max_position_embeddings"], eps=d.get("layer_norm_eps", 1e-5),
                   activation=d.get("hidden_act", "quick_gelu"), eos_token_id=d.get("eos_token_id", 2))


class CLIPLayer(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads, self.act = cfg.num_heads, _activation(cfg.activation, "CLIP")
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(d, eps=cfg.eps), nn.LayerNorm(d, eps=cfg.eps)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, cfg.intermediate_size), nn.Linear(cfg.intermediate_size, d)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        h = self.layer_norm1(x)
        q, k, v = (proj(h).view(b, n, self.num_heads, -1).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=(d // self.num_heads) ** -0.5)
        x = x + self.out_proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(self.act(self.fc1(self.layer_norm2(x))))


class CLIPTextEncoder(nn.Module):
    """CLIP's text transformer (causal attention, no padding mask, as FLUX runs it).

    `forward(ids)` returns (last hidden states, pooled): the final-normed state at the end-of-text token.
    Configs whose eos_token_id is 2 (the original CLIP-L's, FLUX's included) mark the end by the largest id
    instead, as the reference does for them.
    """

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.config = cfg
        self.token_embedding = _embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = _embedding(cfg.max_positions, cfg.hidden_size)
        self.layers = nn.ModuleList(CLIPLayer(cfg) for _ in range(cfg.num_layers))
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps)

    @property
    def device(self) -> torch.device:
        return self.token_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.token_embedding.weight.dtype

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        if ids.shape[-1] > self.config.max_positions:
            raise ValueError(f"CLIP takes at most {self.config.max_positions} tokens, got {ids.shape[-1]}")
        x = self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[-1]][None]
        for layer in self.layers:
            x = layer(x)
        x = self.final_layer_norm(x)
        if self.config.eos_token_id == 2:
            ends = ids.to(torch.int).argmax(dim=-1)
        else:
            ends = (ids.to(torch.int) == self.config.eos_token_id).int().argmax(dim=-1)
        return x, x[torch.arange(x.shape[0], device=x.device), ends]


# ---------------------------------------------------------------------------------------------------------------
# T5 encoder

@dataclass
class T5Config:
    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    num_buckets: int
    max_distance: int
    eps: float
    activation: str
    gated: bool

    @classmethod
    def from_transformers(cls, d: dict) -> T5Config:
        proj = d.get("feed_forward_proj", "relu")
        gated = proj.startswith("gated-")
        act = proj.split("-")[-1]
        return cls(vocab_size=d["vocab_size"], d_model=d["d_model"], d_kv=d["d_kv"], d_ff=d["d_ff"],
                   num_layers=d["num_layers"], num_heads=d["num_heads"],
                   num_buckets=d.get("relative_attention_num_buckets", 32),
                   max_distance=d.get("relative_attention_max_distance", 128), eps=d.get("layer_norm_epsilon", 1e-6),
                   activation=d.get("dense_act_fn", "gelu_new" if act == "gelu" else act), gated=gated)


class T5Norm(nn.Module):
    """T5's RMS norm: a float32 mean of squares, the result cast back to a half-precision weight's dtype."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x: Tensor) -> Tensor:
        x = x * torch.rsqrt(x.to(torch.float32).pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


def relative_position_buckets(n: int, num_buckets: int, max_distance: int, device=None) -> Tensor:
    """(n, n) bucket of each key position j seen from query i: half the buckets for j > i, half for j <= i;
    exact distances below num_buckets / 4, log-spaced ones up to max_distance, then one bucket."""
    rel = torch.arange(n, device=device)[None, :] - torch.arange(n, device=device)[:, None]
    half = num_buckets // 2
    buckets = (rel > 0).to(torch.long) * half
    dist = rel.abs()
    exact = half // 2
    log_spaced = exact + (torch.log(dist.float() / exact) / math.log(max_distance / exact)
                          * (half - exact)).to(torch.long)
    log_spaced = torch.minimum(log_spaced, torch.full_like(log_spaced, half - 1))
    return buckets + torch.where(dist < exact, dist, log_spaced)


class T5Layer(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.num_heads, self.act = cfg.num_heads, _activation(cfg.activation, "T5")
        self.attn_norm, self.ff_norm = T5Norm(cfg.d_model, cfg.eps), T5Norm(cfg.d_model, cfg.eps)
        self.q, self.k, self.v = (nn.Linear(cfg.d_model, inner, bias=False) for _ in range(3))
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if cfg.gated:
            self.wi_0, self.wi_1 = (nn.Linear(cfg.d_model, cfg.d_ff, bias=False) for _ in range(2))
        else:
            self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: Tensor, position_bias: Tensor) -> Tensor:
        b, n, _ = x.shape
        h = self.attn_norm(x)
        q, k, v = (proj(h).view(b, n, self.num_heads, -1).transpose(1, 2) for proj in (self.q, self.k, self.v))
        # T5 does not scale q.k: the relative position bias is added to the raw scores
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=position_bias, scale=1.0)
        x = _clamp_half(x + self.o(a.transpose(1, 2).reshape(b, n, -1)))
        h = self.ff_norm(x)
        h = self.act(self.wi_0(h)) * self.wi_1(h) if hasattr(self, "wi_0") else self.act(self.wi(h))
        # wo stays float32 in a float16 model (T5's activations overflow float16 there): feed it its dtype; a GGUF
        # wo (uint8 blocks) computes in the dtype it is fed
        wo_dtype = self.wo.weight.dtype if self.wo.weight.is_floating_point() else \
            torch.float32 if h.dtype == torch.float16 else h.dtype
        return _clamp_half(x + self.wo(h.to(wo_dtype)))


def _clamp_half(x: Tensor) -> Tensor:
    """float16 only: keep overflowed values finite, as the reference does."""
    if x.dtype != torch.float16:
        return x
    big = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), big - 1000, big)
    return torch.clamp(x, min=-limit, max=limit)


class T5Encoder(nn.Module):
    """T5's encoder stack; `forward(ids)` returns the final-normed hidden states (no attention mask: FLUX
    conditions on the padding tokens' states too)."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.config = cfg
        self.shared = _embedding(cfg.vocab_size, cfg.d_model)
        self.relative_attention_bias = _embedding(cfg.num_buckets, cfg.num_heads)
        self.blocks = nn.ModuleList(T5Layer(cfg) for _ in range(cfg.num_layers))
        self.final_layer_norm = T5Norm(cfg.d_model, cfg.eps)

    @property
    def device(self) -> torch.device:
        return self.shared.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.shared.weight.dtype

    def position_bias(self, n: int) -> Tensor:
        buckets = relative_position_buckets(n, self.config.num_buckets, self.config.max_distance, self.device)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)[None]  # (1, heads, n, n)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.shared(ids)
        bias = self.position_bias(ids.shape[-1])
        for block in self.blocks:
            x = block(x, bias)
        return self.final_layer_norm(x)


class TextEncoders:
    """CLIP + T5 with their tokenizers; `encode` gives (prompt_embeds, pooled_prompt_embeds)."""

    def __init__(
        self, clip: CLIPTextEncoder, clip_tokenizer: CLIPTokenizerFast, t5: T5Encoder, t5_tokenizer: T5TokenizerFast
    ) -> None:
        self.clip, self.clip_tokenizer = clip.eval(), clip_tokenizer
        self.t5, self.t5_tokenizer = t5.eval(), t5_tokenizer

    def work(self, prompts: int, max_sequence_length: int) -> int:
        """Multiply-adds of one width x width linear over the larger encoder's tokens (rectiflux.runtime's measure)."""
        return prompts * max(self.clip_tokenizer.model_max_length * self.clip.config.hidden_size ** 2,
                             max_sequence_length * self.t5.config.d_model ** 2)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TextEncoders:
        if device is not None:
            self.clip.to(device)
            self.t5.to(device)
        if dtype is not None:
            self.clip.to(dtype)
            for name, module in self.t5.named_modules():
                # in float16 T5's output projections stay float32, as transformers keeps them (they overflow)
                if not (dtype == torch.float16 and name.endswith(".wo")):
                    for pname, p in module.named_parameters(recurse=False):
                        setattr(module, pname, nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad))
        return self

    def check(self, prompt: str | list[str], prompt_2: str | list[str] | None = None,
              max_sequence_length: int = 512) -> tuple[list[str], list[str]]:
        """Refuse prompts T5 cannot take whole (tokenizers only, no model runs); returns the prompt lists."""
        if not 1 <= max_sequence_length <= MAX_T5_LENGTH:
            raise ValueError(f"max_sequence_length must be between 1 and {MAX_T5_LENGTH}, got {max_sequence_length}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        # `or`, not `is None`, on purpose: diffusers also falls back to prompt for "" and [].
        t5_name = "prompt_2" if prompt_2 else "prompt"
        prompt_2 = prompt_2 or prompt
        prompts_2 = [prompt_2] if isinstance(prompt_2, str) else list(prompt_2)
        if len(prompts_2) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(prompts_2)} prompt_2 values")

        # T5 counts its end-of-sequence token too; that is what has to fit.
        for i, ids in enumerate(self.t5_tokenizer(prompts_2, verbose=False).input_ids):
            if len(ids) > max_sequence_length:
                where = t5_name if len(prompts_2) == 1 else f"{t5_name} {i}"
                raise ValueError(
                    f"{where} is {len(ids)} T5 tokens, longer than max_sequence_length {max_sequence_length}; "
                    f"shorten it or raise --max-sequence-length (at most {MAX_T5_LENGTH})"
                )

        return prompts, prompts_2

    @torch.no_grad()
    def encode(
        self,
        prompt: str | list[str],
        prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        max_sequence_length: int = 512,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds (B*n, max_sequence_length, T5 dim), pooled_prompt_embeds (B*n, CLIP dim)).

        prompt goes to CLIP, prompt_2 (default: prompt) to T5. Rows repeat per prompt: p0, p0, p1, p1.
        """
        prompts, prompts_2 = self.check(prompt, prompt_2, max_sequence_length)
        clip_ids = self.clip_tokenizer(
            prompts, padding="max_length", max_length=self.clip_tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids
        pooled = self.clip(clip_ids.to(self.clip.device))[1]
        t5_ids = self.t5_tokenizer(
            prompts_2, padding="max_length", max_length=max_sequence_length, truncation=True, return_tensors="pt"
        ).input_ids
        # No attention mask, as in FLUX: the padding tokens' states are part of the conditioning.
        embeds = self.t5(t5_ids.to(self.t5.device))
        # Cast like diffusers does (T5 keeps some layers in float32 when loaded in float16).
        pooled, embeds = pooled.to(self.clip.dtype), embeds.to(self.t5.dtype)
        return (
            embeds.repeat_interleave(num_images_per_prompt, dim=0),
            pooled.repeat_interleave(num_images_per_prompt, dim=0),
        )
