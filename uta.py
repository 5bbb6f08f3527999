"""UTA: Enhancing Vision-Language Model with Unmasked Token Alignment (Liu, Zheng, Liu, Liu, Li; arXiv 2405.19009).

The official repository (jihaonew/UTA) has inference code only; this is training code written from the paper.

What this file implements
- A frozen CLIP image encoder, the teacher, sees the full image (eval mode, no gradients, never updated). Its targets
  are every output token after its final norm and image projection, i.e. in CLIP space. The first target row is the
  teacher's CLIP image embedding: its CLS token (the patch mean for an 'avg'-pooled one). The teacher
  runs as open_clip builds it (open_clip.create_model), so any open_clip CLIP with a ViT image tower teaches:
  open_clip's own ViT (OpenAI, LAION, the exports of these scripts), whose tokens go through ln_post and proj, and timm
  trunks such as EVA02-B-16 and EVA02-L-14 (the paper's EVA-CLIP teachers), whose tokens go through the trunk's
  fc_norm and head and then open_clip's projection head, token by token, as its pooled output does.
- The student, the common.py ViT from scratch, sees only the unmasked tokens (no [MASK] tokens, no decoder). A linear
  head maps its tokens into the teacher's embedding space; the head is the student's own bias-free `visual.proj`, so
  the student's CLIP image embedding is CLS -> ln_post -> head, the token aligned to that first row.
- Loss: negative cosine similarity between student and teacher tokens at the same positions, averaged over CLS and
  every kept patch. The alignment stage reads images only: captions, where the data has them, are not used.
- Zero-shot: student CLS -> ln_post -> head, normalised, against the teacher's text encoder (the student model carries
  a copy of the teacher's text tower), reported beside the teacher's own zero-shot accuracy on the same images.
- Export: an open_clip `local-dir:` CLIP whose image tower is the student and whose text tower is the teacher's.
- Big batches: --accum-freq K gives one optimizer step over K x batch-size x processes samples with exactly one big
  batch's gradients, --grad-checkpointing recomputes the blocks in backward. The alignment loss averages as many
  tokens (CLS and the kept patches) in every sample, so the micro-batches' size-weighted mean is the global batch's:
  plain accumulation, no extra forward, the frozen teacher run once per micro-batch (no batch statistics: exact). The
  contrastive stage contrasts all the pairs of the global batch (common.accumulate: GradCache, one extra no-grad
  forward per micro-batch). Masks are drawn for the whole global batch from (seed, step) and each micro-batch takes
  its rows, so any split into processes x micro-batches gives the same step.
- --pretrained initialises the student from a CLIP of --model with the teacher's embedding dimension (an open_clip tag,
  local-dir: or a ckpt.pt; strict, so its text tower must fit the teacher's); the teacher's text tower and logit scale
  are then put back: zero-shot and the contrastive stage start from the teacher's text space.

Data: --train-data DIR, an ImageFolder of images without captions (the paper trains on ImageNet-21K; class folders,
classes unused), or WebDataset shards, read for their images alone when there is no contrastive stage; CSV files and
the embedded synthetic data as in the other scripts. A contrastive stage needs captions: with an ImageFolder it is
refused.

Reconstructed (not recoverable from the paper or the released code), each a flag:
- --mask block: "reversed block-wise" masking. BEiT's blocks (area >= 16 patches at a 14x14 grid, scaled to the
  grid; aspect ratio log-uniform in (0.3, 1/0.3)) are the *visible* set, drawn in order until K patches are visible;
  the block that overshoots is cut at random and, if the blocks cover fewer than K patches, random patches pad the
  set, so every sample keeps exactly K = max(1, int(L * (1 - r))) (at least one, as OpenCLIP's PatchDropout). A
  block's top-left corner is uniform over every position where the block still overlaps the grid, and the part
  outside is cut off: each patch is then covered equally often and kept 1 - r of the time, +-0.04, at every position
  (the paper's aim: visible tokens that cover the image evenly). BEiT draws each area up to the patches still missing
  and rejects blocks that overshoot; here every area is drawn up to K, so all samples are drawn at once on the device.
  --mask block-inside places every block inside the grid, as BEiT's generator does: the literal reading of "reversed
  BEiT masks", kept for comparison; it keeps the centre far more often than the border (14x14, r = 0.5: corners 7%,
  centre 86%). --mask random is FLIP's uniform masking. --mask-ratio 0.5.
- Different student and teacher grids: the teacher's patch-token map (in CLIP space) is resampled to the student's
  grid (area averages onto a coarser grid, bilinear onto a finer one); the image is first resized to the teacher's
  resolution, and renormalised to the teacher's mean and std, where those differ.
- The optimiser: EVA-02's masked-image-modelling recipe (baaivision/EVA, EVA-02/asuka: a CLIP-feature-prediction
  MIM like this one) -- AdamW betas (0.9, 0.98), eps 1e-6, wd 0.05 (none on biases, norms and position embeddings),
  the gradient norm clipped at 3.0 (--grad-clip-norm) -- with warmup then cosine to 0 and lr 1.5e-4 x global batch /
  256 (MAE's rule; EVA-02 uses 1.5e-3 at 2048 for B and L).
- The training augmentation: RandomResizedCrop to the student's size, scale (0.5, 1), bicubic, and a horizontal flip
  (EVA-02's MIM crops with scale (0.2, 1)); none on the embedded synthetic data, whose captions name positions.
- --contrastive-steps N (default 0): a second stage after --steps, CLIP loss on image-text pairs, full images, student
  image tower, text tower and logit scale all trained, fresh optimizer (the same recipe), lr / 10.
- --unmasked-fraction F (not in the paper; 0 except for the tiny CPU default): the last F of the alignment steps
  keep every patch (mask ratio 0, the same loss), as FLIP's unmasked tuning: the student ends on the full-image
  input that zero-shot evaluation gives it.

Scaled down for the embedded CPU default, and said so: the `tiny` student (64 px, 8 px patches), 640 steps of 128,
the second half unmasked (--unmasked-fraction 0.5), lr 2e-3. The student's width and depth come from --model, its
embedding dimension and text tower from the teacher, and it pools CLS (the aligned token). Why the unmasked half: the
synthetic objects are a few patches wide on an 8x8 grid, and half-image visible blocks often hide the object whose
name the CLS token must predict. On the 64-way object task the student reached 0.70x its teacher with 800 masked steps
at lr 1e-3, and 1.00x / 0.88x / 0.88x (seeds 0 / 1 / 2) with this default, in 4.3-4.6 minutes (README, Results);
those runs predate the even block placement, eps 1e-6 and the clipping (they used what is now --mask block-inside,
eps 1e-8, no clipping).

Launch
    python flip.py && python uta.py                  # CPU: distil runs/flip's CLIP into a tiny ViT, results in runs/uta/
    python uta.py --teacher EVA02-B-16/merged2b_s8b_b131k --model ViT-B-16 --train-data /data/imagenet21k \\
        --imagenet-val /data/imagenet/val           # one GPU: the paper's teacher, images without captions
    torchrun --nproc_per_node=8 uta.py --teacher EVA02-L-14/merged2b_s4b_b131k --model ViT-L-14 \\
        --train-data '/data/laion/{00000..41455}.tar' --train-num-samples 400000000 --imagenet-val /data/imagenet/val \\
        --batch-size 256 --workers 8
A teacher is any open_clip model name with its pretrained tag (ViT-L-14/openai, EVA02-B-16/merged2b_s8b_b131k), a
`local-dir:` folder, a state-dict file with --teacher-model NAME (read by open_clip's loader), or a ckpt.pt written by
these scripts. Its text tower must be one the compact text transformer of common.py builds (the student carries it).
"""
import argparse
import copy
import json
import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import open_clip
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer as OpenClipViT

import common
import data

# ----------------------------------------------------------------------------- args


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_common_args(p)
    p.set_defaults(wd=0.05, grad_clip_norm=3.0)  # EVA-02's MIM recipe
    g = p.add_argument_group('UTA')
    g.add_argument('--teacher', default='local-dir:runs/flip/open_clip', help='frozen CLIP teacher: open_clip '
                   'NAME/TAG, local-dir:PATH, or a checkpoint file')
    g.add_argument('--teacher-model', default=None, help='open_clip model name of a --teacher state-dict file')
    g.add_argument('--mask', default='block', choices=['block', 'block-inside', 'random'], help='reversed block-wise '
                   '(blocks cover every position equally), the same with blocks inside the grid (centre-biased), or '
                   'uniform')
    g.add_argument('--mask-ratio', type=float, default=0.5, help='fraction of student patches removed')
    g.add_argument('--unmasked-fraction', type=float, default=None, help='the last fraction of the alignment '
                   'steps sees every patch (mask ratio 0), so the student ends on the full-image input it is '
                   'evaluated on (default: 0.5 for the tiny CPU default, else 0 as the paper)')
    g.add_argument('--contrastive-steps', type=int, default=0, help='CLIP-loss steps on image-text pairs after '
                   '--steps, text tower trained too, fresh optimizer, lr / 10')
    args = p.parse_args(argv)
    if not 0 <= args.mask_ratio < 1:
        raise ValueError('--mask-ratio must be in [0, 1)')
    if args.contrastive_steps < 0:
        raise ValueError('--contrastive-steps must be >= 0')
    if args.unmasked_fraction is None:
        args.unmasked_fraction = 0.5 if args.model == 'tiny' else 0.0
    if not 0 <= args.unmasked_fraction <= 1:
        raise ValueError('--unmasked-fraction must be in [0, 1]')
    args = common.check_args(args, 'uta')
    if args.contrastive_steps and args.dataset_type == 'imagefolder':
        raise ValueError(f'--contrastive-steps needs captions, and --train-data {args.train_data} is a folder of '
                         'images; give a CSV or WebDataset shards with captions, or --contrastive-steps 0')
    return args


def default_lr(args, global_batch):
    """MAE's rule, lr = 1.5e-4 x global batch / 256; 2e-3 for the tiny model on the synthetic data."""
    return 2e-3 if args.model == 'tiny' else 1.5e-4 * global_batch / 256

# ----------------------------------------------------------------------------- method: masking


def block_masking(batch, grid, mask_ratio, generator, min_block=None, inside=False):
    """UTA's reversed block-wise masking: M BEiT-style rectangles per sample are the visible set. A patch's score is
    the index of the first rectangle covering it (M if none) plus U(0, 1) noise; the K = max(1, int(L * (1 - r)))
    lowest scores are kept, so rectangles are taken in order until K patches are visible, the last one cut at random,
    and random patches pad the rest. A rectangle's top-left corner is uniform over the positions where it overlaps the
    grid (cut at the border), so every patch is covered alike; inside=True keeps it inside the grid, as BEiT does
    (centre-biased). Returns ids_keep (B, K), the kept patch indices in [0, L), L = H * W."""
    H, W = grid
    dev = generator.device
    num_keep = max(1, int(H * W * (1 - mask_ratio)))
    min_block = min_block or max(1, round(16 * H * W / 196))  # BEiT: blocks of at least 16 patches at 14x14
    M = 2 * math.ceil(num_keep / min_block)  # rectangles per sample: enough to cover K patches nearly always
    u = torch.rand(4, batch, M, 1, 1, device=dev, generator=generator)  # (4, B, M, 1, 1)
    area = min_block + u[0] * max(num_keep - min_block, 0)  # in patches
    aspect = torch.exp((2 * u[1] - 1) * math.log(1 / 0.3))  # h / w, log-uniform in (0.3, 1/0.3)
    h = (area * aspect).sqrt().round().clamp(1, H)
    w = (area / aspect).sqrt().round().clamp(1, W)
    if inside:  # top in [0, H - h]: a centre row is inside more placements than a border row
        top, left = (u[2] * (H - h + 1)).floor(), (u[3] * (W - w + 1)).floor()
    else:  # top in [1 - h, H - 1]: every row is inside exactly h of the H + h - 1 placements
        top, left = (u[2] * (H + h - 1)).floor() - (h - 1), (u[3] * (W + w - 1)).floor() - (w - 1)
    rows = torch.arange(H, device=dev).view(1, 1, H, 1)
    cols = torch.arange(W, device=dev).view(1, 1, 1, W)
    covers = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)  # (B, M, H, W)
    order = torch.arange(M, device=dev).view(1, M, 1, 1)
    first = torch.where(covers, order, M).amin(dim=1).flatten(1)  # (B, L): the first rectangle covering each patch
    score = first + torch.rand(batch, H * W, device=dev, generator=generator)  # (B, L)
    return score.argsort(dim=1)[:, :num_keep]  # (B, K)


def random_masking(batch, num_patches, mask_ratio, generator):
    """FLIP's (= MAE's) per-sample uniform masking. Returns ids_keep (B, K), K = max(1, int(L * (1 - r))), the kept
    patch indices in [0, L); noise is drawn on the generator's device."""
    noise = torch.rand(batch, num_patches, device=generator.device, generator=generator)  # (B, L)
    return noise.argsort(dim=1)[:, :max(1, int(num_patches * (1 - mask_ratio)))]  # (B, K)

# ----------------------------------------------------------------------------- method: teacher, student and head


def load_teacher(spec, model_name=None):
    """Any open_clip CLIP -> (open_clip's own model with its weights, loaded strict, frozen and in eval mode; its
    config). Names with a tag and local-dir folders are built by open_clip.create_model; a state-dict file by
    open_clip with --teacher-model NAME; a ckpt.pt of these scripts from the config and weights it holds."""
    try:
        if spec.startswith('local-dir:'):
            with open(os.path.join(spec[len('local-dir:'):], 'open_clip_config.json')) as f:
                cfg = json.load(f)['model_cfg']
            clip = open_clip.create_model(spec, require_pretrained=True)
        elif os.path.isfile(spec) and model_name == 'tiny':  # this project's CPU model, not in open_clip's registry
            cfg = common.model_config('tiny')
            clip = open_clip.CLIP(**cfg)
            open_clip.load_checkpoint(clip, spec, strict=True)
        elif os.path.isfile(spec) and model_name:
            cfg = open_clip.get_model_config(model_name)
            clip = open_clip.create_model(model_name, pretrained=spec, require_pretrained=True)
        elif os.path.isfile(spec):
            state = open_clip.factory.load_state_dict(spec)  # .pt/.bin/.safetensors, a 'state_dict' key, 'module.'
            if not ('args' in state and 'model' in state):
                raise ValueError('a state-dict file needs --teacher-model NAME')
            cfg = state.get('cfg') or common.model_config(state['args']['model'])  # a ckpt.pt written by these scripts
            clip = open_clip.CLIP(**cfg)
            clip.load_state_dict(state['model'], strict=True)
        else:
            name, _, tag = spec.partition('/')
            if not tag:
                raise ValueError(f'{name} needs a pretrained tag, one of: '
                                 f'{", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"}')
            quick_gelu = (open_clip.get_pretrained_cfg(name, tag) or {}).get('quick_gelu', False)  # OpenAI's weights
            cfg = dict(open_clip.get_model_config(name) or {}, **({'quick_gelu': True} if quick_gelu else {}))
            clip = open_clip.create_model(name, pretrained=tag, require_pretrained=True,
                                          force_quick_gelu=quick_gelu)
    except Exception as err:
        raise ValueError(f'cannot load teacher {spec!r} ({str(err).splitlines()[0]}); make one with `python flip.py` '
                         f'(then --teacher local-dir:runs/flip/open_clip) or name a pretrained one, e.g. '
                         f'--teacher ViT-B-16/openai') from None
    check_tower(clip.visual, spec)
    return clip.eval().requires_grad_(False), cfg


def check_tower(visual, spec):
    """Refuses an image tower without patch tokens to align to (a CNN, attention pooling), in one line."""
    if isinstance(visual, TimmModel):
        t = visual.trunk
        ok = all(hasattr(t, a) for a in ('num_prefix_tokens', 'fc_norm', 'patch_embed')) and bool(t.global_pool) and \
            getattr(t, 'attn_pool', None) is None and 'pool' not in visual.head._modules
    elif isinstance(visual, OpenClipViT):
        ok = visual.attn_pool is None and visual.pool_type != 'none'
    else:
        ok = isinstance(visual, common.VisionTransformer)
    if not ok:
        raise ValueError(f'the image tower of teacher {spec!r} ({type(getattr(visual, "trunk", visual)).__name__}) has '
                         'no patch tokens to align to: UTA needs a ViT (open_clip\'s, or a timm ViT/EVA trunk) pooled '
                         'by its CLS token or a token average, not by attention')


def student_config(teacher_cfg, model):
    """The student's vision tower from --model, CLS pooled; embedding dimension, activation and text tower from the
    teacher, so the head (visual.proj) lands in the teacher's space and the teacher's text tower fits. Raises
    ValueError for a teacher text tower that the compact text transformer cannot hold."""
    text = teacher_cfg['text_cfg']
    bad = [k for k, x in text.items() if k not in common._TEXT_KEYS and x and common._TEXT_DEFAULTS.get(k) != x]
    if bad:
        raise ValueError(f'the teacher\'s text tower uses text_cfg.{", text_cfg.".join(bad)}, which the compact text '
                         'transformer in common.py (the student\'s copy of it) does not implement')
    vision = dict(common.model_config(model)['vision_cfg'], pool_type='tok')
    cfg = {k: copy.deepcopy(v) for k, v in teacher_cfg.items() if k in ('embed_dim', 'quick_gelu', 'text_cfg')}
    return dict(cfg, vision_cfg=vision)


def copy_text_tower(student, teacher):
    """The teacher's text tower and logit scale into the student (a common.CLIP), strict. open_clip's CustomTextCLIP
    (EVA-CLIP) holds them under 'text.'; CLIP and common.CLIP at the top level."""
    state = teacher.state_dict()
    if isinstance(teacher, open_clip.CustomTextCLIP):
        state = {'logit_scale': state['logit_scale'], **{k[5:]: v for k, v in state.items() if k.startswith('text.')}}
    names = [k for k in student.state_dict() if not k.startswith('visual.')]
    missing = [k for k in names if k not in state]
    if missing:
        raise ValueError(f'the teacher\'s text tower has no {missing[0]}, which the student\'s copy needs')
    try:
        student.load_state_dict({**student.state_dict(), **{k: state[k] for k in names}}, strict=True)
    except RuntimeError as err:
        raise ValueError(f'the teacher\'s text tower does not fit the student\'s copy '
                         f'({str(err).splitlines()[-1].strip()})') from None


def resample_tokens(patches, src_grid, dst_grid):
    """(B, Hs * Ws, D) token map -> (B, Hd * Wd, D): area averages onto a coarser grid (each student patch covers
    several teacher patches), bilinear interpolation onto a finer one."""
    B, _, D = patches.shape
    x = patches.transpose(1, 2).reshape(B, D, *src_grid)  # (B, D, Hs, Ws)
    shrink = dst_grid[0] <= src_grid[0] and dst_grid[1] <= src_grid[1]
    x = F.interpolate(x, size=dst_grid, mode='area' if shrink else 'bilinear')  # (B, D, Hd, Wd)
    return x.flatten(2).transpose(1, 2)  # (B, Hd * Wd, D)


def tower_tokens(visual, images):
    """A CLIP image tower's outputs in CLIP space: (its image embedding (B, D), exactly as it pools; every patch token
    through the same final norm and projection (B, Lt, D))."""
    if isinstance(visual, common.VisionTransformer):  # the compact ViT of these scripts (bench.py's step)
        tokens = visual.forward_tokens(images) @ visual.proj  # (B, 1 + Lt, D)
        return visual.pool(tokens), tokens[:, 1:]
    if isinstance(visual, TimmModel):  # EVA-CLIP, timm ViTs: the trunk's head, then open_clip's, on every token
        trunk = visual.trunk
        x = trunk.forward_features(images)  # (B, prefix + Lt, width) after the trunk's final norm
        patches = visual.head(trunk.head(trunk.fc_norm(x[:, trunk.num_prefix_tokens:])))  # (B, Lt, D)
        return visual.head(trunk.forward_head(x)), patches  # the first is visual(images)
    # open_clip's ViT: the last block's tokens through ln_post (normalize_intermediates), then proj
    out = visual.forward_intermediates(images, indices=1, normalize_intermediates=True, output_fmt='NLC')
    patches = out['image_intermediates'][-1]  # (B, Lt, width) after ln_post
    return out['image_features'], patches if visual.proj is None else patches @ visual.proj


def _pair(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x, x)


class Teacher(nn.Module):
    """The frozen teacher's targets on the student's grid, (B, 1 + L, D): its CLIP image embedding, then every patch
    token in CLIP space. Images come at the student's size, normalised with `mean`/`std` (the student's: OpenAI's);
    they are resized to the teacher's resolution and renormalised to its statistics where those differ."""

    def __init__(self, clip, grid, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD):
        super().__init__()
        v = clip.visual
        self.clip, self.grid, self.size = clip, tuple(grid), _pair(v.image_size)
        self.src_grid = tuple(v.trunk.patch_embed.grid_size) if isinstance(v, TimmModel) else tuple(v.grid_size)
        pp = open_clip.get_model_preprocess_cfg(clip)
        t_mean, t_std = [torch.tensor(pp.get(k) or d, dtype=torch.float32) for k, d in (('mean', mean), ('std', std))]
        s_mean, s_std = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
        self.renormalise = not (torch.allclose(t_mean, s_mean) and torch.allclose(t_std, s_std))
        device = next(clip.parameters()).device
        self.register_buffer('scale', (s_std / t_std).view(3, 1, 1).to(device), persistent=False)
        self.register_buffer('shift', ((s_mean - t_mean) / t_std).view(3, 1, 1).to(device), persistent=False)

    @torch.no_grad()
    def forward(self, images):
        if tuple(images.shape[-2:]) != self.size:
            images = F.interpolate(images, size=self.size, mode='bicubic', align_corners=False)
        if self.renormalise:  # x_teacher = (x * std + mean - teacher_mean) / teacher_std
            images = images * self.scale + self.shift
        pooled, patches = tower_tokens(self.clip.visual, images)  # (B, D), (B, Lt, D): CLIP space
        if self.src_grid != self.grid:
            patches = resample_tokens(patches, self.src_grid, self.grid)  # (B, L, D)
        return torch.cat([pooled[:, None], patches], dim=1)  # first row: the CLIP image embedding


class Student(nn.Module):
    """The training forward, one module for compile and DDP. Alignment (no texts): the CLS and kept tokens through
    ln_post and the head visual.proj, (B, 1 + K, D). Contrastive stage: the CLIP forward."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def forward(self, images, ids_keep=None, texts=None):
        if texts is not None:
            return self.clip(images, texts)
        return self.clip.visual.forward_tokens(images, ids_keep) @ self.clip.visual.proj

# ----------------------------------------------------------------------------- method: loss


def uta_loss(student_tokens, teacher_tokens, ids_keep):
    """Negative cosine similarity at the same positions over CLS and the K kept patches.
    student_tokens (B, 1 + K, D), teacher_tokens (B, 1 + L, D), ids_keep (B, K) -> (loss, cosines (B, 1 + K))."""
    D = teacher_tokens.shape[-1]
    kept = torch.gather(teacher_tokens[:, 1:], 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))  # (B, K, D)
    target = torch.cat([teacher_tokens[:, :1], kept], dim=1)  # (B, 1 + K, D)
    cos = F.cosine_similarity(student_tokens.float(), target.float(), dim=-1)  # (B, 1 + K)
    return -cos.mean(), cos

# ----------------------------------------------------------------------------- data


def transforms(args, cfg):
    size = cfg['vision_cfg']['image_size']
    evaluate = open_clip.image_transform(size, is_train=False)
    if data.resolve_dataset_type(args.train_data, args.dataset_type) == 'synthetic':
        return evaluate, evaluate  # captions name positions: no crop, no flip
    train = T.Compose([T.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                       T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)])
    return train, evaluate


def print_side_by_side(student, teacher, chance):
    common.print0(f"{'metric':<34} {'student':>8} {'teacher':>8} {'ratio':>7} {'chance':>8}")
    for k, v in student.items():
        t = teacher.get(k, float('nan'))
        common.print0(f'{k:<34} {v:8.4f} {t:8.4f} {v / t if t else float("nan"):7.3f} {chance.get(k, float("nan")):8.4f}')

# ----------------------------------------------------------------------------- main


def main(argv=None):
    try:
        args = get_args(argv)
        teacher_clip, teacher_cfg = load_teacher(args.teacher, args.teacher_model)
        cfg = student_config(teacher_cfg, args.model)
    except ValueError as err:
        common.fail(err)
    rank, world, device = common.init_distributed()
    torch.manual_seed(args.seed)  # the same initialisation on every rank
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, 'ckpt.pt')
    resume = args.resume or (ckpt_path if os.path.exists(ckpt_path) else None)
    amp = common.autocast(device, args.precision)

    # model: `model` (student image tower + a copy of the teacher's text tower) is saved, evaluated and exported;
    # `train_model` (compiled, DDP) runs the training forward; `teacher` is frozen and never saved
    model = common.CLIP(cfg).to(device)
    common.set_grad_checkpointing(model, args.grad_checkpointing)
    try:
        copy_text_tower(model, teacher_clip)
    except ValueError as err:
        common.fail(err)
    teacher_clip = teacher_clip.to(device)
    grid = model.visual.grid_size
    plain_teacher = Teacher(teacher_clip, grid)  # its targets; `teacher` is the compiled handle
    teacher = common.maybe_compile(plain_teacher, args.compile, device)
    tokenizer = common.tokenizer_for(cfg)
    num_patches = model.visual.num_patches

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
            common.load_pretrained(model, args.pretrained, args.model)
            copy_text_tower(model, teacher_clip)  # the image tower from --pretrained, the text tower the teacher's
        except ValueError as err:
            common.fail(err)

    # data: images only (an ImageFolder, or shards whose captions are not read) unless a contrastive stage needs the
    # captions; where the loader tokenises them, only that stage reads them. The teacher is evaluated on its own
    # preprocessing (size, mean, std)
    train_tf, eval_tf = transforms(args, cfg)
    size = cfg['vision_cfg']['image_size']
    image_only = args.dataset_type == 'imagefolder' or \
        (args.dataset_type == 'webdataset' and not args.contrastive_steps)
    pp = open_clip.get_model_preprocess_cfg(teacher_clip)
    teacher_tf = open_clip.image_transform(plain_teacher.size, is_train=False, mean=pp.get('mean'), std=pp.get('std'))
    try:
        loader, num_samples = data.image_loader(args, train_tf, rank, world, start) if image_only else \
            data.train_loader(args, train_tf, tokenizer, size, rank, world, start)
        tasks, retrieval = data.eval_sets(args, eval_tf, size)
        teacher_tasks, teacher_retrieval = (tasks, retrieval) if plain_teacher.size == (size, size) and \
            not plain_teacher.renormalise else data.eval_sets(args, teacher_tf, plain_teacher.size[0])
    except data.DataError as err:
        common.fail(err)
    global_batch = common.finish_run_args(args, num_samples, world, 640, default_lr)
    total = args.steps + args.contrastive_steps
    unmasked_from = args.steps - round(args.unmasked_fraction * args.steps)  # alignment steps from here see every patch

    # optimizer and schedule: alignment trains the image tower only; the contrastive stage starts a fresh optimizer
    # over the whole student (text tower and logit scale included) at step args.steps
    def make_optimizer(contrastive):
        for name, p in model.named_parameters():
            p.requires_grad_(contrastive or name.startswith('visual.'))
        return torch.optim.AdamW(common.param_groups(model, args.wd), lr=args.lr, betas=(0.9, 0.98), eps=1e-6)

    def wrap():  # after make_optimizer: DDP registers the parameters that require grad when it is built
        m = common.maybe_compile(Student(model), args.compile, device)
        return DDP(m, device_ids=[device.index] if device.type == 'cuda' else None) if world > 1 else m

    def lr_at(step):
        if step < args.steps:
            return common.lr_at(step, args.steps, args.warmup, args.lr)
        return common.lr_at(step - args.steps, args.contrastive_steps, max(1, args.contrastive_steps // 20), args.lr / 10)

    optimizer = make_optimizer(start > args.steps)
    train_model = wrap()
    common.resume_optimizer(optimizer, state, resume, total, args)

    def checkpoint(step):
        if rank == 0:
            common.save_checkpoint(ckpt_path, {'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                                               'step': step, 'rng': torch.get_rng_state(),
                                               'cfg': cfg, 'args': vars(args)})

    # loop
    logger = common.Logger(os.path.join(args.out, 'log.jsonl'), resume_step=start)
    stop = common.StopSignal()
    common.print0(f'UTA: {args.model} student from teacher {args.teacher}, {args.mask} mask ratio {args.mask_ratio}, '
                  f'{args.steps} steps (the last {args.steps - unmasked_from} unmasked) + {args.contrastive_steps} '
                  f'contrastive steps of {global_batch} '
                  f'({world} process{"es" if world > 1 else ""}, {device.type}), out {args.out}')
    meter, skipped, step = common.Throughput(), 0, start
    bar = tqdm(total=total, initial=start, disable=rank != 0, dynamic_ncols=True)
    batches = common.Batches(loader, args, device)
    while step < total:
        micro, n_skipped = next(batches)  # --accum-freq micro-batches of --batch-size
        contrastive = step >= args.steps
        if step == args.steps and args.contrastive_steps:
            optimizer = make_optimizer(True)  # fresh optimizer state (also right after a resume here)
            train_model = wrap()
        lr = lr_at(step)
        for group in optimizer.param_groups:
            group['lr'] = lr
        optimizer.zero_grad(set_to_none=True)
        if contrastive:  # stage 2: CLIP loss on full images and their captions, over the whole global batch
            def forward(m):
                with amp:
                    image_features, text_features, logit_scale = train_model(m.images, texts=m.texts)
                return common.Forward(coupled=(image_features, text_features), shared=(logit_scale,))
            loss, terms = common.accumulate(train_model, micro, forward, common.clip_loss)
        else:  # stage 1: align the student's unmasked tokens to the teacher's tokens at the same positions
            g = common.batch_generator(device, args.seed, step)
            ratio = args.mask_ratio if step < unmasked_from else 0.0
            ids_keep = random_masking(global_batch, num_patches, ratio, g) if args.mask == 'random' else \
                block_masking(global_batch, grid, ratio, g, inside=args.mask == 'block-inside')  # (global batch, K)

            def forward(m):
                if 'targets' not in m.cache:
                    with amp:
                        m.cache['targets'] = teacher(m.images)  # (b, 1 + L, D), no grad
                with amp:
                    tokens = train_model(m.images, ids_keep[m.rows])  # (b, 1 + K, D)
                loss, cos = uta_loss(tokens, m.cache['targets'], ids_keep[m.rows])  # the micro-batch's mean
                return common.Forward(local=loss, terms={'cos_cls': cos[:, 0].mean()})  # CLS: the token zero-shot uses
            loss, terms = common.accumulate(train_model, micro, forward, None)
        nonfinite, stopping = common.any_rank(not torch.isfinite(loss).item(), stop.requested)
        if nonfinite:
            common.print0(f'error: non-finite loss at step {step + 1}; stopping all ranks, '
                          f'the last good checkpoint is kept in {ckpt_path}', file=sys.stderr)
            common.cleanup()
            sys.exit(1)
        common.clip_grad_norm(model, args.grad_clip_norm)
        optimizer.step()
        if contrastive:
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
        step += 1
        skipped += n_skipped
        meter.add(global_batch)
        bar.update(1)
        if step % args.log_every == 0 or step == total:
            record = {'step': step, 'stage': 'contrastive' if contrastive else 'align', 'loss': common.mean_over_ranks(loss),
                      'lr': lr, **{k: common.mean_over_ranks(v) for k, v in terms.items()},
                      **({'logit_scale': model.logit_scale.exp().item()} if contrastive else {}),
                      **meter.rates(batches), 'skipped': skipped}
            logger.log(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f'{lr:.2e}', data=common.data_share(record))
        if args.eval_every and step % args.eval_every == 0 and step < total:  # every rank: its share of the sets
            logger.log({'step': step, **common.evaluate(model, tokenizer, tasks, retrieval, device, amp)})
        if step % args.save_every == 0 or step == total or stopping:
            checkpoint(step)
        if stopping:
            common.print0(f'stopped by signal at step {step}; checkpoint saved to {ckpt_path}, rerun to resume')
            break
    bar.close()

    # cleanup: final evaluation of student and teacher side by side (every rank its share; rank 0 logs and prints) and
    # export (rank 0)
    if step == total:
        results = common.evaluate(model, tokenizer, tasks, retrieval, device, amp)
        teacher_results = common.evaluate(teacher_clip, tokenizer, teacher_tasks, teacher_retrieval, device, amp)
        logger.log({'step': step, **results, **{f'teacher/{k}': v for k, v in teacher_results.items()}})
        print_side_by_side(results, teacher_results, common.chance_levels(tasks, retrieval))
        if rank == 0:
            common.export_open_clip(model, cfg, os.path.join(args.out, 'open_clip'))
            print(f'exported open_clip model to local-dir:{os.path.join(args.out, "open_clip")}')
    common.cleanup()
    return step


if __name__ == '__main__':
    main()
