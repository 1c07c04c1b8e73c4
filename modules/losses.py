"""T2L's two training losses: video-text alignment (KL form) and Temporal Feature Diversity (TFD)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def alignment_loss(video_emb: torch.Tensor, text_emb: torch.Tensor, labels: torch.Tensor,
                   logit_scale: torch.Tensor | float, target_sharpness: float = 10.0) -> torch.Tensor:
    """Symmetric KL alignment loss between B videos and their B class texts (ActionCLIP's form).

    logits = s * norm(v) @ norm(w)^T, s = exp(logit_scale). The target row i is softmax(10 * G_i) with
    G[i, j] = 1 when videos i and j share a label, so equal labels in a batch are positives, not negatives.
    Returns (KL(Q || softmax(L)) + KL(Q || softmax(L^T))) / 2, each averaged over rows.
    """
    if video_emb.shape[0] != text_emb.shape[0] or video_emb.shape[0] != labels.shape[0]:
        raise ValueError(f"alignment_loss needs as many texts and labels as videos, got videos "
                         f"{tuple(video_emb.shape)}, texts {tuple(text_emb.shape)}, labels {tuple(labels.shape)}")
    scale = logit_scale.exp() if torch.is_tensor(logit_scale) else torch.tensor(logit_scale).exp()
    v = F.normalize(video_emb.float(), dim=-1)
    w = F.normalize(text_emb.float(), dim=-1)
    logits = scale.float() * v @ w.t()
    same = (labels[:, None] == labels[None, :]).float()
    log_target = F.log_softmax(target_sharpness * same, dim=1)  # symmetric, so it serves both directions
    loss_v = F.kl_div(F.log_softmax(logits, dim=1), log_target, reduction="batchmean", log_target=True)
    loss_w = F.kl_div(F.log_softmax(logits.t(), dim=1), log_target, reduction="batchmean", log_target=True)
    return (loss_v + loss_w) / 2


def tfd_loss(frame_emb: torch.Tensor) -> torch.Tensor:
    """Temporal Feature Diversity loss on per-frame embeddings (B, T, E), before normalisation.

    C = mean |F[t+1] - F[t-1]| / 2 with the ends replicated (a central difference), V = mean over (b, d) of the
    unbiased variance over t; the loss 1 / (1 + C + V) falls as frame features change more over time.
    """
    if frame_emb.ndim != 3:
        raise ValueError(f"tfd_loss expects frame embeddings (B, T, E), got {tuple(frame_emb.shape)}")
    f = frame_emb.float()
    T = f.shape[1]
    if T < 2:
        return f.new_ones(())  # one frame has no temporal change: C = V = 0
    nxt = torch.cat([f[:, 1:], f[:, -1:]], dim=1)
    prev = torch.cat([f[:, :1], f[:, :-1]], dim=1)
    change = ((nxt - prev).abs() / 2).mean()
    variance = f.var(dim=1, unbiased=True).mean()
    return 1.0 / (1.0 + change + variance)


class T2LLoss(torch.nn.Module):
    """Total loss = alignment + tfd_weight * TFD; returns (total, parts) with the parts detached for logging."""

    def __init__(self, tfd_weight: float = 1.0, target_sharpness: float = 10.0):
        super().__init__()
        self.tfd_weight = tfd_weight
        self.target_sharpness = target_sharpness

    def forward(self, video_emb, frame_emb, text_emb, labels, logit_scale):
        align = alignment_loss(video_emb, text_emb, labels, logit_scale, self.target_sharpness)
        tfd = tfd_loss(frame_emb) if self.tfd_weight else align.new_zeros(())
        total = align + self.tfd_weight * tfd
        return total, {"loss": total.detach(), "align": align.detach(), "tfd": tfd.detach()}
