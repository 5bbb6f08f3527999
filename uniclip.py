"""UniCLIP: Unified Framework for Contrastive Language-Image Pre-training (Lee et al., NeurIPS 2022; arXiv 2209.13430).

No public implementation of this paper exists; this is the first. The abstract fixes the idea, two independent
restatements fix the loss, and everything else is reconstructed, each reconstruction behind a flag.

What this file implements
- From the paper (abstract): image-text (inter-domain) and image-image (intra-domain) contrast in ONE universal
  embedding space, made to work by three components, each of which the paper ablates:
  (1) augmentation-aware feature embedding, (2) the MP-NCE loss, (3) a domain-dependent similarity measure.
- MP-NCE (restated identically by two third-party papers): every embedding of the global batch is an anchor; its
  positives are the other embeddings of the same sample, its negatives everything from other samples, both domains.
  Each positive gets its own denominator, itself plus the anchor's negatives (other positives excluded):
      L = mean_i mean_{p in P(i)} -log[ e^{s_ip} / (e^{s_ip} + sum_{n in N(i)} e^{s_in}) ]          (Eq. 1)
  With one positive per anchor it is InfoNCE. Local anchors against candidates gathered with gradient (as
  common.clip_loss), so N processes compute exactly what one process computes on the global batch.

What is reconstructed, and the flag that changes it
- Domain-dependent similarity (Eq. 2): s_ij = (cos(z_i, z_j) - b_d) / tau_d for the domain pair d of i and j, a
  learnable temperature per pair (--tau domain) and a learnable offset (--offset domain); the offsets matter because
  one softmax mixes pairs. --tau-init 0.1 0.07 (image-image, image-text), tau clamped to [0.01, 1] (CLIP's
  logit-scale clamp). Only the offsets' difference is identified (a shift common to a whole softmax row cancels), so
  b_image-text is fixed at 0 and b_image-image is learned, from 0: two free offsets have a direction in which the loss
  is flat, and Adam's per-coordinate steps drift along it. The three parts switch off one at a time: --tau shared
  (one learnable temperature; the pairs keep the ratio of their --tau-init values), --offset none, --tau-init 0.07
  0.07 (image-image starts where image-text does); all three together are the "one temperature, no offset" ablation.
- Text-text pairs (--text-text tied): MP-NCE's negatives are everything from other samples, in both domains, so
  other captions are negatives of a caption anchor. With one caption per sample text-text pairs are only ever
  negatives, so a text-text temperature or offset of their own has no stable value: the loss falls for ever as
  b_text-text grows, which switches those negatives off (what this file's first version did: b_text-text climbed
  every step). Here they are scored with the image-text temperature and offset and have no parameters of their own.
  --text-text none leaves them out of every softmax (a caption anchor then sees image negatives only).
- --aug-embed add: the view's augmentation parameters (crop box, flip, colour-jitter factors - 1, grayscale, blur
  sigma; AUG_PARAMS) -> 2-layer MLP (--aug-hidden, last layer zero-initialised, so training starts as plain CLIP)
  -> added to the pooled image feature before the projection; 'concat' concatenates it instead, with its own
  projection rows. The crop box is in units of the image's centre square (side min(W, H), origin at its top-left
  corner), so the evaluation view -- resize the short side, centre crop -- is the box (0, 0, 1, 1) for every aspect
  ratio. Evaluation feeds IDENTITY, that view unaugmented; the result is a constant that export folds into ln_post's
  bias, so open_clip/ is a plain CLIP image tower (see fold_export).
- --views 2 augmented views + the caption per sample.
- --augment: 'slip' is SimCLR/SLIP's recipe (crop area 0.08-1, flip, colour jitter 0.4/0.4/0.4/0.1 at p 0.8,
  grayscale p 0.2, blur p 0.5), used on real data; the paper's own recipe is not reconstructed. The synthetic
  captions name positions and colours, so the synthetic default 'mild' keeps both: crop area 0.8-1 (objects stay in
  their third), brightness/contrast/saturation 0.2, no hue, no grayscale, no flip, light blur. Colour jitter is
  applied in a fixed order.
- --loss infonce is the ablation without MP-NCE: multi-positive InfoNCE (SupCon's L_out), where all positives of
  an anchor share one denominator, so they compete with each other.
- The ablation switches: --aug-embed none, --loss infonce, and the three similarity switches above. The optimiser
  is flip.py's (AdamW, betas (0.9, 0.95), wd 0.2, warmup + cosine) so that comparisons with the CLIP baseline
  isolate the method; the paper's own schedule is not known.
- Export: logit_scale = 1 / tau_image-text (the image-text offset is 0).
- Big batches: --accum-freq K gives exactly the gradients of one batch of K x batch-size x processes samples
  (common.accumulate: GradCache, one extra no-grad forward per micro-batch): MP-NCE takes every view and caption of
  all of them as anchors and candidates, and the temperatures and offset get their gradient once, from the loss on the
  whole batch. --grad-checkpointing recomputes the blocks of both towers in backward. The views are drawn by the
  loader, seeded by each sample's position in the global batch (data.py; synthetic and CSV data), and nothing else in
  a step is random, so any split of a global batch into processes x micro-batches gives the same step (tested).
- --pretrained loads the CLIP part; the temperatures and the offset start from --tau-init and 0 all the same.

Scaled down for the embedded CPU default, and said so: the `tiny` model, 400 steps of 96, lr 1e-3. A step costs
1.74x the FLOPs of a CLIP step on the same batch (two image views); the run costs what flip.py's default does
(28 TFLOP of forward and backward).

Launch
    python uniclip.py                                   # CPU, synthetic data, ~6 minutes, results in runs/uniclip/
    python uniclip.py --aug-embed none --out runs/uniclip_noaug   # one component of the ablation
    torchrun --nproc_per_node=8 uniclip.py --model ViT-B-32 --train-data '/data/yfcc15m/{00000..01499}.tar' \\
        --train-num-samples 15000000 --imagenet-val /data/imagenet/val --batch-size 512 --workers 8
"""
import argparse
import copy
import math
import os
import sys
from itertools import combinations

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import ImageFilter
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
    p.set_defaults(batch_size=96)
    g = p.add_argument_group('UniCLIP')
    g.add_argument('--loss', default='mpnce', choices=['mpnce', 'infonce'], help='infonce: positives share one '
                   'denominator (ablation of MP-NCE)')
    g.add_argument('--tau', default='domain', choices=['domain', 'shared'], help='a learnable temperature per domain '
                   'pair, or one learnable temperature, the pairs keeping their --tau-init ratio (ablation)')
    g.add_argument('--offset', default='domain', choices=['domain', 'none'], help='learnable image-image offset '
                   '(image-text: 0), or no offsets (ablation)')
    g.add_argument('--tau-init', type=float, nargs=2, default=[0.1, 0.07], metavar=('II', 'IT'),
                   help='initial temperatures for image-image and image-text pairs')
    g.add_argument('--text-text', default='tied', choices=['tied', 'none'], help='text-text pairs (only negatives '
                   'with one caption): negatives at the image-text temperature and offset, or in no softmax')
    g.add_argument('--aug-embed', default='add', choices=['add', 'concat', 'none'], help='how the augmentation MLP '
                   'joins the image feature before the projection (none: ablation)')
    g.add_argument('--aug-hidden', type=int, default=256, help='hidden width of the augmentation MLP')
    g.add_argument('--views', type=int, default=2, help='augmented image views per sample')
    g.add_argument('--augment', default='auto', choices=['auto', 'mild', 'slip'], help="augmentation recipe: SLIP's "
                   '(SimCLR) or a mild one that keeps positions and colours; auto: mild on the synthetic data, else slip')
    args = p.parse_args(argv)
    if args.views < 1 or args.aug_hidden < 1:
        raise ValueError('--views and --aug-hidden must be >= 1')
    if not all(0 < t <= 1 for t in args.tau_init):
        raise ValueError('--tau-init values must be in (0, 1]')
    if args.batch_size < 2:
        raise ValueError('--batch-size must be >= 2: an anchor needs negatives from other samples')
    return common.check_args(args, 'uniclip')


def default_lr(args, global_batch):
    """1e-3 for the tiny model on the synthetic data (as flip.py); else 5e-4 x global batch / 4096, a linear-scaling
    guess: the paper's learning rate is not reconstructed."""
    return 1e-3 if args.model == 'tiny' else 5e-4 * global_batch / 4096

# ----------------------------------------------------------------------------- method: augmentation

AUG_PARAMS = ['crop_x0', 'crop_y0', 'crop_w', 'crop_h', 'flip', 'brightness', 'contrast', 'saturation', 'hue',
              'grayscale', 'blur_sigma']  # crop in units of the centre square (crop_box); jitter as factor - 1
IDENTITY = [0., 0., 1., 1., 0., 0., 0., 0., 0., 0., 0.]  # the centre square, unaugmented: the evaluation view
RECIPES = {  # crop area, flip prob, jitter (brightness, contrast, saturation, hue) and prob, grayscale prob, blur
    'slip': dict(scale=(0.08, 1.0), flip=0.5, jitter=(0.4, 0.4, 0.4, 0.1), p_jitter=0.8, gray=0.2, blur=0.5, sigma=(0.1, 2.0)),
    'mild': dict(scale=(0.8, 1.0), flip=0.0, jitter=(0.2, 0.2, 0.2, 0.0), p_jitter=0.8, gray=0.0, blur=0.5, sigma=(0.1, 1.0)),
}


def crop_box(i, j, h, w, W, H):
    """A crop (top i, left j, height h, width w, in pixels) of a W x H image -> (x0, y0, w, h) in units of the image's
    centre square s = min(W, H), origin at that square's top-left corner. The evaluation transform (resize the short
    side, centre crop) sees exactly that square, (0, 0, 1, 1) = IDENTITY's box, whatever the aspect ratio; a training
    crop can reach outside it on a non-square image (x0 < 0 or w > 1)."""
    s = min(W, H)
    return [(j - (W - s) / 2) / s, (i - (H - s) / 2) / s, w / s, h / s]


class Views:
    """PIL image -> (views (V, 3, S, S), params (V, len(AUG_PARAMS))). Every random number comes from torch's global
    RNG, which data.py seeds per sample position, so a resumed run sees the same views."""

    def __init__(self, size, recipe, num_views):
        self.size, self.r, self.num_views = size, RECIPES[recipe], num_views
        self.normalize = T.Normalize(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)

    def view(self, image):
        r, (W, H) = self.r, image.size
        i, j, h, w = T.RandomResizedCrop.get_params(image, r['scale'], (3 / 4, 4 / 3))  # top, left, height, width
        x = TF.resized_crop(image, i, j, h, w, [self.size, self.size], T.InterpolationMode.BICUBIC)
        flip = float(torch.rand(()) < r['flip'])
        if flip:
            x = TF.hflip(x)
        b = c = s = 1.0
        hue = 0.0
        if torch.rand(()) < r['p_jitter']:
            u = 2 * torch.rand(4) - 1  # (4,) in [-1, 1)
            b, c, s, hue = [1 + u[k].item() * r['jitter'][k] for k in range(3)] + [u[3].item() * r['jitter'][3]]
            x = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(x, b), c), s)
            x = TF.adjust_hue(x, hue) if hue else x
        gray = float(torch.rand(()) < r['gray'])
        if gray:
            x = TF.rgb_to_grayscale(x, num_output_channels=3)
        sigma = 0.0
        if torch.rand(()) < r['blur']:
            sigma = r['sigma'][0] + (r['sigma'][1] - r['sigma'][0]) * torch.rand(()).item()
            x = x.filter(ImageFilter.GaussianBlur(radius=sigma))  # MoCo v2 / SLIP's blur (PIL, fast)
        params = crop_box(i, j, h, w, W, H) + [flip, b - 1, c - 1, s - 1, hue, gray, sigma]  # AUG_PARAMS order
        return self.normalize(TF.to_tensor(x)), torch.tensor(params)

    def __call__(self, image):
        views, params = zip(*(self.view(image) for _ in range(self.num_views)))
        return torch.stack(views), torch.stack(params)  # (V, 3, S, S), (V, P)

# ----------------------------------------------------------------------------- method: model and heads


class UniCLIP(nn.Module):
    """common.CLIP plus the augmentation MLP and the domain-pair similarity parameters. The image embedding is
    z = pool(x) @ proj + mlp(params) @ Q, with Q = proj for 'add' ((pool + mlp) @ proj, expanded) and Q a separate
    (hidden, embed_dim) matrix for 'concat' ([pool, mlp] @ [proj; Q], written as a sum)."""

    def __init__(self, cfg, aug_embed='add', aug_hidden=256, tau='domain', offset='domain', tau_init=(0.1, 0.07)):
        super().__init__()
        self.clip = common.CLIP(cfg)
        self.clip.logit_scale.requires_grad_(False)  # the universal space has its own temperatures; set at export
        self.aug_embed = aug_embed
        self.register_buffer('identity', torch.tensor(IDENTITY), persistent=False)
        if aug_embed != 'none':
            out = cfg['vision_cfg']['width'] if aug_embed == 'add' else aug_hidden
            self.aug_mlp = nn.Sequential(nn.Linear(len(IDENTITY), aug_hidden), nn.GELU(), nn.Linear(aug_hidden, out))
            nn.init.zeros_(self.aug_mlp[2].weight)  # zero contribution at the start: plain CLIP
            nn.init.zeros_(self.aug_mlp[2].bias)
            if aug_embed == 'concat':
                self.aug_proj = nn.Parameter(aug_hidden ** -0.5 * torch.randn(aug_hidden, cfg['embed_dim']))
        tau_init = torch.tensor(tau_init, dtype=torch.float)  # (2,) image-image, image-text
        if tau == 'domain':  # tau_d = exp(log_tau[d])
            self.log_tau = nn.Parameter(tau_init.log())  # (2,)
            self.register_buffer('tau_ratio', torch.ones(2), persistent=False)
        else:  # the ablation: one learnable temperature, tau_d = exp(log_tau) * tau_init[d] / tau_init[image-text]
            self.log_tau = nn.Parameter(tau_init[1:].log())  # (1,)
            self.register_buffer('tau_ratio', tau_init / tau_init[1], persistent=False)
        if offset == 'domain':  # b_image-image of Eq. 2; b_image-text = 0 (only the difference is identified)
            self.offset = nn.Parameter(torch.zeros(1))
        else:
            self.register_buffer('offset', torch.zeros(1), persistent=False)

    def aug_term(self, params):
        """(N, P) augmentation parameters -> (N, embed_dim), what they add to the projected image feature."""
        m = self.aug_mlp(params)  # (N, width) for 'add', (N, hidden) for 'concat'
        return m @ (self.clip.visual.proj if self.aug_embed == 'add' else self.aug_proj)

    def encode_image(self, image, normalize=False, params=None):
        """params=None means the identity parameters: evaluation, and what fold_export reproduces."""
        x = self.clip.visual(image)  # (N, embed_dim)
        if self.aug_embed != 'none':
            x = x + self.aug_term(self.identity.expand(len(image), -1) if params is None else params)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, text, normalize=False):
        return self.clip.encode_text(text, normalize)

    def similarity(self):
        """Eq. 2's temperature and offset per domain pair, (3,) each in PAIRS order. Text-text has no parameters of
        its own: it reads the image-text ones (--text-text tied)."""
        tau = self.log_tau.exp() * self.tau_ratio  # (2,) image-image, image-text
        offset = torch.cat([self.offset, torch.zeros_like(self.offset)])  # (2,) b_image-image, b_image-text = 0
        return torch.cat([tau, tau[1:]]), torch.cat([offset, offset[1:]])

    def forward(self, images, params, texts):
        """(N, 3, S, S), (N, P), (B, T) -> normalised image (N, D) and text (B, D) embeddings, tau and b per pair (3,)."""
        return (self.encode_image(images, True, params), self.encode_text(texts, True), *self.similarity())


@torch.no_grad()
def clamp_tau_(model):
    """After each optimiser step: log_tau in [log 0.01, 0], CLIP's logit-scale range (--tau shared: tau_image-text)."""
    model.log_tau.clamp_(-math.log(100), 0)


@torch.no_grad()
def fold_export(model):
    """A plain common.CLIP equal to `model` at evaluation. The identity term c = aug_term(identity) (embed_dim) is a
    constant after the projection; a shift d of ln_post's bias adds d @ proj there, so solve d @ proj = c: d =
    mlp(identity) exactly for 'add', d = c @ pinv(proj) for 'concat' (exact when proj has full column rank, checked)."""
    clip = copy.deepcopy(model.clip)
    clip.logit_scale.copy_(-model.similarity()[0][1].log())  # 1 / tau_image-text
    if model.aug_embed == 'add':
        clip.visual.ln_post.bias.add_(model.aug_mlp(model.identity))
    elif model.aug_embed == 'concat':
        c = model.aug_term(model.identity[None])[0].double()  # (embed_dim,)
        proj = clip.visual.proj.double()  # (width, embed_dim)
        d = c @ torch.linalg.pinv(proj)  # (width,)
        if (d @ proj - c).abs().max() > 1e-4 * (1 + c.abs().max()):
            raise ValueError('cannot fold the concat augmentation term: the projection has rank < embed_dim')
        clip.visual.ln_post.bias.add_(d.float())
    return clip

# ----------------------------------------------------------------------------- method: loss

PAIRS = ['image_image', 'image_text', 'text_text']  # domain pair d = domain_i + domain_j, 0 image, 1 text


def universal_logits(z, domains, tau, offset, text_text='tied'):
    """z (B, E, D): this rank's normalised embeddings, E per sample in `domains` order (list of 0 image / 1 text);
    tau, offset (3,) per domain pair. Returns logits (A, N) of the A = B*E local anchors against the N = world*B*E
    gathered candidates (Eq. 2), the positive and negative masks (A, N) and the domain pair index (A, N).
    text_text='none' leaves text-text pairs out of both masks."""
    z = z.float()
    B, E, D = z.shape
    world, rank, dev = common.world_size(), common.rank(), z.device
    anchors = z.reshape(B * E, D)  # (A, D), row a is sample a // E, slot a % E
    candidates = common.gather(z).reshape(-1, D)  # (N, D), rank-major like the anchors' global rows
    dom = torch.tensor(domains, device=dev)
    pair = dom.repeat(B)[:, None] + dom.repeat(world * B)[None, :]  # (A, N)
    logits = (anchors @ candidates.T - offset.float()[pair]) / tau.float()[pair]  # s_ij = (cos - b_d) / tau_d, Eq. 2
    sample_a = torch.arange(B, device=dev).repeat_interleave(E) + B * rank  # (A,) global sample of each anchor
    sample_c = torch.arange(world * B, device=dev).repeat_interleave(E)  # (N,)
    same = sample_a[:, None] == sample_c[None, :]  # (A, N)
    is_self = (torch.arange(B * E, device=dev) + B * E * rank)[:, None] == torch.arange(world * B * E, device=dev)
    kept = pair != 2 if text_text == 'none' else torch.ones_like(same)  # (A, N)
    return logits, same & ~is_self & kept, ~same & kept, pair


def mp_nce(logits, pos, neg):
    """(A, N) -> (A, N): -log e^{s_ip} / (e^{s_ip} + sum_{n in N(i)} e^{s_in}) at each positive p (Eq. 1), 0 elsewhere."""
    neg_lse = logits.masked_fill(~neg, float('-inf')).logsumexp(dim=1, keepdim=True)  # (A, 1) log sum over N(i)
    return (torch.logaddexp(logits, neg_lse) - logits).masked_fill(~pos, 0)


def info_nce(logits, pos, neg):
    """The ablation: -log e^{s_ip} / sum_{j != i} e^{s_ij}, one denominator shared by all positives (SupCon L_out)."""
    log_prob = logits.masked_fill(~(pos | neg), float('-inf')).log_softmax(dim=1)  # (A, N), self excluded
    return (-log_prob).masked_fill(~pos, 0)


def universal_loss(z, domains, tau, offset, loss='mpnce', text_text='tied'):
    """Mean over local anchors of the mean over each anchor's positives (Eq. 1); also each domain pair's mean term."""
    logits, pos, neg, pair = universal_logits(z, domains, tau, offset, text_text)
    terms = (mp_nce if loss == 'mpnce' else info_nce)(logits, pos, neg)  # (A, N)
    parts = {}
    for d in sorted({a + b for a, b in combinations(domains, 2)} - ({2} if text_text == 'none' else set())):
        sel = pos & (pair == d)
        parts[f'loss_{PAIRS[d]}'] = (terms.detach() * sel).sum() / sel.sum()
    return (terms.sum(dim=1) / pos.sum(dim=1)).mean(), parts

# ----------------------------------------------------------------------------- data


def transforms(args, cfg):
    size = cfg['vision_cfg']['image_size']
    synthetic = data.resolve_dataset_type(args.train_data, args.dataset_type) == 'synthetic'
    recipe = args.augment if args.augment != 'auto' else ('mild' if synthetic else 'slip')
    return Views(size, recipe, args.views), open_clip.image_transform(size, is_train=False)

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
    model = UniCLIP(cfg, args.aug_embed, args.aug_hidden, args.tau, args.offset, args.tau_init).to(device)
    common.set_grad_checkpointing(model, args.grad_checkpointing)
    train_model = common.maybe_compile(model, args.compile, device)
    if world > 1:
        train_model = DDP(train_model, device_ids=[device.index] if device.type == 'cuda' else None)
    tokenizer = common.tokenizer_for(cfg)
    domains = [0] * args.views + [1]  # per sample: the views, then the caption

    def coupled_loss(z, tau, offset):  # z (rows, V + 1, D): this rank's rows of the whole step, views then caption
        return universal_loss(z, domains, tau, offset, args.loss, args.text_text)

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

    # data
    train_tf, eval_tf = transforms(args, cfg)
    try:
        loader, num_samples = data.train_loader(args, train_tf, tokenizer, cfg['vision_cfg']['image_size'], rank, world, start)
        tasks, retrieval = data.eval_sets(args, eval_tf, cfg['vision_cfg']['image_size'])
    except data.DataError as err:
        common.fail(err)
    global_batch = common.finish_run_args(args, num_samples, world, 400, default_lr)

    # optimizer
    optimizer = torch.optim.AdamW(common.param_groups(model, args.wd), lr=args.lr, betas=(0.9, 0.95))
    common.resume_optimizer(optimizer, state, resume, args.steps, args)

    def checkpoint(step):
        if rank == 0:
            common.save_checkpoint(ckpt_path, {'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                                               'step': step, 'rng': torch.get_rng_state(),
                                               'cfg': cfg, 'args': vars(args)})

    # loop
    logger = common.Logger(os.path.join(args.out, 'log.jsonl'), resume_step=start)
    stop = common.StopSignal()
    common.print0(f'UniCLIP: {args.model}, loss {args.loss}, tau {args.tau}, offset {args.offset}, text-text '
                  f'{args.text_text}, aug-embed {args.aug_embed}, {args.views} views, {args.steps} steps of '
                  f'{global_batch} ({world} process{"es" if world > 1 else ""}, {device.type}), out {args.out}')
    meter, skipped, step = common.Throughput(), 0, start
    bar = tqdm(total=args.steps, initial=start, disable=rank != 0, dynamic_ncols=True)
    batches = common.Batches(loader, args, device)
    while step < args.steps:
        micro, n_skipped = next(batches)  # --accum-freq micro-batches of --batch-size; views drawn by the loader
        lr = common.lr_at(step, args.steps, args.warmup, args.lr)
        for group in optimizer.param_groups:
            group['lr'] = lr

        def forward(m):
            images, params = m.images  # (b, V, 3, S, S), (b, V, P)
            b, V = images.shape[:2]
            with amp:
                image_features, text_features, tau, offset = train_model(images.flatten(0, 1), params.flatten(0, 1),
                                                                         m.texts)  # (b*V, D), (b, D), (3,), (3,)
            z = torch.cat([image_features.view(b, V, -1), text_features[:, None]], dim=1)  # (b, V + 1, D)
            return common.Forward(coupled=(z,), shared=(tau, offset))
        optimizer.zero_grad(set_to_none=True)
        loss, terms = common.accumulate(train_model, micro, forward, coupled_loss)  # terms: MP-NCE per domain pair
        nonfinite, stopping = common.any_rank(not torch.isfinite(loss).item(), stop.requested)
        if nonfinite:
            common.print0(f'error: non-finite loss at step {step + 1}; stopping all ranks, '
                          f'the last good checkpoint is kept in {ckpt_path}', file=sys.stderr)
            common.cleanup()
            sys.exit(1)
        common.clip_grad_norm(model, args.grad_clip_norm)
        optimizer.step()
        clamp_tau_(model)
        step += 1
        skipped += n_skipped
        meter.add(global_batch)
        bar.update(1)
        if step % args.log_every == 0 or step == args.steps:
            tau, offset = model.similarity()
            record = {'step': step, 'loss': common.mean_over_ranks(loss), 'lr': lr,
                      **{k: common.mean_over_ranks(v) for k, v in terms.items()},
                      'tau_image_image': tau[0].item(), 'tau_image_text': tau[1].item(),
                      'offset_image_image': offset[0].item(),
                      **meter.rates(batches), 'skipped': skipped}
            logger.log(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f'{lr:.2e}', data=common.data_share(record))
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:  # every rank: its share of the sets
            logger.log({'step': step, **common.evaluate(model, tokenizer, tasks, retrieval, device, amp)})
        if step % args.save_every == 0 or step == args.steps or stopping:
            checkpoint(step)
        if stopping:
            common.print0(f'stopped by signal at step {step}; checkpoint saved to {ckpt_path}, rerun to resume')
            break
    bar.close()

    # cleanup: final evaluation (identity augmentation parameters; every rank its share, rank 0 logs and prints) and
    # export of the folded plain CLIP (rank 0)
    if step == args.steps:
        results = common.evaluate(model, tokenizer, tasks, retrieval, device, amp)
        logger.log({'step': step, **results})
        common.print_results(results, common.chance_levels(tasks, retrieval))
        if rank == 0:
            common.export_open_clip(fold_export(model), cfg, os.path.join(args.out, 'open_clip'))
            print(f'exported open_clip model to local-dir:{os.path.join(args.out, "open_clip")}')
    common.cleanup()
    return step


if __name__ == '__main__':
    main()
