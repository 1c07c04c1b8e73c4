"""The CLIP model: a vision transformer and a causal text transformer with OpenAI's parameter names.

The parameter names are exactly those of OpenAI's released weights (``visual.conv1.weight``,
``visual.transformer.resblocks.0.attn.in_proj_weight``, ``token_embedding.weight``...), so an OpenAI state dict
loads with no renaming. Tokens are kept batch-first, (B, N, D), which is what
``F.scaled_dot_product_attention`` wants; OpenAI's code is sequence-first, which changes no number.

This module knows nothing of video: T2L (``modules/``) drives the blocks' own submodules.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype, then cast back (as OpenAI's CLIP does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        orig_type = x.dtype
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        out = F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)
        return out.to(orig_type)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation the OpenAI CLIP weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with one fused q/k/v projection, computed by SDPA.

    Parameter names match ``nn.MultiheadAttention`` (``in_proj_weight``, ``in_proj_bias``, ``out_proj``), the
    layout of the OpenAI weights.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads != 0:
            raise ValueError(f"attention width {width} is not divisible by the number of heads {heads}")
        self.width = width
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False, dropout_p: float = 0.0) -> torch.Tensor:
        """x: (B, N, D) -> (B, N, D). ``dropout_p``: dropout on the attention probabilities (as the ``dropout`` of
        ``nn.MultiheadAttention``); the caller passes 0 outside training."""
        B, N, D = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        # (B, N, 3D) -> (3, B, heads, N, head_dim)
        q, k, v = qkv.view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                             dropout_p=dropout_p)
        # (B, heads, N, head_dim) -> (B, N, D)
        out = out.transpose(1, 2).reshape(B, N, D)
        return self.out_proj(out)


class ResidualAttentionBlock(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = Attention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, width * 4)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(width * 4, width)),
        ]))
        self.ln_2 = LayerNorm(width)

    def forward(self, x: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), is_causal=is_causal)
        x = x + self.mlp(self.ln_2(x))
        return x


class Transformer(nn.Module):
    """A stack of residual attention blocks (``resblocks.{i}``)."""

    def __init__(self, width: int, layers: int, heads: int, causal: bool = False):
        super().__init__()
        self.width = width
        self.layers = layers
        self.causal = causal
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, is_causal=self.causal)
        return x


class VisionTransformer(nn.Module):
    """CLIP's image tower: patchify, class token, positional embedding, ln_pre, blocks, ln_post on CLS, proj."""

    def __init__(self, input_resolution: int, patch_size: int, width: int, layers: int, heads: int,
                 output_dim: int):
        super().__init__()
        self.input_resolution = input_resolution
        self.patch_size = patch_size
        self.width = width
        self.output_dim = output_dim
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.grid_size = input_resolution // patch_size
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid_size ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> tokens (B, 1 + grid**2, D) with class token and positional embedding added.

        ``ln_pre`` is *not* applied here, so a caller may add more embeddings first (T2L's temporal embedding).
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        H, W = images.shape[-2:]
        if H != self.input_resolution or W != self.input_resolution:
            raise ValueError(
                f"image size {H}x{W} does not match this CLIP's positional embedding "
                f"{tuple(self.positional_embedding.shape)}, which expects {self.input_resolution}x"
                f"{self.input_resolution} ({self.grid_size}x{self.grid_size} patches of {self.patch_size})")
        x = self.conv1(images.to(self.conv1.weight.dtype))
        # (B, D, g, g) -> (B, g*g, D)
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)
        return x + self.positional_embedding.to(x.dtype)

    def head(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final tokens (..., N, D) -> embeddings (..., output_dim) from the class token."""
        return self.ln_post(tokens[..., 0, :]) @ self.proj

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.ln_pre(self.embed(images))
        x = self.transformer(x)
        return self.head(x)


@dataclass(frozen=True)
class CLIPConfig:
    """The sizes that define a CLIP model; ``from_state_dict`` reads them off the weights as OpenAI does."""

    embed_dim: int
    image_resolution: int
    vision_layers: int
    vision_width: int
    vision_patch_size: int
    context_length: int
    vocab_size: int
    transformer_width: int
    transformer_heads: int
    transformer_layers: int
    vision_heads: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state_dict: dict, vision_heads: Optional[int] = None,
                        text_heads: Optional[int] = None) -> "CLIPConfig":
        """Infer the sizes from an OpenAI-layout state dict.

        The head counts are not stored in the weights; like OpenAI's loader we take width // 64 unless told.
        """
        sd = state_dict
        vision_width = sd["visual.conv1.weight"].shape[0]
        vision_layers = len({k.split(".")[3] for k in sd
                             if k.startswith("visual.transformer.resblocks.") and k.endswith(".attn.in_proj_weight")})
        patch = sd["visual.conv1.weight"].shape[-1]
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        width = sd["ln_final.weight"].shape[0]
        layers = len({k.split(".")[2] for k in sd
                      if k.startswith("transformer.resblocks.") and k.endswith(".attn.in_proj_weight")})
        return cls(
            embed_dim=sd["text_projection"].shape[1],
            image_resolution=patch * grid,
            vision_layers=vision_layers,
            vision_width=vision_width,
            vision_patch_size=patch,
            context_length=sd["positional_embedding"].shape[0],
            vocab_size=sd["token_embedding.weight"].shape[0],
            transformer_width=width,
            transformer_heads=text_heads or max(1, width // 64),
            transformer_layers=layers,
            vision_heads=vision_heads or max(1, vision_width // 64),
        )


class CLIP(nn.Module):
    """The two-tower CLIP model with OpenAI's parameter names."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        c = config
        self.context_length = c.context_length
        self.visual = VisionTransformer(c.image_resolution, c.vision_patch_size, c.vision_width,
                                        c.vision_layers, c.vision_heads, c.embed_dim)
        self.transformer = Transformer(c.transformer_width, c.transformer_layers, c.transformer_heads, causal=True)
        self.vocab_size = c.vocab_size
        self.token_embedding = nn.Embedding(c.vocab_size, c.transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(c.context_length, c.transformer_width))
        self.ln_final = LayerNorm(c.transformer_width)
        self.text_projection = nn.Parameter(torch.empty(c.transformer_width, c.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(4.6052))  # log(100), as stored in the OpenAI weights
        self.initialize_parameters()

    def initialize_parameters(self) -> None:
        """OpenAI's initialisation, so a randomly initialised model (tests, the demo) is well scaled."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        proj_std = (self.transformer.width ** -0.5) * ((2 * self.transformer.layers) ** -0.5)
        attn_std = self.transformer.width ** -0.5
        fc_std = (2 * self.transformer.width) ** -0.5
        for tower in (self.transformer, self.visual.transformer):
            for block in tower.resblocks:
                nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
                nn.init.zeros_(block.attn.in_proj_bias)
                nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
                nn.init.zeros_(block.attn.out_proj.bias)
                nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
                nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=self.transformer.width ** -0.5)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W), normalised with CLIP's mean/std -> embeddings (B, embed_dim), not normalised."""
        return self.visual(images.to(self.dtype))

    def embed_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (N, L) -> input tokens of the text transformer (N, L, width)."""
        if tokens.ndim != 2:
            raise ValueError(f"expected token ids of shape (N, context_length), got {tuple(tokens.shape)}")
        if tokens.shape[1] > self.context_length:
            raise ValueError(f"token ids have length {tokens.shape[1]}, longer than this CLIP's context "
                             f"length {self.context_length}")
        x = self.token_embedding(tokens).to(self.dtype)
        return x + self.positional_embedding[: tokens.shape[1]].to(self.dtype)

    def text_head(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Final text tokens (N, L, width) -> embeddings (N, embed_dim), read at the EOT token.

        The EOT token has the highest id in the vocabulary, so its position is the argmax of the ids.
        """
        x = self.ln_final(x)
        eot = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        return eot @ self.text_projection

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (N, L) from ``clip.tokenize`` -> embeddings (N, embed_dim), not normalised."""
        x = self.transformer(self.embed_text(tokens))
        return self.text_head(x, tokens)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        """Returns (logits_per_image, logits_per_text), as OpenAI's CLIP does."""
        image_features = F.normalize(self.encode_image(images), dim=-1)
        text_features = F.normalize(self.encode_text(tokens), dim=-1)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()


def build_model(state_dict: dict, vision_heads: Optional[int] = None, text_heads: Optional[int] = None) -> CLIP:
    """Build a CLIP whose sizes are read off an OpenAI-layout state dict, and load the weights (strictly).

    Extra non-tensor entries OpenAI files carry (``input_resolution``, ``context_length``, ``vocab_size``) are
    ignored. The model is returned in fp32 and eval mode; its parameters are fp32 copies, never views of the
    given tensors.
    """
    sd = {k: v for k, v in state_dict.items() if k not in ("input_resolution", "context_length", "vocab_size")}
    config = CLIPConfig.from_state_dict(sd, vision_heads=vision_heads, text_heads=text_heads)
    # Built on the meta device, then given the loaded tensors: a random initialisation that the weights would
    # overwrite costs seconds at ViT-L size (9 s of a 10 s load on 2 CPU cores).
    with torch.device("meta"):
        model = CLIP(config)
    model.load_state_dict({k: v.to(torch.float32, copy=True) for k, v in sd.items()}, strict=True, assign=True)
    return model.eval()
