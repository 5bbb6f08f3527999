"""Run by tests/test_attentive_mask_clip.py under `torch.distributed.run --nproc_per_node 2` (gloo, CPU):
1. attentive_mask_clip.losses (EMA scores and targets, block masks, the online pass under DDP, CLIP + SimCLR + BYOL)
   on this rank's half of a fixed global batch, then backward; rank 0 saves the mean loss and terms over ranks and the
   (DDP-averaged) gradients, which the test compares with one process on the whole batch. BatchNorm is in eval mode
   (random running statistics): in train mode each gloo rank normalises with its own half-batch's statistics, since
   torch has no SyncBatchNorm for CPU, and the two would differ by design;
2. two steps of attentive_mask_clip.main in the same process group (a smoke run of the distributed loop, with the
   step timing; evaluation left out)."""
import copy
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import attentive_mask_clip as aclip  # noqa: E402
import common  # noqa: E402
import data  # noqa: E402

MICRO = {'embed_dim': 32,
         'vision_cfg': {'image_size': 32, 'layers': 2, 'width': 64, 'head_width': 32, 'patch_size': 4,
                        'pool_type': 'tok'},
         'text_cfg': {'context_length': 16, 'vocab_size': 49408, 'width': 64, 'heads': 2, 'layers': 1}}


def global_batch(n=6):
    """views (n, 3, 3, 32, 32), boxes (n, 3, 4): two online crops per sample and the EMA box that covers both, texts."""
    g = torch.Generator().manual_seed(1)
    views = torch.randn(n, 3, 3, 32, 32, generator=g)
    size = 0.5 + 0.3 * torch.rand(n, 2, 2, generator=g)  # (n, 2 crops, (h, w))
    corner = (1 - size) * torch.rand(n, 2, 2, generator=g)  # (top, left)
    lo, hi = corner.min(dim=1).values, (corner + size).max(dim=1).values  # (n, 2): the union of the two crops
    boxes = torch.cat([torch.cat([corner, size], dim=2), torch.cat([lo, hi - lo], dim=1)[:, None]], dim=1)
    texts = torch.randint(1, 1000, (n, 16), generator=g)
    texts[:, 6] = 49407  # end-of-text: the largest id
    return views, boxes, texts


def models(out):
    """The same online model and EMA on every rank: moved apart, BN in eval mode with random running statistics."""
    torch.manual_seed(0)
    model = aclip.ACLIP(MICRO, 32, 16, simclr=True, byol=True)
    ema = copy.deepcopy(aclip.tracked(model)).requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))  # the online weights have moved away from the EMA
        for module in list(model.modules()) + list(ema.modules()):
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.normal_(std=0.1)
                module.running_var.uniform_(0.5, 2.0)
    args = aclip.get_args(['--out', out])  # the defaults: attentive masks, 2 views, CLIP + SimCLR + BYOL
    return model.eval(), ema.eval(), args


def loss_and_grads(model, train_model, ema, args, views, boxes, texts):
    """The training step's loss and terms on one rank's slice (as attentive_mask_clip.main computes them) and the
    parameter gradients."""
    generator = common.step_generator(views.device, args.seed, common.rank(), 0)
    loss, terms, _ = aclip.losses(train_model, ema, views, boxes, texts, args, generator)
    model.zero_grad(set_to_none=True)
    loss.backward()
    values = torch.stack([loss.detach()] + [terms[k].detach() for k in sorted(terms)])  # (1 + terms,)
    return values, sorted(terms), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


if __name__ == '__main__':
    out = sys.argv[1]
    rank, world, device = common.init_distributed()
    model, ema, args = models(os.path.join(out, 'unused'))
    views, boxes, texts = [x.chunk(world)[rank] for x in global_batch()]
    values, names, grads = loss_and_grads(model, DDP(model), ema, args, views, boxes, texts)
    dist.all_reduce(values)
    if rank == 0:
        torch.save({'values': values / world, 'names': names, 'grads': grads}, os.path.join(out, 'dist.pt'))
    dist.barrier()

    # the training loop under torchrun, in this process group (evaluation is tested elsewhere: left out)
    common.init_distributed = lambda: (rank, world, device)
    data.eval_sets = lambda *args: ({}, None)
    common.evaluate = lambda *args, **kwargs: {}
    step = aclip.main(['--steps', '2', '--batch-size', '2', '--workers', '0', '--log-every', '1', '--time-steps', '1',
                       '--out', os.path.join(out, 'run')])
    assert step == 2, step
