"""UTA: Enhancing Vision-Language Model with Unmasked Token Alignment (Liu, Zheng, Liu, Liu, Li; arXiv 2405.19009).

The official repository (jihaonew/UTA) has inference code only; this is training code written from the paper.

What this file implements
- A frozen CLIP image encoder, the teacher, sees the full image (eval mode, no gradients, never updated). Its targets
  are every output token after its final LayerNorm and image projection, i.e. in CLIP space. The first target row
  is the teacher's CLIP image embedding: its CLS token, or the patch mean for an 'avg'-pooled teacher (`tiny`).
- The student, the common.py ViT from scratch, sees only the unmasked tokens (no [MASK] tokens, no decoder). A linear
  head maps its tokens into the teacher's embedding space; the head is the student's own bias-free `visual.proj`, so
  the student's CLIP image embedding is CLS -> ln_post -> head, the token aligned to that first row.
- Loss: negative cosine similarity between student and teacher tokens at the same positions, averaged over CLS and
  every kept patch. Captions are loaded but never used by this stage.
- Zero-shot: student CLS -> ln_post -> head, normalised, against the teacher's text encoder (the student model carries
  a copy of the teacher's text tower), reported beside the teacher's own zero-shot accuracy on the same images.
- Export: an open_clip `local-dir:` CLIP whose image tower is the student and whose text tower is the teacher's.

Reconstructed (not recoverable from the paper or the released code), each a flag:
- --mask block: "reversed block-wise" masking. BEiT's blocks (area >= 16 patches at a 14x14 grid, scaled to the
  grid; aspect ratio log-uniform in (0.3, 1/0.3)) are the *visible* set, drawn in order until K = int(L * (1 - r))
  patches are visible; the block that overshoots is cut at random and, if the blocks cover fewer than K patches,
  random patches pad the set, so every sample keeps exactly K. BEiT draws each area up to the patches still missing
  and rejects blocks that overshoot; here every area is drawn up to K, so all samples are drawn at once on the device.
  --mask random is FLIP's uniform masking. --mask-ratio 0.5.
- Different student and teacher grids: the teacher's patch-token map (in CLIP space) is resampled to the student's
  grid (area averages onto a coarser grid, bilinear onto a finer one); the image is first resized to the teacher's
  resolution if that differs.
- The optimiser: AdamW betas (0.9, 0.98), wd 0.05 (the masked-image-modelling recipe; none on biases, norms and
  position embeddings), warmup then cosine to 0, lr 1.5e-4 x global batch / 256 (MAE's rule).
- --contrastive-steps N (default 0): a second stage after --steps, CLIP loss on image-text pairs, full images, student
  image tower, text tower and logit scale all trained, fresh optimizer, lr / 10.
- --unmasked-fraction F (not in the paper; 0 except for the tiny CPU default): the last F of the alignment steps
  keep every patch (mask ratio 0, the same loss), as FLIP's unmasked tuning: the student ends on the full-image
  input that zero-shot evaluation gives it.

Scaled down for the embedded CPU default, and said so: the `tiny` student (64 px, 8 px patches), 640 steps of 128,
the second half unmasked (--unmasked-fraction 0.5), lr 2e-3, no crop or flip on the synthetic data (captions name
positions). The student's width and depth come from --model, its embedding dimension and text tower from the
teacher, and it pools CLS (the aligned token). Why the unmasked half: the synthetic objects are a few patches wide
on an 8x8 grid, and half-image visible blocks often hide the object whose name the CLS token must predict. On the
64-way object task the student reached 0.70x its teacher with 800 masked steps at lr 1e-3, and 1.00x / 0.88x /
0.88x (seeds 0 / 1 / 2) with this default, in 4.3-4.6 minutes (README, Results).

Launch
    python flip.py && python uta.py                  # CPU: distil runs/flip's CLIP into a tiny ViT, results in runs/uta/
    python uta.py --teacher ViT-B-16/openai --model ViT-B-16 --train-data /data/cc3m.csv --imagenet-val /data/imagenet/val
    torchrun --nproc_per_node=8 uta.py --teacher ViT-B-16/openai --model ViT-B-16 \\
        --train-data '/data/laion/{00000..41455}.tar' --train-num-samples 400000000 --imagenet-val /data/imagenet/val \\
        --batch-size 256 --workers 8
A teacher is any open_clip model name with its pretrained tag (ViT-L-14/openai), a `local-dir:` folder, or a
checkpoint file (an open_clip state dict with --teacher-model NAME, or a ckpt.pt written by these scripts).
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

import common
import data

# ----------------------------------------------------------------------------- args


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_common_args(p)
    p.set_defaults(wd=0.05)
    g = p.add_argument_group('UTA')
    g.add_argument('--teacher', default='local-dir:runs/flip/open_clip', help='frozen CLIP teacher: open_clip '
                   'NAME/TAG, local-dir:PATH, or a checkpoint file')
    g.add_argument('--teacher-model', default=None, help='open_clip model name of a --teacher state-dict file')
    g.add_argument('--mask', default='block', choices=['block', 'random'], help='reversed block-wise or uniform')
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
    return common.check_args(args, 'uta')


def default_lr(args, global_batch):
    """MAE's rule, lr = 1.5e-4 x global batch / 256; 2e-3 for the tiny model on the synthetic data."""
    return 2e-3 if args.model == 'tiny' else 1.5e-4 * global_batch / 256

# ----------------------------------------------------------------------------- method: masking


def block_masking(batch, grid, mask_ratio, generator, min_block=None):
    """UTA's reversed block-wise masking: M BEiT-style rectangles per sample are the visible set. A patch's score is
    the index of the first rectangle covering it (M if none) plus U(0, 1) noise; the K = int(L * (1 - r)) lowest
    scores are kept, so rectangles are taken in order until K patches are visible, the last one cut at random, and
    random patches pad the rest. Returns ids_keep (B, K), the kept patch indices in [0, L), L = H * W."""
    H, W = grid
    dev = generator.device
    num_keep = int(H * W * (1 - mask_ratio))
    min_block = min_block or max(1, round(16 * H * W / 196))  # BEiT: blocks of at least 16 patches at 14x14
    M = 2 * math.ceil(num_keep / min_block)  # rectangles per sample: enough to cover K patches nearly always
    u = torch.rand(4, batch, M, 1, 1, device=dev, generator=generator)  # (4, B, M, 1, 1)
    area = min_block + u[0] * max(num_keep - min_block, 0)  # in patches
    aspect = torch.exp((2 * u[1] - 1) * math.log(1 / 0.3))  # h / w, log-uniform in (0.3, 1/0.3)
    h = (area * aspect).sqrt().round().clamp(1, H)
    w = (area / aspect).sqrt().round().clamp(1, W)
    top, left = (u[2] * (H - h + 1)).floor(), (u[3] * (W - w + 1)).floor()
    rows = torch.arange(H, device=dev).view(1, 1, H, 1)
    cols = torch.arange(W, device=dev).view(1, 1, 1, W)
    inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)  # (B, M, H, W)
    order = torch.arange(M, device=dev).view(1, M, 1, 1)
    first = torch.where(inside, order, M).amin(dim=1).flatten(1)  # (B, L): the first rectangle covering each patch
    score = first + torch.rand(batch, H * W, device=dev, generator=generator)  # (B, L)
    return score.argsort(dim=1)[:, :num_keep]  # (B, K)


def random_masking(batch, num_patches, mask_ratio, generator):
    """FLIP's (= MAE's) per-sample uniform masking. Returns ids_keep (B, K), K = int(L * (1 - r)), the kept patch
    indices in [0, L); noise is drawn on the generator's device."""
    noise = torch.rand(batch, num_patches, device=generator.device, generator=generator)  # (B, L)
    return noise.argsort(dim=1)[:, :int(num_patches * (1 - mask_ratio))]  # (B, K)

# ----------------------------------------------------------------------------- method: teacher, student and head


def load_teacher(spec, model_name=None):
    """Any CLIP teacher -> (common.CLIP with its weights, loaded strict, frozen and in eval mode; its config).
    Names and local-dir folders are built by open_clip and copied over; files are read with open_clip's reader."""
    try:
        if os.path.isfile(spec):
            state = open_clip.factory.load_state_dict(spec)  # .pt/.bin/.safetensors, a 'state_dict' key, 'module.'
            if 'args' in state and 'model' in state:  # a ckpt.pt written by these scripts
                cfg, state = state.get('cfg') or common.model_config(state['args']['model']), state['model']
            elif model_name:
                cfg = common.model_config(model_name)
            else:
                raise ValueError('a state-dict file needs --teacher-model NAME')
        else:
            if spec.startswith('local-dir:'):
                path = spec[len('local-dir:'):]
                if not os.path.isfile(os.path.join(path, 'open_clip_config.json')):
                    raise FileNotFoundError(f'no open_clip model in {path}')
                with open(os.path.join(path, 'open_clip_config.json')) as f:
                    cfg = json.load(f)['model_cfg']
                oc = open_clip.create_model(spec)
            else:
                name, _, tag = spec.partition('/')
                cfg = common.model_config(name)
                cfg['quick_gelu'] = cfg.get('quick_gelu') or open_clip.get_pretrained_cfg(name, tag).get('quick_gelu', False)
                oc = open_clip.create_model(name, pretrained=tag or None, require_pretrained=True)
            state = oc.state_dict()
        teacher = common.CLIP(cfg)
        teacher.load_state_dict(state, strict=True)
    except Exception as err:
        raise ValueError(f'cannot load teacher {spec!r} ({str(err).splitlines()[0]}); make one with `python flip.py` '
                         f'(then --teacher local-dir:runs/flip/open_clip) or name a pretrained one, e.g. '
                         f'--teacher ViT-B-16/openai') from None
    return teacher.eval().requires_grad_(False), cfg


def student_config(teacher_cfg, model):
    """The student's vision tower from --model, CLS pooled; embedding dimension, activation and text tower from the
    teacher, so the head (visual.proj) lands in the teacher's space and the teacher's text tower fits."""
    vision = dict(common.model_config(model)['vision_cfg'], pool_type='tok')
    return {**copy.deepcopy(teacher_cfg), 'vision_cfg': vision}


def resample_tokens(patches, src_grid, dst_grid):
    """(B, Hs * Ws, D) token map -> (B, Hd * Wd, D): area averages onto a coarser grid (each student patch covers
    several teacher patches), bilinear interpolation onto a finer one."""
    B, _, D = patches.shape
    x = patches.transpose(1, 2).reshape(B, D, *src_grid)  # (B, D, Hs, Ws)
    shrink = dst_grid[0] <= src_grid[0] and dst_grid[1] <= src_grid[1]
    x = F.interpolate(x, size=dst_grid, mode='area' if shrink else 'bilinear')  # (B, D, Hd, Wd)
    return x.flatten(2).transpose(1, 2)  # (B, Hd * Wd, D)


class Teacher(nn.Module):
    """The frozen teacher's targets: every token after ln_post and proj, on the student's grid, (B, 1 + L, D)."""

    def __init__(self, clip, grid):
        super().__init__()
        self.clip, self.grid = clip, tuple(grid)

    @torch.no_grad()
    def forward(self, images):
        v = self.clip.visual
        if images.shape[-1] != v.image_size:
            images = F.interpolate(images, size=(v.image_size, v.image_size), mode='bicubic', align_corners=False)
        tokens = v.forward_tokens(images) @ v.proj  # (B, 1 + Lt, D): CLIP space
        patches = tokens[:, 1:]
        if tuple(v.grid_size) != self.grid:
            patches = resample_tokens(patches, v.grid_size, self.grid)  # (B, L, D)
        return torch.cat([v.pool(tokens)[:, None], patches], dim=1)  # first row: the CLIP image embedding


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
    text_tower = {k: v for k, v in teacher_clip.state_dict().items() if not k.startswith('visual.')}
    model.load_state_dict({**model.state_dict(), **text_tower}, strict=True)
    teacher_clip = teacher_clip.to(device)
    grid = model.visual.grid_size
    teacher = common.maybe_compile(Teacher(teacher_clip, grid), args.compile, device)
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

    # data: captions are tokenised by the loader but only the contrastive stage reads them
    train_tf, eval_tf = transforms(args, cfg)
    teacher_size = teacher_cfg['vision_cfg']['image_size']
    try:
        loader, num_samples = data.train_loader(args, train_tf, tokenizer, cfg['vision_cfg']['image_size'], rank, world, start)
        tasks, retrieval = data.eval_sets(args, eval_tf, cfg['vision_cfg']['image_size'])
        teacher_tasks, teacher_retrieval = (tasks, retrieval) if teacher_size == cfg['vision_cfg']['image_size'] else \
            data.eval_sets(args, open_clip.image_transform(teacher_size, is_train=False), teacher_size)
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
        return torch.optim.AdamW(common.param_groups(model, args.wd), lr=args.lr, betas=(0.9, 0.98))

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
    batches = iter(loader)
    while step < total:
        images, texts, n_skipped = next(batches)
        contrastive = step >= args.steps
        if step == args.steps and args.contrastive_steps:
            optimizer = make_optimizer(True)  # fresh optimizer state (also right after a resume here)
            train_model = wrap()
        lr = lr_at(step)
        for group in optimizer.param_groups:
            group['lr'] = lr
        images = images.to(device, non_blocking=True)
        extra = {}  # per-stage values to log
        if contrastive:  # stage 2: CLIP loss on full images and their captions
            with amp:
                image_features, text_features, logit_scale = train_model(images, texts=texts.to(device, non_blocking=True))
            loss = common.clip_loss(image_features, text_features, logit_scale)
            extra['logit_scale'] = logit_scale
        else:  # stage 1: align the student's unmasked tokens to the teacher's tokens at the same positions
            g = common.step_generator(device, args.seed, rank, step)
            ratio = args.mask_ratio if step < unmasked_from else 0.0
            ids_keep = block_masking(images.shape[0], grid, ratio, g) if args.mask == 'block' \
                else random_masking(images.shape[0], num_patches, ratio, g)  # (B, K)
            with amp:
                targets = teacher(images)  # (B, 1 + L, D), no grad
                tokens = train_model(images, ids_keep)  # (B, 1 + K, D)
            loss, cos = uta_loss(tokens, targets, ids_keep)
            extra['cos_cls'] = cos[:, 0].mean()  # the token zero-shot uses
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nonfinite, stopping = common.any_rank(not torch.isfinite(loss).item(), stop.requested)
        if nonfinite:
            common.print0(f'error: non-finite loss at step {step + 1}; stopping all ranks, '
                          f'the last good checkpoint is kept in {ckpt_path}', file=sys.stderr)
            common.cleanup()
            sys.exit(1)
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
                      'lr': lr, **{k: common.mean_over_ranks(v) for k, v in extra.items()},
                      'samples_per_sec': meter.rate(), 'skipped': skipped}
            logger.log(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f'{lr:.2e}')
        if args.eval_every and step % args.eval_every == 0 and step < total and rank == 0:
            logger.log({'step': step, **common.evaluate(model, tokenizer, tasks, retrieval, device, amp)})
        if step % args.save_every == 0 or step == total or stopping:
            checkpoint(step)
        if stopping:
            common.print0(f'stopped by signal at step {step}; checkpoint saved to {ckpt_path}, rerun to resume')
            break
    bar.close()

    # cleanup: final evaluation of student and teacher side by side, and export (rank 0)
    if step == total and rank == 0:
        results = common.evaluate(model, tokenizer, tasks, retrieval, device, amp)
        teacher_results = common.evaluate(teacher_clip, tokenizer, teacher_tasks, teacher_retrieval, device, amp)
        logger.log({'step': step, **results, **{f'teacher/{k}': v for k, v in teacher_results.items()}})
        print_side_by_side(results, teacher_results, common.chance_levels(tasks, retrieval))
        common.export_open_clip(model, cfg, os.path.join(args.out, 'open_clip'))
        print(f'exported open_clip model to local-dir:{os.path.join(args.out, "open_clip")}')
    common.cleanup()
    return step


if __name__ == '__main__':
    main()
