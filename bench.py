"""bench.py: the five methods side by side on one backbone, one data path and one machine.

Two questions pick a method: what does a step cost, and what does it buy. Papers answer each on their own hardware
and data; this file answers both here, in one run per question.

    python bench.py speed --model tiny                  # cost: step time, FLOPs, memory; CLIP = 1.00x (~40 s on a CPU)
    python bench.py speed --model ViT-B-16 --batch-size 8 --rounds 3 --warmup 1
    python bench.py quality --methods clip flip50      # what it buys: same-budget runs (3 seeds), tables and plots
    python bench.py loader                              # can the loader feed it: images/s per worker vs OpenCLIP's

speed (one process, the current device: CUDA if present, else CPU):
- every method's training step (forward, backward, AdamW, and its EMA/centre updates) on the same model size and
  batch of synthetic samples through the method's own training transform; rounds are interleaved (one step of each
  method per round) so load on a shared machine hits all alike; warm-up rounds dropped, the median reported, as a
  ratio to the CLIP step next to the paper's published ratio;
- FLOPs per step counted with torch.utils.flop_counter (forward + backward), FLIP's measured speed-up against its
  FLOP-count ideal, and each step's achieved FLOP/s against a plain matmul's FLOP/s measured in the same run;
- memory: the bytes of the distinct tensors each step saves for backward (its activation memory, any device), and on
  CUDA the peak allocated during the step above what was resident before it;
- common.py's vision tower against open_clip's VisionTransformer of the same config with the same weights,
  forward + backward: throughput ratio and activation memory.
Eager mode: no torch.compile, so the numbers are the code's as written. Models are randomly initialised (UTA's
teacher is a frozen random CLIP of the student's size). On a CPU with glibc, freed memory is kept for reuse
(keep_freed_memory; --system-malloc to time without), as CUDA's caching allocator keeps it.

quality: runs each method's script as a subprocess with the same --steps, --batch-size and seed (and the method's
own defaults otherwise, --lr included unless given), evaluating every --eval-every steps, for each seed. UTA distils
the FLIP (r = 0.5) run of the same seed; flip50-equal-time is FLIP (r = 0.5) given as many steps as fit in the CLIP
run's training time (the paper's comparison); both run after the runs they need. Training seconds are steps x the
median of the logged 10-step intervals, so the few intervals that hold start-up or an evaluation do not count; the
subprocess wall-clock is recorded too. Reports mean and spread over seeds per task, the paper's claims next to what we
measured, and a PNG of zero-shot accuracy against training seconds (needs matplotlib).

loader: images/s per loader worker at --image-size from generated WebDataset shards of web-sized JPEGs (500x375 by
default), through FLIP's training transform and OpenCLIP's tokenizer, for open_clip_train.data.get_wds_dataset (as
its training builds it with --dataset-resampled; it needs pandas), this project's pipeline decoding every JPEG in full
(as before draft decoding), and this project's pipeline (data.Decoder: a JPEG is decoded at 1/2-1/8 size when the
crop leaves room). Rounds are interleaved (a few batches of each pipeline in turn), the ratio taken per round.

Outputs in --out (default bench/): speed-<model>-<device>.{json,md}; quality.{json,md,png} and the runs under runs/;
loader-<size>px-<W>x<H>.{json,md}.
"""
import argparse
import copy
import ctypes
import io
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, default_collate
from torch.utils import flop_counter

import open_clip

import attentive_mask_clip as aclip
import common
import data
import flip
import maskclip
import uniclip
import uta

aten = torch.ops.aten
SDPA_CPU_FLOPS = {  # torch's flop counter has formulas for the CUDA attention kernels only; the CPU one, the same way
    aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_flop_count(q, k, v),
    aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_backward_flop_count(grad, q, k, v)}
ROOT = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = {'flip.py': flip, 'uta.py': uta, 'attentive_mask_clip.py': aclip, 'maskclip.py': maskclip,
           'uniclip.py': uniclip}
PAPER_RATIO = {'clip': '1.00', 'flip50': '0.50 (FLOPs 0.52)', 'flip75': '0.33 (FLOPs 0.28)', 'uta': 'not published',
               'aclip': '1.16', 'maskclip': '1.56', 'maskclip-bidirectional-text': '(a variant)',
               'maskclip-masked-view': '(a variant)', 'uniclip': 'not published'}

# ----------------------------------------------------------------------------- speed: one training step per method


def synthetic_batch(transform, tokenizer, size, batch_size):
    """The first `batch_size` training samples of the embedded dataset through a method's training transform."""
    dataset = data.SyntheticShapes(size, seed=0, split='train')
    torch.manual_seed(0)  # the transforms draw from torch's global RNG
    samples = [dataset[i] for i in range(batch_size)]
    return default_collate([transform(image) for image, _ in samples]), tokenizer([c for _, c in samples])


def clip_step(model_name, batch_size, device, ratio):
    """CLIP (ratio 0) or FLIP: flip.py's forward and loss. Returns (trained module, loss function, after-step hook)."""
    args = flip.get_args(['--model', model_name, '--mask-ratio', str(ratio)])
    cfg = common.model_config(model_name)
    model = common.CLIP(cfg).to(device)
    images, texts = synthetic_batch(flip.transforms(args, cfg)[0], common.tokenizer_for(cfg),
                                    cfg['vision_cfg']['image_size'], batch_size)
    images, texts = images.to(device), texts.to(device)
    generator = torch.Generator(device).manual_seed(0)

    def loss():
        ids_keep = flip.random_masking(batch_size, model.visual.num_patches, ratio, generator) if ratio else None
        return common.clip_loss(*model(images, texts, ids_keep))
    return model, loss, None


def uta_step(model_name, batch_size, device):
    """UTA's alignment step: a frozen teacher of the student's size on the full image, the student on the kept
    tokens, negative cosine; only the image tower trains."""
    args = uta.get_args(['--model', model_name])
    teacher_cfg = common.model_config(model_name)
    cfg = uta.student_config(teacher_cfg, model_name)
    teacher_clip = common.CLIP(teacher_cfg).to(device).eval().requires_grad_(False)
    model = common.CLIP(cfg).to(device)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith('visual.'))
    teacher, student = uta.Teacher(teacher_clip, model.visual.grid_size), uta.Student(model)
    images, _ = synthetic_batch(uta.transforms(args, cfg)[0], common.tokenizer_for(cfg),
                                cfg['vision_cfg']['image_size'], batch_size)
    images = images.to(device)
    generator = torch.Generator(device).manual_seed(0)

    def loss():
        ids_keep = uta.block_masking(batch_size, model.visual.grid_size, args.mask_ratio, generator)
        return uta.uta_loss(student(images, ids_keep), teacher(images), ids_keep)[0]
    return model, loss, None


def aclip_step(model_name, batch_size, device):
    """A-CLIP's default step: EMA scoring pass, two masked online views, CLIP + SimCLR + BYOL, the EMA update."""
    args = aclip.get_args(['--model', model_name])
    cfg = aclip.model_config(model_name)
    model = aclip.ACLIP(cfg, args.head_hidden, args.head_dim, simclr=args.simclr_weight > 0,
                        byol=args.byol_weight > 0).to(device)
    ema = copy.deepcopy(aclip.tracked(model)).requires_grad_(False)
    (views, boxes), texts = synthetic_batch(aclip.transforms(args, cfg)[0], common.tokenizer_for(cfg),
                                            cfg['vision_cfg']['image_size'], batch_size)
    views, boxes, texts = views.to(device), boxes.to(device), texts.to(device)
    generator = torch.Generator(device).manual_seed(0)

    def loss():
        return aclip.losses(model, ema, views, boxes, texts, args, generator)[0]
    return model, loss, lambda: aclip.update_ema(ema, model, 0.999)


def maskclip_step(model_name, batch_size, device, *flags):
    """MaskCLIP's step (default: CLIP on the full image and the masked caption, the masked image pass + decoder
    against the EMA teacher's online tokenizer, MLM from the CLIP text pass; then the EMA and centre updates), or
    with `flags`."""
    args = maskclip.get_args(['--model', model_name, *flags])
    cfg = common.model_config(model_name)
    model = maskclip.MaskCLIP(cfg, args).to(device)
    teacher = copy.deepcopy(model.distilled()).requires_grad_(False)
    center = torch.zeros(args.prototypes, device=device)
    images, texts = synthetic_batch(maskclip.transforms(args, cfg)[0], common.tokenizer_for(cfg),
                                    cfg['vision_cfg']['image_size'], batch_size)
    images, texts = images.to(device), texts.to(device)
    generator = torch.Generator(device).manual_seed(0)
    target = {}

    def loss():
        total, _, _, target['t'] = maskclip.losses(model, model, teacher, center, images, texts, args, generator)
        return total

    def after():
        maskclip.ema_update(teacher, model.distilled(), 0.999)
        maskclip.update_center(center, target['t'])
    return model, loss, after


def uniclip_step(model_name, batch_size, device):
    """UniCLIP's default step: two augmented views + the caption per sample, MP-NCE in the universal space."""
    args = uniclip.get_args(['--model', model_name, '--batch-size', str(max(2, batch_size))])
    cfg = common.model_config(model_name)
    model = uniclip.UniCLIP(cfg, args.aug_embed, args.aug_hidden, args.tau, args.offset, args.tau_init).to(device)
    (images, params), texts = synthetic_batch(uniclip.transforms(args, cfg)[0], common.tokenizer_for(cfg),
                                              cfg['vision_cfg']['image_size'], batch_size)
    B, V = images.shape[:2]
    images, params, texts = images.to(device).flatten(0, 1), params.to(device).flatten(0, 1), texts.to(device)
    domains = [0] * V + [1]

    def loss():
        image_features, text_features, tau, offset = model(images, params, texts)
        z = torch.cat([image_features.view(B, V, -1), text_features[:, None]], dim=1)
        return uniclip.universal_loss(z, domains, tau, offset, args.loss, args.text_text)[0]
    return model, loss, None


STEPS = {'clip': lambda m, b, d: clip_step(m, b, d, 0.0), 'flip50': lambda m, b, d: clip_step(m, b, d, 0.5),
         'flip75': lambda m, b, d: clip_step(m, b, d, 0.75), 'uta': uta_step, 'aclip': aclip_step,
         'maskclip': maskclip_step,
         'maskclip-bidirectional-text': lambda m, b, d: maskclip_step(m, b, d, '--mlm-pass', 'bidirectional'),
         'maskclip-masked-view': lambda m, b, d: maskclip_step(m, b, d, '--clip-view', 'masked'),
         'uniclip': uniclip_step}

# ----------------------------------------------------------------------------- speed: measuring


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def count_flops(fn):
    """FLOPs of the matmuls, convolutions and attention that fn() runs (forward and, if it calls it, backward)."""
    with flop_counter.FlopCounterMode(display=False, custom_mapping=SDPA_CPU_FLOPS) as counter:
        fn()
    return counter.get_total_flops()


def saved_bytes(fn, module):
    """Runs fn() (a forward + backward) and returns the bytes of the distinct storages autograd saved for backward,
    the module's own parameters and autocast's low-precision copies of them not counted: the step's activation memory."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages = {}

    def is_weight_copy(t):  # a cast straight from a leaf (a parameter): autocast's bf16 weight
        fn = t.grad_fn
        return type(fn).__name__ == 'ToCopyBackward0' and type(fn.next_functions[0][0]).__name__ == 'AccumulateGrad'

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params and not is_weight_copy(t):
            storages[(s.device, s.data_ptr())] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def matmul_flops_per_second(device, dtype, repeats):
    n = 4096 if device.type == 'cuda' else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for _ in range(repeats + 2):
        sync(device)
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        sync(device)
        times.append((time.perf_counter() - t) / 4)
    return 2 * n ** 3 / statistics.median(times[2:])


def interleaved_medians(fns, rounds, warmup, device):
    """{name: fn} -> {name: median seconds}, one call of each per round, the first `warmup` rounds dropped."""
    times = {name: [] for name in fns}
    for r in range(warmup + rounds):
        for name, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def keep_freed_memory():
    """glibc hands freed blocks above its mmap threshold back to the OS, so each step page-faults its big tensors
    in again, at a cost that grows with a method's transient memory (on this project's CPU, a second MaskCLIP text
    pass looked 30% dearer than its FLOPs). CUDA's caching allocator keeps freed blocks; this makes glibc keep them too
    (mallopt: no mmap below 1 GiB, or 32 MiB where an older glibc caps it; no trimming of the heap), so CPU step times
    rank methods as their compute does. Returns the mmap threshold set, in bytes, or 0 where nothing was set (no glibc).
    """
    try:
        libc = ctypes.CDLL('libc.so.6')
    except OSError:
        return 0
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
    for threshold in (2 ** 30, 2 ** 25):
        if libc.mallopt(M_MMAP_THRESHOLD, threshold) == 1:
            libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1)
            return threshold
    return 0


def speed(args, device):
    amp = common.autocast(device, args.precision)
    dtype = torch.bfloat16 if bf16(args, device) else torch.float32
    methods = {}
    for name in args.methods:
        torch.manual_seed(0)
        model, loss_fn, after = STEPS[name](args.model, args.batch_size, device)
        opt = torch.optim.AdamW(common.param_groups(model, 0.2), lr=1e-9, betas=(0.9, 0.95))

        def step(loss_fn=loss_fn, after=after, opt=opt):
            with amp:
                loss = loss_fn()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if after:
                after()
        methods[name] = dict(step=step, loss_fn=loss_fn, opt=opt, model=model)
        common.print0(f'built {name}')

    def forward_backward(loss_fn):
        with amp:
            loss = loss_fn()
        loss.backward()

    rows = {}
    for name, m in methods.items():
        m['step']()  # optimizer state and lazy buffers exist before memory is read
        rows[name] = {'flops': count_flops(lambda: forward_backward(m['loss_fn'])),
                      'saved_MiB': saved_bytes(lambda: forward_backward(m['loss_fn']), m['model']) / 2 ** 20}
        m['opt'].zero_grad(set_to_none=True)  # the two passes above only measured
        if device.type == 'cuda':
            sync(device)
            torch.cuda.reset_peak_memory_stats()
            resident = torch.cuda.memory_allocated()
            m['step']()
            sync(device)
            rows[name]['cuda_peak_MiB'] = (torch.cuda.max_memory_allocated() - resident) / 2 ** 20
    common.print0(f'timing {len(methods)} steps x {args.rounds} rounds (+{args.warmup} warm-up)')
    seconds = interleaved_medians({n: m['step'] for n, m in methods.items()}, args.rounds, args.warmup, device)
    matmul = matmul_flops_per_second(device, dtype, args.rounds)
    base = seconds.get('clip')
    for name, row in rows.items():
        row.update(seconds=seconds[name], ratio=seconds[name] / base if base else None,
                   flop_ratio=row['flops'] / rows['clip']['flops'] if 'clip' in rows else None,
                   tflops_per_s=row['flops'] / seconds[name] / 1e12, of_matmul=row['flops'] / seconds[name] / matmul,
                   paper_ratio=PAPER_RATIO[name])
    return rows, matmul, open_clip_tower(args, device, amp)


def open_clip_tower(args, device, amp):
    """common.py's VisionTransformer vs open_clip's of the same config and weights: forward + backward."""
    cfg = common.model_config(args.model)
    ours = common.CLIP(cfg).visual.to(device)
    ref = (open_clip.model.CLIP(**cfg) if args.model == 'tiny' else open_clip.create_model(args.model)).visual.to(device)
    ref.load_state_dict(ours.state_dict(), strict=True)
    size = cfg['vision_cfg']['image_size']
    images = torch.randn(args.batch_size, 3, size, size, device=device)

    def fwd_bwd(tower):
        def fn():
            tower.zero_grad(set_to_none=True)
            with amp:
                out = tower(images)
            out.float().square().mean().backward()
        return fn
    modules = {'common.py': ours, 'open_clip': ref}
    towers = {name: fwd_bwd(m) for name, m in modules.items()}
    seconds = interleaved_medians(towers, args.rounds, args.warmup, device)
    result = {name: {'seconds': seconds[name], 'images_per_s': args.batch_size / seconds[name],
                     'saved_MiB': saved_bytes(fn, modules[name]) / 2 ** 20} for name, fn in towers.items()}
    if device.type == 'cuda':
        for name, fn in towers.items():
            modules[name].zero_grad(set_to_none=True)
            sync(device)
            torch.cuda.reset_peak_memory_stats()
            resident = torch.cuda.memory_allocated()
            fn()
            sync(device)
            result[name]['cuda_peak_MiB'] = (torch.cuda.max_memory_allocated() - resident) / 2 ** 20
    return result


def malloc_note(args):
    """What the speed table's header says of the CPU allocator."""
    if args.malloc == 'kept':
        return f', freed memory kept for reuse (glibc mallopt: no mmap below {args.malloc_threshold // 2 ** 20} MiB)'
    return ', the allocator as is (not glibc)' if args.malloc == 'unchanged' else ''


def speed_report(args, device, rows, matmul, towers):
    machine = device_name(device)
    subset = '' if args.methods == list(STEPS) else f' --methods {" ".join(args.methods)}'
    subset += ' --system-malloc' if args.system_malloc else ''
    lines = [f'Step cost, `python bench.py speed --model {args.model} --batch-size {args.batch_size}{subset}` on {machine}, '
             f'{"bf16 autocast" if bf16(args, device) else "fp32"}, eager, '
             f'median of {args.rounds} interleaved rounds{malloc_note(args)}. Matmul reference: '
             f'{matmul / 1e12:.3f} TFLOP/s.', '',
             '| method | step (ms) | × CLIP | paper × CLIP | GFLOP/step | FLOPs × CLIP | % of matmul FLOP/s | '
             'saved for backward (MiB) |' + (' CUDA peak (MiB) |' if device.type == 'cuda' else ''),
             '|---|---|---|---|---|---|---|---|' + ('---|' if device.type == 'cuda' else '')]
    for name, r in rows.items():
        lines.append(f"| {name} | {1e3 * r['seconds']:.1f} | {fmt(r['ratio'])} | {r['paper_ratio']} | "
                     f"{r['flops'] / 1e9:.1f} | {fmt(r['flop_ratio'])} | {100 * r['of_matmul']:.0f}% | "
                     f"{r['saved_MiB']:.0f} |" + (f" {r['cuda_peak_MiB']:.0f} |" if device.type == 'cuda' else ''))
    lines.append('')
    for r in ('flip50', 'flip75'):
        if r in rows and 'clip' in rows:
            lines.append(f"- {r}: measured speed-up {1 / rows[r]['ratio']:.2f}x against its FLOP-count ideal "
                         f"{1 / rows[r]['flop_ratio']:.2f}x ({rows[r]['flop_ratio'] / rows[r]['ratio']:.0%} of ideal).")
    o, c = towers['open_clip'], towers['common.py']
    lines += [f"- Vision tower forward + backward, batch {args.batch_size}: common.py {c['images_per_s']:.1f} images/s, "
              f"open_clip {o['images_per_s']:.1f} images/s ({c['images_per_s'] / o['images_per_s']:.2f}x); saved for "
              f"backward {c['saved_MiB']:.0f} MiB vs {o['saved_MiB']:.0f} MiB."]
    return '\n'.join(lines) + '\n'

# ----------------------------------------------------------------------------- quality: same-budget training runs


CONFIGS = {  # name: (script, flags beyond the shared budget)
    'clip': ('flip.py', ['--mask-ratio', '0']),
    'flip50': ('flip.py', ['--mask-ratio', '0.5']),
    'flip75': ('flip.py', ['--mask-ratio', '0.75']),
    'flip50-equal-time': ('flip.py', ['--mask-ratio', '0.5']),  # --steps: CLIP's training seconds / FLIP's step time
    'uta': ('uta.py', ['--teacher', 'local-dir:{runs}/flip50-s{seed}/open_clip']),
    'aclip': ('attentive_mask_clip.py', ['--mask', 'attentive', '--time-steps', '0']),
    'aclip-random': ('attentive_mask_clip.py', ['--mask', 'random', '--time-steps', '0']),  # per-token: the paper's
    'aclip-1view-cliponly': ('attentive_mask_clip.py', ['--mask', 'attentive', '--views', '1', '--simclr-weight', '0',
                                                         '--byol-weight', '0', '--time-steps', '0']),
    'aclip-random-1view-cliponly': ('attentive_mask_clip.py', ['--mask', 'random', '--views', '1', '--simclr-weight',
                                                                '0', '--byol-weight', '0', '--time-steps', '0']),
    'maskclip': ('maskclip.py', ['--time-steps', '0']),
    'maskclip-bidirectional-text': ('maskclip.py', ['--mlm-pass', 'bidirectional', '--time-steps', '0']),  # 2nd text pass
    'maskclip-masked-view': ('maskclip.py', ['--clip-view', 'masked', '--time-steps', '0']),  # no full-image pass
    'uniclip': ('uniclip.py', []),
    'uniclip-no-aug-embed': ('uniclip.py', ['--aug-embed', 'none']),
    'uniclip-infonce': ('uniclip.py', ['--loss', 'infonce']),
    'uniclip-shared-tau': ('uniclip.py', ['--tau', 'shared']),  # one learnable temperature, same starting values
    'uniclip-no-offset': ('uniclip.py', ['--offset', 'none']),
    'uniclip-same-tau-init': ('uniclip.py', ['--tau-init', '0.07', '0.07']),  # image-image starts at 0.07, not 0.1
    'uniclip-shared-sim': ('uniclip.py', ['--tau', 'shared', '--offset', 'none', '--tau-init', '0.07', '0.07']),
}
CLAIMS = [  # (paper's claim, method, baseline, kind): 'beats' the baseline, 'matches' it, or the UTA 'teacher' test
    ('FLIP: masking 50% matches or beats CLIP at equal steps, at about half the step cost', 'flip50', 'clip', 'matches'),
    ('FLIP: masking 50% beats CLIP at equal training time', 'flip50-equal-time', 'clip', 'beats'),
    ('FLIP: masking 50% beats CLIP at equal training time, on the curve: its last evaluation against CLIP\'s nearest '
     'the same seconds', 'flip50', 'clip-at-flip50-time', 'beats'),
    ('FLIP: masking 75% beats CLIP at equal training time, on the curve', 'flip75', 'clip-at-flip75-time', 'beats'),
    ('FLIP: masking 75% stays close to 50% (paper: 1.4 points lower)', 'flip75', 'flip50', 'matches'),
    ("UTA: the student reaches about its teacher's zero-shot accuracy without captions", 'uta', 'flip50', 'teacher'),
    ('A-CLIP: attentive masking beats random masking at the same ratio (2 views)', 'aclip', 'aclip-random', 'beats'),
    ('A-CLIP: attentive masking beats random masking at the same ratio (1 view, CLIP loss only: the paper\'s masking '
     'table)', 'aclip-1view-cliponly', 'aclip-random-1view-cliponly', 'beats'),
    ('A-CLIP: beats CLIP', 'aclip', 'clip', 'beats'),
    ('MaskCLIP: beats CLIP', 'maskclip', 'clip', 'beats'),
    ('MaskCLIP with the CLIP term on the masked pass (no full-image pass): beats CLIP', 'maskclip-masked-view', 'clip',
     'beats'),
    ('MaskCLIP: MLM from the CLIP text pass (the default) matches MLM on a second, bidirectional text pass',
     'maskclip', 'maskclip-bidirectional-text', 'matches'),
    ('UniCLIP: beats CLIP', 'uniclip', 'clip', 'beats'),
    ('UniCLIP: the augmentation-aware embedding helps', 'uniclip', 'uniclip-no-aug-embed', 'beats'),
    ('UniCLIP: MP-NCE beats InfoNCE with shared denominators', 'uniclip', 'uniclip-infonce', 'beats'),
    ('UniCLIP: per-domain-pair similarity helps', 'uniclip', 'uniclip-shared-sim', 'beats'),
    ('UniCLIP: per-domain-pair similarity helps, one part alone: a temperature per pair (vs one shared)', 'uniclip',
     'uniclip-shared-tau', 'beats'),
    ('UniCLIP: per-domain-pair similarity helps, one part alone: the image-image offset (vs none)', 'uniclip',
     'uniclip-no-offset', 'beats'),
    ('UniCLIP: per-domain-pair similarity helps, one part alone: image-image tau from 0.1 (vs 0.07; our init)',
     'uniclip', 'uniclip-same-tau-init', 'beats'),
]
# what a claim is judged on
MEASURES = ['zeroshot/object', 'zeroshot/shape', 'zeroshot/position', 'retrieval/image_to_text_R@1']
EVAL_SIZE = {'zeroshot/object': 3000, 'zeroshot/shape': 3000, 'zeroshot/position': 3000,  # data.py's sets
             'retrieval/image_to_text_R@1': 1000}
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}  # two-sided 95% t, by dof
TASKS = ['zeroshot/shape', 'zeroshot/colour', 'zeroshot/position', 'zeroshot/object', 'zeroshot/object_heldout',
         'retrieval/image_to_text_R@1', 'retrieval/text_to_image_R@1']


def read_args(path):
    with open(os.path.join(path, 'args.json')) as f:
        return json.load(f)


def read_run(path):
    """A finished run's log -> (eval records by step, median seconds per training step)."""
    with open(os.path.join(path, 'log.jsonl')) as f:
        records = [json.loads(line) for line in f if line.strip()]
    batch_size = read_args(path)['batch_size']
    evals = [r for r in records if any(k.startswith('zeroshot/') for k in r)]
    step_s = statistics.median(batch_size / r['samples_per_sec'] for r in records if 'samples_per_sec' in r)
    return evals, step_s


def time_ratio(args, runs, name, seed):
    """`name`'s step time over CLIP's: from the --speed table (interleaved rounds on one machine) if given, else the
    median step times of the two runs of this seed (right when they ran alone, one after another)."""
    if args.speed_ratios:
        return args.speed_ratios[name]
    return runs[f'{name}-s{seed}']['step_seconds'] / runs[f'clip-s{seed}']['step_seconds']


def quality(args):
    runs = {}
    for seed in args.seeds:
        for name in args.methods:
            script, flags = CONFIGS[name]
            out = os.path.join(args.runs, f'{name}-s{seed}')
            done = os.path.exists(os.path.join(out, 'open_clip', 'open_clip_config.json'))
            started = os.path.exists(os.path.join(out, 'args.json'))  # finished, or stopped and resumed below
            if args.report_only and not done:
                print(f'{name} seed {seed}: not finished in {args.runs}, left out of the report', file=sys.stderr)
                continue
            steps = args.steps
            if name == 'flip50-equal-time':  # the FLIP steps that fit in CLIP's training seconds (a run here: its own)
                steps = read_args(out)['steps'] if started else round(args.steps / time_ratio(args, runs, 'flip50', seed))
            cmd = [sys.executable, os.path.join(ROOT, script), '--steps', str(steps), '--batch-size',
                   str(args.batch_size), '--seed', str(seed), '--out', out, '--eval-every', str(args.eval_every),
                   '--save-every', str(steps), '--model', args.model] + [f.format(runs=args.runs, seed=seed) for f in flags]
            cmd += ['--lr', str(args.lr)] if args.lr else []
            if started:  # reused or resumed only if made with the flags this command gives now (defaults included)
                module = SCRIPTS[script]
                try:
                    now = module.get_args(cmd[2:])
                except ValueError as err:
                    common.fail(err)
                common.fill_run_defaults(now, None, 1, steps, module.default_lr)
                changed = common.changed_args(now, read_args(out))
                if changed:
                    common.fail(f'{out} holds a run made with other flags ({"; ".join(changed)}): delete it to rerun, '
                                f'or pass another --runs')
            print(f"[{time.strftime('%H:%M:%S')}] {name} seed {seed}: {'done already' if done else ' '.join(cmd[1:])}",
                  flush=True)
            wall = None
            if not done:
                t = time.perf_counter()
                result = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                if result.returncode != 0:
                    last = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else 'no message'
                    print(f'error: {name} seed {seed} failed (exit {result.returncode}): {last}; its run is in {out}',
                          file=sys.stderr)
                    sys.exit(1)
                if not os.path.exists(os.path.join(out, 'open_clip', 'open_clip_config.json')):  # a signal stops at 0
                    print(f'error: {name} seed {seed} stopped before its last step (a signal?); rerun this command to '
                          f'resume it from {out}', file=sys.stderr)
                    sys.exit(1)
                wall = time.perf_counter() - t
            evals, step_s = read_run(out)
            runs[f'{name}-s{seed}'] = dict(method=name, seed=seed, steps=steps, evals=evals, step_seconds=step_s,
                                           train_seconds=step_s * steps, wall_seconds=wall)
    return runs


def summarise(runs, methods):
    """Per method: mean and spread (half the max - min over seeds) of each task at the final step, and each seed's
    final values (for the paired comparisons)."""
    table = {}
    for name in methods:
        mine = [r for r in runs.values() if r['method'] == name]
        if mine:  # (--report-only leaves out what has not run)
            table[name] = with_spread({'steps': statistics.mean(r['steps'] for r in mine), 'seeds': len(mine),
                                       'train_seconds': statistics.mean(r['train_seconds'] for r in mine),
                                       'per_seed': {r['seed']: final(r['evals'][-1]) for r in mine}})
    return table


def final(record):
    """An evaluation record of a run's log -> its results on TASKS."""
    return {t: record[t] for t in TASKS if t in record}


def with_spread(row):
    """A summary row's per-seed values -> their mean and spread (half the max - min) for each task."""
    for task in TASKS:
        vals = [v[task] for v in row['per_seed'].values() if task in v]
        if vals:
            row[task] = (statistics.mean(vals), (max(vals) - min(vals)) / 2)
    return row


def equal_time(args, runs, table):
    """FLIP's Figure 1 read at one time: for each FLIP ratio with runs beside CLIP's, CLIP's evaluation nearest the
    training seconds of FLIP's last step (FLIP's steps x its step-time ratio to CLIP, in CLIP steps), per seed, as a
    summary row -> {name: (row, CLIP's step per seed)}."""
    rows = {}
    for name in ('flip50', 'flip75'):
        seeds = [s for s in table.get(name, {}).get('per_seed', {}) if f'clip-s{s}' in runs]
        if not seeds:
            continue
        per_seed, steps = {}, {}
        for s in seeds:
            target = runs[f'{name}-s{s}']['steps'] * time_ratio(args, runs, name, s)
            nearest = min(runs[f'clip-s{s}']['evals'], key=lambda e: abs(e['step'] - target))
            per_seed[s], steps[s] = final(nearest), nearest['step']
        rows[f'clip-at-{name}-time'] = (with_spread({'per_seed': per_seed}), steps)
    return rows


def quality_report(args, table, runs, at_time):
    short = [t.split('/')[1].replace('image_to_text_R@1', 'i→t R@1').replace('text_to_image_R@1', 't→i R@1')
             for t in TASKS]
    lines = [f'Same budget, `python bench.py quality --steps {args.steps} --batch-size {args.batch_size} --seeds '
             f'{" ".join(map(str, args.seeds))}` on {device_name(default_device())}: mean ± half-range over '
             f'{len(args.seeds)} seed(s), final step, in %. Training seconds: median step time × steps.', '',
             '| method | steps | train s | ' + ' | '.join(short) + ' |', '|---|---|---|' + '---|' * len(TASKS)]
    for name, row in table.items():
        cells = [f'{100 * row[t][0]:.1f} ± {100 * row[t][1]:.1f}' if t in row else '—' for t in TASKS]
        lines.append(f"| {name} | {row['steps']:.0f} | {row['train_seconds']:.0f} | " + ' | '.join(cells) + ' |')
    lines += ['', "| paper's claim | method vs baseline (difference, smallest detectable): object; shape; position; "
              "i→t R@1 | verdict |", '|---|---|---|']
    rows = {**table, **{name: row for name, (row, _) in at_time.items()}}
    for claim, a, b, kind in CLAIMS:
        if a in rows and b in rows:
            cells = []
            for t in MEASURES:
                diff, detectable = paired(rows[a], rows[b], t)
                cells.append(f'{100 * rows[a][t][0]:.1f} vs {100 * rows[b][t][0]:.1f} ({100 * diff:+.1f}' +
                             (f', {100 * detectable:.1f}) {sign(rows[a], rows[b], t)}' if detectable else ')'))
            if b in at_time:
                claim += f' (CLIP at step {"/".join(str(v) for v in sorted(set(at_time[b][1].values())))})'
            lines.append(f'| {claim} | {"; ".join(cells)} | {verdict(rows[a], rows[b], kind)} |')
    lines += ['', '(difference, smallest detectable): the mean over seeds of the per-seed difference, method minus '
              'baseline (same seed: same data order and initialisation), and the smallest difference these runs could '
              "tell from zero: the 95% interval of that mean (Student's t over the seeds, n - 1 degrees of freedom) "
              'combined with two standard errors of the difference from the finite evaluation set (binomial, '
              f'{EVAL_SIZE["zeroshot/object"]} images, {EVAL_SIZE["retrieval/image_to_text_R@1"]} captions). '
              '↑ / ↓: ahead / behind by more than that; ≈: within it. Verdict: "beats" claims are reproduced when ahead '
              'on at least two measures and behind on none; "matches" claims when behind on none.', '',
              'Equal training time (the flip50-equal-time run\'s steps, and CLIP\'s step on the curve): step times as '
              + (f"ratios to CLIP's from `{args.speed}` ({args.speed_note})" if args.speed_ratios else
                 "the runs' own median step times (fair only if they ran alone, one after another; --speed takes "
                 "the ratios from a `bench.py speed` table instead)") + '.']
    lines += curve_report(args, runs)
    return '\n'.join(lines) + '\n'


def curve_report(args, runs, methods=('clip', 'flip50', 'flip75'), tasks=('zeroshot/object', 'zeroshot/shape',
                                                                          'zeroshot/position',
                                                                          'retrieval/image_to_text_R@1')):
    """FLIP's Figure 1 at this scale: accuracy against training seconds for CLIP and FLIP at each evaluation, means over
    seeds (x: the step times step_seconds)."""
    lines = []
    for name in methods:
        mine = [r for r in runs.values() if r['method'] == name]
        if not mine:
            continue
        step_s = step_seconds(args, runs, name)
        if not lines:
            lines = ['', 'Accuracy against training time (FLIP\'s Figure 1 at this scale; means over seeds, in %):', '',
                     '| method | step | train s | ' + ' | '.join(t.split('/')[1] for t in tasks) + ' |',
                     '|---|---|---|' + '---|' * len(tasks)]
        for i, e in enumerate(mine[0]['evals']):
            cells = [f"{100 * statistics.mean(r['evals'][i][t] for r in mine):.1f}" for t in tasks]
            lines.append(f"| {name} | {e['step']} | {e['step'] * step_s:.0f} | " + ' | '.join(cells) + ' |')
    return lines


def step_seconds(args, runs, name):
    """A method's seconds per step, mean over its seeds: for FLIP beside CLIP's runs, CLIP's times time_ratio (so
    --speed puts them on one time axis), else its own median."""
    mine = [r for r in runs.values() if r['method'] == name]
    if name in ('flip50', 'flip75') and all(f"clip-s{r['seed']}" in runs for r in mine):
        return statistics.mean(runs[f"clip-s{r['seed']}"]['step_seconds'] * time_ratio(args, runs, name, r['seed'])
                               for r in mine)
    return statistics.mean(r['step_seconds'] for r in mine)


def paired(a, b, task):
    """Method row a against baseline row b on `task`, paired by seed -> (mean difference, smallest detectable
    difference, None with fewer than 2 common seeds). The per-seed differences carry the seed noise of this comparison
    (same seed: same data order and initialisation); t(95%, n - 1) x their standard error is combined in quadrature
    with 2 standard errors of the difference from the evaluation set (binomial and unpaired: an upper bound, as the
    per-image results are not kept)."""
    seeds = sorted(set(a['per_seed']) & set(b['per_seed']), key=str)
    d = [a['per_seed'][s][task] - b['per_seed'][s][task] for s in seeds]
    if len(d) < 2:
        return (d[0] if d else a[task][0] - b[task][0]), None
    pa, pb = a[task][0], b[task][0]
    seed_part = T95[min(len(d) - 1, max(T95))] * statistics.stdev(d) / math.sqrt(len(d))
    eval_part = 2 * math.sqrt((pa * (1 - pa) + pb * (1 - pb)) / EVAL_SIZE[task])
    return statistics.mean(d), math.hypot(seed_part, eval_part)


def sign(a, b, task):
    """Method and baseline rows on `task` -> ↑, ↓ or ≈: is the paired difference beyond the smallest detectable?"""
    diff, detectable = paired(a, b, task)
    return '↑' if diff > detectable else '↓' if diff < -detectable else '≈'


def verdict(a, b, kind):
    if kind == 'teacher':  # "about the teacher": within 10% on the 64-way zero-shot task, over the seeds both have
        pa, pb, task = a.get('per_seed', {}), b.get('per_seed', {}), 'zeroshot/object'
        seeds = set(pa) & set(pb)
        mean_a, mean_b = ((statistics.mean(p[s][task] for s in seeds) for p in (pa, pb)) if seeds else
                          (a[task][0], b[task][0]))
        ratio = mean_a / max(mean_b, 1e-9)
        return f'{"reproduced" if ratio >= 0.9 else "not reproduced"} (student / teacher {ratio:.2f})'
    if len(set(a['per_seed']) & set(b['per_seed'])) < 2:
        return 'n/a (fewer than two common seeds: nothing to judge the noise by)'
    signs = [sign(a, b, t) for t in MEASURES]
    if kind == 'matches':
        return 'reproduced' if '↓' not in signs else 'not reproduced'
    if signs.count('↑') >= 2 and '↓' not in signs:
        return 'reproduced'
    if signs.count('≈') == len(signs):
        return 'not reproduced: within noise'
    return 'not reproduced'


def plot(args, runs, path, methods=None):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    panels = ['zeroshot/object', 'zeroshot/shape', 'zeroshot/position', 'zeroshot/object_heldout',
              'retrieval/image_to_text_R@1']
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    colours = plt.get_cmap('tab20')
    for k, name in enumerate(methods or args.methods):
        seeds = [r for r in runs.values() if r['method'] == name]
        if not seeds:  # (--report-only)
            continue
        steps = [e['step'] for e in seeds[0]['evals']]
        x = [s * step_seconds(args, runs, name) for s in steps]
        for ax, task in zip(axes, panels):
            y = [100 * statistics.mean(r['evals'][i][task] for r in seeds) for i in range(len(steps))]
            ax.plot(x, y, marker='o', ms=3, label=name, ls='--' if '-' in name else '-', color=colours(k % 20))
    for ax, task in zip(axes, panels):
        ax.set_title(task)
        ax.set_xlabel('training seconds')
        ax.grid(alpha=0.3)
    axes[0].set_ylabel('accuracy / recall (%)')
    fig.legend(*axes[0].get_legend_handles_labels(), loc='center left', bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.suptitle(f'{args.model}, batch {args.batch_size}, mean of seeds {args.seeds}, {device_name(default_device())}')
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches='tight')

# ----------------------------------------------------------------------------- loader: images/s per loader worker


def web_shards(folder, shards, per_shard, width, height, seed=0):
    """WebDataset shards of web-sized JPEGs (smooth structure plus pixel texture, quality 90: ~80 KB at 500x375, like a
    photo) and synthetic captions. Returns the brace pattern."""
    rng = np.random.default_rng(seed)
    for s in range(shards):
        with tarfile.open(os.path.join(folder, f'{s:05d}.tar'), 'w') as tar:
            for i in range(per_shard):
                coarse = rng.integers(0, 256, (max(1, height // 16), max(1, width // 16), 3), dtype=np.uint8)
                pixels = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC)).astype(np.int16)
                pixels = np.clip(pixels + rng.integers(-20, 21, pixels.shape), 0, 255).astype(np.uint8)
                jpeg = io.BytesIO()
                Image.fromarray(pixels).save(jpeg, format='JPEG', quality=90)
                text = data.caption(data.sample_scene(random.Random(s * per_shard + i), True)).encode()
                for ext, payload in (('jpg', jpeg.getvalue()), ('txt', text)):
                    info = tarfile.TarInfo(f'{s * per_shard + i:08d}.{ext}')
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return os.path.join(folder, f'{{00000..{shards - 1:05d}}}.tar')


def open_clip_loader(spec, transform, tokenizer, batch_size, workers, seed):
    """open_clip_train.data.get_wds_dataset as its training run builds it with --dataset-resampled (endless). One shim:
    webdataset after 0.2.86 (OpenCLIP pins <= 0.2.86; this project needs newer) ends each shard's file stream with an
    empty dict, which open_clip_train's grouping of files into samples does not expect; those markers are dropped."""
    import open_clip_train.data as oc
    if not getattr(oc.tar_file_expander, 'shim', False):
        expand = oc.tar_file_expander

        def tar_file_expander(*a, **kw):
            return (f for f in expand(*a, **kw) if f)
        tar_file_expander.shim = True
        oc.tar_file_expander = tar_file_expander
    a = argparse.Namespace(train_data=spec, train_num_samples=10 ** 9, dataset_resampled=True, batch_size=batch_size,
                           train_data_upsampling_factors=None, workers=workers, world_size=1, seed=seed)
    return oc.get_wds_dataset(a, transform, is_train=True, tokenizer=tokenizer).dataloader


def our_loader(spec, transform, tokenizer, batch_size, workers, seed, draft):
    """data.train_loader's WebDataset loader; draft=False decodes every JPEG in full (the pipeline before draft)."""
    members = data.Members('jpg;png;jpeg;webp', 'txt')
    ds = data.webdataset_pipeline(spec, transform, tokenizer, seed, 0, 1, 0, members, draft)
    return data.Loader(DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=data._collate,
                                  persistent_workers=workers > 0, generator=torch.Generator().manual_seed(seed)))


def interleaved_rates(loaders, batches, rounds, workers):
    """{name: loader} -> {name: [images/s, one per round]}. Each round times `batches` batches of each loader in turn
    (the order rotated every round), after taking the batches its workers made while the others were timed (2 per
    worker: the prefetch)."""
    iters = {name: iter(loader) for name, loader in loaders.items()}
    for it in iters.values():
        next(it)  # start-up: worker processes spawned, shuffle buffers filled
    rates = {name: [] for name in loaders}
    names = list(loaders)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            it = iters[name]
            for _ in range(2 * workers):
                next(it)
            t, n = time.perf_counter(), 0
            for _ in range(batches):
                n += len(next(it)[1])
            rates[name].append(n / (time.perf_counter() - t))
    return rates


def loader(args):
    """Images/s per loader worker, this project's WebDataset pipeline against OpenCLIP's on the same shards, the same
    transform (FLIP's: RandomResizedCrop to --image-size, area (0.5, 1), bicubic; flip; normalise) and tokenizer."""
    size = args.image_size
    transform = flip.transforms(argparse.Namespace(dataset_type='webdataset'), {'vision_cfg': {'image_size': size}})[0]
    tokenizer = open_clip.tokenizer.SimpleTokenizer()  # OpenCLIP's, 77 tokens
    with tempfile.TemporaryDirectory() as folder:
        spec = web_shards(folder, args.shards, args.shard_samples, *args.source_size)
        loaders = {'open_clip': open_clip_loader(spec, transform, tokenizer, args.batch_size, args.workers, 0),
                   'ours, full decode': our_loader(spec, transform, tokenizer, args.batch_size, args.workers, 0, False),
                   'ours': our_loader(spec, transform, tokenizer, args.batch_size, args.workers, 0, True)}
        common.print0(f'timing {len(loaders)} loaders x {args.rounds} rounds of {args.loader_batches} batches of '
                      f'{args.batch_size}, {max(1, args.workers)} worker(s) each')
        rates = interleaved_rates(loaders, args.loader_batches, args.rounds, args.workers)
    per_worker = max(1, args.workers)
    rows = {}
    for name, r in rates.items():
        ratios = [a / b for a, b in zip(r, rates['open_clip'])]  # per round: both timed under the same load
        rows[name] = {'images_per_s_per_worker': statistics.median(r) / per_worker,
                      'ratio_to_open_clip': statistics.median(ratios), 'ratio_range': [min(ratios), max(ratios)]}
    return rows


def loader_report(args, rows):
    w, h = args.source_size
    lines = [f'Loader throughput, `python bench.py loader --image-size {args.image_size} --source-size {w} {h} '
             f'--workers {args.workers} --batch-size {args.batch_size}` on {device_name(torch.device("cpu"))}: '
             f'{args.shards} x {args.shard_samples} JPEGs of {w}x{h} to {args.image_size} px through FLIP\'s training '
             f'transform; median of {args.rounds} interleaved rounds (the ratio per round, both timed under the same '
             'load; its range over rounds in brackets). A shared machine\'s load moves the absolute numbers.', '',
             '| pipeline | images/s per worker | vs open_clip |', '|---|---|---|']
    for name, row in rows.items():
        lo, hi = row['ratio_range']
        lines.append(f"| {name} | {row['images_per_s_per_worker']:.1f} | {row['ratio_to_open_clip']:.2f}x "
                     f'[{lo:.2f}, {hi:.2f}] |')
    return '\n'.join(lines) + '\n'

# ----------------------------------------------------------------------------- accum: big batches on few devices

SCRIPTS_RUN = {  # name: (module, flags) for the in-process runs of `accum`; {teacher}: a frozen random CLIP
    'clip': (flip, ['--mask-ratio', '0']),
    'flip50': (flip, ['--mask-ratio', '0.5']),
    'uta': (uta, ['--teacher', '{teacher}', '--unmasked-fraction', '0']),
    'aclip': (aclip, ['--time-steps', '0']),
    'maskclip': (maskclip, ['--time-steps', '0']),
    'uniclip': (uniclip, []),
}


def run_script(name, argv, folder):
    """The method's own main(argv) in this process (its real loop, common.accumulate included), with the evaluation
    sets, evaluation and export skipped: they are not what is timed. -> the log records (one per step)."""
    module, flags = SCRIPTS_RUN[name]
    skipped = {(data, 'eval_sets'): lambda *a, **k: ({}, None), (common, 'evaluate'): lambda *a, **k: {},
               (common, 'export_open_clip'): lambda *a, **k: None, (common, 'print_results'): lambda *a, **k: None}
    real = {key: getattr(*key) for key in skipped}
    out = tempfile.mkdtemp(dir=folder)
    argv = [f.format(teacher=f'local-dir:{folder}/teacher') for f in flags] + argv + [
        '--out', out, '--workers', '0', '--log-every', '1', '--save-every', '100000']
    try:
        for (module_, attr), fn in skipped.items():
            setattr(module_, attr, fn)
        module.main(argv)
    finally:
        for (module_, attr), fn in real.items():
            setattr(module_, attr, fn)
    with open(os.path.join(out, 'log.jsonl')) as f:
        return [json.loads(line) for line in f if line.strip()]


def accum(args, device):
    """Per method: compute seconds per sample at --accum-freq 2 and 4 against 1 at the same micro-batch (the real
    loops, rounds interleaved, the first steps of each run dropped), and --grad-checkpointing's activation memory and
    step time against the same step without (bench's step functions, the flag toggled on the same model)."""
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        common.export_open_clip(common.CLIP(common.model_config(args.model)), common.model_config(args.model),
                                os.path.join(folder, 'teacher'))
        base = ['--model', args.model, '--batch-size', str(args.batch_size), '--steps', str(args.accum_steps + 1),
                '--compile', 'off', '--precision', args.precision]
        per_sample = {(n, k): [] for n in args.methods for k in args.accum_freqs}
        for r in range(args.rounds):
            for name in args.methods:
                for k in args.accum_freqs:
                    records = [x for x in run_script(name, base + ['--accum-freq', str(k)], folder)
                               if 'compute_seconds' in x][1:]  # the first step: warm-up
                    per_sample[name, k].append(statistics.median(x['compute_seconds'] for x in records) /
                                               (k * args.batch_size))
                    common.print0(f'round {r + 1}: {name} accum-freq {k}: {1e3 * per_sample[name, k][-1]:.1f} ms/sample')
    amp = common.autocast(device, args.precision)
    for name in args.methods:
        one = per_sample[name, 1]
        rows[name] = {f'accum_{k}_ratio': statistics.median(a / b for a, b in zip(per_sample[name, k], one))
                      for k in args.accum_freqs if k != 1}
        rows[name]['ms_per_sample'] = 1e3 * statistics.median(one)
        if name not in STEPS and name != 'flip50':
            continue
        torch.manual_seed(0)
        model, loss_fn, _ = STEPS[name](args.model, args.batch_size, device)

        def forward_backward(ckpt, model=model, loss_fn=loss_fn):
            common.set_grad_checkpointing(model, ckpt)
            with amp:
                loss = loss_fn()
            loss.backward()
            model.zero_grad(set_to_none=True)
        plain, ckpt = (saved_bytes(lambda c=c: forward_backward(c), model) for c in (False, True))
        seconds = interleaved_medians({False: lambda: forward_backward(False), True: lambda: forward_backward(True)},
                                      args.rounds, 1, device)
        rows[name].update(saved_MiB=plain / 2 ** 20, ckpt_saved_MiB=ckpt / 2 ** 20, ckpt_memory_ratio=ckpt / plain,
                          ckpt_time_ratio=seconds[True] / seconds[False])
        common.print0(f'{name}: grad checkpointing memory {ckpt / plain:.2f}x, time {seconds[True] / seconds[False]:.2f}x')
    return rows


def openclip_accum(args, device):
    """OpenCLIP's --accum-freq (open_clip_train/train.py, restated line for line: a no-grad forward caches every
    micro-batch's features; then each micro-batch is forwarded again and the whole loss, its own features in place of
    the cached ones and its own logit scale, is backpropagated) on open_clip's own model with FLIP-style patch
    dropout, against ours (common.accumulate on common.CLIP with the same weights, masks per global row); both
    against one big batch with the masks the first pass used. -> gradient errors and time."""
    cfg = common.model_config(args.model)
    oc_cfg = copy.deepcopy(cfg)
    oc_cfg['vision_cfg']['patch_dropout'] = 0.5
    torch.manual_seed(0)
    ours = common.CLIP(cfg).to(device)
    theirs = open_clip.model.CLIP(**oc_cfg, output_dict=True).to(device)
    theirs.load_state_dict(ours.state_dict(), strict=False)
    K, B = 2, args.batch_size
    images, texts = synthetic_batch(open_clip.image_transform(cfg['vision_cfg']['image_size'], is_train=False),
                                    common.tokenizer_for(cfg), cfg['vision_cfg']['image_size'], K * B)
    images, texts = images.to(device), texts.to(device)
    L = ours.visual.num_patches
    loss_fn = open_clip.ClipLoss()
    drawn = []  # the keep indices open_clip's PatchDropout drew, per call

    def record(module, inputs, output):
        drawn.append(output)
    theirs.visual.patch_dropout.register_forward_hook(record)

    def grads(model):
        out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return out

    def openclip_step():
        theirs.zero_grad(set_to_none=True)
        with torch.no_grad():
            cached = [theirs(images[k * B:(k + 1) * B], texts[k * B:(k + 1) * B]) for k in range(K)]
        for j in range(K):
            out = theirs(images[j * B:(j + 1) * B], texts[j * B:(j + 1) * B])
            img = torch.cat([c['image_features'] for c in cached[:j]] + [out['image_features']] +
                            [c['image_features'] for c in cached[j + 1:]])
            txt = torch.cat([c['text_features'] for c in cached[:j]] + [out['text_features']] +
                            [c['text_features'] for c in cached[j + 1:]])
            loss_fn(img, txt, out['logit_scale']).backward()

    generator = torch.Generator(device).manual_seed(0)
    ids_keep = flip.random_masking(K * B, L, 0.5, generator)
    micro = [common.Micro(images[k * B:(k + 1) * B], texts[k * B:(k + 1) * B], slice(k * B, (k + 1) * B)) for k in range(K)]

    def our_step():
        ours.zero_grad(set_to_none=True)
        common.accumulate(ours, micro, lambda m: common.Forward(coupled=ours(m.images, m.texts, ids_keep[m.rows])[:2],
                                                                 shared=(ours.logit_scale.exp(),)), common.clip_loss)

    def reference(model_forward, model):  # one big batch, given masks
        model.zero_grad(set_to_none=True)
        common.clip_loss(*model_forward()).backward()
        return grads(model)

    def rel(a, b, keys):
        return max((a[k] - b[k]).norm().item() / max(b[k].norm().item(), 1e-12) for k in keys)

    our_step()
    ours_g = grads(ours)
    ref = reference(lambda: ours(images, texts, ids_keep), ours)
    drawn.clear()
    openclip_step()
    theirs_g = grads(theirs)
    first = torch.cat(drawn[:K])  # the cached pass's tokens: rebuild the big batch with exactly those
    kept = first[:, 1:]  # (K*B, keep, width) with CLS first; recover indices by matching the patch embeddings
    with torch.no_grad():
        x = theirs.visual.conv1(images).flatten(2).transpose(1, 2) + theirs.visual.positional_embedding[1:]
    match = (kept[:, :, None, :] - x[:, None, :, :]).abs().sum(-1).argmin(-1)  # (K*B, keep) patch indices
    ref_theirs = reference(lambda: ours(images, texts, match), ours)
    towers = [k for k in ref if k != 'logit_scale']
    return {'ours_tower_rel_err': rel(ours_g, ref, towers),
            'ours_logit_scale_rel_err': rel(ours_g, ref, ['logit_scale']),
            'openclip_tower_rel_err': rel(theirs_g, ref_theirs, towers),
            'openclip_logit_scale_ratio': (theirs_g['logit_scale'] / ref_theirs['logit_scale']).item(),
            'seconds': interleaved_medians({'openclip': openclip_step, 'ours': our_step}, args.rounds, 1, device)}


def accum_report(args, device, rows, oc):
    lines = [f'Big batches, `python bench.py accum --model {args.model} --batch-size {args.batch_size}` on '
             f'{device_name(device)}: compute seconds per sample of each method\'s own loop at --accum-freq K against '
             f'K = 1 at the same micro-batch of {args.batch_size} (median over {args.rounds} interleaved rounds of '
             f'{args.accum_steps} timed steps); --grad-checkpointing: activation memory (saved for backward) and step '
             'time against the same step without.', '',
             '| method | ms/sample, K = 1 | ' + ' | '.join(f'K = {k}' for k in args.accum_freqs if k != 1) +
             ' | activation MiB | with checkpointing | its time |', '|---|---|' + '---|' * (len(args.accum_freqs) - 1) +
             '---|---|---|']
    for name, r in rows.items():
        lines.append(f"| {name} | {r['ms_per_sample']:.1f} | " +
                     ' | '.join(f"{r[f'accum_{k}_ratio']:.2f}x" for k in args.accum_freqs if k != 1) +
                     (f" | {r['saved_MiB']:.0f} | {r['ckpt_memory_ratio']:.2f}x | {r['ckpt_time_ratio']:.2f}x |"
                      if 'saved_MiB' in r else ' | | | |'))
    s = oc['seconds']
    lines += ['', f"OpenCLIP's --accum-freq 2 (its algorithm restated, open_clip's model with patch dropout 0.5) "
              f"against ours, micro-batch {args.batch_size}, against one big batch with the same masks: tower "
              f"gradients off by {oc['openclip_tower_rel_err']:.2g} (relative norm, worst parameter; ours "
              f"{oc['ours_tower_rel_err']:.1g}), the logit scale's gradient {oc['openclip_logit_scale_ratio']:.2f}x the "
              f"big batch's (ours: off by {oc['ours_logit_scale_rel_err']:.1g}); step time {s['openclip']:.3f} s vs "
              f"ours {s['ours']:.3f} s."]
    return '\n'.join(lines) + '\n'


# ----------------------------------------------------------------------------- gpu: the check for one GPU

PEAK_BF16_TFLOPS = {'H200': 989, 'H100': 989, 'A100': 312, 'L40S': 362, 'A10': 125, 'L4': 121, 'RTX 4090': 165}  # dense


def gpu(args, device):
    """Every method's own loop for --gpu-steps steps at --model, --compile on and then eager (bf16 where supported):
    step time (median after the first --gpu-warmup steps), peak memory, MFU (FLOPs of the step / time / the GPU's dense
    bf16 peak), compile seconds (the first steps' excess over the median), and a failure where dynamo compiled new
    graphs after the warm-up steps (a recompile) or broke a graph. On a CPU (its test): eager only, no MFU."""
    from torch._dynamo.utils import counters
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    modes = ['on', 'off'] if device.type == 'cuda' else ['off']
    rows, failures = {}, []
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        common.export_open_clip(common.CLIP(common.model_config(args.model)), common.model_config(args.model),
                                os.path.join(folder, 'teacher'))
        for method in args.methods:
            step_name = method if method in STEPS else 'clip'
            torch.manual_seed(0)
            model, loss_fn, _ = STEPS[step_name](args.model, args.batch_size, device)
            with common.autocast(device, args.precision):
                flops = count_flops(lambda fn=loss_fn: fn().backward())
            del model, loss_fn
            for mode in modes:
                torch._dynamo.reset()
                counters.clear()
                graphs = []  # unique graphs compiled so far, read at every step
                real = common.accumulate

                def counted(*a, **k):
                    out = real(*a, **k)
                    graphs.append(counters['stats']['unique_graphs'])
                    return out
                common.accumulate = counted
                if device.type == 'cuda':
                    torch.cuda.reset_peak_memory_stats()
                try:
                    records = run_script(method, ['--model', args.model, '--batch-size', str(args.batch_size), '--steps',
                                                  str(args.gpu_steps), '--compile', mode, '--precision', args.precision],
                                         folder)
                finally:
                    common.accumulate = real
                seconds = [r['compute_seconds'] for r in records if 'compute_seconds' in r]
                step_s = statistics.median(seconds[args.gpu_warmup:])
                row = {'step_s': step_s, 'compile_s': sum(seconds[:args.gpu_warmup]) - args.gpu_warmup * step_s,
                       'peak_GiB': torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == 'cuda' else None,
                       'mfu': flops / step_s / (peak * 1e12) if peak else None,
                       'graph_breaks': sum(counters['graph_break'].values()),
                       'late_graphs': graphs[-1] - graphs[args.gpu_warmup - 1] if len(graphs) >= args.gpu_warmup else 0}
                rows[f'{method} compile {mode}'] = row
                if row['late_graphs'] or row['graph_breaks']:
                    failures.append(f"{method} compile {mode}: {row['late_graphs']} graph(s) compiled after step "
                                    f"{args.gpu_warmup}, {row['graph_breaks']} graph break(s)")
                common.print0(f'{method} compile {mode}: {1e3 * step_s:.0f} ms/step' +
                              (f", MFU {100 * row['mfu']:.0f}%" if row['mfu'] else ''))
    return rows, failures, name


def gpu_report(args, rows, failures, name):
    lines = [f'GPU check, `python bench.py gpu --model {args.model} --batch-size {args.batch_size}` on {name}: each '
             f"method's own loop, {args.gpu_steps} steps, precision {args.precision}; medians after "
             f'{args.gpu_warmup} steps.', '', '| run | ms/step | compile s | peak GiB | MFU | graph breaks | late graphs |',
             '|---|---|---|---|---|---|---|']
    for run, r in rows.items():
        peak = '' if r['peak_GiB'] is None else f"{r['peak_GiB']:.1f}"
        mfu = '' if r['mfu'] is None else f"{100 * r['mfu']:.0f}%"
        lines.append(f"| {run} | {1e3 * r['step_s']:.0f} | {r['compile_s']:.0f} | {peak} | {mfu} | "
                     f"{r['graph_breaks']} | {r['late_graphs']} |")
    lines += [''] + ([f'FAILED: {f}' for f in failures] or ['No recompiles after the warm-up steps, no graph breaks.'])
    return '\n'.join(lines) + '\n'


# ----------------------------------------------------------------------------- main


def fmt(x):
    return '—' if x is None else f'{x:.2f}'


def bf16(args, device):
    return isinstance(common.autocast(device, args.precision), torch.autocast)  # common.autocast's rule, not a copy


def default_device():
    return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


def device_name(device):
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    return f'{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}'


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('mode', choices=['speed', 'quality', 'loader', 'accum', 'gpu'])
    p.add_argument('--model', default='tiny', help='tiny, or an open_clip ViT config name such as ViT-B-16')
    p.add_argument('--batch-size', type=int, default=None, help='the same for every method (default: 128 for '
                   'quality, the default-size run; 64 otherwise)')
    p.add_argument('--methods', nargs='+', default=None, help='default: all (speed: clip flip50 flip75 uta aclip '
                   'maskclip and two variants, uniclip; quality: also the A-CLIP masking ablation and the '
                   'UniCLIP ablations)')
    p.add_argument('--out', default='bench', help='folder for the tables (and quality.png)')
    g = p.add_argument_group('speed')
    g.add_argument('--rounds', type=int, default=10, help='timed rounds (one step of every method each)')
    g.add_argument('--warmup', type=int, default=2, help='rounds dropped before timing')
    g.add_argument('--precision', default='auto', choices=['auto', 'fp32', 'bf16'], help='auto: bf16 on CUDA')
    g.add_argument('--system-malloc', action='store_true', help="on a CPU, time with glibc's default allocator "
                   'settings (big freed blocks go back to the OS) instead of keeping freed memory for reuse')
    g = p.add_argument_group('quality')
    g.add_argument('--steps', type=int, default=560, help="CLIP's default-size run on the embedded data (about 5 "
                   'minutes on 2 CPU cores): at 400 x 64 no data variant learned shape or position')
    g.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    g.add_argument('--eval-every', type=int, default=100)
    g.add_argument('--lr', type=float, default=None, help='one peak learning rate for every run (default: each '
                   "method's own; all 1e-3 at tiny, but their rules differ at other sizes)")
    g.add_argument('--runs', default='runs/bench', help='where the training runs go (finished runs are reused)')
    g.add_argument('--no-plot', action='store_true')
    g.add_argument('--report-only', action='store_true', help='train nothing: the tables from the runs already '
                   'finished in --runs (the others are named on stderr and left out)')
    g.add_argument('--speed', default=None, help="a `bench.py speed` table's .json: FLIP's step-time ratios to "
                   "CLIP's for the equal-time comparisons, measured interleaved (default: the runs' own step times)")
    g = p.add_argument_group('accum (also --model, --batch-size, --rounds, --precision)')
    g.add_argument('--accum-freqs', type=int, nargs='+', default=[1, 2, 4], help='--accum-freq values timed')
    g.add_argument('--accum-steps', type=int, default=2, help='timed steps per run (after one warm-up step)')
    g = p.add_argument_group('gpu (also --model, --batch-size, --precision)')
    g.add_argument('--gpu-steps', type=int, default=30, help='steps per run')
    g.add_argument('--gpu-warmup', type=int, default=5, help='steps before the medians (and compiling)')
    g = p.add_argument_group('loader (also --batch-size, --rounds)')
    g.add_argument('--image-size', type=int, default=224, help='output side of the training crop')
    g.add_argument('--source-size', type=int, nargs=2, default=[500, 375], metavar=('W', 'H'),
                   help='the JPEGs in the generated shards (web-sized by default)')
    g.add_argument('--shards', type=int, default=4)
    g.add_argument('--shard-samples', type=int, default=250)
    g.add_argument('--workers', type=int, default=1, help='loader worker processes per pipeline (0: in the main one)')
    g.add_argument('--loader-batches', type=int, default=5, help='batches timed per pipeline and round')
    args = p.parse_args(argv)
    args.batch_size = args.batch_size or (128 if args.mode == 'quality' else 64)
    if args.mode == 'loader':
        if min(args.batch_size, args.rounds, args.image_size, args.shards, args.shard_samples, args.loader_batches,
               *args.source_size) < 1 or args.workers < 0:
            raise ValueError('--batch-size, --rounds, --image-size, --source-size, --shards, --shard-samples and '
                             '--loader-batches must be >= 1, --workers >= 0')
        try:
            import open_clip_train.data  # noqa: F401  (the reference pipeline)
        except ImportError as err:
            raise ValueError(f'bench.py loader compares with open_clip_train.data.get_wds_dataset, which cannot be '
                             f'imported ({err}): pip install pandas') from None
        return args
    if args.mode in ('accum', 'gpu'):
        args.methods = args.methods or list(SCRIPTS_RUN)
        if args.gpu_steps <= args.gpu_warmup or args.gpu_warmup < 1:
            raise ValueError('--gpu-steps must exceed --gpu-warmup, which must be >= 1')
        unknown = [m for m in args.methods if m not in SCRIPTS_RUN]
        if unknown or 1 not in args.accum_freqs or min(args.accum_freqs + [args.accum_steps, args.rounds]) < 1:
            raise ValueError(f'accum: methods from {" ".join(SCRIPTS_RUN)}; --accum-freqs >= 1 and including 1; '
                             '--accum-steps, --rounds >= 1')
        common.model_config(args.model)
        return args
    known = STEPS if args.mode == 'speed' else CONFIGS
    args.methods = args.methods or list(known)
    unknown = [m for m in args.methods if m not in known]
    if unknown:
        raise ValueError(f'unknown method(s) {" ".join(unknown)} for {args.mode}; choose from {" ".join(known)}')
    if args.mode == 'speed' and 'clip' not in args.methods:
        args.methods.insert(0, 'clip')  # every ratio is to the CLIP step
    args.methods = [m for m in known if m in args.methods]  # in table order: what a run needs runs before it
    args.speed_ratios, args.speed_note = (read_speed(args) if args.mode == 'quality' and args.speed else (None, None))
    trains = args.mode == 'quality' and not args.report_only  # and a run may need another one first
    if trains and 'uta' in args.methods and 'flip50' not in args.methods:
        raise ValueError('uta distils the flip50 run of the same seed: add flip50 to --methods')
    if (trains and 'flip50-equal-time' in args.methods and not args.speed_ratios and
            not {'clip', 'flip50'} <= set(args.methods)):
        raise ValueError('flip50-equal-time takes its steps from the clip and flip50 runs: add both to --methods, '
                         'or give --speed')
    if min(args.batch_size, args.rounds, args.steps, args.eval_every) < 1 or args.warmup < 0:
        raise ValueError('--batch-size, --rounds, --steps and --eval-every must be >= 1, --warmup >= 0')
    common.model_config(args.model)  # unknown or unsupported models fail here, in one line
    return args


def read_speed(args):
    """--speed: a `bench.py speed` table -> (FLIP's step-time ratios to CLIP by method, a note on what was timed)."""
    try:
        with open(args.speed) as f:
            speed = json.load(f)
        timed, rows = speed['args'], speed['methods']
        ratios = {name: rows[name]['ratio'] for name in ('flip50', 'flip75') if name in rows}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f'--speed {args.speed}: not a bench.py speed table ({type(err).__name__}: {err})') from None
    if timed.get('model') != args.model:
        raise ValueError(f"--speed {args.speed} timed --model {timed.get('model')}, these runs are --model {args.model}")
    needed = [m for m in ('flip50', 'flip75') if m in args.methods or (m == 'flip50' and 'flip50-equal-time' in
                                                                       args.methods)]
    if not set(needed) <= set(ratios):
        raise ValueError(f'--speed {args.speed} has no step time for {" ".join(sorted(set(needed) - set(ratios)))}')
    return ratios, f"--batch-size {timed.get('batch_size')}, {speed.get('machine')}"


def main(argv=None):
    try:
        args = get_args(argv)
        if args.mode == 'quality' and not args.no_plot:
            import matplotlib  # noqa: F401  (checked before hours of training, not after)
    except ValueError as err:
        common.fail(err)
    except ImportError:
        common.fail('the quality plot needs matplotlib: pip install matplotlib, or pass --no-plot')
    os.makedirs(args.out, exist_ok=True)
    if args.mode == 'speed':
        device = default_device()
        args.malloc_threshold, args.malloc = 0, 'system'
        if device.type == 'cpu' and not args.system_malloc:
            args.malloc_threshold = keep_freed_memory()
            args.malloc = 'kept' if args.malloc_threshold else 'unchanged'
        rows, matmul, towers = speed(args, device)
        stem = os.path.join(args.out, f'speed-{args.model}-{device.type}')
        with open(stem + '.json', 'w') as f:
            json.dump({'machine': device_name(device), 'args': vars(args), 'matmul_flops_per_s': matmul,
                       'methods': rows, 'vision_tower': towers}, f, indent=2)
        report = speed_report(args, device, rows, matmul, towers)
    elif args.mode == 'accum':
        device = default_device()
        if device.type == 'cpu':
            keep_freed_memory()
        rows, oc = accum(args, device), openclip_accum(args, device)
        stem = os.path.join(args.out, f'accum-{args.model}-{device.type}')
        with open(stem + '.json', 'w') as f:
            json.dump({'machine': device_name(device), 'args': vars(args), 'methods': rows, 'open_clip': oc}, f, indent=2)
        report = accum_report(args, device, rows, oc)
    elif args.mode == 'gpu':
        device = default_device()
        rows, failures, name = gpu(args, device)
        stem = os.path.join(args.out, f'gpu-{args.model}-{device.type}')
        with open(stem + '.json', 'w') as f:
            json.dump({'machine': name, 'args': vars(args), 'runs': rows, 'failures': failures}, f, indent=2)
        report = gpu_report(args, rows, failures, name)
    elif args.mode == 'loader':
        rows = loader(args)
        w, h = args.source_size
        stem = os.path.join(args.out, f'loader-{args.image_size}px-{w}x{h}')
        with open(stem + '.json', 'w') as f:
            json.dump({'machine': device_name(torch.device('cpu')), 'args': vars(args), 'pipelines': rows}, f, indent=2)
        report = loader_report(args, rows)
    else:
        runs = quality(args)
        table = summarise(runs, args.methods)
        at_time = equal_time(args, runs, table)
        stem = os.path.join(args.out, 'quality')
        with open(stem + '.json', 'w') as f:
            json.dump({'machine': device_name(default_device()), 'args': vars(args), 'summary': table,
                       'equal_time': at_time, 'runs': runs}, f, indent=2)
        report = quality_report(args, table, runs, at_time)
        if not args.no_plot:
            plot(args, runs, stem + '.png')
            flips = [m for m in ('clip', 'flip50', 'flip75') if m in table]
            if len(flips) > 1:  # FLIP's Figure 1: CLIP and FLIP on one time axis
                plot(args, runs, stem + '-flip.png', flips)
    with open(stem + '.md', 'w') as f:
        f.write(report)
    print(report)
    print(f'written to {stem}.*')
    if args.mode == 'gpu' and failures:
        sys.exit(1)


if __name__ == '__main__':
    main()
