"""Run as `python tests/dist_worker.py OUT` (one process) or under torchrun: a tiny CLIP's FLIP loss and gradients on
one fixed global batch of 8, split across the processes, with DDP; rank 0 saves them to OUT."""
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import flip  # noqa: E402

rank, world, device = common.init_distributed()
torch.manual_seed(0)
model = common.CLIP(common.model_config('tiny'))
train_model = DDP(model) if world > 1 else model
g = torch.Generator().manual_seed(1)
images = torch.randn(8, 3, 64, 64, generator=g)
texts = torch.randint(1, 49408, (8, 32), generator=g)
ids_keep = flip.random_masking(8, model.visual.num_patches, 0.5, g)
B = 8 // world
local = slice(rank * B, (rank + 1) * B)
image_features, text_features, logit_scale = train_model(images[local], texts[local], ids_keep[local])
loss = common.clip_loss(image_features, text_features, logit_scale)
loss.backward()
total = loss.detach().clone()
if world > 1:
    dist.all_reduce(total)
if rank == 0:
    torch.save({'loss': total / world, 'grads': {n: p.grad for n, p in model.named_parameters()}}, sys.argv[1])
common.cleanup()
