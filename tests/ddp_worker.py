"""Launched by tests/test_train_test.py with ``torchrun --nproc_per_node 2`` (gloo, CPU).

Two DDP training steps of a tiny T2L with the gathered alignment loss; every rank writes its losses and its
trainable parameters after each step to OUT/rank<r>.pt, so the test can compare ranks with each other and with a
single process on the same global batch.
"""
import sys

import torch
from torch.nn.parallel import DistributedDataParallel

from modules import T2LLoss, build_t2l, random_clip
from utils import distributed

TINY = dict(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
            context_length=16, vocab_size=100, transformer_width=64, transformer_heads=1, transformer_layers=2,
            vision_heads=1)


def global_batch(step: int, size: int = 4):
    g = torch.Generator().manual_seed(100 + step)
    videos = torch.randn(size, 8, 3, 32, 32, generator=g)
    labels = torch.tensor([0, 1, 0, 2])[:size]
    tokens = torch.randint(1, 98, (3, 16), generator=g)
    tokens[:, 10] = 99  # EOT
    return videos, labels, tokens[labels]


def make_model():
    torch.manual_seed(0)
    model = build_t2l(random_clip(TINY, 0), num_frames=8, prompt_dropout=0.0, drop_path_rate=0.0,
                      attention_dropout_rate=0.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("clip.") and p.requires_grad:
                p.normal_(0, 0.05)
    return model


def make_optimizer(model):
    """Plain SGD: the update is linear in the gradient, so equal gradients give equal parameters to rounding.

    (AdamW's first step is about lr * sign(g): a gradient element of 1e-7 that rounding makes +1e-7 in one
    computation and -1e-7 in the other moves the parameter by 2 * lr apart, which says nothing about DDP.)
    """
    return torch.optim.SGD([p for _, p in model.trainable_parameters()], lr=0.1)


def main(out: str) -> None:
    info = distributed.setup("cpu")
    model = make_model()
    ddp = DistributedDataParallel(model)
    opt = make_optimizer(model)
    criterion = T2LLoss()
    record = {"loss": [], "params": []}
    for step in range(2):
        videos, labels, tokens = global_batch(step)
        per_rank = videos.shape[0] // info.world_size
        sl = slice(info.rank * per_rank, (info.rank + 1) * per_rank)
        v, f, t = ddp(videos[sl], tokens[sl])
        v, f, t = (distributed.all_gather_with_grad(x) for x in (v, f, t))
        lab = distributed.all_gather_tensor(labels[sl])
        loss, _ = criterion(v, f, t, lab, model.logit_scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
        record["loss"].append(loss.item())
        record["params"].append({n: p.detach().clone() for n, p in model.trainable_parameters()})
    torch.save(record, f"{out}/rank{info.rank}.pt")
    distributed.cleanup()


if __name__ == "__main__":
    main(sys.argv[1])
