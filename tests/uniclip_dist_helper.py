"""Run by tests/test_uniclip.py under `torch.distributed.run --nproc_per_node 2` (gloo, CPU):
1. one DDP forward/backward of a micro UniCLIP on this rank's half of a fixed global batch; rank 0 saves the mean
   loss over ranks and the (DDP-averaged) gradients, which the test compares with one process on the whole batch;
2. two steps of uniclip.main in the same process group (a smoke run of the distributed training loop)."""
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import data  # noqa: E402
import uniclip  # noqa: E402

MICRO = {'embed_dim': 32,
         'vision_cfg': {'image_size': 32, 'layers': 1, 'width': 64, 'head_width': 32, 'patch_size': 8},
         'text_cfg': {'context_length': 16, 'vocab_size': 49408, 'width': 64, 'heads': 2, 'layers': 1}}


def global_batch(n=4, views=2):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(n, views, 3, 32, 32, generator=g)  # (n, V, 3, S, S)
    params = torch.rand(n, views, len(uniclip.IDENTITY), generator=g)  # (n, V, P)
    texts = torch.randint(1, 1000, (n, 16), generator=g)
    texts[:, 6] = 49407  # end-of-text: the largest id
    return images, params, texts


def loss_and_grads(model, train_model, images, params, texts, loss='mpnce'):
    """The training step's loss on one rank's slice (as uniclip.main computes it) and the parameter gradients."""
    B, V = images.shape[:2]
    image_features, text_features, tau, offset = train_model(images.flatten(0, 1), params.flatten(0, 1), texts)
    z = torch.cat([image_features.view(B, V, -1), text_features[:, None]], dim=1)  # (B, V + 1, D)
    value, _ = uniclip.universal_loss(z, [0] * V + [1], tau, offset, loss)
    model.zero_grad(set_to_none=True)
    value.backward()
    return value.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


if __name__ == '__main__':
    out = sys.argv[1]
    rank, world, device = common.init_distributed()
    torch.manual_seed(0)
    model = uniclip.UniCLIP(MICRO, 'add')
    with torch.no_grad():
        torch.nn.init.normal_(model.aug_mlp[2].weight, std=0.1)  # a non-zero augmentation term
        model.offset.normal_(std=0.1)
    images, params, texts = [x.chunk(world)[rank] for x in global_batch()]
    loss, grads = loss_and_grads(model, DDP(model), images, params, texts)
    dist.all_reduce(loss)
    if rank == 0:
        torch.save({'loss': loss / world, 'grads': grads}, os.path.join(out, 'dist.pt'))
    dist.barrier()

    # the training loop under torchrun, in this process group, with a small evaluation set
    common.init_distributed = lambda: (rank, world, device)
    data.eval_sets = lambda args, transform, size: data.synthetic_eval_sets(size, 0, transform, 40, 20)
    step = uniclip.main(['--steps', '2', '--batch-size', '2', '--workers', '0', '--log-every', '1',
                         '--out', os.path.join(out, 'run')])
    assert step == 2, step
