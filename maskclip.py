"""MaskCLIP: Masked Self-Distillation Advances Contrastive Language-Image Pretraining (Dong, Bao, Zheng, Zhang, Chen,
Yang, Zeng, Zhang, Yuan, Chen, Wen, Yu; CVPR 2023; arXiv 2208.12262).

Not Zhou et al.'s training-free segmentation "MaskCLIP" (ECCV 2022), nor Ding et al.'s open-vocabulary segmentation
"MaskCLIP" (ICML 2023). The authors' repository (LightDXY/MaskCLIP) holds a README only; no public implementation of
this paper exists, so everything below the paper's description is a reconstruction, and says so.

What this file implements, from the paper ([abstract]: its abstract; [3rd]: third-party summaries of the full text)
- CLIP's symmetric InfoNCE over the global batch (common.clip_loss) [abstract], here on the full image and the
  caption (with MLM's masked tokens: --mlm-pass below).
- Masked self-distillation: the representation of the full image is distilled into the representation the student
  predicts from a masked image, at local patch level [abstract]; the full image goes through an EMA ("mean") teacher
  and a small decoder makes the prediction, so that distillation does not fight the contrastive objective [3rd].
- Targets from an online tokenizer, a softmax over learned prototypes, with cross-entropy [3rd] (which beat
  regression in the paper's ablation); regression of normalised features is the alternative.
- Local semantic supervision in the text branch [abstract]: masked language modelling with its own small decoder
  [3rd]. One stage: loss = L_clip + lambda_img * L_distill + lambda_txt * L_mlm, small lambdas [3rd].

Reconstructed (not recoverable from public material), each a flag
- --clip-view full: the CLIP term sees the full image and the distillation a second, masked student pass; 'masked'
  takes the CLIP embedding from the masked pass instead (FLIP-style): one full image pass less per step (refused with
  --lambda-img 0, which has no masked pass).
- --mask-ratio 0.75 --mask-type random: the student drops the masked patches (MAE/FLIP token removal, so its pass
  costs a quarter of a full one); 'block' masks BEiT-style random rectangles instead. It keeps K = int(L x (1 - r))
  patches, at least one (OpenCLIP's PatchDropout), and masks at least one.
- --decoder-depth 1: the image decoder is MAE's (a linear map to half the encoder width, a learned [MASK] token at each
  dropped position, its own position embedding, blocks, LayerNorm, a linear map back to the encoder width); the
  text decoder is blocks and a LayerNorm at the text width.
- --target ce: iBOT's online tokenizer. A head (MLP -> L2-normalised 256-d bottleneck -> cosine to --prototypes
  learned prototypes) maps the student's predictions and, as its EMA, the teacher's patch tokens to logits; target
  softmax((t - centre) / tau_t), prediction log_softmax(s / --student-temp 0.1), cross-entropy per masked patch. tau_t
  is iBOT's patch temperature (main_ibot.py's defaults): linear from --warmup-teacher-temp 0.04 at step 0 to
  --teacher-temp 0.07 at --warmup-teacher-temp-steps, constant after; that default is 30% of --steps, iBOT's 30
  warm-up epochs of its default 100 (0: --teacher-temp throughout). The cosines are made in fp32 outside autocast: a
  bf16 cosine is off by up to 2^-9 (~0.002), 0.05 in the exponent after / 0.04. The centre is an EMA (momentum 0.9)
  of the teacher logits' batch mean, all-reduced across ranks and checkpointed. --target mse: squared distance of the
  L2-normalised prediction and teacher patch token.
- --ema-momentum 0.996, cosine to 1 (BYOL/DINO, iBOT): the teacher is the EMA of the image tower and the tokenizer
  head and gets no gradients; evaluation and export use the student.
- --text-mask-ratio 0.15 (BERT): per caption, n = round(0.15 x its word tokens), at least one, become [MASK]; no
  80/10/10 split. Word tokens are those after start of text and before end of text; padding is told by position (after
  end of text), not by id, as its id 0 is also a word piece ('!' in '!$'). [MASK] is the existing id 49405
  ('jekyll</w>', the last, rarest BPE merge): below end-of-text (49407), so `encode_text`'s argmax pooling never
  moves. The decoder's outputs at the masked positions are scored against the token embedding matrix (tied: no new
  49408-way layer). Static shapes, no host sync: each caption scores N = round(0.15 x (context length - 2))
  positions, the most it can have masked (4 at tiny's 32, 11 at 77), those past its n weighted 0; the loss is the
  mean over every masked token of the global batch: each micro-batch's sum is divided by the step's count over all
  micro-batches and ranks (one small all_reduce), so any split into processes x micro-batches gives one batch's loss.
- --mlm-pass shared: the summaries do not say whether MLM has a text-tower pass of its own. The BERT-like
  reconstruction gives it one ('bidirectional', this file's first default); the default gives it none: the CLIP text
  pass itself reads the masked caption (causally, so CLIP's text embedding comes from the masked caption, as with
  FLIP's text masking) and the text decoder, which attends both ways, gives each masked token its right-hand
  context. 'bidirectional' adds a second pass of the text tower over the masked caption, bidirectional as BERT's
  (`text_tokens(causal=False)`), and CLIP's text term keeps the intact caption. Why shared is the default: the only
  published cost figures (A-CLIP's table, the same device for all rows: 1.56x CLIP's training time, 16 GB against
  14 GB) leave no room for a second text pass. Beside CLIP's own step, the teacher's full-image forward, the quarter
  student pass and the heads already make 1.56x CLIP's FLOPs at ViT-B/16; the second pass takes it to 1.70x. At the
  same budget on the embedded data the two score the same (README, bench.py quality).
- --lambda-img 0.1 --lambda-txt 0.1; with both 0 the step is exactly flip.py's CLIP step (--mask-ratio 0): no teacher,
  no decoders, the same optimiser (AdamW, betas 0.9/0.95).
- The learning rate, 5e-4 x global batch / 4096: a guess (SLIP's YFCC-15M rate; the paper compares against SLIP).
- Big batches: --accum-freq K trains on exactly one batch of K x batch-size x processes (common.accumulate,
  GradCache): L_clip contrasts the whole global batch, at the cost of one extra no-grad forward per micro-batch
  (the decoders included); the EMA teacher's targets are computed once per micro-batch and reused (m.cache). The
  distillation and MLM terms are per sample, averaged over the global batch (MLM per masked token, above); the EMA
  teacher and the centre update once per optimizer step, the centre from the targets of every micro-batch (and
  rank). Patch masks and MLM positions are drawn for the whole global batch from (seed, step), each micro-batch taking
  its rows, so any split gives the same step and resume stays exact. Everything is exact (no BatchNorm here).
  --grad-checkpointing recomputes every block of both towers and both decoders in backward.

Scaled down for the embedded CPU default, and said so: the `tiny` model (64 px, 8 px patches), 200 steps of 128 (about
0.8 s each: 3 min on 2 idle cores), lr 1e-3, 256 prototypes (iBOT: 8192), no crop or flip on the synthetic data, and
EMA momentum 0.95 -> 1 (as attentive_mask_clip.py's tiny default). After T steps the teacher is still prod_t m_t of its
random initialisation, about exp(-(1 - m_0) T / 2) on the cosine schedule: 0.996 would leave 67% after 200 steps (45%
after bench.py's 400), 0.95 leaves 0.6% (0.004%). At the paper's 91,552 steps 0.996 leaves nothing.

Cost against a CLIP step on the same batch (the paper's only figure, via A-CLIP's table: 1.56x on ViT-B/16). The
default adds a quarter-length student pass, a forward-only teacher pass, the decoders, the prototype head and the
vocabulary scores; --mlm-pass bidirectional adds a second text pass, --clip-view masked drops the full-image pass.
`bench.py speed` (its rows maskclip, maskclip-bidirectional-text, maskclip-masked-view; commands in the README), 2 CPU
cores, fp32, freed memory kept for reuse, time x CLIP (FLOPs x CLIP):
    ViT-B/16, batch 8:   default 1.58x (1.56x)   --mlm-pass bidirectional 1.71x (1.70x)   --clip-view masked 0.77x (0.70x)
    ViT-S/16, batch 16:  default 1.59x (1.54x)   --mlm-pass bidirectional 1.82x (1.81x)   --clip-view masked 0.91x (0.81x)
    tiny, batch 64:      default 1.78x (1.84x)   --mlm-pass bidirectional 1.99x (2.10x)   --clip-view masked 1.15x (1.10x)
At ViT-B/16 the default's FLOP ratio equals the published time ratio, 1.56x; its time here is 1.58x (a 3-round
median). The tiny model's ratio is higher because its one-block decoders and 49,408-way vocabulary scores are large
beside a 3-layer text tower. Not measured on a GPU. These times predate the static-shape MLM, which scores N rows per
caption instead of its n masked ones; FLOPs x CLIP since (bench.count_flops on the same steps, not timed): ViT-B/16
default 1.57x, bidirectional 1.72x, masked view 0.72x; ViT-S/16 1.57x, 1.83x, 0.83x; tiny 2.00x, 2.26x, 1.26x.
Every finished run times both steps on its last micro-batch and logs and prints the ratio (--time-steps).

Launch
    python maskclip.py                                   # CPU, synthetic data, results in runs/maskclip/
    python maskclip.py --lambda-img 0 --lambda-txt 0     # the CLIP baseline (= flip.py --mask-ratio 0)
    python maskclip.py --model ViT-B-16 --train-data '/data/yfcc15m/{00000..01499}.tar' --train-num-samples 15000000 \\
        --imagenet-val /data/imagenet/val --batch-size 256 --workers 8     # one GPU
    torchrun --nproc_per_node=8 maskclip.py --model ViT-B-16 --train-data '/data/yfcc15m/{00000..01499}.tar' \\
        --train-num-samples 15000000 --steps 91552 --imagenet-val /data/imagenet/val --batch-size 512 --workers 8
        # 25 epochs of YFCC-15M at a global batch of 4096, the paper's setting
"""
import argparse
import copy
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import open_clip
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

import common
import data

SOT, EOT = 49406, 49407  # open_clip's SimpleTokenizer: start/end of text (padding after EOT is 0, also a word piece)
MASK_ID = 49405  # [MASK]: an existing, rarely used token (the last BPE merge), below EOT

# ----------------------------------------------------------------------------- args


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_common_args(p)
    g = p.add_argument_group('MaskCLIP')
    g.add_argument('--lambda-img', type=float, default=0.1, help='weight of masked self-distillation (0: off)')
    g.add_argument('--lambda-txt', type=float, default=0.1, help='weight of masked language modelling (0: off)')
    g.add_argument('--mask-ratio', type=float, default=0.75, help='fraction of patches the student does not see')
    g.add_argument('--mask-type', default='random', choices=['random', 'block'], help='uniform or BEiT-style blocks')
    g.add_argument('--decoder-depth', type=int, default=1, help='blocks in each of the two decoders')
    g.add_argument('--target', default='ce', choices=['ce', 'mse'], help='online tokenizer + cross-entropy, or '
                   'regression of L2-normalised teacher features')
    g.add_argument('--prototypes', type=int, default=None, help='online tokenizer size (default: 8192 as iBOT, '
                   '256 for the tiny model)')
    g.add_argument('--teacher-temp', type=float, default=0.07, help='teacher temperature after the warm-up')
    g.add_argument('--warmup-teacher-temp', type=float, default=0.04, help='teacher temperature at step 0')
    g.add_argument('--warmup-teacher-temp-steps', type=int, default=None, help='steps of the linear warm-up of the '
                   'teacher temperature (default: 30%% of --steps; 0: --teacher-temp throughout)')
    g.add_argument('--student-temp', type=float, default=0.1)
    g.add_argument('--ema-momentum', type=float, default=None, help='teacher momentum at step 0, cosine to 1 '
                   '(default: 0.996; 0.95 for tiny)')
    g.add_argument('--text-mask-ratio', type=float, default=0.15, help='fraction of caption tokens masked for MLM')
    g.add_argument('--time-steps', type=int, default=5, help='steps timed against a CLIP step at the end (0: skip)')
    g.add_argument('--clip-view', default='full', choices=['full', 'masked'], help='image of the CLIP term: the full '
                   'image (a second student pass), or the masked pass the decoder uses (FLIP-style, cheaper; '
                   'with --lambda-img > 0)')
    g.add_argument('--mlm-pass', default='shared', choices=['shared', 'bidirectional'], help='text tower pass of '
                   'MLM: the CLIP pass itself (causal) reading the masked caption, the bidirectional decoder supplying '
                   'the right context, or a second, bidirectional pass over the masked caption (costlier)')
    args = p.parse_args(argv)
    if args.lambda_img < 0 or args.lambda_txt < 0:
        raise ValueError('--lambda-img and --lambda-txt must be >= 0')
    if not 0 < args.mask_ratio < 1 or not 0 < args.text_mask_ratio <= 1:
        raise ValueError('--mask-ratio must be in (0, 1) and --text-mask-ratio in (0, 1]')
    if args.decoder_depth < 1 or (args.prototypes is not None and args.prototypes < 1):
        raise ValueError('--decoder-depth and --prototypes must be at least 1')
    if min(args.teacher_temp, args.warmup_teacher_temp, args.student_temp) <= 0:
        raise ValueError('--teacher-temp, --warmup-teacher-temp and --student-temp must be positive')
    if (args.warmup_teacher_temp_steps or 0) < 0 or args.time_steps < 0:
        raise ValueError('--warmup-teacher-temp-steps and --time-steps must be >= 0')
    if args.ema_momentum is not None and not 0 <= args.ema_momentum <= 1:
        raise ValueError('--ema-momentum must be in [0, 1]')
    if args.clip_view == 'masked' and args.lambda_img == 0:
        raise ValueError('--clip-view masked takes the CLIP embedding from the masked pass, which --lambda-img 0 '
                         'does not make: use --clip-view full')
    if args.prototypes is None:
        args.prototypes = 256 if args.model == 'tiny' else 8192
    if args.ema_momentum is None:
        args.ema_momentum = 0.95 if args.model == 'tiny' else 0.996
    return common.check_args(args, 'maskclip')


def default_lr(args, global_batch):
    """5e-4 x global batch / 4096 [recon]; 1e-3 for the tiny model on the synthetic data (as flip.py)."""
    return 1e-3 if args.model == 'tiny' else 5e-4 * global_batch / 4096

# ----------------------------------------------------------------------------- method: masking


def patch_masking(batch, grid, mask_ratio, generator, block=False, blocks=4):
    """Returns ids_keep (B, K) and ids_mask (B, M): per sample a partition of the L = H * W patch indices, with
    K = int(L * (1 - r)) kept (what the student encodes), at least 1 (OpenCLIP's PatchDropout) and at most L - 1, and
    M = L - K masked (what the decoder predicts).
    random: MAE's uniform masking, keep the K smallest of uniform noise (flip.random_masking's ids_keep).
    block: BEiT-style, vectorised: `blocks` random rectangles per sample (area M / blocks x U(0.5, 1.5), aspect ratio
    log-uniform in [0.3, 1/0.3]); covered patches are masked first and the noise makes the count exactly M."""
    H, W = grid
    L, dev = H * W, generator.device
    K = min(max(1, int(L * (1 - mask_ratio))), L - 1)
    score = torch.rand(batch, L, device=dev, generator=generator)  # (B, L), in [0, 1)
    if block:
        u = torch.rand(4, batch, blocks, 1, 1, device=dev, generator=generator)
        area = (L - K) / blocks * (0.5 + u[0])  # (B, blocks, 1, 1)
        aspect = torch.exp(math.log(0.3) * (2 * u[1] - 1))
        h, w = (area * aspect).sqrt().round().clamp(1, H), (area / aspect).sqrt().round().clamp(1, W)
        top, left = (u[2] * (H - h + 1)).floor(), (u[3] * (W - w + 1)).floor()
        rows, cols = torch.arange(H, device=dev).view(H, 1), torch.arange(W, device=dev).view(1, W)
        inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)  # (B, blocks, H, W)
        score = score + inside.any(dim=1).flatten(1)  # (B, L): covered patches score in [1, 2), sort last
    ids = score.argsort(dim=1)  # (B, L), ascending: kept first
    return ids[:, :K], ids[:, K:]


def text_masking(texts, mask_ratio, noise):
    """BERT-style masking for MLM. texts (B, T) ids and noise (B, T) uniform in [0, 1) (the caller's draw: these rows
    of the global batch's) -> masked texts (B, T), ids_mask (B, N), valid (B, N) bool.
    A caption's word tokens are those after SOT and before its EOT (the largest id: argmax); padding follows EOT and
    is told by position, as its id 0 is also '!' (as in '!$'). Per caption, n = max(1, round(r * words)) of them, the
    lowest of the noise, become MASK_ID; ids_mask[b, :n] are their positions (valid) and the rest of the row other
    positions (not valid). N = max(1, round(r * (T - 2))) is the most any caption can have: the shapes are static."""
    B, T = texts.shape
    eot = texts.argmax(dim=1, keepdim=True)  # (B, 1)
    words = (texts != SOT) & (torch.arange(T, device=texts.device) < eot)  # (B, T)
    noise = noise.masked_fill(~words, 2.0)  # (B, T): the words sort first
    N = max(1, int((torch.tensor(T - 2) * mask_ratio).round()))  # the arithmetic of n below, at T - 2 words
    n = (words.sum(dim=1, keepdim=True) * mask_ratio).round().clamp(1, N)  # (B, 1)
    ids_mask = noise.argsort(dim=1)[:, :N]  # (B, N): the words first, in noise order
    valid = (torch.arange(N, device=texts.device) < n) & words.gather(1, ids_mask)  # (B, N)
    masked = texts.scatter(1, ids_mask, torch.where(valid, MASK_ID, texts.gather(1, ids_mask)))
    return masked, ids_mask, valid


def draw_masks(micro, global_batch, grid, args, generator):
    """One step's random choices, drawn for all `global_batch` rows from `generator` (common.batch_generator: a pure
    function of (seed, step)), each micro-batch taking its rows into m.cache['masks'] = (ids_keep, ids_mask,
    masked_texts, text_ids, valid), None where a branch is off: the patch masks, and caption noise (global_batch, T)
    applied to each micro-batch's own captions (text_masking needs their word counts). So a sample's masks do not
    depend on how the global batch is split into ranks x micro-batches. Returns MLM's normaliser, the mean count of
    masked caption tokens per sample of the global batch (every micro-batch's count, summed over ranks in one small
    all_reduce; no host sync), or None without MLM."""
    ids_keep = ids_mask = noise = None
    if args.lambda_img > 0:  # (global_batch, K), (global_batch, M)
        ids_keep, ids_mask = patch_masking(global_batch, grid, args.mask_ratio, generator, args.mask_type == 'block')
    if args.lambda_txt > 0:
        noise = torch.rand(global_batch, micro[0].texts.shape[1], device=generator.device, generator=generator)
    for m in micro:
        patches = (None, None) if ids_keep is None else (ids_keep[m.rows], ids_mask[m.rows])
        words = (None, None, None) if noise is None else text_masking(m.texts, args.text_mask_ratio, noise[m.rows])
        m.cache['masks'] = patches + words
    if noise is None:
        return None
    count = torch.stack([m.cache['masks'][4].sum() for m in micro]).sum().float()  # this rank's masked tokens
    if common.world_size() > 1:
        dist.all_reduce(count)  # the masked tokens of the global batch
    return count.clamp(min=1) / global_batch

# ----------------------------------------------------------------------------- method: model and heads


class ImageDecoder(nn.Module):
    """MAE's decoder, small: student tokens (B, 1 + K, width) -> predictions at the M masked positions (B, M, width)."""

    def __init__(self, visual, depth):
        super().__init__()
        width, heads = visual.transformer.width, visual.transformer.resblocks[0].attn.heads
        dim = width // 2
        self.embed = nn.Linear(width, dim)
        self.mask_token = nn.Parameter(0.02 * torch.randn(dim))
        self.positional_embedding = nn.Parameter(0.02 * torch.randn(visual.num_patches + 1, dim))
        self.transformer = common.Transformer(dim, depth, heads, 4.0, nn.GELU)
        self.transformer.init_weights()
        self.ln = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, width)

    def forward(self, tokens, ids_keep, ids_mask):
        x = self.embed(tokens)  # (B, 1 + K, dim)
        B, D, L = x.shape[0], x.shape[2], ids_keep.shape[1] + ids_mask.shape[1]
        patches = self.mask_token.to(x.dtype).expand(B, L, D)  # (B, L, dim): [MASK] everywhere ...
        patches = patches.scatter(1, ids_keep.unsqueeze(-1).expand(-1, -1, D), x[:, 1:])  # ... but the kept patches
        x = torch.cat([x[:, :1], patches], dim=1) + self.positional_embedding.to(x.dtype)  # (B, 1 + L, dim)
        x = self.ln(self.transformer(x))
        x = torch.gather(x[:, 1:], 1, ids_mask.unsqueeze(-1).expand(-1, -1, D))  # (B, M, dim)
        return self.pred(x)  # (B, M, width)


class PrototypeHead(nn.Module):
    """The online tokenizer (iBOT's head, smaller MLP): (..., width) -> cosine logits to K prototypes (..., K), fp32.
    The MLP runs under the caller's autocast; the cosines are made in fp32, as the teacher divides them by 0.04."""

    def __init__(self, width, prototypes, bottleneck=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, bottleneck))
        self.prototypes = nn.Parameter(torch.randn(prototypes, bottleneck))

    def forward(self, x):
        z = self.mlp(x)  # (..., bottleneck)
        with torch.autocast(z.device.type, enabled=False):
            return F.normalize(z.float(), dim=-1) @ F.normalize(self.prototypes.float(), dim=-1).T  # in [-1, 1]


class TextDecoder(nn.Module):
    """MLM's own decoder, attending both ways over the text tower's tokens of the masked caption; its output is scored
    against the token embeddings."""

    def __init__(self, width, heads, depth):
        super().__init__()
        self.transformer = common.Transformer(width, depth, heads, 4.0, nn.GELU)
        self.transformer.init_weights()
        self.ln = nn.LayerNorm(width)

    def forward(self, x):
        return self.ln(self.transformer(x))  # (B, T, width)


class MaskCLIP(nn.Module):
    """The student: `clip` (common.CLIP, exported) plus the two decoders and the tokenizer head (trained, not exported).
    With a weight at 0 its branch is not built, so lambda_img = lambda_txt = 0 is exactly CLIP."""

    def __init__(self, cfg, args):
        super().__init__()
        self.clip = common.CLIP(cfg)  # built first: the same initialisation as flip.py for the same seed
        v, t = self.clip.visual, self.clip.transformer
        self.img_decoder = ImageDecoder(v, args.decoder_depth) if args.lambda_img > 0 else None
        ce = args.lambda_img > 0 and args.target == 'ce'
        self.head = PrototypeHead(v.transformer.width, args.prototypes) if ce else nn.Identity()
        self.txt_decoder = None
        if args.lambda_txt > 0:
            self.txt_decoder = TextDecoder(t.width, t.resblocks[0].attn.heads, args.decoder_depth)
        self.clip_on_masked = args.clip_view == 'masked'
        self.mlm_shared = args.mlm_pass == 'shared'

    def distilled(self):
        """What the EMA teacher copies: the image tower and the tokenizer head (same structure, same order)."""
        return nn.ModuleDict({'visual': self.clip.visual, 'head': self.head})

    def forward(self, images, texts, ids_keep=None, ids_mask=None, masked_texts=None):
        pred = hidden = None
        if ids_keep is not None:
            tokens = self.clip.visual.forward_tokens(images, ids_keep)  # (B, 1 + K, width): the masked pass
            pred = self.head(self.img_decoder(tokens, ids_keep, ids_mask))  # (B, M, prototypes) or (B, M, width)
        if ids_keep is not None and self.clip_on_masked:  # --clip-view masked: one image pass, as FLIP
            image_features = F.normalize(self.clip.visual.pool(tokens) @ self.clip.visual.proj, dim=-1)
        else:
            image_features = self.clip.encode_image(images, normalize=True)  # the full image
        if masked_texts is not None and self.mlm_shared:  # --mlm-pass shared: one causal pass of the masked caption
            words = self.clip.text_tokens(masked_texts)  # (B, T, width)
            text_features = F.normalize(self.clip.pool_text(words, masked_texts), dim=-1)  # MASK_ID < EOT: same place
            hidden = self.txt_decoder(words)  # (B, T, width): the decoder attends both ways
        else:
            text_features = self.clip.encode_text(texts, normalize=True)
            if masked_texts is not None:
                hidden = self.txt_decoder(self.clip.text_tokens(masked_texts, causal=False))  # (B, T, width)
        return image_features, text_features, self.clip.logit_scale.exp(), pred, hidden


@torch.no_grad()
def teacher_targets(teacher, images, ids_mask):
    """The EMA teacher on the full image, at the masked positions: (B, M, prototypes) logits or (B, M, width)."""
    tokens = teacher['visual'].forward_tokens(images)[:, 1:]  # (B, L, width), patches in grid order
    tokens = torch.gather(tokens, 1, ids_mask.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))  # (B, M, width)
    return teacher['head'](tokens)


def ema_momentum(step, total, base):
    """BYOL/DINO's cosine schedule: `base` at step 0, rising to 1 at `total`."""
    return 1 - (1 - base) * (math.cos(math.pi * step / total) + 1) / 2


def teacher_temp(step, warmup, start, final):
    """iBOT's teacher temperature: linear from `start` at step 0 to `final` at step `warmup`, then `final`."""
    return final if step >= warmup else start + (final - start) * step / warmup


def teacher_temp_warmup(args):
    """--warmup-teacher-temp-steps, default 30% of --steps (iBOT: 30 warm-up epochs of its default 100)."""
    w = args.warmup_teacher_temp_steps
    return round(0.3 * args.steps) if w is None else w


@torch.no_grad()
def ema_update(teacher, student, momentum):
    """teacher <- m * teacher + (1 - m) * student, parameter by parameter (same structure, same order)."""
    torch._foreach_lerp_(list(teacher.parameters()), list(student.parameters()), 1 - momentum)

# ----------------------------------------------------------------------------- method: loss


def distill_loss(pred, target, center, tau_t, args):
    """Masked self-distillation, averaged over the B * M masked patches. ce: H(softmax((t - c) / tau_t),
    softmax(s / tau_s)) (iBOT's patch loss); mse: |s/|s| - t/|t||^2 = 2 - 2 cos."""
    pred, target = pred.float(), target.float()
    if args.target == 'mse':
        return (F.normalize(pred, dim=-1) - F.normalize(target, dim=-1)).pow(2).sum(-1).mean()
    p_teacher = F.softmax((target - center) / tau_t, dim=-1)  # (B, M, K)
    return -(p_teacher * F.log_softmax(pred / args.student_temp, dim=-1)).sum(-1).mean()


@torch.no_grad()
def update_center(center, target, momentum=0.9):
    """iBOT's centring: EMA of the teacher logits' mean, averaged over all ranks so every rank keeps the same centre."""
    batch_center = target.float().mean(dim=(0, 1))  # (K,)
    if common.world_size() > 1:
        dist.all_reduce(batch_center)
        batch_center /= common.world_size()
    center.mul_(momentum).add_(batch_center, alpha=1 - momentum)


def mlm_loss(hidden, texts, ids_mask, valid, token_embedding, tokens_per_sample):
    """Cross-entropy over the vocabulary at the masked caption tokens, logits = hidden @ token_embedding.T (tied),
    summed over the valid (b, N) positions and divided by b x tokens_per_sample (draw_masks': the global batch's masked
    tokens per sample). That is the micro-batch mean of a per-caption term, so the size-weighted mean over micro-batches
    and ranks (common.accumulate, DDP) is the mean over every masked token of the global batch, as one big batch's."""
    h = torch.gather(hidden, 1, ids_mask.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])).float()  # (b, N, width)
    logits = h @ token_embedding.float().T  # (b, N, vocab)
    ce = F.cross_entropy(logits.flatten(0, 1), texts.gather(1, ids_mask).flatten(), reduction='none')  # (b * N,)
    return (ce * valid.flatten().float()).sum() / (len(texts) * tokens_per_sample)


def micro_forward(model, train_model, teacher, center, m, args, tau_t, tokens_per_sample):
    """MaskCLIP on one micro-batch `m` (common.Micro, its masks in m.cache from draw_masks), under the caller's
    autocast, the per-sample losses in fp32 outside it. Returns common.Forward: coupled = the CLIP embeddings, shared =
    the logit scale (the inputs of L_clip, batch-coupled), local = lambda_img L_distill + lambda_txt L_mlm (micro-batch
    means), terms = the two unweighted. The EMA teacher's targets are computed on the first call and kept in m.cache."""
    ids_keep, ids_mask, masked_texts, text_ids, valid = m.cache['masks']
    if ids_mask is not None and 'target' not in m.cache:  # the EMA teacher: once per micro-batch
        m.cache['target'] = teacher_targets(teacher, m.images, ids_mask)
    image_features, text_features, logit_scale, pred, hidden = train_model(m.images, m.texts, ids_keep, ids_mask,
                                                                           masked_texts)
    terms = {}
    with torch.autocast(m.texts.device.type, enabled=False):
        if pred is not None:
            terms['distill_loss'] = distill_loss(pred, m.cache['target'], center, tau_t, args)
        if hidden is not None:
            terms['mlm_loss'] = mlm_loss(hidden, m.texts, text_ids, valid, model.clip.token_embedding.weight,
                                         tokens_per_sample)
    local = args.lambda_img * terms.get('distill_loss', 0.0) + args.lambda_txt * terms.get('mlm_loss', 0.0)
    return common.Forward(coupled=(image_features, text_features), shared=(logit_scale,), local=local, terms=terms)


def clip_term(image_features, text_features, logit_scale):
    """The batch-coupled term, L_clip over the whole step's batch (common.clip_loss), and its value for the log."""
    loss = common.clip_loss(image_features, text_features, logit_scale)
    return loss, {'clip_loss': loss}


def losses(model, train_model, teacher, center, images, texts, args, generator, tau_t=None):
    """One batch as one micro-batch, without accumulation (what step_seconds and bench.py time): masks from `generator`
    for this rank's rows of a global batch of world x B, the forward (under the caller's autocast) and the loss at
    teacher temperature tau_t (default: --teacher-temp). Returns the loss L_clip + lambda_img L_distill + lambda_txt
    L_mlm, the terms by name, the logit scale and the teacher's targets. main's loop runs the same pieces through
    common.accumulate."""
    B, rank = len(texts), common.rank()
    m = common.Micro(images, texts, slice(rank * B, rank * B + B))
    tokens_per_sample = draw_masks([m], B * common.world_size(), model.clip.visual.grid_size, args, generator)
    out = micro_forward(model, train_model, teacher, center, m, args, tau_t or args.teacher_temp, tokens_per_sample)
    with torch.autocast(images.device.type, enabled=False):
        clip, _ = clip_term(*out.coupled, *out.shared)
    return clip + out.local, {'clip_loss': clip, **out.terms}, out.shared[0], m.cache.get('target')

# ----------------------------------------------------------------------------- cost: a step against a CLIP step


def step_seconds(model, teacher, center, images, texts, args, device, amp, n):
    """Median seconds of a training step (forward, backward, AdamW, EMA and centre update) of MaskCLIP and of CLIP
    (both lambdas 0) on the same batch, on copies of the models; interleaved, so other load hits both alike."""
    model, teacher, center = copy.deepcopy(model), copy.deepcopy(teacher), center.clone()
    opt = torch.optim.AdamW(common.param_groups(model, args.wd), lr=1e-9, betas=(0.9, 0.95))
    generator = common.batch_generator(device, args.seed, 0)
    sync = torch.cuda.synchronize if device.type == 'cuda' else lambda: None
    clip_args = argparse.Namespace(**{**vars(args), 'lambda_img': 0.0, 'lambda_txt': 0.0})
    runs = {'maskclip': (teacher, args), 'clip': (None, clip_args)}
    times = {name: [] for name in runs}
    for _ in range(n + 1):  # the first round warms up
        for name, (ema, run_args) in runs.items():
            opt.zero_grad(set_to_none=True)
            sync()
            t = time.perf_counter()
            with amp:
                loss, _, _, target = losses(model, model, ema, center, images, texts, run_args, generator)
            loss.backward()
            opt.step()
            if ema is not None:
                ema_update(ema, model.distilled(), 0.999)
                if args.target == 'ce':
                    update_center(center, target)
            sync()
            times[name].append(time.perf_counter() - t)
    return {name: sorted(ts[1:])[n // 2] for name, ts in times.items()}

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

    # model: `model` (student + decoders) is saved and trained, `model.clip` evaluated and exported; `train_model`
    # (compiled, DDP) runs the training forward; `teacher` (EMA of the image tower and tokenizer head) makes targets
    model = MaskCLIP(cfg, args).to(device)
    common.set_grad_checkpointing(model, args.grad_checkpointing)
    train_model = common.maybe_compile(model, args.compile, device)
    if world > 1:
        train_model = DDP(train_model, device_ids=[device.index] if device.type == 'cuda' else None)
    tokenizer = common.tokenizer_for(cfg)
    grid = model.clip.visual.grid_size

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
    # the teacher starts as the student (after --pretrained), or as it was saved
    teacher = copy.deepcopy(model.distilled()).requires_grad_(False) if args.lambda_img > 0 else None
    center = torch.zeros(args.prototypes, device=device)  # the online tokenizer's centre (--target ce)
    if state and teacher is not None:
        try:
            teacher.load_state_dict(state['teacher'], strict=True)
            center.copy_(state['center'])
        except (RuntimeError, KeyError, TypeError, AttributeError) as err:
            common.fail(f'cannot resume from {resume}: {str(err).splitlines()[0]}')

    # data
    train_tf, eval_tf = transforms(args, cfg)
    try:
        loader, num_samples = data.train_loader(args, train_tf, tokenizer, cfg['vision_cfg']['image_size'], rank, world, start)
        tasks, retrieval = data.eval_sets(args, eval_tf, cfg['vision_cfg']['image_size'])
    except data.DataError as err:
        common.fail(err)
    global_batch = common.finish_run_args(args, num_samples, world, 200, default_lr)
    tau_warmup = teacher_temp_warmup(args)

    # optimizer (flip.py's, so that lambda = 0 is its CLIP step exactly)
    optimizer = torch.optim.AdamW(common.param_groups(model, args.wd), lr=args.lr, betas=(0.9, 0.95))
    common.resume_optimizer(optimizer, state, resume, args.steps, args)

    def checkpoint(step):
        if rank == 0:
            common.save_checkpoint(ckpt_path, {'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                                               'teacher': teacher.state_dict() if teacher is not None else None,
                                               'center': center, 'step': step, 'rng': torch.get_rng_state(),
                                               'cfg': cfg, 'args': vars(args)})

    # loop
    logger = common.Logger(os.path.join(args.out, 'log.jsonl'), resume_step=start)
    stop = common.StopSignal()
    common.print0(f'MaskCLIP: {args.model}, lambda_img {args.lambda_img} ({args.target}, {args.mask_type} mask '
                  f'{args.mask_ratio}), lambda_txt {args.lambda_txt}, {args.steps} steps of {global_batch} '
                  f'({world} process{"es" if world > 1 else ""}, {device.type}), out {args.out}')
    meter, skipped, step = common.Throughput(), 0, start
    bar = tqdm(total=args.steps, initial=start, disable=rank != 0, dynamic_ncols=True)
    batches = common.Batches(loader, args, device)
    while step < args.steps:
        micro, n_skipped = next(batches)  # --accum-freq micro-batches of --batch-size
        lr = common.lr_at(step, args.steps, args.warmup, args.lr)
        for group in optimizer.param_groups:
            group['lr'] = lr
        tau_t = teacher_temp(step, tau_warmup, args.warmup_teacher_temp, args.teacher_temp)
        # patch masks and MLM positions for every row of the global batch; each micro-batch keeps its rows in m.cache
        tokens_per_sample = draw_masks(micro, global_batch, grid, args, common.batch_generator(device, args.seed, step))

        def forward(m):
            with amp:
                return micro_forward(model, train_model, teacher, center, m, args, tau_t, tokens_per_sample)
        optimizer.zero_grad(set_to_none=True)
        loss, terms = common.accumulate(train_model, micro, forward, clip_term)
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
        if teacher is not None:  # once per optimizer step; the centre from the targets of every micro-batch
            momentum = ema_momentum(step, args.steps, args.ema_momentum)
            ema_update(teacher, model.distilled(), momentum)
            if args.target == 'ce':
                update_center(center, torch.cat([m.cache['target'] for m in micro]))
        step += 1
        skipped += n_skipped
        meter.add(global_batch)
        bar.update(1)
        if step % args.log_every == 0 or step == args.steps:
            record = {'step': step, 'loss': common.mean_over_ranks(loss),
                      **{k: common.mean_over_ranks(v) for k, v in terms.items()}, 'lr': lr,
                      'logit_scale': model.clip.logit_scale.exp().item(), **meter.rates(batches), 'skipped': skipped}
            if teacher is not None:
                record['momentum'] = momentum
                record['teacher_temp'] = tau_t
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

    # cleanup: step time against CLIP on the last micro-batch (every rank: the losses hold collectives), final
    # evaluation (every rank its share; rank 0 logs and prints) and export (rank 0)
    if step == args.steps and args.time_steps and start < step:
        t = step_seconds(model, teacher, center, micro[-1].images, micro[-1].texts, args, device, amp, args.time_steps)
        logger.log({'step': step, 'step_seconds/maskclip': t['maskclip'], 'step_seconds/clip': t['clip']})
        common.print0(f"step time on the same batch: MaskCLIP {t['maskclip']:.3f} s, CLIP {t['clip']:.3f} s, "
                      f"{t['maskclip'] / t['clip']:.2f}x (paper, ViT-B/16: 1.56x)")
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
