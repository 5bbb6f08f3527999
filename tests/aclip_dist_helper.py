"""Run by tests/test_attentive_mask_clip.py under `torch.distributed.run --nproc_per_node 2` (gloo, CPU):
1. the training step of attentive_mask_clip.main (the EMA pass, the masks, the online pass under DDP, eq. (A) through
   common.accumulate) on this rank's half of a fixed global batch of 8 in 2 micro-batches, with the attentive masks and
   with random ones; rank 0 saves the mean loss and terms over ranks and the (DDP-averaged) gradients, which the test
   compares with one process on the whole batch in one piece. BatchNorm is in eval mode (random running statistics):
   in train mode each micro-batch is normalised with its own statistics (on gloo, also each rank: torch has no
   SyncBatchNorm for CPU), and the two would differ by design;
2. two steps of attentive_mask_clip.main with --accum-freq 2 in the same process group (a smoke run of the
   distributed loop, with the step timing; evaluation left out)."""
import copy
import functools
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


def global_batch(n=8):
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


def models(out, mask):
    """The same online model and EMA on every rank: moved apart, BN in eval mode with random running statistics."""
    torch.manual_seed(0)
    model = aclip.ACLIP(MICRO, 32, 16, simclr=True, byol=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))  # the online weights will have moved away from the EMA
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.normal_(std=0.1)
                module.running_var.uniform_(0.5, 2.0)
    ema = copy.deepcopy(aclip.tracked(model)).requires_grad_(False)
    with torch.no_grad():
        for p in ema.parameters():
            p.sub_(0.02 * torch.randn_like(p))
    args = aclip.get_args(['--out', out, '--mask', mask])  # the defaults: 2 views, CLIP + SimCLR + BYOL
    return model.eval(), ema.eval(), args


def loss_and_grads(model, train_model, ema, args, views, boxes, texts, K, G):
    """attentive_mask_clip.main's step on this rank's rows of a global batch of G (views, boxes, texts: its rows) in K
    micro-batches: its loss and terms (this rank's) and the parameter gradients."""
    B = len(texts) // K
    micro = [common.Micro((views[k * B:(k + 1) * B], boxes[k * B:(k + 1) * B]), texts[k * B:(k + 1) * B],
                          slice((common.rank() * K + k) * B, (common.rank() * K + k + 1) * B)) for k in range(K)]
    ids_random = aclip.random_ids(args, G, ema['visual'].grid_size, common.batch_generator(views.device, args.seed, 0))

    def forward(m):  # as in attentive_mask_clip.main
        views, boxes = m.images
        if not m.cache:
            m.cache.update(aclip.teacher(ema, views, boxes, args))
        ids_keep = m.cache.get('ids_keep') if ids_random is None else ids_random[:, m.rows].flatten(0, 1)
        out = train_model(views[:, :args.views].transpose(0, 1).flatten(0, 1), m.texts, ids_keep)
        return aclip.loss_parts(out, m.cache.get('target'), args)
    model.zero_grad(set_to_none=True)
    loss, terms = common.accumulate(train_model, micro, forward, functools.partial(aclip.coupled_loss, args))
    values = torch.stack([loss] + [terms[k] for k in sorted(terms)])  # (1 + terms,)
    return values, sorted(terms), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


if __name__ == '__main__':
    out = sys.argv[1]
    rank, world, device = common.init_distributed()
    results = {}
    for mask in ('attentive', 'random'):
        model, ema, args = models(os.path.join(out, 'unused'), mask)
        views, boxes, texts = [x.chunk(world)[rank] for x in global_batch()]
        values, names, grads = loss_and_grads(model, DDP(model), ema, args, views, boxes, texts, 2, 8)
        dist.all_reduce(values)
        results[mask] = {'values': values / world, 'names': names, 'grads': grads}
    if rank == 0:
        torch.save(results, os.path.join(out, 'dist.pt'))
    dist.barrier()

    # the training loop under torchrun, in this process group (evaluation is tested elsewhere: left out)
    common.init_distributed = lambda: (rank, world, device)
    data.eval_sets = lambda *args: ({}, None)
    common.evaluate = lambda *args, **kwargs: {}
    step = aclip.main(['--steps', '2', '--batch-size', '2', '--accum-freq', '2', '--workers', '0', '--log-every', '1',
                       '--time-steps', '1', '--out', os.path.join(out, 'run')])
    assert step == 2, step
