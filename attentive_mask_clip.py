"""A-CLIP: Attentive Mask CLIP (Yang, Huang, Wei, Peng, Jiang, Jiang, Wei, Wang, Hu, Qiu, Yang; ICCV 2023; arXiv 2212.08653).

What this file implements
- Views: per sample two online crops and one "zoom-out" crop covering both for the EMA encoder, boxes kept; colour
  augmentation on the online views only; no flips.
- Attentive token removal: the EMA vision tower runs the whole zoom-out view; a patch's score is its CLS->patch
  attention averaged over all layers and heads, carried to each online view through the crop boxes (bilinear samples
  at the view's patch centres) and pooled into 2x2 patch blocks; the best blocks stay, K = 4 * ceil(L * (1 - r) / 4)
  tokens with r = 0.5 (100 of 196 at ViT-B/16, the official 25 of 49 blocks), at least one block at any r < 1. Grids
  come from image and patch size.
- Loss (A) = 0.5 CLIP(v1, t) + 0.5 CLIP(v2, t) + 1.0 SimCLR(v1, v2) + 2.0 BYOL(v1, v2 -> EMA): CLIP is
  common.clip_loss; SimCLR is NT-Xent (tau 0.1, global batch) on a 3-layer BN MLP (4096 -> 256) of the pooled image
  token; BYOL is 2 - 2 cos(pred(proj(online)), proj_ema(EMA)), projector width -> 4096 -> 256, predictor 256 -> 4096
  -> 256. BatchNorm is SyncBatchNorm under DDP on CUDA (torch has none for CPU: gloo runs use per-rank statistics);
  it sees one micro-batch at a time (Big batches, below).
  The forward runs under autocast (bf16 on CUDA); every loss term is computed in fp32 outside it.
- The EMA (teacher) covers the vision tower and the BYOL projector; momentum cosine 0.996 -> 1.
- The paper's optimiser: AdamW, betas (0.9, 0.98), wd 0.5, lr 5e-4 at batch 4096, warmup, cosine to 1e-5. At other
  global batches the default lr follows the linear rule, lr = 5e-4 x global batch / 4096 (default_lr).
- The masking ablation (README table): --mask {attentive,random,none} x --views {1,2}. That table trains the CLIP
  terms only (its attentive 2 x 50% row, 41.3, is below A-CLIP's 43.9): add --simclr-weight 0 --byol-weight 0; one
  view drops the SimCLR term. `random` is the official code's random baseline, MAE's per-token masking (any
  int(L * (1 - r)) patches, at least one: 32 of 64 at tiny, 98 of 196 at ViT-B/16 against attentive's 100).
  `random-block` (not in the paper) puts random scores into the block selection: the blocks and K of attentive.
- Big batches (the paper's table is at 4096): --accum-freq K gives eq. (A)'s CLIP and SimCLR terms all K x batch-size
  x processes samples as one batch (common.accumulate: GradCache, one extra no-grad online forward per micro-batch),
  BYOL is their mean, the EMA pass runs once per micro-batch (its masks and targets are cached for the second pass)
  and the EMA moves once per optimizer step; --grad-checkpointing recomputes the blocks of both towers in backward.
  Random masks are drawn for the whole global batch from (seed, step) and each micro-batch takes its rows; attentive
  masks are each sample's own. Not exact: the heads' BatchNorm (online and EMA) normalises with each micro-batch's
  statistics, as DDP without SyncBN does per rank (here: per rank on CPU, over all processes' micro-batch with SyncBN
  on CUDA), so K micro-batches of b differ from one batch of K x b there; its running statistics, which nothing reads
  (the heads only train), move on each forward, so twice per micro-batch in the online heads when K > 1. --head-bn
  eval puts every BN in eval mode on its running statistics (mean 0, variance 1 as initialised, never updated): then
  any split is exactly one big batch, and the exactness tests (tests/test_accumulation.py, the 2-process test) use
  it; it is not the paper's.

Where this differs from the official code (microsoft/A-CLIP), and why
- SimCLR contrasts view 1 with view 2, as the paper says; the official loss passes view 1 as both views.
- Masking is on by default; the README command leaves --mask-ratio at 0, i.e. no token removal at all.
- The zoom-out box takes its left edge from the crops' lefts (official: min(left1, height2)) and grows after its
  corner is drawn (official: before, so the EMA view can miss part of a crop): it always covers both crops.
- Grid and K are derived, not hard-coded 14x14 -> 7x7 with int(49 / 2) + 1 blocks (the same 25 blocks there).
- Left out, as they are not in the paper's method: the frozen patch embedding (MoCo v3's trick) and the EMA of the
  text tower (used only to evaluate the EMA model). OpenAI mean/std (open_clip's preprocessing for the export). The
  EMA steps after the optimizer (official: before the next forward; the same sequence).
- CLS pooling for every --model (model_config below), as the official code: the score is the CLS query's attention,
  which the CLIP loss aligns with the text only when CLS is the image embedding (as `tiny` pools; an 'avg' config
  would not).
- One EMA pass gives both the scores and the BYOL target (cls_attention: explicit softmax for the CLS row, SDPA for
  the blocks), so the teacher costs one forward, as in the official code.

Reconstructed, each a flag: the grids and K for models other than ViT-B/16 (block size 2, K above); the synthetic
data's augmentation (--crop-scale, below); the lr at global batches other than 4096 (the linear rule above; --lr).

Scaled down for the embedded CPU default, and said so: the `tiny` model (8x8 grid, 32 of 64 tokens kept), 400 steps
of 64 (each step ~1.3x a CLIP step: the EMA forward), heads 512 wide, lr 1e-3, EMA momentum 0.95 -> 1 (0.996 would
leave the teacher ~45% its random initialisation after 400 steps), and on the synthetic data, whose captions name
colours and positions, mild crops (area 0.8-1, aspect 0.9-1.1: an object stays in its named cell) and brightness/
contrast jitter only. Real data gets the paper's augmentation: area 0.5-1, colour jitter 0.4/0.4/0.2/0.1 p 0.8,
grayscale 0.2, blur 0.1, solarize 0.2.

Launch
    python attentive_mask_clip.py                       # CPU, synthetic data, ~4 minutes, results in runs/attentive_mask_clip/
    python attentive_mask_clip.py --mask random --out runs/aclip_random      # the masking ablation
    python attentive_mask_clip.py --model ViT-B-16 --train-data /data/cc3m/train.csv --batch-size 256 --workers 8
    # above: lr 5e-4 x 256 / 4096 = 3.1e-5; with --accum-freq 16 --grad-checkpointing, the paper's 4096 a step on one
    # GPU (lr 5e-4; BatchNorm then sees 256 at a time); below, the paper's run: 8 x 512 = 4096, 25 YFCC epochs
    torchrun --nproc_per_node=8 attentive_mask_clip.py --model ViT-B-16 --train-data '/data/yfcc15m/{00000..01499}.tar' \\
        --train-num-samples 15000000 --steps 91550 --imagenet-val /data/imagenet/val --batch-size 512 --workers 8
"""
import argparse
import copy
import functools
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import open_clip
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

import common
import data

# ----------------------------------------------------------------------------- args


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_common_args(p)
    p.set_defaults(wd=0.5, batch_size=64)  # the paper's weight decay; a CPU-sized batch (three views a sample)
    g = p.add_argument_group('A-CLIP')
    g.add_argument('--mask', default='attentive', choices=['attentive', 'random', 'random-block', 'none'],
                   help='which patches the online views keep: the best 2x2 blocks by EMA attention, random patches '
                   "(MAE's per-token masking, the paper's baseline), random 2x2 blocks, or all")
    g.add_argument('--views', type=int, default=2, choices=[1, 2], help='online views per sample')
    g.add_argument('--mask-ratio', type=float, default=0.5, help='fraction of patches removed (at least one is kept)')
    g.add_argument('--clip-weight', type=float, default=1.0, help='CLIP weight, split evenly over the views')
    g.add_argument('--simclr-weight', type=float, default=1.0)
    g.add_argument('--byol-weight', type=float, default=2.0)
    g.add_argument('--simclr-tau', type=float, default=0.1, help='NT-Xent temperature')
    g.add_argument('--ema-momentum', type=float, default=None, help='start of the cosine schedule to 1 '
                   '(default: 0.996; 0.95 for tiny)')
    g.add_argument('--head-hidden', type=int, default=None, help='hidden width of the SimCLR/BYOL heads '
                   '(default: 4096; 512 for tiny)')
    g.add_argument('--head-dim', type=int, default=256, help='output width of the SimCLR/BYOL heads')
    g.add_argument('--crop-scale', type=float, default=None, help='smallest crop area (default: 0.5; 0.8 synthetic)')
    g.add_argument('--head-bn', default='batch', choices=['batch', 'eval'], help="the heads' BatchNorm: batch "
                   "statistics (the paper; each micro-batch's, over all processes with SyncBN on CUDA), or eval mode "
                   "on the running statistics (each sample alone: any split into processes x micro-batches gives one "
                   "big batch's step exactly; for the exactness tests, not the paper's)")
    g.add_argument('--time-steps', type=int, default=5, help='steps timed against a CLIP step at the end (0: skip)')
    args = p.parse_args(argv)
    if not 0 <= args.mask_ratio < 1:
        raise ValueError('--mask-ratio must be in [0, 1)')
    if min(args.clip_weight, args.simclr_weight, args.byol_weight) < 0 or args.simclr_tau <= 0:
        raise ValueError('loss weights must be >= 0 and --simclr-tau > 0')
    if args.ema_momentum is not None and not 0 <= args.ema_momentum <= 1:
        raise ValueError('--ema-momentum must be in [0, 1]')
    if args.crop_scale is not None and not 0 < args.crop_scale <= 1:
        raise ValueError('--crop-scale must be in (0, 1]')
    if (args.head_hidden is not None and args.head_hidden < 1) or args.head_dim < 1:
        raise ValueError('--head-hidden and --head-dim must be at least 1')
    if args.time_steps < 0:
        raise ValueError('--time-steps must be >= 0')
    if args.lr is not None and args.lr <= 0:  # common.fill_run_defaults would replace 0 by the default
        raise ValueError('--lr must be > 0')
    args = common.check_args(args, 'attentive_mask_clip')
    if args.head_hidden is None:
        args.head_hidden = 512 if args.model == 'tiny' else 4096
    if args.ema_momentum is None:
        args.ema_momentum = 0.95 if args.model == 'tiny' else 0.996
    if args.crop_scale is None:  # the synthetic captions name positions: mild crops keep an object in its cell
        args.crop_scale = 0.8 if args.dataset_type == 'synthetic' else 0.5
    return args


def default_lr(args, global_batch):
    """The paper's 5e-4 at global batch 4096, scaled linearly: lr = 5e-4 x global batch / 4096 [recon: the paper gives
    one batch]; 1e-3 for the tiny model on the synthetic data, at any batch."""
    return 1e-3 if args.model == 'tiny' else 5e-4 * global_batch / 4096

# ----------------------------------------------------------------------------- method: views


def zoom_out(box1, box2, height, width):
    """The EMA view's box (top, left, h, w) in pixels: the union of the two online boxes, each edge then moved out at
    random towards the image border, so it always covers both crops."""
    top, left = min(box1[0], box2[0]), min(box1[1], box2[1])
    bottom, right = max(box1[0] + box1[2], box2[0] + box2[2]), max(box1[1] + box1[3], box2[1] + box2[3])
    randint = lambda lo, hi: int(torch.randint(lo, hi + 1, ()).item())  # torch's RNG: seeded per sample by data.py
    top, left, bottom, right = randint(0, top), randint(0, left), randint(bottom, height), randint(right, width)
    return top, left, bottom - top, right - left


class ThreeViews:
    """PIL image -> (views (3, 3, S, S): online view 1, online view 2, EMA view; boxes (3, 4): each view's crop as
    (top, left, height, width) in fractions of the source image). Colour augmentation on the online views only."""

    def __init__(self, size, scale, ratio, colour):
        self.size, self.scale, self.ratio, self.colour = size, scale, ratio, colour
        self.to_tensor = T.Compose([T.ToTensor(), T.Normalize(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)])

    def __call__(self, image):
        width, height = image.size
        box1 = T.RandomResizedCrop.get_params(image, self.scale, self.ratio)  # (top, left, h, w)
        box2 = T.RandomResizedCrop.get_params(image, self.scale, self.ratio)
        boxes = [box1, box2, zoom_out(box1, box2, height, width)]
        crops = [TF.resized_crop(image, *box, [self.size, self.size]) for box in boxes]
        views = [self.to_tensor(self.colour(c)) for c in crops[:2]] + [self.to_tensor(crops[2])]
        boxes = torch.tensor(boxes, dtype=torch.float32) / torch.tensor([height, width, height, width])
        return torch.stack(views), boxes

# ----------------------------------------------------------------------------- method: masking


@torch.no_grad()
def cls_attention(visual, x):
    """One pass of a vision tower -> (tokens (B, 1 + L, width) after ln_post, CLS attention (B, layers, heads, 1 + L)):
    each block's explicit softmax(q_cls k^T / sqrt(d)) row, the CLS query only; the blocks themselves run on SDPA, so
    the same pass gives the EMA's output tokens (for BYOL) at the cost of one extra (B, heads, 1, N) product a layer."""
    x = visual.embed(x)
    rows = []
    for block in visual.transformer.resblocks:  # common.Block.forward, with the CLS row of the attention kept
        q, k, v = block.attn.qkv(block.ln_1(x))  # 3 x (B, heads, N, head_dim)
        logits = q[:, :, :1] @ k.transpose(-2, -1) * q.shape[-1] ** -0.5  # (B, heads, 1, N): the CLS query only
        rows.append(logits.float().softmax(dim=-1)[:, :, 0])  # (B, heads, N)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(x.shape)  # (B, N, width)
        x = x + block.attn.out_proj(a)
        x = x + block.mlp(block.ln_2(x))
    return visual.ln_post(x), torch.stack(rows, dim=1)


def map_scores(score, box, ema_box):
    """Carry a score map from the EMA view to an online view: score (B, gh, gw) on the EMA view's patch grid, boxes
    (B, 4) as (top, left, h, w) in source-image fractions -> (B, gh, gw) bilinear samples at the online view's patch
    centres (the official resize, crop and resize of the map, as one continuous step). Equal boxes: the identity."""
    B, gh, gw = score.shape
    ys = box[:, :1] + (torch.arange(gh, device=score.device) + 0.5) / gh * box[:, 2:3]  # (B, gh) source fractions
    xs = box[:, 1:2] + (torch.arange(gw, device=score.device) + 0.5) / gw * box[:, 3:4]  # (B, gw)
    ys = (ys - ema_box[:, :1]) / ema_box[:, 2:3] * 2 - 1  # in the EMA view, grid_sample's [-1, 1] (edges, not centres)
    xs = (xs - ema_box[:, 1:2]) / ema_box[:, 3:4] * 2 - 1
    grid = torch.stack(torch.broadcast_tensors(xs[:, None, :], ys[:, :, None]), dim=-1)  # (B, gh, gw, 2) as (x, y)
    return F.grid_sample(score[:, None].float(), grid, mode='bilinear', padding_mode='border', align_corners=False)[:, 0]


def keep_count(num_patches, mask_ratio, blocks=True):
    """K, at least one patch: whole 2x2 blocks covering at least (1 - r) of the patches (at least one block), or for
    per-token masks (blocks=False, random_masking) int(L * (1 - r))."""
    if not blocks:
        return max(1, int(num_patches * (1 - mask_ratio)))
    return min(num_patches, 4 * max(1, math.ceil(num_patches * (1 - mask_ratio) / 4 - 1e-9)))


def random_masking(batch, num_patches, mask_ratio, generator):
    """The paper's random baseline, MAE's per-sample uniform masking (the official code's only random path; as
    flip.py). Returns ids_keep (B, K), K = max(1, int(L * (1 - r))), the kept patch indices in [0, L)."""
    noise = torch.rand(batch, num_patches, device=generator.device, generator=generator)  # (B, L)
    return noise.argsort(dim=1)[:, :max(1, int(num_patches * (1 - mask_ratio)))]  # (B, K)


def block_mask(score, grid, mask_ratio):
    """A-CLIP's block-wise token selection. score (B, L) per patch on a (gh, gw) grid -> ids_keep (B, K) in [0, L): the
    patches of the best 2x2 blocks by mean score. On an even grid all kept blocks are whole; on an odd grid the blocks
    on the far edges are 2x1 or 1x1 and the last block taken may be cut, so that every sample keeps exactly K."""
    (B, L), (gh, gw) = score.shape, grid
    block_score = F.avg_pool2d(score.float().view(B, 1, gh, gw), 2, ceil_mode=True).flatten(1)  # (B, blocks)
    rows, cols = torch.arange(gh, device=score.device), torch.arange(gw, device=score.device)
    block_of = ((rows // 2)[:, None] * math.ceil(gw / 2) + (cols // 2)[None, :]).flatten()  # (L,) block of each patch
    block_rank = block_score.argsort(dim=1, descending=True).argsort(dim=1)  # (B, blocks), 0 = best
    key = block_rank[:, block_of] * L + torch.arange(L, device=score.device)  # (B, L): block rank, then raster order
    return key.argsort(dim=1)[:, :keep_count(L, mask_ratio)]  # (B, K)


def random_ids(args, batch, grid, generator):
    """The masks of --mask random / random-block for `batch` rows and every online view, ids_keep (V, batch, K), view
    by view; None for the other masks. The loop draws them for the whole global batch, once a step from
    common.batch_generator, and each micro-batch takes its rows [:, m.rows]: a sample's mask is a function of (seed,
    step, its position in the global batch), whatever the split into processes and micro-batches."""
    V, L = args.views, grid[0] * grid[1]
    if args.mask == 'random':  # the paper's baseline: K = int(L * (1 - r)) patches, any patches
        return random_masking(V * batch, L, args.mask_ratio, generator).view(V, batch, -1)
    if args.mask == 'random-block':  # random scores into the block selection: blocks and K as attentive
        score = torch.rand(V * batch, L, device=generator.device, generator=generator)
        return block_mask(score, grid, args.mask_ratio).view(V, batch, -1)
    return None


@torch.no_grad()
def teacher(ema, views, boxes, args):
    """The EMA pass on the zoom-out views, no gradient, under the caller's autocast: views (b, 3, 3, S, S), boxes
    (b, 3, 4) -> {'ids_keep': the attentive masks (V*b, K), view-major; 'target': the BYOL targets (b, dim)}, each
    where used. A function of each sample alone (but for the EMA head's BatchNorm); the loop caches it per
    micro-batch."""
    out, visual = {}, ema['visual']
    b, V, (gh, gw) = views.shape[0], args.views, visual.grid_size
    if args.mask == 'attentive':
        tokens, attn = cls_attention(visual, views[:, 2])  # (b, 1 + L, width), (b, layers, heads, 1 + L)
        score = attn[..., 1:].mean(dim=(1, 2)).view(b, gh, gw)  # CLS->patch, mean over layers and heads
        score = torch.cat([map_scores(score, boxes[:, v], boxes[:, 2]) for v in range(V)]).flatten(1)  # (V*b, L)
        out['ids_keep'] = block_mask(score, (gh, gw), args.mask_ratio)  # (V*b, K)
    elif 'byol_proj' in ema:
        tokens = visual.forward_tokens(views[:, 2])
    if 'byol_proj' in ema:
        out['target'] = ema['byol_proj'](visual.pool(tokens))  # (b, dim)
    return out

# ----------------------------------------------------------------------------- method: model and heads


def model_config(name):
    """common.model_config, pooled by the CLS token (see the docstring); the export carries the same config."""
    cfg = common.model_config(name)
    cfg['vision_cfg']['pool_type'] = 'tok'
    return cfg


def mlp(dims, bias):
    """Linear layers with BatchNorm + ReLU between them and none after the last (SimCLR's and BYOL's heads)."""
    layers = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=bias))
        if i < len(dims) - 2:
            layers += [nn.BatchNorm1d(dims[i + 1]), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class ACLIP(nn.Module):
    """The online network: `clip` (common.CLIP, exported) plus the heads on its pooled image token (pre-projection);
    a head whose loss is off is not built, so DDP sees no unused parameters."""

    def __init__(self, cfg, hidden, dim, simclr, byol):
        super().__init__()
        self.clip = common.CLIP(cfg)
        width = cfg['vision_cfg']['width']
        self.simclr_head = mlp([width, hidden, hidden, dim], bias=True) if simclr else None
        self.byol_proj = mlp([width, hidden, dim], bias=False) if byol else None
        self.byol_pred = mlp([dim, hidden, dim], bias=False) if byol else None

    def forward(self, images, texts, ids_keep=None):
        """images (V*B, 3, S, S), the online views stacked view-major -> normalised image (V*B, D) and text (B, D)
        features, logit scale, SimCLR embeddings (V*B, dim) and BYOL predictions (V*B, dim) (None where off)."""
        visual = self.clip.visual
        pooled = visual.pool(visual.forward_tokens(images, ids_keep))  # (V*B, width)
        image_features = F.normalize(pooled @ visual.proj, dim=-1)
        text_features = self.clip.encode_text(texts, normalize=True)
        z = self.simclr_head(pooled) if self.simclr_head is not None else None
        p = self.byol_pred(self.byol_proj(pooled)) if self.byol_proj is not None else None
        return image_features, text_features, self.clip.logit_scale.exp(), z, p


def tracked(model):
    """The online modules the EMA follows: the vision tower and the BYOL projector."""
    modules = {'visual': model.clip.visual}
    if model.byol_proj is not None:
        modules['byol_proj'] = model.byol_proj
    return nn.ModuleDict(modules)


def ema_momentum(step, total, base):
    """BYOL's cosine schedule: base at step 0, 1 at the end."""
    return 1 - (1 - base) * (math.cos(math.pi * step / total) + 1) / 2


@torch.no_grad()
def update_ema(ema, model, momentum):
    """ema <- m * ema + (1 - m) * online, parameters only (the EMA head's BN statistics are its own, as in BYOL)."""
    torch._foreach_lerp_(list(ema.parameters()), list(tracked(model).parameters()), 1 - momentum)

# ----------------------------------------------------------------------------- method: loss


def simclr_loss(z1, z2, tau):
    """NT-Xent (SimCLR eq. 1) over the global batch: local rows of each view against all ranks' rows of both views;
    the positive of sample i in view 1 is sample i in view 2, every other embedding (not itself) is a negative."""
    z1, z2 = F.normalize(z1.float(), dim=-1), F.normalize(z2.float(), dim=-1)
    B = z1.shape[0]
    labels = torch.arange(B, device=z1.device) + B * common.rank()
    k1, k2 = common.gather(z1), common.gather(z2)  # (world * B, dim)
    itself = F.one_hot(labels, k1.shape[0]).bool()  # (B, world * B)
    loss_1 = F.cross_entropy(torch.cat([z1 @ k2.T, (z1 @ k1.T).masked_fill(itself, -math.inf)], 1) / tau, labels)
    loss_2 = F.cross_entropy(torch.cat([z2 @ k1.T, (z2 @ k2.T).masked_fill(itself, -math.inf)], 1) / tau, labels)
    return (loss_1 + loss_2) / 2


def byol_loss(p, target):
    """2 - 2 cos(p, target) (BYOL eq. 2), p (V*B, dim) view-major online predictions, target (B, dim) from the EMA."""
    p, target = F.normalize(p.float(), dim=-1), F.normalize(target.float(), dim=-1)
    return (2 - 2 * (p.view(-1, *target.shape) * target).sum(dim=-1)).mean()


def coupled_loss(args, image_features, text_features, *rest):
    """Eq. (A)'s batch-coupled terms on this rank's rows, in fp32 (common.accumulate calls it outside autocast, on all
    of the step's rows at once): image_features (n, V, D) and text_features (n, D) for CLIP per view, then the SimCLR
    projections (n, 2, dim) where SimCLR is on, then the logit scale. -> (loss, terms)."""
    *z, logit_scale = rest
    image_features, text_features, logit_scale = image_features.float(), text_features.float(), logit_scale.float()
    V = image_features.shape[1]
    terms = {f'clip_{v + 1}': common.clip_loss(image_features[:, v], text_features, logit_scale) for v in range(V)}
    loss = args.clip_weight / V * sum(terms.values())  # eq. (A): 0.5 CLIP(v1, t) + 0.5 CLIP(v2, t)
    if z:
        z = z[0].float()  # (n, 2, dim)
        terms['simclr'] = simclr_loss(z[:, 0], z[:, 1], args.simclr_tau)
        loss = loss + args.simclr_weight * terms['simclr']  # eq. (A): + 1.0 SimCLR(v1, v2)
    return loss, terms


def loss_parts(out, target, args):
    """The online pass's outputs (view-major, as ACLIP.forward returns them) -> common.Forward: coupled = image
    features (b, V, D), text features (b, D) and the SimCLR projections (b, 2, dim) where on (coupled_loss reads them
    with the logit scale, `shared`); local = the weighted BYOL term, each sample's predictions against its EMA target
    (b, dim), in fp32 outside autocast: eq. (A)'s + 2.0 BYOL(v -> EMA)."""
    image_features, text_features, logit_scale, z, p = out
    b = text_features.shape[0]
    coupled = (image_features.view(-1, b, image_features.shape[-1]).transpose(0, 1), text_features)  # (b, V, D), (b, D)
    if z is not None:
        coupled += (z.view(2, b, -1).transpose(0, 1),)  # (b, 2, dim)
    terms = {}
    if p is not None:
        with torch.autocast(p.device.type, enabled=False):  # the losses in fp32: bf16 logits are +-0.25 at scale 100
            terms['byol'] = byol_loss(p.float(), target.float())
    return common.Forward(coupled=coupled, shared=(logit_scale,), local=args.byol_weight * terms.get('byol', 0.0),
                          terms=terms)


def losses(train_model, ema, views, boxes, texts, args, generator):
    """One batch's eq. (A) as one micro-batch of the loop (its forward, then coupled_loss), for step_seconds and
    bench.py to time; under the caller's autocast, the losses in fp32 outside it. views (B, 3, 3, S, S), boxes
    (B, 3, 4), `generator` for the random masks. -> (loss, terms, logit_scale)."""
    cache = teacher(ema, views, boxes, args)
    ids_random = random_ids(args, texts.shape[0], ema['visual'].grid_size, generator)  # (V, B, K) or None
    ids_keep = cache.get('ids_keep') if ids_random is None else ids_random.flatten(0, 1)  # (V*B, K)
    out = loss_parts(train_model(views[:, :args.views].transpose(0, 1).flatten(0, 1), texts, ids_keep),
                     cache.get('target'), args)
    with torch.autocast(views.device.type, enabled=False):
        loss, terms = coupled_loss(args, *out.coupled, *out.shared)
    return loss + out.local, dict(terms, **out.terms), out.shared[0]

# ----------------------------------------------------------------------------- data


def transforms(args, cfg):
    """(train, eval): train gives ThreeViews' (views, boxes) per sample, eval open_clip's preprocessing."""
    size = cfg['vision_cfg']['image_size']
    evaluate = open_clip.image_transform(size, is_train=False)
    if args.dataset_type == 'synthetic':
        colour = T.RandomApply([T.ColorJitter(0.2, 0.2)], p=0.8)  # captions name colours: brightness/contrast only
        return ThreeViews(size, (args.crop_scale, 1.0), (0.9, 1.1), colour), evaluate
    colour = T.Compose([T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(0.2),
                        T.RandomApply([T.GaussianBlur(2 * (size // 20) + 1, (0.1, 2.0))], p=0.1),
                        T.RandomSolarize(128, p=0.2)])
    return ThreeViews(size, (args.crop_scale, 1.0), (3 / 4, 4 / 3), colour), evaluate

# ----------------------------------------------------------------------------- cost: a step against a CLIP step


def step_seconds(model, ema, m, args, device, amp, n):
    """Median seconds of a training step (forward, backward, AdamW; and the EMA update) of A-CLIP and of CLIP (the whole
    first view, CLIP loss only) on the same batch, micro-batch m (common.Micro), on copies of the models; interleaved,
    so other load hits both alike. A plain loop of one-batch steps (`losses`), not the training loop's accumulation."""
    model, ema = copy.deepcopy(model), copy.deepcopy(ema)
    opt = torch.optim.AdamW(common.param_groups(model, args.wd), lr=1e-9, betas=(0.9, 0.98))
    (views, boxes), texts = m.images, m.texts
    generator = common.batch_generator(device, args.seed, 0)
    sync = torch.cuda.synchronize if device.type == 'cuda' else lambda: None
    steps = {'aclip': lambda: losses(model, ema, views, boxes, texts, args, generator)[0],
             'clip': lambda: common.clip_loss(*model.clip(views[:, 0], texts))}
    times = {name: [] for name in steps}
    for _ in range(n + 1):  # the first round warms up
        for name, loss_fn in steps.items():
            opt.zero_grad(set_to_none=True)
            sync()
            t = time.perf_counter()
            with amp:
                loss = loss_fn()
            loss.backward()
            opt.step()
            if name == 'aclip':
                update_ema(ema, model, 0.999)
            sync()
            times[name].append(time.perf_counter() - t)
    return {name: sorted(ts[1:])[n // 2] for name, ts in times.items()}

# ----------------------------------------------------------------------------- main


def main(argv=None):
    try:
        args = get_args(argv)
        cfg = model_config(args.model)
    except ValueError as err:
        common.fail(err)
    rank, world, device = common.init_distributed()
    torch.manual_seed(args.seed)  # the same initialisation on every rank
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, 'ckpt.pt')
    resume = args.resume or (ckpt_path if os.path.exists(ckpt_path) else None)
    amp = common.autocast(device, args.precision)

    # model: `model` (online CLIP + heads) is saved, its CLIP evaluated and exported; `train_model` (compiled, DDP)
    # runs the training forward; `ema` (the teacher: vision tower + BYOL projector) scores tokens and gives targets
    model = ACLIP(cfg, args.head_hidden, args.head_dim, simclr=args.views == 2 and args.simclr_weight > 0,
                  byol=args.byol_weight > 0).to(device)
    if world > 1 and device.type == 'cuda':
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # head BN statistics over the micro-batch of all ranks
    if args.head_bn == 'eval':  # BN on its running statistics: every sample alone (the EMA's copy inherits it)
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    common.set_grad_checkpointing(model, args.grad_checkpointing)
    train_model = common.maybe_compile(model, args.compile, device)
    if world > 1:
        train_model = DDP(train_model, device_ids=[device.index] if device.type == 'cuda' else None)
    tokenizer = common.tokenizer_for(cfg)
    num_patches, grid = model.clip.visual.num_patches, model.clip.visual.grid_size

    # resume
    state = None
    if resume:
        try:
            state = common.load_checkpoint(resume, cfg)
            model.load_state_dict(state['model'], strict=True)
        except (ValueError, RuntimeError, KeyError) as err:
            common.fail(f'cannot resume from {resume}: {str(err).splitlines()[0]}')
    start = state['step'] if state else 0
    if args.pretrained and not state:
        try:
            common.load_pretrained(model.clip, args.pretrained, args.model)
        except ValueError as err:
            common.fail(err)
    ema = copy.deepcopy(tracked(model)).requires_grad_(False)  # starts as the online weights, updated only by EMA
    if state:
        try:
            ema.load_state_dict(state['ema'], strict=True)
        except (RuntimeError, KeyError) as err:
            common.fail(f'cannot resume from {resume}: {str(err).splitlines()[0]}')

    # data
    train_tf, eval_tf = transforms(args, cfg)
    try:
        loader, num_samples = data.train_loader(args, train_tf, tokenizer, cfg['vision_cfg']['image_size'], rank, world, start)
        tasks, retrieval = data.eval_sets(args, eval_tf, cfg['vision_cfg']['image_size'])
    except data.DataError as err:
        common.fail(err)
    global_batch = common.finish_run_args(args, num_samples, world, 400, default_lr)

    # optimizer and schedule
    optimizer = torch.optim.AdamW(common.param_groups(model, args.wd), lr=args.lr, betas=(0.9, 0.98))
    common.resume_optimizer(optimizer, state, resume, args.steps, args)

    def checkpoint(step):
        if rank == 0:
            common.save_checkpoint(ckpt_path, {'model': model.state_dict(), 'ema': ema.state_dict(),
                                               'optimizer': optimizer.state_dict(), 'step': step,
                                               'rng': torch.get_rng_state(),
                                               'cfg': cfg, 'args': vars(args)})

    # loop
    logger = common.Logger(os.path.join(args.out, 'log.jsonl'), resume_step=start)
    stop = common.StopSignal()
    kept = num_patches if args.mask == 'none' else keep_count(num_patches, args.mask_ratio, args.mask != 'random')
    common.print0(f'A-CLIP: {args.model}, {args.mask} mask keeping {kept} of {num_patches} patches, {args.views} '
                  f'view(s), {args.steps} steps of {global_batch} ({world} process{"es" if world > 1 else ""}, '
                  f'{device.type}), out {args.out}')
    if world > 1 and device.type != 'cuda':
        common.print0('note: SyncBatchNorm needs CUDA; on CPU the heads normalise with per-rank batch statistics')
    meter, skipped, step = common.Throughput(), 0, start
    bar = tqdm(total=args.steps, initial=start, disable=rank != 0, dynamic_ncols=True)
    batches = common.Batches(loader, args, device)
    while step < args.steps:
        micro, n_skipped = next(batches)  # --accum-freq micro-batches of --batch-size, images = (views, boxes)
        lr = common.lr_at(step, args.steps, args.warmup, args.lr, min_lr=1e-5)
        for group in optimizer.param_groups:
            group['lr'] = lr
        # random masks (V, global batch, K) for every row of the global batch, each micro-batch takes its rows; the
        # attentive masks come from the EMA pass, per sample
        ids_random = random_ids(args, global_batch, grid, common.batch_generator(device, args.seed, step))

        def forward(m):
            views, boxes = m.images  # (b, 3, 3, S, S): online views 1 and 2, the EMA view; (b, 3, 4) their boxes
            with amp:
                if not m.cache:  # the EMA pass, once per micro-batch: attentive masks, BYOL targets
                    m.cache.update(teacher(ema, views, boxes, args))
                ids_keep = m.cache.get('ids_keep') if ids_random is None else ids_random[:, m.rows].flatten(0, 1)
                out = train_model(views[:, :args.views].transpose(0, 1).flatten(0, 1), m.texts, ids_keep)  # view-major
            return loss_parts(out, m.cache.get('target'), args)
        optimizer.zero_grad(set_to_none=True)
        loss, terms = common.accumulate(train_model, micro, forward, functools.partial(coupled_loss, args))
        nonfinite, stopping = common.any_rank(not torch.isfinite(loss).item(), stop.requested)
        if nonfinite:
            common.print0(f'error: non-finite loss at step {step + 1}; stopping all ranks, '
                          f'the last good checkpoint is kept in {ckpt_path}', file=sys.stderr)
            common.cleanup()
            sys.exit(1)
        common.clip_grad_norm(model, args.grad_clip_norm)
        optimizer.step()
        with torch.no_grad():
            model.clip.logit_scale.clamp_(0, math.log(100))
        momentum = ema_momentum(step, args.steps, args.ema_momentum)
        update_ema(ema, model, momentum)  # once per optimizer step
        step += 1
        skipped += n_skipped
        meter.add(global_batch)
        bar.update(1)
        if step % args.log_every == 0 or step == args.steps:
            record = {'step': step, 'loss': common.mean_over_ranks(loss),  # the global batch's, as one process logs
                      **{k: common.mean_over_ranks(v) for k, v in terms.items()}, 'lr': lr,
                      'logit_scale': model.clip.logit_scale.exp().item(), 'ema_momentum': momentum,
                      **meter.rates(batches), 'skipped': skipped}
            logger.log(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f'{lr:.2e}', data=common.data_share(record))
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:  # every rank: its share of the sets
            logger.log({'step': step, **common.evaluate(model.clip, tokenizer, tasks, retrieval, device, amp)})
        if step % args.save_every == 0 or step == args.steps or stopping:
            checkpoint(step)
        if stopping:
            common.print0(f'stopped by signal at step {step}; checkpoint saved to {ckpt_path}, rerun to resume')
            break
    bar.close()

    # cleanup: step time against CLIP (every rank: the losses hold collectives), final evaluation (every rank its
    # share; rank 0 logs and prints) and export (rank 0)
    if step == args.steps and args.time_steps and start < step:
        t = step_seconds(model, ema, micro[-1], args, device, amp, args.time_steps)
        logger.log({'step': step, 'step_seconds/aclip': t['aclip'], 'step_seconds/clip': t['clip']})
        common.print0(f"step time on the same batch: A-CLIP {t['aclip']:.3f} s, CLIP {t['clip']:.3f} s, "
                      f"{t['aclip'] / t['clip']:.2f}x (paper, ViT-B/16: 1.16x)")
    if step == args.steps:
        results = common.evaluate(model.clip, tokenizer, tasks, retrieval, device, amp)
        logger.log({'step': step, **results})
        common.print_results(results, common.chance_levels(tasks, retrieval))
        if rank == 0:
            common.export_open_clip(model.clip, cfg, os.path.join(args.out, 'open_clip'))
            print(f'exported open_clip model to local-dir:{os.path.join(args.out, "open_clip")}')
    common.cleanup()
    return step


if __name__ == '__main__':
    main()
