"""FLIP: Scaling Language-Image Pre-training via Masking (Li, Fan, Hu, Feichtenhofer, He; arXiv 2212.00794).

What this file implements
- CLIP trained with a large random fraction of image patches removed before the image encoder (Sec. 3): per sample,
  noise ~ U(0, 1) over the L patches, keep the int(L * (1 - r)) patches with the smallest noise (MAE's masking,
  uniform, not block-wise). The position embedding is added before the drop, CLS is always kept, there are no
  [MASK] tokens, no decoder and no reconstruction loss. r = 0.5 by default, 0.75 supported, r = 0 is CLIP.
- The symmetric InfoNCE loss over the global batch (common.clip_loss: local rows against gathered columns).
- Evaluation sees the full, unmasked image.
- Unmasked tuning (Sec. 3, "Unmasked tuning"): after the masked steps, --unmasked-tuning-steps more steps at r = 0
  with a fresh optimizer state, a 100x lower learning rate and its own warmup (the official recipe: lr 4e-8 per 256,
  warmup 20 of 100 epochs; --unmasked-tuning-warmup, default 20% of the tuning steps). The paper uses ~1% of
  training; default 0 here. Every patch costs activation memory, so by default tuning keeps the global batch and
  cuts each micro-batch into ceil(1 / (1 - r)) (--unmasked-accum-freq): a batch sized for r = 0.5 fits the tuning.
- The paper's optimiser: AdamW, betas (0.9, 0.95), wd 0.2, linear warmup then cosine decay to 0, lr = 4e-6 x global
  batch / 256, RandomResizedCrop area (0.5, 1) and horizontal flip on real data. Weight decay: the official code
  exempts biases, norm scales and position embeddings only, so it DOES decay the CLS embedding and the logit scale;
  here they are exempt, as in OpenCLIP and in the other four files (common.param_groups), so that CLIP and every
  method share one optimizer. A difference in two vectors of parameters, stated rather than copied.
- Zero-shot prompts: the official code scores ImageNet with 7 short templates ('itap of a {}.', ...; open_clip's
  SIMPLE_IMAGENET_TEMPLATES); here OpenAI's 80 by default, `--zeroshot-templates flip` for FLIP's.
- Big batches (the point of the paper: more samples per step at the same memory): --accum-freq K contrasts all
  K x batch-size x processes samples with exactly one big batch's gradients (common.accumulate: GradCache, one extra
  no-grad forward per micro-batch), --grad-checkpointing recomputes the blocks in backward. Masks are drawn for the
  whole global batch from (seed, step) and each micro-batch takes its rows, so any split gives the same step.
- Small global batches: the lr rule is for the paper's 32k-64k; at 8 x 256 = 2048 it gives 3.2e-5, far below what
  CLIP trainings at such batches use (OpenCLIP's README examples: lr 5e-4 to 1e-3, 2k-10k warmup steps, batches of
  128-256 per GPU). On one node either pass --lr (5e-4 is a reasonable start; an untuned suggestion, not measured
  here), or reach the paper's batch with --accum-freq (8 x 256 x 16 = 32k, where the rule gives 5.1e-4).

Scaled down for the embedded CPU default, and said so: the `tiny` model (64 px, 8 px patches), 800 steps of 128,
lr 1e-3 (the paper's rule would give 2e-6 at this batch, far too small for a tiny model from scratch in minutes), and
no crop or flip on the synthetic data, whose captions name positions ("on the left").

Where this follows OpenCLIP's architecture rather than the JAX code, so the result is a standard open_clip model:
OpenAI's BPE tokenizer and causal text tower pooled at the end-of-text token (the paper: BERT WordPiece,
bidirectional, first-token pooling, length 32 -- text-side choices it reports as marginal); learned position
embeddings (paper: fixed 2-D sin-cos); ln_pre present; pooling as the open_clip config says: CLS for open_clip's
ViT configs and for `tiny` (the official code averages all output tokens including CLS; on the embedded data the
patch mean, open_clip's 'avg', learned position at 1.7x chance and CLS at 3.1x, 3 seeds: README). Each keeps the
export loadable by `open_clip.create_model_and_transforms('local-dir:...')`.

Launch
    python flip.py                                   # CPU, synthetic data, ~6 minutes, results in runs/flip/
    python flip.py --mask-ratio 0 --out runs/clip    # the CLIP baseline
    torchrun --nproc_per_node=8 flip.py --model ViT-B-16 --train-data '/data/laion/{00000..41455}.tar' \\
        --train-num-samples 400000000 --imagenet-val /data/imagenet/val --batch-size 256 --workers 8
"""
import argparse
import math
import os
import sys

import torch
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
    g = p.add_argument_group('FLIP')
    g.add_argument('--mask-ratio', type=float, default=0.5, help='fraction of patches removed (0 = CLIP)')
    g.add_argument('--unmasked-tuning-steps', type=int, default=0, help='steps at mask ratio 0 after --steps, '
                   'fresh optimizer, lr / 100 (paper: ~1%% of training)')
    g.add_argument('--unmasked-tuning-warmup', type=int, default=None, help='warmup steps of unmasked tuning '
                   '(default: 20%% of them, as the official recipe)')
    g.add_argument('--unmasked-accum-freq', type=int, default=None, help='micro-batches per unmasked-tuning step, the '
                   'same global batch (default: ceil(1 / (1 - mask ratio)) x --accum-freq: no more activation memory '
                   'than a masked step)')
    args = p.parse_args(argv)
    if not 0 <= args.mask_ratio < 1:
        raise ValueError('--mask-ratio must be in [0, 1)')
    if args.unmasked_tuning_steps < 0:
        raise ValueError('--unmasked-tuning-steps must be >= 0')
    if args.unmasked_tuning_warmup is None:
        args.unmasked_tuning_warmup = args.unmasked_tuning_steps // 5
    if args.unmasked_accum_freq is None:
        args.unmasked_accum_freq = math.ceil(1 / (1 - args.mask_ratio) - 1e-9) * args.accum_freq
    if args.unmasked_accum_freq < 1 or args.unmasked_accum_freq % max(args.accum_freq, 1):
        raise ValueError('--unmasked-accum-freq must be a positive multiple of --accum-freq')
    if args.unmasked_tuning_warmup < 0:
        raise ValueError('--unmasked-tuning-warmup must be >= 0')
    return common.check_args(args, 'flip')


def default_lr(args, global_batch):
    """The paper's rule, lr = 4e-6 x global batch / 256; 1e-3 for the tiny model on the synthetic data."""
    return 1e-3 if args.model == 'tiny' else 4e-6 * global_batch / 256

# ----------------------------------------------------------------------------- method: masking


def random_masking(batch, num_patches, mask_ratio, generator):
    """FLIP's (= MAE's) per-sample uniform masking. Returns ids_keep (B, K), K = max(1, int(L * (1 - r))), the kept
    patch indices in [0, L); noise is drawn on the generator's device."""
    noise = torch.rand(batch, num_patches, device=generator.device, generator=generator)  # (B, L)
    return noise.argsort(dim=1)[:, :max(1, int(num_patches * (1 - mask_ratio)))]  # (B, K)

# ----------------------------------------------------------------------------- data


def transforms(args, cfg):
    size = cfg['vision_cfg']['image_size']
    evaluate = open_clip.image_transform(size, is_train=False)
    if args.dataset_type == 'synthetic':
        return evaluate, evaluate  # captions name positions: no crop, no flip
    train = T.Compose([T.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                       T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)])
    return train, evaluate

# ----------------------------------------------------------------------------- main


def main(argv=None):
    try:
        args = get_args(argv)
        cfg = common.model_config(args.model)
    except ValueError as err:
        common.fail(err)
    rank, world, device = common.init_distributed()
    torch.manual_seed(args.seed)  # the same initialisation on every rank
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, 'ckpt.pt')
    resume = args.resume or (ckpt_path if os.path.exists(ckpt_path) else None)
    amp = common.autocast(device, args.precision)

    # model: `model` is saved, evaluated and exported; `train_model` (compiled, DDP) runs the training forward
    model = common.CLIP(cfg).to(device)
    common.set_grad_checkpointing(model, args.grad_checkpointing)
    train_model = common.maybe_compile(model, args.compile, device)
    if world > 1:
        train_model = DDP(train_model, device_ids=[device.index] if device.type == 'cuda' else None)
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
        except ValueError as err:
            common.fail(err)

    # data
    train_tf, eval_tf = transforms(args, cfg)
    try:
        loader, num_samples = data.train_loader(args, train_tf, tokenizer, cfg['vision_cfg']['image_size'], rank, world, start)
        tasks, retrieval = data.eval_sets(args, eval_tf, cfg['vision_cfg']['image_size'])
    except data.DataError as err:
        common.fail(err)
    global_batch = common.finish_run_args(args, num_samples, world, 800, default_lr)
    total = args.steps + args.unmasked_tuning_steps

    # optimizer and schedule; unmasked tuning starts from a fresh optimizer state at step args.steps
    def make_optimizer():
        return torch.optim.AdamW(common.param_groups(model, args.wd), lr=args.lr, betas=(0.9, 0.95))

    def lr_at(step):
        if step < args.steps:
            return common.lr_at(step, args.steps, args.warmup, args.lr)
        return common.lr_at(step - args.steps, args.unmasked_tuning_steps, args.unmasked_tuning_warmup, args.lr / 100)

    optimizer = make_optimizer()
    common.resume_optimizer(optimizer, state, resume, total, args)

    def checkpoint(step):
        if rank == 0:
            common.save_checkpoint(ckpt_path, {'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                                               'step': step, 'rng': torch.get_rng_state(),
                                               'cfg': cfg, 'args': vars(args)})

    # loop
    logger = common.Logger(os.path.join(args.out, 'log.jsonl'), resume_step=start)
    stop = common.StopSignal()
    common.print0(f'FLIP: {args.model}, mask ratio {args.mask_ratio}, {total} steps of {global_batch} '
                  f'({world} process{"es" if world > 1 else ""}, {device.type}), out {args.out}')
    meter, skipped, step = common.Throughput(), 0, start
    bar = tqdm(total=total, initial=start, disable=rank != 0, dynamic_ncols=True)
    batches = common.Batches(loader, args, device)
    while step < total:
        micro, n_skipped = next(batches)  # --accum-freq micro-batches of --batch-size
        if step >= args.steps:  # unmasked tuning: the same global batch in smaller micro-batches
            micro = common.split_micro(micro, args.unmasked_accum_freq // args.accum_freq)
        if step == args.steps and args.unmasked_tuning_steps:
            optimizer = make_optimizer()  # unmasked tuning: fresh optimizer state (also right after a resume here)
        lr = lr_at(step)
        for group in optimizer.param_groups:
            group['lr'] = lr
        mask_ratio = args.mask_ratio if step < args.steps else 0.0
        ids_keep = None  # (global batch, K): masks for every row of the global batch; each micro-batch takes its rows
        if mask_ratio > 0:
            ids_keep = random_masking(global_batch, num_patches, mask_ratio, common.batch_generator(device, args.seed, step))

        def forward(m):
            with amp:
                image_features, text_features, logit_scale = train_model(
                    m.images, m.texts, None if ids_keep is None else ids_keep[m.rows])
            return common.Forward(coupled=(image_features, text_features), shared=(logit_scale,))
        optimizer.zero_grad(set_to_none=True)
        loss, _ = common.accumulate(train_model, micro, forward, common.clip_loss)
        nonfinite, stopping = common.any_rank(not torch.isfinite(loss).item(), stop.requested)
        if nonfinite:
            common.print0(f'error: non-finite loss at step {step + 1}; stopping all ranks, '
                          f'the last good checkpoint is kept in {ckpt_path}', file=sys.stderr)
            common.cleanup()
            sys.exit(1)
        common.clip_grad_norm(model, args.grad_clip_norm)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        step += 1
        skipped += n_skipped
        meter.add(global_batch)
        bar.update(1)
        if step % args.log_every == 0 or step == total:
            record = {'step': step, 'loss': common.mean_over_ranks(loss), 'lr': lr,
                      'logit_scale': model.logit_scale.exp().item(), 'mask_ratio': mask_ratio,
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

    # cleanup: final evaluation (every rank its share; rank 0 logs and prints) and export (rank 0)
    if step == total:
        results = common.evaluate(model, tokenizer, tasks, retrieval, device, amp)
        logger.log({'step': step, **results})
        common.print_results(results, common.chance_levels(tasks, retrieval))
        if rank == 0:
            common.export_open_clip(model, cfg, os.path.join(args.out, 'open_clip'))
            print(f'exported open_clip model to local-dir:{os.path.join(args.out, "open_clip")}')
    common.cleanup()
    return step


if __name__ == '__main__':
    main()
