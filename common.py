"""What no paper changes: the compact ViT and text transformer (OpenAI/OpenCLIP parameter layout, SDPA attention),
model configs from open_clip's registry, torchrun/DDP setup, the gradient-carrying all-gather and the contrastive
loss, AdamW groups and the warmup+cosine schedule, atomic checkpoints, rank-0 logging, zero-shot and retrieval
evaluation, and export to an open_clip `local-dir:` folder. Method ideas live in the method files, never here.
"""
import contextlib
import json
import math
import os
import signal
import sys
import time
from collections import OrderedDict

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import open_clip
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

import data

# -----------------------------------------------------------------------------
# Model: the OpenAI CLIP layout, so open_clip state dicts load with strict=True and give the same embeddings.


class QuickGELU(nn.Module):  # OpenAI's activation, used by their pretrained weights (configs '*-quickgelu')
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """nn.MultiheadAttention's parameter names (in_proj_weight, in_proj_bias, out_proj), computed with SDPA."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def qkv(self, x):
        B, N, C = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(B, N, 3, self.heads, C // self.heads)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, heads, N, head_dim)

    def forward(self, x, causal=False):
        B, N, C = x.shape
        q, k, v = self.qkv(x)
        x = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, heads, N, head_dim)
        return self.out_proj(x.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    """Pre-LN transformer block, named as open_clip's ResidualAttentionBlock."""

    def __init__(self, width, heads, mlp_ratio, act):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, hidden), gelu=act(), c_proj=nn.Linear(hidden, width)))

    def forward(self, x, causal=False):
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, mlp_ratio, act):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.ModuleList([Block(width, heads, mlp_ratio, act) for _ in range(layers)])
        self.grad_checkpointing = False  # set by common.set_grad_checkpointing

    def forward(self, x, causal=False):
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():  # keep only the block's input; recompute in backward
                x = torch.utils.checkpoint.checkpoint(block, x, causal, use_reentrant=False)
            else:
                x = block(x, causal)
        return x

    def init_weights(self):  # open_clip's text-tower init, used for both towers here
        proj_std = self.width ** -0.5 * (2 * self.layers) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=self.width ** -0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * self.width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)


class VisionTransformer(nn.Module):
    """conv patch embed -> + position embedding -> keep `ids_keep` patches -> prepend CLS -> ln_pre -> blocks -> ln_post.
    Dropping tokens after the position embedding and always keeping CLS is open_clip's PatchDropout, with the
    indices chosen by the caller (each method masks its own way)."""

    def __init__(self, image_size, patch_size, width, layers, heads, mlp_ratio, output_dim, act,
                 pool_type='tok', no_ln_pre=False):
        super().__init__()
        self.image_size, self.patch_size, self.pool_type = image_size, patch_size, pool_type
        self.grid_size = (image_size // patch_size, image_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.num_patches + 1, width))
        self.ln_pre = nn.Identity() if no_ln_pre else nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, mlp_ratio, act)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def embed(self, x, ids_keep=None):
        """(B, 3, H, W) -> (B, 1 + K, width) tokens entering the blocks; K = L without ids_keep."""
        x = self.conv1(x).flatten(2).transpose(1, 2)  # (B, L, width), L = grid_h * grid_w
        x = x + self.positional_embedding[1:]
        if ids_keep is not None:  # (B, K) patch indices in [0, L)
            x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (B, K, width)
        cls = (self.class_embedding + self.positional_embedding[0]).expand(x.shape[0], 1, -1)
        return self.ln_pre(torch.cat([cls.to(x.dtype), x], dim=1))

    def forward_tokens(self, x, ids_keep=None):
        """All output tokens after ln_post, (B, 1 + K, width): CLS first, then the kept patches in ids_keep order."""
        return self.ln_post(self.transformer(self.embed(x, ids_keep)))

    def pool(self, tokens):
        return tokens[:, 0] if self.pool_type == 'tok' else tokens[:, 1:].mean(dim=1)

    def forward(self, x, ids_keep=None):
        return self.pool(self.forward_tokens(x, ids_keep)) @ self.proj  # (B, output_dim)


def attention_maps(visual, x, ids_keep=None):
    """Explicit softmax attention of every block, (B, layers, heads, 1 + K, 1 + K), for methods that need scores
    (A-CLIP's CLS->patch attention). A separate function so the SDPA path stays fast; callers wrap it in no_grad."""
    x = visual.embed(x, ids_keep)
    maps = []
    for block in visual.transformer.resblocks:
        q, k, _ = block.attn.qkv(block.ln_1(x))
        maps.append((q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1))  # (B, heads, N, N)
        x = block(x)
    return torch.stack(maps, dim=1)


class CLIP(nn.Module):
    """open_clip.model.CLIP's layout: `visual` plus the text tower's parameters at the top level."""

    def __init__(self, cfg):
        super().__init__()
        v, t = cfg['vision_cfg'], cfg['text_cfg']
        act = QuickGELU if cfg.get('quick_gelu') else nn.GELU
        self.visual = VisionTransformer(
            v['image_size'], v['patch_size'], v['width'], v['layers'], v['width'] // v.get('head_width', 64),
            v.get('mlp_ratio', 4.0), cfg['embed_dim'], act, v.get('pool_type', 'tok'), v.get('no_ln_pre', False))
        self.context_length = t.get('context_length', 77)
        self.token_embedding = nn.Embedding(t.get('vocab_size', 49408), t['width'])
        self.positional_embedding = nn.Parameter(torch.empty(self.context_length, t['width']))
        self.transformer = Transformer(t['width'], t['layers'], t['heads'], t.get('mlp_ratio', 4.0), act)
        self.ln_final = nn.LayerNorm(t['width'])
        self.text_projection = nn.Parameter(torch.empty(t['width'], cfg['embed_dim']))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=t['width'] ** -0.5)
        self.transformer.init_weights()
        self.visual.transformer.init_weights()

    def encode_image(self, image, normalize=False, ids_keep=None):
        x = self.visual(image, ids_keep)
        return F.normalize(x, dim=-1) if normalize else x

    def text_tokens(self, text, causal=True):
        """(B, T) token ids -> (B, T, width) after ln_final; causal=False is a bidirectional pass (MLM heads)."""
        x = self.token_embedding(text) + self.positional_embedding
        return self.ln_final(self.transformer(x, causal))

    def pool_text(self, tokens, text):
        """text_tokens' output (B, T, width) -> (B, embed_dim): the end-of-text token (the largest id), projected."""
        return tokens[torch.arange(tokens.shape[0], device=tokens.device), text.argmax(dim=-1)] @ self.text_projection

    def encode_text(self, text, normalize=False):
        x = self.pool_text(self.text_tokens(text), text)
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, image, text, ids_keep=None):
        return (self.encode_image(image, True, ids_keep), self.encode_text(text, True), self.logit_scale.exp())


# the CPU default: 64 px images in 8x8 patches (64 tokens), small enough to learn in minutes on 2 cores; image
# embedding from the CLS token (open_clip's default 'tok'; 'avg', the patch mean, left position near chance on the
# embedded data: README, "What the same budget buys")
TINY = {'embed_dim': 128,
        'vision_cfg': {'image_size': 64, 'layers': 4, 'width': 128, 'head_width': 32, 'patch_size': 8, 'pool_type': 'tok'},
        'text_cfg': {'context_length': 32, 'vocab_size': 49408, 'width': 128, 'heads': 4, 'layers': 3}}

# open_clip config keys this compact model implements; anything else with a non-default value is refused
_VISION_KEYS = {'image_size', 'layers', 'width', 'head_width', 'mlp_ratio', 'patch_size', 'pool_type', 'no_ln_pre'}
_TEXT_KEYS = {'context_length', 'vocab_size', 'width', 'heads', 'layers', 'mlp_ratio'}
_TEXT_DEFAULTS = {'pool_type': 'argmax', 'proj_type': 'linear', 'pad_id': 0, 'eos_id': 2}


def model_config(name):
    """'tiny' or any open_clip model name ('ViT-B-16'); raises ValueError for what the compact ViT cannot build."""
    cfg = json.loads(json.dumps(TINY)) if name == 'tiny' else open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f'unknown --model {name!r}: use tiny or an open_clip ViT name such as ViT-B-16 '
                         f'(see open_clip.list_models())')
    v, t = cfg.get('vision_cfg', {}), cfg.get('text_cfg', {})
    bad = [f'vision_cfg.{k}' for k, x in v.items() if k not in _VISION_KEYS and x] + \
          [f'text_cfg.{k}' for k, x in t.items() if k not in _TEXT_KEYS and x and _TEXT_DEFAULTS.get(k) != x] + \
          [k for k in cfg if k not in ('embed_dim', 'quick_gelu', 'vision_cfg', 'text_cfg', 'custom_text') and cfg[k]]
    if not isinstance(v.get('layers'), int) or not isinstance(v.get('image_size'), int) or v.get('pool_type', 'tok') not in ('tok', 'avg'):
        bad.append('vision_cfg (needs a square ViT with int layers and tok/avg pooling)')
    if bad:
        raise ValueError(f'--model {name} uses {", ".join(bad)}, which the compact ViT in common.py does not implement')
    return cfg


def tokenizer_for(cfg):
    return open_clip.tokenizer.SimpleTokenizer(context_length=cfg['text_cfg'].get('context_length', 77))


# -----------------------------------------------------------------------------
# The command line every method shares (OpenCLIP's flag names); each method adds its own group and defaults.


def add_common_args(p):
    g = p.add_argument_group('data')
    g.add_argument('--train-data', default=None, help='CSV/TSV file or WebDataset shards (brace patterns, "::" joins '
                   'several); default: the embedded synthetic dataset')
    g.add_argument('--dataset-type', default='auto', choices=['auto', 'synthetic', 'csv', 'webdataset'])
    g.add_argument('--csv-img-key', default='filepath')
    g.add_argument('--csv-caption-key', default='title')
    g.add_argument('--csv-separator', default='\t')
    g.add_argument('--wds-image-key', default='jpg;png;jpeg;webp', help="WebDataset member holding the image "
                   "(';'-separated alternatives, the first present wins)")
    g.add_argument('--wds-caption-key', default='txt', help="WebDataset member holding the caption (';'-separated "
                   "alternatives); json:FIELD reads FIELD of the .json member")
    g.add_argument('--train-num-samples', type=int, default=None, help='samples per epoch (needed for webdataset '
                   'without --steps; synthetic: dataset size, default 100000)')
    g.add_argument('--synthetic-group-size', type=int, default=4, help='synthetic data: consecutive samples come in '
                   'groups of this many scenes that differ in one attribute (hard negatives; 1: independent scenes)')
    g.add_argument('--imagenet-val', default=None, help='ImageNet val folder (ImageFolder layout) for zero-shot')
    g.add_argument('--zeroshot-folder', default=None, help='any ImageFolder; class name = folder name, _ as space')
    g.add_argument('--zeroshot-templates', default='openai', choices=['openai', 'flip'], help="prompts for "
                   "--imagenet-val/--zeroshot-folder: OpenAI's 80, or the 7 short ones FLIP's official code uses")
    g.add_argument('--val-data', default=None, help='retrieval set, several captions per image (COCO/Flickr30K '
                   'test style): CSV/TSV rows of image + caption (--csv-*-keys), or WebDataset shards of an image and '
                   'its captions one per line; scored R@1/5/10 both ways')
    g.add_argument('--workers', type=int, default=1, help='data loader processes per rank')
    g = p.add_argument_group('training')
    g.add_argument('--model', default='tiny', help='tiny, or an open_clip model name such as ViT-B-16')
    g.add_argument('--batch-size', type=int, default=128, help='per process')
    g.add_argument('--steps', type=int, default=None, help='default: 800 on synthetic data, else one pass over '
                   '--train-num-samples')
    g.add_argument('--warmup', type=int, default=None, help='linear warmup steps (default: 5%% of --steps)')
    g.add_argument('--lr', type=float, default=None, help='peak learning rate (default: see the method group)')
    g.add_argument('--wd', type=float, default=0.2, help='AdamW weight decay')
    g.add_argument('--seed', type=int, default=0)
    g.add_argument('--accum-freq', type=int, default=1, help='micro-batches of --batch-size per optimizer step: the '
                   'global batch is accum-freq x batch-size x processes, with exactly its gradients')
    g.add_argument('--grad-checkpointing', action='store_true', help='recompute every transformer block in backward')
    g.add_argument('--grad-clip-norm', type=float, default=None, help='clip the global gradient norm (default: off)')
    g.add_argument('--pretrained', default=None, help='initialise the CLIP from an open_clip pretrained tag of '
                   '--model, a local-dir: folder or a ckpt.pt of any method here (weights only, fresh optimizer)')
    g.add_argument('--precision', default='auto', choices=['auto', 'fp32', 'bf16'], help='auto: bf16 on CUDA')
    g.add_argument('--compile', default='auto', choices=['auto', 'on', 'off'], help='auto: on for CUDA')
    g = p.add_argument_group('output')
    g.add_argument('--out', default=None, help='run folder (default: runs/<method>); an existing ckpt.pt resumes')
    g.add_argument('--resume', default=None, help='checkpoint to resume from (default: <out>/ckpt.pt if present)')
    g.add_argument('--eval-every', type=int, default=0, help='steps between evaluations (0: at the end only)')
    g.add_argument('--log-every', type=int, default=10)
    g.add_argument('--save-every', type=int, default=100, help='steps between checkpoints (and at the end)')
    return p


def check_args(args, method):
    """Fills run-dependent defaults; raises ValueError on flags that cannot work together."""
    args.out = args.out or os.path.join('runs', method)
    args.dataset_type = data.resolve_dataset_type(args.train_data, args.dataset_type)
    for name, least in (('batch_size', 1), ('accum_freq', 1), ('log_every', 1), ('save_every', 1), ('workers', 0),
                        ('eval_every', 0)):
        if getattr(args, name) < least:
            raise ValueError(f'--{name.replace("_", "-")} must be at least {least}')
    if args.grad_clip_norm is not None and not args.grad_clip_norm > 0:
        raise ValueError('--grad-clip-norm must be > 0 (leave it out for no clipping)')
    if args.resume and not os.path.isfile(args.resume):
        raise ValueError(f'--resume {args.resume} does not exist')
    return args


def finish_run_args(args, num_samples, world, synthetic_steps, default_lr):
    """fill_run_defaults, then rank 0 writes args.json. Returns the global batch size."""
    global_batch = fill_run_defaults(args, num_samples, world, synthetic_steps, default_lr)
    if rank() == 0:
        with open(os.path.join(args.out, 'args.json'), 'w') as f:
            json.dump(vars(args), f, indent=2)
    return global_batch


def fill_run_defaults(args, num_samples, world, synthetic_steps, default_lr):
    """Fills the run-length defaults once the data is known: --steps (`synthetic_steps` on the embedded data, else
    one pass over `num_samples`), --warmup (5% of --steps) and --lr (the method's `default_lr(args, global_batch)`).
    Returns the global batch size."""
    global_batch = args.batch_size * args.accum_freq * world
    if args.steps is None:
        if num_samples is None:
            fail('--train-data as webdataset needs --train-num-samples or --steps')
        args.steps = synthetic_steps if args.dataset_type == 'synthetic' else max(1, num_samples // global_batch)
    args.warmup = args.warmup if args.warmup is not None else max(1, args.steps // 20)
    args.lr = args.lr or default_lr(args, global_batch)
    return global_batch


# -----------------------------------------------------------------------------
# Distributed: torchrun's environment means distributed; NCCL on CUDA, gloo on CPU; plain python is world 1.


def init_distributed():
    """Returns (rank, world, device)."""
    if 'RANK' in os.environ and 'WORLD_SIZE' in os.environ:
        rank, world, local = int(os.environ['RANK']), int(os.environ['WORLD_SIZE']), int(os.environ['LOCAL_RANK'])
        if torch.cuda.is_available():
            device = torch.device('cuda', local)
            torch.cuda.set_device(device)
            dist.init_process_group('nccl', device_id=device)
        else:
            device = torch.device('cpu')
            dist.init_process_group('gloo')
        return rank, world, device
    return 0, 1, torch.device('cuda' if torch.cuda.is_available() else 'cpu')


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def cleanup():
    """Every rank calls this last. The barrier: no rank tears the process group down while another still works
    (rank 0 saving or exporting); a precaution after a rank aborted at shutdown ('terminate called without an active
    exception') in the 2-process test, three times in a row, and not since."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def print0(*args, **kwargs):
    if rank() == 0:
        print(*args, **kwargs, flush=True)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for each slice and returns this rank's slice."""

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(world_size())[rank()]


def gather(x):
    """(B, ...) on each rank -> (world * B, ...), rank-major; the gradient flows back to the rank that made each row."""
    return _GatherWithGrad.apply(x) if world_size() > 1 else x


def clip_loss(image_features, text_features, logit_scale):
    """Symmetric InfoNCE over the global batch (CLIP, Radford et al. 2021): this rank's rows against all ranks' columns,
    labels arange(B) + B * rank. Gradients under DDP equal one process on the concatenated batch."""
    image_features, text_features = image_features.float(), text_features.float()
    B = image_features.shape[0]
    labels = torch.arange(B, device=image_features.device) + B * rank()
    logits_per_image = logit_scale * image_features @ gather(text_features).T  # (B, world * B)
    logits_per_text = logit_scale * text_features @ gather(image_features).T  # (B, world * B)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def any_rank(*flags):
    """Bools on this rank -> list of bools that are True if True on any rank (one small collective)."""
    t = torch.tensor([float(f) for f in flags], device='cuda' if dist.is_initialized() and dist.get_backend() == 'nccl' else 'cpu')
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(x) for x in t.tolist()]


def mean_over_ranks(x):
    """A scalar tensor averaged over ranks, as a float (for logging: the loss of the global batch)."""
    x = x.detach().float().clone()
    if world_size() > 1:
        dist.all_reduce(x)
    return x.item() / world_size()


def batch_generator(device, seed, step):
    """A generator on `device` for the random choices of the whole global batch at `step` (masks, MLM positions): a
    pure function of (seed, step). Every rank draws for all rows of the global batch and takes its micro-batches'
    rows, so a sample's draw depends on its position in the global batch only, not on the split into ranks x
    micro-batches, and resume is exact."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_033 + step + 1)


# -----------------------------------------------------------------------------
# Big batches: gradient accumulation that is exact for batch-coupled losses (GradCache), activation checkpointing.


class Micro:
    """One micro-batch on the device: `images` (a tensor, or a tuple for multi-view transforms), `texts` (b, T), `rows`
    (its slice of the global batch) and `cache`, a dict the method's forward fills on its first call and reads on the
    second (teacher outputs: computed once per micro-batch)."""

    def __init__(self, images, texts, rows):
        self.images, self.texts, self.rows, self.cache = images, texts, rows, {}
        self.size = texts.shape[0]


def _to(x, device):
    return tuple(_to(t, device) for t in x) if isinstance(x, (tuple, list)) else x.to(device, non_blocking=True)


def _chunk(x, n):  # a tensor or a tuple of tensors -> n chunks along the batch
    return list(zip(*(_chunk(t, n) for t in x))) if isinstance(x, tuple) else x.chunk(n)


class Batches:
    """The loader's micro-batches grouped into optimizer steps: next() -> (list of --accum-freq Micro on `device`,
    samples skipped). Micro-batch k of rank r holds global rows (r * K + k) * B ... + B (data.StepSampler's order).
    Also times the wait for data (`data_seconds`, for the log)."""

    def __init__(self, loader, args, device):
        self.batches, self.K, self.B, self.device = iter(loader), args.accum_freq, args.batch_size, device
        self.data_seconds = 0.0

    def __next__(self):
        t = time.perf_counter()
        try:
            got = [next(self.batches) for _ in range(self.K)]
        except data.DataError as err:  # e.g. no readable sample in the shards (from a loader worker): bad input
            fail(err)
        self.data_seconds += time.perf_counter() - t
        micro = []
        for k, (images, texts, _) in enumerate(got):
            first = (rank() * self.K + k) * self.B
            micro.append(Micro(_to(images, self.device), _to(texts, self.device), slice(first, first + len(texts))))
        return micro, sum(n for _, _, n in got)


def split_micro(micro, n):
    """Each micro-batch cut into n along the batch (FLIP's unmasked tuning: the same global batch in smaller pieces)."""
    out = []
    for m in micro:
        start = m.rows.start
        for images, texts in zip(_chunk(m.images, n), m.texts.chunk(n)):
            out.append(Micro(images, texts, slice(start, start + len(texts))))
            start += len(texts)
    return out


class Forward:
    """What a method's forward on one micro-batch returns. `coupled`: per-sample tensors (b, ...) that the batch-coupled
    loss reads (embeddings); `shared`: tensors made from parameters alone that it also reads (the logit scale,
    temperatures); `local`: the mean over the micro-batch of the per-sample loss terms (a tensor, or 0.0); `terms`:
    per-sample terms to log (micro-batch means)."""

    def __init__(self, coupled=(), shared=(), local=0.0, terms=None):
        self.coupled, self.shared, self.local, self.terms = coupled, shared, local, terms or {}


def _sync(train_model, last):
    """DDP all-reduces gradients in the last micro-batch's backward only."""
    if last or not isinstance(train_model, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return train_model.no_sync()


def accumulate(train_model, micro, forward, coupled_loss=None):
    """The backward of one optimizer step over its micro-batches, with the gradients of ONE batch of all of them.
    forward(m) -> Forward for Micro m (its own autocast inside); coupled_loss(*coupled, *shared) -> loss or (loss, terms)
    on this rank's rows of the whole step's batch (in fp32, called outside autocast; cross-rank gathers inside). The
    step's loss is coupled_loss + the size-weighted mean of the micro-batches' local terms; under DDP, the mean over ranks.
    One micro-batch: forward, loss, backward, as without accumulation. Several, with a coupled loss (GradCache, Gao et
    al. 2021): a no-grad forward of each gives the coupled tensors; the coupled loss on all of them, concatenated and
    detached, gives their gradients; then each micro-batch is forwarded again (the same inputs, masks and cache: the
    same outputs) and backpropagated with sum(coupled * cached gradient) + its weight x (shared * their gradient +
    local). Parameters behind `shared` thus get the coupled loss's gradient once in total. Returns (loss, terms),
    detached."""
    weights = [m.size / sum(m.size for m in micro) for m in micro]
    if coupled_loss is None or len(micro) == 1:  # plain accumulation: no extra forward
        loss, terms = 0.0, {}
        for k, (m, w) in enumerate(zip(micro, weights)):
            with _sync(train_model, k == len(micro) - 1):
                out = forward(m)
                step_loss, step_terms = _loss_terms(coupled_loss(*out.coupled, *out.shared)) if coupled_loss else (0.0, {})
                (step_loss + w * out.local).backward()
            loss, terms = _add(loss, terms, step_loss + w * out.local, step_terms, out.terms, w)
        return loss.detach(), terms
    with torch.no_grad():
        first = [forward(m) for m in micro]
    coupled = [torch.cat(ts).float().requires_grad_() for ts in zip(*(f.coupled for f in first))]
    shared = [s.detach().float().requires_grad_() for s in first[0].shared]
    loss, terms = _loss_terms(coupled_loss(*coupled, *shared))
    loss.backward()  # gradients of the coupled loss w.r.t. its inputs only: they are leaves
    loss, terms = loss.detach(), {k: v.detach() for k, v in terms.items()}
    grads = [c.grad.split([m.size for m in micro]) for c in coupled]
    for k, (m, w) in enumerate(zip(micro, weights)):
        with _sync(train_model, k == len(micro) - 1):
            out = forward(m)
            surrogate = w * out.local + sum((x.float() * g[k]).sum() for x, g in zip(out.coupled, grads)) + \
                w * sum((s.float() * c.grad).sum() for s, c in zip(out.shared, shared))
            surrogate.backward()
        loss, terms = _add(loss, terms, w * out.local, {}, out.terms, w)
    return loss, terms


def _loss_terms(out):
    return out if isinstance(out, tuple) else (out, {})


def _add(loss, terms, step_loss, coupled_terms, local_terms, w):
    """Running totals for the log: the loss, the coupled terms as they are, the local terms weighted."""
    terms = dict(terms, **{k: v.detach() for k, v in coupled_terms.items()})
    for k, v in local_terms.items():
        terms[k] = terms.get(k, 0.0) + w * v.detach()
    return loss + (step_loss.detach() if torch.is_tensor(step_loss) else step_loss), terms


def set_grad_checkpointing(model, enable=True):
    """--grad-checkpointing: every common.Transformer in `model` (both towers, decoders built from it) recomputes its
    blocks in backward (torch.utils.checkpoint, use_reentrant=False); no-grad forwards are unaffected."""
    for module in model.modules():
        if isinstance(module, Transformer):
            module.grad_checkpointing = enable


def clip_grad_norm(model, max_norm):
    """--grad-clip-norm: clip the global gradient norm (after DDP's all-reduce, so every rank clips alike)."""
    if max_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


# -----------------------------------------------------------------------------
# Optimizer, schedule, precision.


def param_groups(model, weight_decay):
    """AdamW groups: no weight decay on biases, norm scales, class/position embeddings and the logit scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or name.endswith('positional_embedding') else decay).append(p)
    return [{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]


def lr_at(step, total, warmup, lr, min_lr=0.0):
    """Linear warmup over `warmup` steps, then cosine from lr to min_lr at `total` (step counts from 0)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))


def autocast(device, precision):
    """bf16 autocast when asked; 'auto' means bf16 on a CUDA device that supports it (Ampere and newer), said at
    start-up when it falls back to fp32; fp32 otherwise."""
    if precision == 'auto' and device.type == 'cuda':
        if torch.cuda.is_bf16_supported():
            return torch.autocast(device.type, dtype=torch.bfloat16)
        print0('note: this GPU does not support bf16; --precision auto trains in fp32')
    if precision == 'bf16':
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def maybe_compile(model, mode, device):
    """--compile auto: on for CUDA, off for CPU (where it only costs start-up time)."""
    return torch.compile(model) if mode == 'on' or (mode == 'auto' and device.type == 'cuda') else model


# -----------------------------------------------------------------------------
# Checkpoints, signals, logging.


def save_checkpoint(path, state):
    """Rank 0 writes a temp file, flushes it to disk, then renames: a kill mid-write leaves the old file intact."""
    tmp = f'{path}.tmp'
    with open(tmp, 'wb') as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path, cfg=None):
    """The saved state; with `cfg`, refuses a checkpoint written for another model config (a pooling or activation
    change leaves the parameter shapes alone, so a strict state-dict load alone would not notice)."""
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:
        raise ValueError(f'cannot read checkpoint {path}: {err}') from None
    if cfg is not None and 'cfg' in state and state['cfg'] != cfg:
        ours, theirs = _flat(cfg), _flat(state['cfg'])
        diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        raise ValueError(f'{path} holds a model with another config ({", ".join(diff)} differ); use another --out')
    return state


def load_pretrained(clip, spec, model_name):
    """--pretrained: initialise `clip` (a common.CLIP) from `spec`: an open_clip pretrained tag of `model_name`
    ('openai', 'laion2b_s34b_b88k'), a `local-dir:` folder (what every run here exports), or a ckpt.pt written by any
    method here (its CLIP part: the keys under the prefix that holds the logit scale). Strict: every parameter must be
    there with its shape. Raises ValueError (one line) otherwise."""
    if spec.startswith('local-dir:') or not os.path.isfile(spec):
        if not spec.startswith('local-dir:'):
            tags = open_clip.list_pretrained_tags_by_model(model_name)
            if spec not in tags:
                raise ValueError(f'--pretrained {spec}: not a file, not local-dir:, and not a pretrained tag of '
                                 f'{model_name} (its tags: {", ".join(tags) or "none"})')
        elif not os.path.isdir(spec[len('local-dir:'):]):
            raise ValueError(f'--pretrained {spec}: no such folder')
        try:
            source = open_clip.create_model(spec if spec.startswith('local-dir:') else model_name,
                                            pretrained=None if spec.startswith('local-dir:') else spec)
        except Exception as err:
            raise ValueError(f'--pretrained {spec}: open_clip cannot build it ({str(err).splitlines()[0]})') from None
        weights = source.state_dict()
    else:
        weights = load_checkpoint(spec)['model']
        prefixes = [k[:-len('logit_scale')] for k in weights if k.endswith('logit_scale')]
        if len(prefixes) != 1:
            raise ValueError(f'--pretrained {spec}: no single CLIP in this checkpoint')
        weights = {k[len(prefixes[0]):]: v for k, v in weights.items() if k.startswith(prefixes[0])}
        weights = {k: v for k, v in weights.items() if k in clip.state_dict()}  # the method's own heads stay out
    try:
        clip.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise ValueError(f'--pretrained {spec} does not fit --model {model_name}: {" ".join(lines[1:3])[:300]}') from None


def changed_args(now, then, ignore=('out', 'resume')):
    """The arguments that differ between `now` (a Namespace) and `then` (a run's saved arguments, a dict): a flag
    given otherwise, a default changed, a flag added since; as '--name: then-value then, now-value now'."""
    return [f'--{k.replace("_", "-")}: {then.get(k, "(none)")} then, {v} now' for k, v in vars(now).items()
            if k not in ignore and then.get(k, '(none)') != v]


def resume_optimizer(optimizer, state, path, total, args):
    """After a model resume (`state` None: a fresh run), the optimizer and RNG state from the checkpoint. A checkpoint
    past this run's last step (nothing would train or be evaluated) or whose optimizer does not fit this run's (other
    flags) is bad input: one line, exit 2. One saved with other flags that fit (a longer --steps, a changed default)
    resumes with a warning that names them."""
    if state is None:
        return
    changed = changed_args(args, state.get('args', {}))
    if changed:
        print0(f'warning: {path} was saved by a run with other flags ({"; ".join(changed)}); resuming with the flags '
               'given now', file=sys.stderr)
    if state['step'] > total:
        fail(f"cannot resume from {path}: it is at step {state['step']}, past this run's {total}; "
             'give more --steps or another --out')
    try:
        optimizer.load_state_dict(state['optimizer'])
    except ValueError as err:
        fail(f'cannot resume from {path}: its optimizer does not fit this run ({str(err).splitlines()[0]})')
    torch.set_rng_state(state['rng'])


def _flat(d, prefix=''):
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f'{prefix}{k}.') if isinstance(v, dict) else {f'{prefix}{k}': v})
    return out


class StopSignal:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the next step boundary and exits cleanly. A second signal
    exits at once (code 128 + signal), for a run that never reaches a step boundary (waiting for data): nothing is
    written, so the last good checkpoint stays."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            print(f'error: second {signal.Signals(signum).name}: exiting now, without a checkpoint', file=sys.stderr,
                  flush=True)
            os._exit(128 + signum)
        self.requested = True
        print0(f'{signal.Signals(signum).name}: stopping at the end of this step (again to exit at once)',
               file=sys.stderr)


class Logger:
    """Rank 0 appends one JSON object per record to log.jsonl. On resume, records past the checkpoint are dropped,
    so the log reads as one uninterrupted run."""

    def __init__(self, path, resume_step=None):
        self.path = path if rank() == 0 else None
        if self.path and os.path.exists(path):
            with open(path) as f:
                records = [json.loads(line) for line in f if line.strip()]
            keep = [r for r in records if resume_step is not None and r.get('step', 0) <= resume_step]
            with open(path, 'w') as f:
                f.writelines(json.dumps(r) + '\n' for r in keep)

    def log(self, record):
        if self.path:
            with open(self.path, 'a') as f:
                f.write(json.dumps(record) + '\n')


class Throughput:
    """Samples per second since the last record; with rates(batches), also the seconds spent waiting for data and
    computing in that time (OpenCLIP's `Data (t)` and `Batch (t)`: slow training is most often slow input)."""

    def __init__(self):
        self.t, self.n, self.data = time.perf_counter(), 0, 0.0

    def add(self, n):
        self.n += n

    def rate(self):
        now = time.perf_counter()
        r, self.t, self.n = self.n / max(now - self.t, 1e-9), now, 0
        return r

    def rates(self, batches):
        """For a log record: samples_per_sec, data_seconds, compute_seconds since the last record (`batches`:
        common.Batches, which times its waits)."""
        seconds, data_seconds = time.perf_counter() - self.t, batches.data_seconds - self.data
        self.data = batches.data_seconds
        return {'samples_per_sec': self.rate(), 'data_seconds': round(data_seconds, 4),
                'compute_seconds': round(seconds - data_seconds, 4)}


def data_share(record):
    """For the progress bar: the share of the time since the last record spent waiting for data."""
    return f"{record['data_seconds'] / max(record['data_seconds'] + record['compute_seconds'], 1e-9):.0%}"


def fail(msg):
    """Bad input: one line on stderr, exit code 2, no traceback."""
    print(f'error: {msg}', file=sys.stderr, flush=True)
    sys.exit(2)


# -----------------------------------------------------------------------------
# Evaluation: zero-shot classification (open_clip's classifier builder) and image<->text retrieval. A collective that
# every rank calls: each rank encodes its batches of every set (data.eval_batches: batch c to rank c mod world, the
# batch one process would encode), the integer counts are summed over ranks, and the results are exactly one process's
# on the whole set, on every rank (rank 0 logs them).

EVAL_BATCH = 256  # images or captions per encoder pass, for the sets held as tensors


def _sum_over_ranks(counts):
    """An int64 tensor of counts on the device -> their sums over ranks, as a list of ints."""
    if world_size() > 1:
        dist.all_reduce(counts)
    return counts.tolist()


def _gather_rows(rows, index, n):
    """This rank's rows (m, D) of a set of n items, at positions `index` (m,) -> all n rows (n, D) in order, on every
    rank (padded to the largest share for all_gather)."""
    if world_size() > 1:
        shape = torch.tensor([len(index), rows.shape[1]], device=index.device)
        shapes = [torch.empty_like(shape) for _ in range(world_size())]
        dist.all_gather(shapes, shape)
        most, dim = (max(int(s[i]) for s in shapes) for i in (0, 1))
        rows = torch.cat([rows.reshape(-1, dim), rows.new_zeros(most - len(index), dim)])
        index = torch.cat([index, index.new_full((most - len(index),), -1)])
        all_rows, all_index = [torch.empty_like(rows) for _ in shapes], [torch.empty_like(index) for _ in shapes]
        dist.all_gather(all_rows, rows)
        dist.all_gather(all_index, index)
        rows, index = torch.cat(all_rows), torch.cat(all_index)
        rows, index = rows[index >= 0], index[index >= 0]  # the padding dropped
    out = rows.new_empty(n, rows.shape[1])
    out[index] = rows
    return out


def _stack(batches, device):
    """[(features (b, D), indices (b,))] -> (features (m, D), indices (m,)); m = 0 on a rank without a batch."""
    if not batches:
        return torch.zeros(0, 0, device=device), torch.zeros(0, dtype=torch.int64, device=device)
    return torch.cat([f for f, _ in batches]), torch.cat([i for _, i in batches])


@torch.no_grad()
def zeroshot_classifier(model, tokenizer, classnames, templates, device, amp):
    """(embed_dim, classes): each class's prompt embeddings averaged (open_clip's builder), encoded 10 classes x all
    templates per text pass, as OpenCLIP does; all of ImageNet's 1000 x 80 prompts in one pass would hold ~60 GB of
    activations at ViT-B-16."""
    with amp:
        return open_clip.build_zero_shot_classifier(model, tokenizer, classnames, templates, num_classes_per_batch=10,
                                                    device=device).float()


@torch.no_grad()
def zeroshot_accuracy(model, tokenizer, task, device, amp, batch_size=EVAL_BATCH):
    """task: dict(classnames, templates, and images + labels tensors or a loader of this rank's (images, labels)
    batches) -> top-1 accuracy on the whole set. Every rank calls this."""
    classifier = zeroshot_classifier(model, tokenizer, task['classnames'], task['templates'], device, amp)
    if 'loader' in task:
        batches = task['loader']
    else:
        batches = ((task['images'][b.start:b.stop], task['labels'][b.start:b.stop])
                   for b in data.eval_batches(len(task['labels']), batch_size, rank(), world_size()))
    counts = torch.zeros(2, dtype=torch.int64, device=device)  # correct, seen
    for images, labels in batches:
        with amp:
            features = model.encode_image(images.to(device), normalize=True)
        counts[0] += (features.float() @ classifier).argmax(dim=1).eq(labels.to(device)).sum()
        counts[1] += len(labels)
    correct, total = _sum_over_ranks(counts)
    return correct / max(total, 1)


@torch.no_grad()
def retrieval_recall(model, tokenizer, retrieval, device, amp, ks=(1, 5, 10), name='retrieval', batch_size=EVAL_BATCH):
    """Image<->text recall@k on a set of images and captions, caption j describing image image_of[j] (one caption per
    image, image_of[j] = j, when not given): image->text is a hit at k if any of the image's captions ranks in the top
    k, text->image if its one image does (the COCO / Flickr30K protocol); ties count for the true match. `retrieval`:
    dict(captions, image_of, and images (N, 3, H, W) or a loader of this rank's (images, indices) batches with
    num_images). Every rank calls this: it encodes its batches of images and captions, gathers both, scores its own
    rows against all of the other side, and the hit counts are summed over ranks."""
    captions = retrieval['captions']
    n_txt = len(captions)
    image_of = retrieval.get('image_of')
    image_of = (torch.arange(n_txt) if image_of is None else image_of).to(device)
    if 'loader' in retrieval:
        n_img, batches = retrieval['num_images'], retrieval['loader']
    else:
        n_img = len(retrieval['images'])
        batches = ((retrieval['images'][b.start:b.stop], torch.tensor(b))
                   for b in data.eval_batches(n_img, batch_size, rank(), world_size()))
    img = []  # this rank's batches: (features, indices)
    for images, index in batches:
        with amp:
            img.append((model.encode_image(images.to(device), normalize=True).float(), index.to(device)))
    txt = []
    for b in data.eval_batches(n_txt, batch_size, rank(), world_size()):
        with amp:
            features = model.encode_text(tokenizer(captions[b.start:b.stop]).to(device), normalize=True).float()
        txt.append((features, torch.tensor(b, device=device)))
    all_img, all_txt = _gather_rows(*_stack(img, device), n_img), _gather_rows(*_stack(txt, device), n_txt)
    k = torch.tensor(ks, device=device)
    hits = torch.zeros(2, len(ks), dtype=torch.int64, device=device)  # image->text, text->image
    for features, index in img:  # scored batch by batch, the batches one process scores
        s = features @ all_txt.T  # (b, n_txt)
        own = image_of[None, :] == index[:, None]  # (b, n_txt): each image's captions
        best = s.masked_fill(~own, -math.inf).amax(dim=1, keepdim=True)  # its best-scored caption
        hits[0] += ((s > best).sum(dim=1, keepdim=True) < k).sum(dim=0)  # captions above it: that caption's rank
    for features, index in txt:
        s = features @ all_img.T  # (b, n_img)
        true = s.gather(1, image_of[index][:, None])  # its image's score
        hits[1] += ((s > true).sum(dim=1, keepdim=True) < k).sum(dim=0)
    hits = _sum_over_ranks(hits.flatten())
    return {f'{name}/{d}_R@{kk}': hits[i * len(ks) + j] / n for i, (d, n) in enumerate(
        (('image_to_text', n_img), ('text_to_image', n_txt))) for j, kk in enumerate(ks)}


def retrieval_sets(retrieval):
    """evaluate's `retrieval`: None, one set (named 'retrieval') or {name: set} -> {name: set}."""
    if retrieval is None:
        return {}
    return {'retrieval': retrieval} if 'captions' in retrieval else retrieval


def evaluate(model, tokenizer, tasks, retrieval, device, amp, batch_size=EVAL_BATCH):
    """Every rank calls this (collectives inside): {'zeroshot/<task>': accuracy, '<set>/<direction>_R@<k>': recall}
    on the whole sets, the same on every rank; `retrieval` as retrieval_sets takes it. `batch_size`: per encoder pass
    for the sets held as tensors (loaders bring their own batches)."""
    was_training = model.training
    model.eval()
    out = {f'zeroshot/{name}': zeroshot_accuracy(model, tokenizer, task, device, amp, batch_size)
           for name, task in tasks.items()}
    for name, s in retrieval_sets(retrieval).items():
        out.update(retrieval_recall(model, tokenizer, s, device, amp, name=name, batch_size=batch_size))
    model.train(was_training)
    return out


def chance_levels(tasks, retrieval, ks=(1, 5, 10)):
    """What random embeddings score: 1 / classes; image->text with c of the n captions its own, 1 - C(n-c, k) / C(n, k)
    (averaged over images); text->image k / images."""
    out = {f'zeroshot/{name}': 1 / len(task['classnames']) for name, task in tasks.items()}
    for name, s in retrieval_sets(retrieval).items():
        n_txt = len(s['captions'])
        n_img = s.get('num_images', len(s['images']) if 'images' in s else n_txt)
        image_of = s.get('image_of')
        per_image = torch.bincount(image_of, minlength=n_img).tolist() if image_of is not None else [1] * n_img
        for k in ks:
            out[f'{name}/image_to_text_R@{k}'] = sum(1 - math.comb(n_txt - c, k) / math.comb(n_txt, k) if k <= n_txt
                                                     else 1.0 for c in per_image) / n_img
            out[f'{name}/text_to_image_R@{k}'] = min(1.0, k / n_img)
    return out


def print_results(results, chance):
    print0(f"{'metric':<34} {'ours':>8} {'chance':>8} {'x chance':>9}")
    for k, v in results.items():
        c = chance.get(k)
        print0(f'{k:<34} {v:8.4f} {c:8.4f} {v / c:9.1f}' if c else f'{k:<34} {v:8.4f}')


# -----------------------------------------------------------------------------
# Export: an open_clip `local-dir:` folder, loadable with open_clip.create_model_and_transforms('local-dir:PATH').


def export_open_clip(model, cfg, path):
    os.makedirs(path, exist_ok=True)
    preprocess = {'size': cfg['vision_cfg']['image_size'], 'mean': list(OPENAI_DATASET_MEAN),
                  'std': list(OPENAI_DATASET_STD), 'interpolation': 'bicubic', 'resize_mode': 'shortest'}
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = os.path.join(path, 'open_clip_pytorch_model.bin.tmp')
    torch.save(weights, tmp)
    os.replace(tmp, os.path.join(path, 'open_clip_pytorch_model.bin'))
    tmp = os.path.join(path, 'open_clip_config.json.tmp')
    with open(tmp, 'w') as f:
        json.dump({'model_cfg': cfg, 'preprocess_cfg': preprocess}, f, indent=2)
    os.replace(tmp, os.path.join(path, 'open_clip_config.json'))
