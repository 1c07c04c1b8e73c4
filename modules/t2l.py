"""T2L: Temporal Token Learning and adapters on a frozen CLIP.

The T2L blocks below do not copy CLIP's blocks: they call the frozen block's own ``ln_1``, ``attn``,
``ln_2`` and ``mlp`` and add the temporal-token path and the adapter around them (METHOD.md, "What is added").
Everything is batched over videos, frames and tokens; there is no Python loop over videos or frames.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, fields
from typing import ClassVar, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .layers import DROP_PATH_MODES, Adapter, drop_path

logger = logging.getLogger(__name__)

TEMPORAL_TOKEN_MODES = ("deep", "shallow", "none")


@dataclass
class T2LOptions:
    """What T2L adds to CLIP. The defaults are the published model (METHOD.md, "What is added").

    This is the one declaration of the options: the config's ``network.t2l`` section (``utils.config``) is made
    from these fields, their types, defaults and :attr:`CHOICES`, so an option added here is settable there.
    """

    # The values a text option may take (checked here and, before any work, by the config).
    CHOICES: ClassVar[dict] = {"temporal_tokens": TEMPORAL_TOKEN_MODES, "drop_path_mode": DROP_PATH_MODES}

    temporal_tokens: str = "deep"        # "deep": one set per vision block; "shallow": block 0 only; "none"
    adapter_ratio: float = 0.25          # adapter hidden width = ratio * block width
    vision_adapters: bool = True
    text_adapters: bool = True
    train_temporal_embedding: bool = False  # published: zero and frozen, kept for the checkpoint layout
    prompt_dropout: float = 0.1          # dropout on the temporal tokens during training
    drop_path_rate: float = 0.1          # stochastic depth, linspace(0, rate, layers) over the blocks
    # "positions": stochastic depth drops token positions for the whole batch, as the published code does (it
    # applies a per-sample rule to sequence-first tensors); "samples": it drops whole samples (the usual rule).
    drop_path_mode: str = "positions"
    # Dropout on the attention probabilities of both towers, linspace(0, rate, layers) over the blocks, as the
    # published code's nn.MultiheadAttention(dropout=...) does (the temporal-summary attention included).
    attention_dropout_rate: float = 0.1
    activation_checkpointing: bool = False

    def __post_init__(self):
        for name, choices in self.CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        if not all(0.0 <= r < 1.0 for r in (self.prompt_dropout, self.drop_path_rate, self.attention_dropout_rate)):
            raise ValueError("prompt_dropout, drop_path_rate and attention_dropout_rate must lie in [0, 1)")
        if self.adapter_ratio <= 0:
            raise ValueError(f"adapter_ratio must be positive, got {self.adapter_ratio}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "T2LOptions":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown T2L option(s) {unknown}; valid options: {sorted(known)}")
        return cls(**values)


def _linspace(end: float, n: int) -> list[float]:
    """linspace(0, end, n) in plain Python (the rates are constants, not tensors)."""
    return [end * i / (n - 1) if n > 1 else 0.0 for i in range(n)]


def _temporal_token_init_bound(width: int) -> float:
    # The published initialisation: uniform(-v, v), v = sqrt(6 / (3 * 16 * 16 + D)) (fixed 16x16 patch term).
    return math.sqrt(6.0 / (3 * 16 * 16 + width))


class T2L(nn.Module):
    """A frozen CLIP driven as a video model with temporal tokens and adapters.

    Build it with :func:`build_t2l`. ``encode_video`` takes (B, T, 3, H, W) clips normalised with CLIP's
    mean/std and returns ``(video_emb (B, E), frame_emb (B, T, E))``; ``encode_text`` takes token ids.
    """

    def __init__(self, clip_model: nn.Module, num_frames: int = 8, options: Optional[T2LOptions] = None):
        super().__init__()
        options = options or T2LOptions()
        if num_frames < 1:
            raise ValueError(f"num_frames must be at least 1, got {num_frames}")
        self.options = options
        self.num_frames = num_frames
        self.clip = clip_model
        for p in self.clip.parameters():
            p.requires_grad_(False)

        visual = clip_model.visual
        v_width, v_layers = visual.width, len(visual.transformer.resblocks)
        t_width, t_layers = clip_model.transformer.width, len(clip_model.transformer.resblocks)

        n_token_blocks = {"deep": v_layers, "shallow": 1, "none": 0}[options.temporal_tokens]
        if n_token_blocks:
            bound = _temporal_token_init_bound(v_width)
            self.temporal_tokens = nn.Parameter(torch.empty(n_token_blocks, num_frames, v_width).uniform_(-bound, bound))
        else:
            self.register_parameter("temporal_tokens", None)
        self.temporal_embedding = nn.Parameter(torch.zeros(1, num_frames, v_width),
                                               requires_grad=options.train_temporal_embedding)
        self.vision_adapters = (nn.ModuleList([Adapter(v_width, options.adapter_ratio) for _ in range(v_layers)])
                                if options.vision_adapters else None)
        self.text_adapters = (nn.ModuleList([Adapter(t_width, options.adapter_ratio) for _ in range(t_layers)])
                              if options.text_adapters else None)
        # Stochastic depth and attention dropout rates per block, rising over the blocks in both towers as published.
        self.vision_drop_rates = _linspace(options.drop_path_rate, v_layers)
        self.text_drop_rates = _linspace(options.drop_path_rate, t_layers)
        self.vision_attn_drop_rates = _linspace(options.attention_dropout_rate, v_layers)
        self.text_attn_drop_rates = _linspace(options.attention_dropout_rate, t_layers)

    # ------------------------------------------------------------------ parameters
    def train(self, mode: bool = True) -> "T2L":
        super().train(mode)
        self.clip.eval()  # the frozen CLIP has no dropout, but keep it in eval mode whatever the caller does
        return self

    def trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) for every parameter that is trained: never a CLIP weight."""
        for name, p in self.named_parameters():
            if p.requires_grad:
                yield name, p

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors that define T2L beyond the frozen CLIP (trainable ones plus the temporal embedding)."""
        sd = {name: p.detach().clone() for name, p in self.named_parameters() if not name.startswith("clip.")}
        return sd

    def parameter_report(self) -> dict[str, int]:
        """Counts: total, trainable, and the trainable breakdown by T2L component."""
        def count(params) -> int:
            return sum(p.numel() for p in params)

        trainable = dict(self.trainable_parameters())
        groups = {
            "temporal_tokens": count(p for n, p in trainable.items() if n == "temporal_tokens"),
            "vision_adapters": count(p for n, p in trainable.items() if n.startswith("vision_adapters.")),
            "text_adapters": count(p for n, p in trainable.items() if n.startswith("text_adapters.")),
        }
        groups["other"] = count(trainable.values()) - sum(groups.values())
        return {"total": count(self.parameters()), "trainable": count(trainable.values()), **groups}

    def log_parameter_report(self) -> dict[str, int]:
        report = self.parameter_report()
        logger.info("T2L parameters: total %s, trainable %s (temporal tokens %s, vision adapters %s, "
                    "text adapters %s, other %s)", *(f"{report[k]:,}" for k in
                    ("total", "trainable", "temporal_tokens", "vision_adapters", "text_adapters", "other")))
        return report

    # ------------------------------------------------------------------ vision
    def _drop_path(self, x: torch.Tensor, rate: float) -> torch.Tensor:
        return drop_path(x, rate, self.training, self.options.drop_path_mode)

    def _vision_block(self, index: int, x: torch.Tensor, batch: int, padded: bool = False) -> torch.Tensor:
        """One vision block. x: (B*T, N, D) -> (B*T, N, D).

        ``padded``: x carries one extra slot at the end, (B*T, N+1, D), that holds the frame's temporal summary
        during attention (a scratch slot: its value after the block is never read). The summary is written into
        it in place, which saves the copy of the whole sequence that appending it would cost in every block;
        the N real tokens get exactly the values of the unpadded path.
        """
        block = self.clip.visual.transformer.resblocks[index]
        rate = self.vision_drop_rates[index]
        attn_p = self.vision_attn_drop_rates[index] if self.training else 0.0
        BT, L, D = x.shape
        T = BT // batch
        N = L - 1 if padded else L
        tokens = self.temporal_tokens
        if tokens is not None and index < tokens.shape[0]:
            prompt = F.dropout(tokens[index], self.options.prompt_dropout, self.training).to(x.dtype)
            # Per frame: its temporal token plus the mean of its N tokens. (B*T, N, D) -> (B, T, D)
            s = x.view(batch, T, L, D)[:, :, :N].mean(dim=2) + prompt
            # The T frame summaries of each video attend to each other through the block's frozen attention.
            u = self._drop_path(block.attn(block.ln_1(s), dropout_p=attn_p), rate).reshape(BT, 1, D)
            # Frame t sees its summary u[b, t] as an extra token; its output is dropped afterwards.
            if padded:
                x[:, N:] = u.to(x.dtype)
                x = x + self._drop_path(block.attn(block.ln_1(x), dropout_p=attn_p), rate)
            else:
                xu = torch.cat([x, u.to(x.dtype)], dim=1)  # (B*T, N+1, D)
                x = x + self._drop_path(block.attn(block.ln_1(xu), dropout_p=attn_p)[:, :N], rate)
        else:
            if padded:
                raise ValueError("the padded layout needs a temporal token in every block")
            x = x + self._drop_path(block.attn(block.ln_1(x), dropout_p=attn_p), rate)
        if self.vision_adapters is not None:
            x = x + self.vision_adapters[index](x)
        return x + self._drop_path(block.mlp(block.ln_2(x)), rate)

    def encode_video(self, videos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Clips (B, T, 3, H, W) -> (video_emb (B, E), frame_emb (B, T, E)), not normalised."""
        if videos.ndim != 5 or videos.shape[2] != 3:
            raise ValueError(f"expected videos of shape (B, T, 3, H, W), got {tuple(videos.shape)}")
        B, T = videos.shape[:2]
        if T != self.num_frames:
            raise ValueError(
                f"the videos have {T} frames but this T2L model was built for {self.num_frames}: temporal_tokens "
                f"{self._shape(self.temporal_tokens)}, temporal_embedding {tuple(self.temporal_embedding.shape)}; "
                f"sample {self.num_frames} frames per clip (data.num_frames) or build the model for {T}")
        visual = self.clip.visual
        blocks = len(visual.transformer.resblocks)
        x = visual.embed(videos.flatten(0, 1))  # (B*T, 3, H, W) -> (B*T, N, D)
        N, D = x.shape[1:]
        # The temporal embedding is added to every token of frame t. (B*T, N, D) -> (B, T, N, D)
        x = x.view(B, T, N, D) + self.temporal_embedding.to(x.dtype)[:, :, None, :]
        x = visual.ln_pre(x.view(B * T, N, D))
        ckpt = self.options.activation_checkpointing and self.training and torch.is_grad_enabled()
        # With a temporal token in every block (the published model) the sequence carries the summary's slot
        # from the start: one copy here instead of one per block. Not under activation checkpointing, whose
        # recomputation needs each block's input unchanged (the in-place write would change it).
        padded = self.temporal_tokens is not None and self.temporal_tokens.shape[0] >= blocks and not ckpt
        if padded:
            x = torch.cat([x, x.new_zeros(B * T, 1, D)], dim=1)
        for i in range(blocks):
            if ckpt:
                x = checkpoint(self._vision_block, i, x, B, use_reentrant=False)
            else:
                x = self._vision_block(i, x, B, padded)
        frame_emb = visual.head(x).view(B, T, -1)  # (B*T, E) -> (B, T, E); the head reads the class token only
        return frame_emb.mean(dim=1), frame_emb

    # ------------------------------------------------------------------ text
    def _text_block(self, index: int, x: torch.Tensor) -> torch.Tensor:
        block = self.clip.transformer.resblocks[index]
        rate = self.text_drop_rates[index]
        attn_p = self.text_attn_drop_rates[index] if self.training else 0.0
        x = x + self._drop_path(block.attn(block.ln_1(x), is_causal=True, dropout_p=attn_p), rate)
        if self.text_adapters is not None:
            x = x + self.text_adapters[index](x)
        return x + self._drop_path(block.mlp(block.ln_2(x)), rate)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (N, L) from ``clip.tokenize`` -> text embeddings (N, E), not normalised."""
        x = self.clip.embed_text(tokens)
        for i in range(len(self.clip.transformer.resblocks)):
            if self.options.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(self._text_block, i, x, use_reentrant=False)
            else:
                x = self._text_block(i, x)
        return self.clip.text_head(x, tokens)

    def forward(self, videos: torch.Tensor, tokens: torch.Tensor):
        """Training entry point (what DDP wraps): (video_emb (B, E), frame_emb (B, T, E), text_emb (N, E))."""
        video_emb, frame_emb = self.encode_video(videos)
        return video_emb, frame_emb, self.encode_text(tokens)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale

    @property
    def embed_dim(self) -> int:
        return self.clip.visual.output_dim

    @staticmethod
    def _shape(t: Optional[torch.Tensor]):
        return None if t is None else tuple(t.shape)


def build_t2l(clip_model: nn.Module, num_frames: int = 8, **options) -> T2L:
    """Wrap a CLIP model (from ``clip.load`` or ``clip.build_model``) as T2L; its weights are frozen.

    ``options`` are the fields of :class:`T2LOptions` (``temporal_tokens="deep"|"shallow"|"none"``,
    ``adapter_ratio``, ``vision_adapters``, ``text_adapters``, ``train_temporal_embedding``, ``prompt_dropout``,
    ``drop_path_rate``, ``drop_path_mode``, ``attention_dropout_rate``, ``activation_checkpointing``). The parameter
    report is logged.
    """
    model = T2L(clip_model, num_frames=num_frames, options=T2LOptions.from_dict(options))
    model.log_parameter_report()
    return model


def convert_to_fp16_like_published(model: nn.Module) -> nn.Module:
    """Cast the tensors the published code keeps in fp16 (its ``clip.model.convert_weights``), in place.

    The weights and biases of every linear and convolution layer (the adapters included), the fused attention
    projection and the two output projections (``visual.proj``, ``text_projection``) become fp16; LayerNorms,
    embeddings, the class and positional embeddings, ``logit_scale``, the temporal tokens and the temporal embedding
    stay fp32 (the forward casts them to the activations' dtype). The published training ran like this on GPUs
    ("pure fp16" weights, no loss scaling); see utils.precision.Fp16MasterStep for its optimiser step.
    """
    from clip.model import Attention

    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            module.weight.data = module.weight.data.half()
            if module.bias is not None:
                module.bias.data = module.bias.data.half()
        if isinstance(module, Attention):
            module.in_proj_weight.data = module.in_proj_weight.data.half()
            module.in_proj_bias.data = module.in_proj_bias.data.half()
        for name in ("proj", "text_projection"):
            p = getattr(module, name, None)
            if isinstance(p, nn.Parameter):
                p.data = p.data.half()
    return model
