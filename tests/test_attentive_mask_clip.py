"""attentive_mask_clip.py: block and per-token random masks, the box mapping, the attention scores, the SimCLR pairing,
the EMA, fp32 losses under bf16, 2 processes x 2 micro-batches against 1 process, the lr rule, and the script end to end
through main(argv): smoke run, exact resume including the EMA (also with --accum-freq 2), random masks drawn for the
global batch, --pretrained before the EMA copy, export round trip, bad input. Accumulated = one big batch and
--grad-checkpointing: tests/test_accumulation.py."""
import copy
import json
import os
import signal
import subprocess
import sys

import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import aclip_dist_helper as dist_helper  # tests/ is on sys.path under pytest
from accum_worker import first_step_grads
import attentive_mask_clip as aclip
import common
import data
import flip

BASE = ['--batch-size', '8', '--workers', '0', '--log-every', '1', '--time-steps', '0']
TINY = aclip.model_config('tiny')  # CLS-pooled


def run(out, *extra):
    return aclip.main(BASE + ['--out', str(out)] + list(extra))


def records(out):
    with open(os.path.join(out, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


def batch(B, generator):
    views = torch.randn(B, 3, 3, 64, 64, generator=generator)
    boxes = torch.tensor([[0.1, 0.0, 0.8, 0.9], [0.0, 0.2, 0.9, 0.8], [0.0, 0.0, 1.0, 1.0]]).expand(B, 3, 4)
    return views, boxes, torch.randint(1, 49000, (B, 32), generator=generator)


# ----------------------------------------------------------------------------- masking


@pytest.mark.parametrize('grid', [(4, 4), (8, 8), (14, 14), (16, 16), (6, 10)])
@pytest.mark.parametrize('ratio', [0.5, 0.75])
def test_block_mask_keeps_exactly_the_top_whole_blocks(grid, ratio):
    (gh, gw), B = grid, 5
    L = gh * gw
    score = torch.rand(B, L, generator=torch.Generator().manual_seed(0))
    ids_keep = aclip.block_mask(score, grid, ratio)
    K = ids_keep.shape[1]
    assert K == aclip.keep_count(L, ratio) and K % 4 == 0 and K - 4 < L * (1 - ratio) <= K
    block_score = score.view(B, gh // 2, 2, gw // 2, 2).mean(dim=(2, 4)).flatten(1)  # (B, blocks)
    for b in range(B):
        kept = torch.zeros(L, dtype=torch.bool)
        kept[ids_keep[b]] = True
        assert kept.sum() == K  # no index twice
        per_block = kept.view(gh // 2, 2, gw // 2, 2).transpose(1, 2).reshape(-1, 4)  # (blocks, 4 patches)
        assert (per_block.all(dim=1) | ~per_block.any(dim=1)).all()  # whole 2x2 blocks only
        assert set(per_block.all(dim=1).nonzero().flatten().tolist()) == set(block_score[b].topk(K // 4).indices.tolist())


def test_block_mask_matches_the_official_selection_at_vit_b16():
    """The official get_att_mask: 14x14 -> 7x7 bilinear (= 2x2 mean), keep int(49 * 0.5) + 1 = 25 blocks = 100 tokens."""
    score = torch.rand(4, 196, generator=torch.Generator().manual_seed(1))
    blocks = F.interpolate(score.view(4, 1, 14, 14), (7, 7), mode='bilinear').flatten(1)  # (4, 49)
    official = blocks.argsort(dim=1, descending=True)[:, :25]
    ids_keep = aclip.block_mask(score, (14, 14), 0.5)
    assert ids_keep.shape == (4, 100) and aclip.keep_count(64, 0.5) == 32
    for b in range(4):
        rows, cols = ids_keep[b] // 14, ids_keep[b] % 14
        assert set((rows // 2 * 7 + cols // 2).tolist()) == set(official[b].tolist())


@pytest.mark.parametrize('grid', [(7, 7), (15, 15)])
def test_block_mask_on_odd_grids_keeps_exactly_k(grid):
    (gh, gw), L = grid, grid[0] * grid[1]
    ids_keep = aclip.block_mask(torch.rand(6, L, generator=torch.Generator().manual_seed(2)), grid, 0.5)
    assert ids_keep.shape == (6, aclip.keep_count(L, 0.5))
    for row in ids_keep:
        assert len(set(row.tolist())) == len(row) and row.min() >= 0 and row.max() < L
        rows, cols = row // gw, row % gw
        block = rows // 2 * (gw // 2 + 1) + cols // 2
        size = lambda blk: min(2, gh - blk // (gw // 2 + 1) * 2) * min(2, gw - blk % (gw // 2 + 1) * 2)
        partial = [blk for blk in set(block.tolist()) if (block == blk).sum() < size(blk)]
        assert len(partial) <= 1  # at most the last block taken is cut


def kept_masks(ids_keep, L):
    """ids_keep (B, K) -> (B, L) bool, True where kept."""
    return torch.zeros(ids_keep.shape[0], L, dtype=torch.bool).scatter_(1, ids_keep, True)


def whole_blocks(kept, grid):
    """(B, L) kept masks on an even grid -> (B,) True where every 2x2 block is kept whole or not at all."""
    (gh, gw), B = grid, kept.shape[0]
    per_block = kept.view(B, gh // 2, 2, gw // 2, 2).transpose(2, 3).reshape(B, -1, 4)  # (B, blocks, 4 patches)
    return (per_block.all(dim=2) | ~per_block.any(dim=2)).all(dim=1)


def test_random_masking_is_per_token_uniform_and_random_block_keeps_blocks():
    """--mask random is MAE's per-token masking: int(L * (1 - r)) distinct patches, every patch kept with probability
    K / L, two patches of one 2x2 block together with K (K - 1) / (L (L - 1)); --mask random-block keeps whole blocks
    (the same marginal, but a block's patches always together)."""
    (gh, gw), L, n = (8, 8), 64, 4000
    ids = aclip.random_masking(n, L, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(ids, flip.random_masking(n, L, 0.5, torch.Generator().manual_seed(0)))  # one masking, two files
    assert ids.shape == (n, 32) == (n, aclip.keep_count(L, 0.5, blocks=False)) and ids.min() >= 0 and ids.max() < L
    kept = kept_masks(ids, L)
    assert (kept.sum(dim=1) == 32).all()  # no index twice
    assert (kept.float().mean(dim=0) - 0.5).abs().max() < 0.04  # uniform: each patch kept 50% of the time
    assert abs((kept[:, 0] & kept[:, 1]).float().mean() - 32 * 31 / (64 * 63)) < 0.03  # patches 0, 1: one block
    assert whole_blocks(kept, (gh, gw)).float().mean() < 0.01
    assert aclip.random_masking(3, 196, 0.5, torch.Generator()).shape == (3, 98)  # official: int(196 * 0.5)

    blocks = kept_masks(aclip.block_mask(torch.rand(n, L, generator=torch.Generator().manual_seed(1)), (gh, gw), 0.5), L)
    assert whole_blocks(blocks, (gh, gw)).all() and (blocks.sum(dim=1) == 32).all()
    assert (blocks.float().mean(dim=0) - 0.5).abs().max() < 0.04
    assert abs((blocks[:, 0] & blocks[:, 1]).float().mean() - 0.5) < 0.04


@pytest.mark.parametrize('mask, K, blocks', [('random', 32, False), ('random-block', 32, True), ('none', None, None)])
def test_losses_pass_each_mask_to_the_online_pass(tmp_path, mask, K, blocks):
    args = aclip.get_args(['--mask', mask, '--out', str(tmp_path)])
    torch.manual_seed(0)
    model = aclip.ACLIP(TINY, 32, 16, simclr=True, byol=True)
    ema = copy.deepcopy(aclip.tracked(model)).requires_grad_(False)
    seen = []

    def online(images, texts, ids_keep):
        seen.append(ids_keep)
        return model(images, texts, ids_keep)
    g = torch.Generator().manual_seed(1)
    aclip.losses(online, ema, *batch(8, g), args, g)
    if K is None:
        assert seen == [None]
        return
    assert seen[0].shape == (16, K)  # V * B rows
    assert whole_blocks(kept_masks(seen[0], 64), (8, 8)).all() == blocks


@pytest.mark.parametrize('ratio', [0.99, 1 - 1e-11])
def test_masks_keep_at_least_one_patch(tmp_path, ratio):
    """int(L * (1 - r)) is 0 at r = 0.99 on tiny's 64 patches, and the block count rounded to 0 near r = 1."""
    assert aclip.random_masking(5, 64, ratio, torch.Generator()).shape == (5, 1)
    assert aclip.keep_count(64, ratio) == 4 and aclip.block_mask(torch.rand(5, 64), (8, 8), ratio).shape == (5, 4)
    torch.manual_seed(0)
    model = aclip.ACLIP(TINY, 32, 16, simclr=True, byol=True)
    ema = copy.deepcopy(aclip.tracked(model)).requires_grad_(False)
    for mask in ('attentive', 'random', 'random-block'):
        g = torch.Generator().manual_seed(1)
        args = aclip.get_args(['--mask', mask, '--mask-ratio', str(ratio), '--out', str(tmp_path)])
        loss, _, _ = aclip.losses(model, ema, *batch(4, g), args, g)
        assert torch.isfinite(loss), mask


def test_box_mapping_is_identity_for_equal_boxes_and_follows_the_boxes():
    g = torch.Generator().manual_seed(0)
    score = torch.rand(3, 8, 8, generator=g)
    boxes = torch.tensor([[0.1, 0.2, 0.7, 0.5], [0.0, 0.0, 1.0, 1.0], [0.3, 0.05, 0.6, 0.9]])
    assert torch.allclose(aclip.map_scores(score, boxes, boxes), score, atol=1e-6)
    # an online crop of the EMA view's top-left quadrant sees that quadrant, upsampled 2x
    full, quadrant = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 3), torch.tensor([[0.0, 0.0, 0.5, 0.5]] * 3)
    upsampled = F.interpolate(score[:, None], scale_factor=2, mode='bilinear', align_corners=False)[:, 0, :8, :8]
    assert torch.allclose(aclip.map_scores(score, quadrant, full), upsampled, atol=1e-6)
    # only the online box relative to the EMA box matters
    ema_box, online = torch.tensor([[0.2, 0.1, 0.5, 0.8]] * 3), torch.tensor([[0.3, 0.3, 0.3, 0.4]] * 3)
    relative = torch.cat([(online[:, :2] - ema_box[:, :2]) / ema_box[:, 2:], online[:, 2:] / ema_box[:, 2:]], dim=1)
    assert torch.allclose(aclip.map_scores(score, online, ema_box), aclip.map_scores(score, relative, full), atol=1e-6)


def test_box_mapping_reads_top_left_height_width_in_that_order():
    """A score that is a linear function of the source-image position, a*y + b*x with a != b, on a non-square grid,
    boxes with top != left and h != w: bilinear sampling is exact on it, so the mapped map must equal the function at
    the online view's patch centres. Swapping top/left, h/w or the grid axes in map_scores breaks it."""
    (gh, gw), f = (6, 10), lambda y, x: 3.0 * y - 5.0 * x
    centres = lambda box, n, axis: box[axis] + (torch.arange(n) + 0.5) / n * box[axis + 2]  # (n,) source fractions
    ema_box, box = torch.tensor([0.1, 0.2, 0.8, 0.7]), torch.tensor([0.3, 0.35, 0.4, 0.25])  # (top, left, h, w)
    score = f(centres(ema_box, gh, 0)[:, None], centres(ema_box, gw, 1)[None, :])  # (gh, gw) on the EMA view
    expected = f(centres(box, gh, 0)[:, None], centres(box, gw, 1)[None, :])  # inside the EMA centres: no clamping
    mapped = aclip.map_scores(score[None], box[None], ema_box[None])[0]
    assert (mapped - expected).abs().max() < 1e-5, (mapped - expected).abs().max()
    assert (expected - score).abs().mean() > 0.1  # not the identity


def test_three_views_boxes_locate_each_crop_in_the_ema_view():
    """End to end with ThreeViews on a non-square image whose red channel is its x coordinate and green its y: the EMA
    view's patch means, carried to online view 1 by the boxes, are view 1's own patch means."""
    height, width, size, patch = 60, 90, 32, 4
    ys, xs = torch.meshgrid(torch.arange(height) / (height - 1), torch.arange(width) / (width - 1), indexing='ij')
    ramp = torch.stack([xs, ys, torch.zeros_like(xs)], dim=-1)  # (H, W, 3) in [0, 1]
    image = Image.fromarray((ramp * 255).round().byte().numpy())
    tf = aclip.ThreeViews(size, (0.2, 0.5), (3 / 4, 4 / 3), lambda im: im)
    mean, std = torch.tensor(aclip.OPENAI_DATASET_MEAN)[:, None, None], torch.tensor(aclip.OPENAI_DATASET_STD)[:, None, None]
    errors = []
    for seed in range(10):
        torch.manual_seed(seed)
        views, boxes = tf(image)  # (3, 3, S, S), (3, 4)
        patches = F.avg_pool2d(views * std + mean, patch)  # (3 views, 3 channels, S / patch, S / patch)
        for channel in (0, 1):  # x, then y
            mapped = aclip.map_scores(patches[2:, channel], boxes[None, 0], boxes[None, 2])[0]
            errors.append((mapped - patches[0, channel]).abs().mean())
    assert max(errors) < 0.01, errors  # measured 0.002; with top/left and h/w both swapped in map_scores, 0.2
def test_three_views_zoom_out_covers_both_crops():
    tf = aclip.ThreeViews(32, (0.3, 1.0), (3 / 4, 4 / 3), lambda im: im)
    image = Image.new('RGB', (90, 60), (100, 120, 140))  # not square: height and width must not be mixed up
    for seed in range(50):
        torch.manual_seed(seed)
        views, boxes = tf(image)
        assert views.shape == (3, 3, 32, 32)
        top, left, h, w = (boxes * torch.tensor([60, 90, 60, 90])).round().long().unbind(1)  # back to pixels
        assert top[2] <= top[:2].min() and left[2] <= left[:2].min(), boxes
        assert (top + h)[2] >= (top + h)[:2].max() and (left + w)[2] >= (left + w)[:2].max(), boxes
        assert top.min() >= 0 and left.min() >= 0 and (top + h).max() <= 60 and (left + w).max() <= 90
    torch.manual_seed(7)
    a = tf(image)
    torch.manual_seed(7)
    assert torch.equal(a[1], tf(image)[1])  # torch's RNG only: data.py's per-sample seed makes views reproducible


def test_attention_scores_agree_with_sdpa_and_common():
    torch.manual_seed(0)
    visual = common.CLIP(TINY).visual.eval()
    with torch.no_grad():
        for block in visual.transformer.resblocks:
            block.attn.in_proj_weight.mul_(4)  # peaked attention, so agreement is not a uniform-vs-uniform accident
    x = torch.randn(2, 3, 64, 64)
    tokens, rows = aclip.cls_attention(visual, x)  # (B, 1 + L, width), (B, layers, heads, 1 + L)
    with torch.no_grad():
        assert torch.allclose(tokens, visual.forward_tokens(x), atol=1e-5)
        assert torch.allclose(rows, common.attention_maps(visual, x)[:, :, :, 0], atol=1e-6)
        h = visual.embed(x)
        for i, block in enumerate(visual.transformer.resblocks):
            q, k, v = block.attn.qkv(block.ln_1(h))
            sdpa = F.scaled_dot_product_attention(q, k, v)[:, :, 0]  # (B, heads, head_dim): the CLS query's output
            assert torch.allclose((rows[:, i].unsqueeze(2) @ v)[:, :, 0], sdpa, atol=1e-5)
            h = block(h)
    assert torch.allclose(rows.sum(dim=-1), torch.ones(())) and rows.max() > 5 / rows.shape[-1]


# ----------------------------------------------------------------------------- losses and EMA


def nt_xent_reference(a, b, tau):
    """SimCLR's loss written out: 2N embeddings, positive pairs (a_i, b_i), every other embedding a negative."""
    z = F.normalize(torch.cat([a, b]), dim=-1)
    n = len(a)
    sim = z @ z.T / tau
    terms = [torch.logsumexp(sim[i, [k for k in range(2 * n) if k != i]], 0) - sim[i, (i + n) % (2 * n)]
             for i in range(2 * n)]
    return torch.stack(terms).mean()


def test_simclr_pairs_view_1_with_view_2():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    assert torch.allclose(aclip.simclr_loss(a, b, 0.1), nt_xent_reference(a, b, 0.1), atol=1e-5)
    assert not torch.allclose(aclip.simclr_loss(a, b, 0.1), nt_xent_reference(a, a, 0.1), atol=1e-2)  # the official bug
    near = a + 0.05 * torch.randn(6, 16, generator=g)
    assert aclip.simclr_loss(a, near, 0.1) < 0.1 < aclip.simclr_loss(a, near[torch.randperm(6, generator=g)], 0.1)


@pytest.mark.parametrize('flags, heads', [([], {'clip_1', 'clip_2', 'simclr', 'byol'}),
                                          (['--views', '1', '--mask', 'random'], {'clip_1', 'byol'}),
                                          (['--mask', 'none', '--byol-weight', '0'], {'clip_1', 'clip_2', 'simclr'})])
def test_ema_moves_by_the_schedule_and_gets_no_gradients(tmp_path, flags, heads):
    assert aclip.ema_momentum(0, 100, 0.996) == pytest.approx(0.996)
    assert aclip.ema_momentum(50, 100, 0.996) == pytest.approx(0.998)
    assert aclip.ema_momentum(100, 100, 0.996) == pytest.approx(1.0)
    args = aclip.get_args(flags + ['--out', str(tmp_path)])
    torch.manual_seed(0)
    model = aclip.ACLIP(TINY, 32, 16, simclr=args.views == 2 and args.simclr_weight > 0, byol=args.byol_weight > 0)
    ema = copy.deepcopy(aclip.tracked(model)).requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # the online weights have moved away from the EMA
    before = [p.clone() for p in ema.parameters()]
    g = torch.Generator().manual_seed(1)
    loss, terms, _ = aclip.losses(model, ema, *batch(4, g), args, g)
    loss.backward()
    assert set(terms) == heads
    assert all(p.grad is None and not p.requires_grad for p in ema.parameters())
    assert all(p.grad is not None for p in model.parameters())  # no unused parameter (DDP would stall)
    aclip.update_ema(ema, model, 0.99)
    for new, old, online in zip(ema.parameters(), before, aclip.tracked(model).parameters()):
        assert torch.allclose(new, 0.99 * old + 0.01 * online, atol=1e-7)
        assert not torch.equal(new, old)


def test_losses_are_fp32_outside_autocast_under_bf16(tmp_path, monkeypatch):
    """--precision bf16 on CPU: the forward runs in bf16 (the heads' outputs are bf16), and every loss function is
    called outside autocast with fp32 inputs."""
    monkeypatch.setattr(data, 'eval_sets', lambda *args: ({}, None))
    monkeypatch.setattr(common, 'evaluate', lambda *args: {})
    calls, forward_dtypes = [], []

    def recorded(name, fn):
        def wrapper(*args, **kwargs):
            calls.append((name, torch.is_autocast_enabled('cpu'),
                          {a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()}))
            return fn(*args, **kwargs)
        return wrapper
    for module, name in ((common, 'clip_loss'), (aclip, 'simclr_loss'), (aclip, 'byol_loss')):
        monkeypatch.setattr(module, name, recorded(name, getattr(module, name)))
    forward = aclip.ACLIP.forward

    def recorded_forward(self, *args):
        out = forward(self, *args)
        forward_dtypes.append((out[3].dtype, out[4].dtype))  # the SimCLR and BYOL head outputs
        return out
    monkeypatch.setattr(aclip.ACLIP, 'forward', recorded_forward)
    assert run(tmp_path, '--steps', '1', '--precision', 'bf16') == 1
    assert forward_dtypes == [(torch.bfloat16, torch.bfloat16)]
    assert sorted(name for name, _, _ in calls) == ['byol_loss', 'clip_loss', 'clip_loss', 'simclr_loss']
    for name, autocast_on, dtypes in calls:
        assert not autocast_on and dtypes == {torch.float32}, (name, autocast_on, dtypes)


# ----------------------------------------------------------------------------- distributed


def test_two_processes_equal_one_process_on_the_global_batch(tmp_path):
    """2 gloo ranks x 2 micro-batches x 2 samples == 1 process x 8 in one piece, attentive and random masks: loss, each
    term and every gradient (SimCLR's rank offsets and its itself-mask, the gathers with gradient, GradCache, BYOL, the
    EMA scores and masks, the random masks' rows). BatchNorm in eval mode: see the helper."""
    helper = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'aclip_dist_helper.py')
    proc = subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                             helper, str(tmp_path)], env=dict(os.environ, OMP_NUM_THREADS='1'), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:  # a rank stuck in a collective: end the whole group, not just torchrun
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f'2-process run timed out: {err[-3000:]}')
    assert proc.returncode == 0, err[-3000:]
    results = torch.load(tmp_path / 'dist.pt')
    for mask in ('attentive', 'random'):
        two = results[mask]
        model, ema, args = dist_helper.models(str(tmp_path / 'unused'), mask)
        values, names, grads = dist_helper.loss_and_grads(model, model, ema, args, *dist_helper.global_batch(), 1, 8)
        assert two['names'] == names == ['byol', 'clip_1', 'clip_2', 'simclr']
        torch.testing.assert_close(two['values'], values, atol=1e-6, rtol=1e-5)
        assert two['grads'].keys() == grads.keys() and any(k.startswith('simclr_head') for k in grads)
        for k in grads:  # fp32 summation order: relative to each tensor's largest entry (the text embeddings' reach 19)
            assert (two['grads'][k] - grads[k]).abs().max() <= 1e-5 * grads[k].abs().max() + 1e-8, (mask, k)
    assert [r['step'] for r in records(tmp_path / 'run') if 'loss' in r] == [1, 2]
    assert os.path.isdir(tmp_path / 'run' / 'open_clip')


# ----------------------------------------------------------------------------- the script


def test_smoke_learns_reports_cost_and_exports(tmp_path):
    out = tmp_path / 'run'
    assert run(out, '--steps', '50', '--batch-size', '16', '--log-every', '5', '--time-steps', '1') == 50
    logged = [r for r in records(out) if 'loss' in r]
    assert {'loss', 'clip_1', 'clip_2', 'simclr', 'byol', 'lr', 'ema_momentum', 'samples_per_sec'} <= set(logged[0])
    assert logged[-1]['loss'] < logged[0]['loss'] - 1.0, logged
    assert logged[0]['ema_momentum'] < logged[-1]['ema_momentum'] <= 1
    final = {k: v for r in records(out) for k, v in r.items()}
    assert final['step_seconds/aclip'] > 0 and final['step_seconds/clip'] > 0
    # it learned: measured colour 0.41 (chance 1/8), object 0.058 (chance 1/64) after these 50 steps
    assert final['zeroshot/colour'] > 2 / 8 and final['zeroshot/object'] > 2 / 64, final
    assert json.load(open(out / 'args.json'))['mask'] == 'attentive'
    state = common.load_checkpoint(out / 'ckpt.pt')
    assert state['step'] == 50 and set(state['ema']) >= {'visual.proj', 'byol_proj.0.weight'}

    # the export is the online CLIP: open_clip loads it and gives the training code's embeddings
    assert json.load(open(out / 'open_clip' / 'open_clip_config.json'))['model_cfg']['vision_cfg']['pool_type'] == 'tok'
    path = f'local-dir:{out / "open_clip"}'
    ref, _, preprocess = open_clip.create_model_and_transforms(path)
    ours = common.CLIP(TINY)
    ours.load_state_dict({k[5:]: v for k, v in state['model'].items() if k.startswith('clip.')}, strict=True)
    scenes = [data.SyntheticShapes(64, 0, 'eval-zeroshot')[i] for i in range(4)]
    images = torch.stack([preprocess(im) for im, _ in scenes])
    texts = common.tokenizer_for(TINY)([c for _, c in scenes])
    with torch.no_grad():
        assert (ref.eval().encode_image(images) - ours.eval().encode_image(images)).abs().max() <= 1e-5
        assert (ref.encode_text(texts) - ours.encode_text(texts)).abs().max() <= 1e-5


@pytest.mark.parametrize('accum', ['1', '2'])
def test_exact_resume_including_the_ema(tmp_path, monkeypatch, accum):
    """SIGTERM during step 3 of 6: checkpoint, return; the resumed run logs the same losses and ends with the same
    online and EMA weights (and BN statistics) as the uninterrupted one, bit for bit; also with 2 micro-batches a step
    (random masks: their draw must be a function of the step, not of the process's history)."""
    monkeypatch.setattr(data, 'eval_sets', lambda *args: ({}, None))  # evaluation is the smoke test's business
    monkeypatch.setattr(common, 'evaluate', lambda *args: {})
    flags = ['--steps', '6', '--save-every', '100', '--accum-freq', accum] + ['--mask', 'random'] * (accum == '2')
    assert run(tmp_path / 'full', *flags) == 6
    calls, real = [0], aclip.coupled_loss

    def coupled_loss(*args):  # once a step, whatever --accum-freq
        calls[0] += 1
        if calls[0] == 3:
            signal.raise_signal(signal.SIGTERM)
        return real(*args)
    with monkeypatch.context() as patch:
        patch.setattr(aclip, 'coupled_loss', coupled_loss)
        assert run(tmp_path / 'part', *flags) == 3
    assert common.load_checkpoint(tmp_path / 'part' / 'ckpt.pt')['step'] == 3
    assert run(tmp_path / 'part', *flags) == 6
    keys = ('loss', 'clip_1', 'clip_2', 'simclr', 'byol')
    read = lambda d: [[r['step']] + [r[k] for k in keys] for r in records(tmp_path / d) if 'loss' in r]
    assert read('part') == read('full') and len(read('full')) == 6
    a, b = common.load_checkpoint(tmp_path / 'full' / 'ckpt.pt'), common.load_checkpoint(tmp_path / 'part' / 'ckpt.pt')
    for part in ('model', 'ema'):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][n], b[part][n]) for n in a[part]), part


@pytest.mark.parametrize('mask', ['random', 'random-block'])
def test_random_masks_are_drawn_for_the_global_batch(tmp_path, monkeypatch, mask):
    """--accum-freq 2 x 4 against one batch of 8, --head-bn eval (BatchNorm on its running statistics): every sample
    gets the mask it gets in the big batch, the step the same gradients (every parameter, 1e-5) and loss; the EMA pass
    runs once per micro-batch, though the online forward runs twice (GradCache), and the EMA moves once per step."""
    monkeypatch.setattr(data, 'eval_sets', lambda *args: ({}, None))
    monkeypatch.setattr(common, 'evaluate', lambda *args, **kwargs: {})
    seen, counts, forward = [], {'teacher': 0, 'update_ema': 0}, aclip.ACLIP.forward

    def recorded(self, images, texts, ids_keep=None):
        seen.append((torch.is_grad_enabled(), ids_keep))
        return forward(self, images, texts, ids_keep)
    monkeypatch.setattr(aclip.ACLIP, 'forward', recorded)

    def counted(name, real):
        def wrapper(*args):
            counts[name] += 1
            return real(*args)
        return wrapper
    for name in counts:
        monkeypatch.setattr(aclip, name, counted(name, getattr(aclip, name)))
    runs = {}
    for name, flags in (('big', []), ('acc', ['--batch-size', '4', '--accum-freq', '2'])):
        seen.clear()
        counts.update(teacher=0, update_ema=0)
        grads, losses = first_step_grads(aclip, BASE + ['--steps', '1', '--mask', mask, '--head-bn', 'eval'] + flags +
                                         ['--out', str(tmp_path / name)])
        runs[name] = grads, losses, [ids for grad, ids in seen if grad], sum(not grad for grad, _ in seen), dict(counts)
    (big, big_loss, big_ids, big_nograd, big_counts), (acc, acc_loss, acc_ids, acc_nograd, acc_counts) = runs.values()
    assert (big_nograd, big_counts) == (0, {'teacher': 1, 'update_ema': 1})  # one micro-batch: no extra forward
    assert (acc_nograd, acc_counts) == (2, {'teacher': 2, 'update_ema': 1})
    V, K = 2, big_ids[0].shape[1]
    assert torch.equal(torch.cat([ids.view(V, 4, K) for ids in acc_ids], dim=1), big_ids[0].view(V, 8, K))
    assert not torch.equal(acc_ids[0], acc_ids[1])  # not one draw reused per micro-batch
    for x, y in zip(acc, big):
        assert (x - y).norm() <= 1e-5 * y.norm(), (tuple(y.shape), (x - y).norm(), y.norm())
    assert acc_loss == pytest.approx(big_loss, rel=1e-5)
    state = common.load_checkpoint(tmp_path / 'acc' / 'ckpt.pt')
    for part in ('model', 'ema'):  # eval mode: the running statistics stay as initialised
        stats = {k: v for k, v in state[part].items() if k.endswith(('running_mean', 'running_var'))}
        assert stats and all(torch.equal(v, torch.full_like(v, float(k.endswith('var')))) for k, v in stats.items())


def test_pretrained_initialises_the_clip_and_the_ema_copies_it(tmp_path, monkeypatch):
    """--pretrained loads the CLIP before the EMA is copied from it: after one step at lr 1e-30 the EMA's vision tower
    is the pretrained one; the heads are not loaded."""
    monkeypatch.setattr(data, 'eval_sets', lambda *args: ({}, None))
    monkeypatch.setattr(common, 'evaluate', lambda *args, **kwargs: {})
    run(tmp_path / 'a', '--steps', '2')
    run(tmp_path / 'b', '--steps', '1', '--lr', '1e-30', '--wd', '0', '--pretrained', str(tmp_path / 'a' / 'ckpt.pt'))
    a, b = (common.load_checkpoint(tmp_path / d / 'ckpt.pt') for d in ('a', 'b'))
    visual = [k for k in a['model'] if k.startswith('clip.visual.')]
    assert visual and all(torch.allclose(b['ema'][k[5:]], a['model'][k], rtol=0, atol=1e-12) for k in visual)
    clip = [k for k in a['model'] if k.startswith('clip.')]
    assert all(torch.allclose(b['model'][k], a['model'][k], rtol=0, atol=1e-12) for k in clip)
    assert not torch.equal(b['model']['simclr_head.0.weight'], a['model']['simclr_head.0.weight'])


@pytest.mark.parametrize('argv, message', [
    (['--mask-ratio', '1.0'], '--mask-ratio'),
    (['--ema-momentum', '1.5'], '--ema-momentum'),
    (['--byol-weight', '-1'], 'weights'),
    (['--model', 'RN50'], 'RN50'),
    (['--crop-scale', '0'], '--crop-scale'),  # was replaced by the default (`or`)
    (['--crop-scale', '1.5'], '--crop-scale'),
    (['--head-hidden', '0'], '--head-hidden'),  # was replaced by the default (`or`)
    (['--head-dim', '0'], '--head-dim'),
    (['--lr', '0'], '--lr'),  # was replaced by the default (common.fill_run_defaults' `or`)
    (['--time-steps', '-1'], '--time-steps'),
    (['--accum-freq', '0'], '--accum-freq'),
])
def test_bad_input_exits_2(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.setattr(data, 'eval_sets', lambda *args: ({}, None))  # a value accepted by mistake: one short run
    monkeypatch.setattr(common, 'evaluate', lambda *args, **kwargs: {})
    with pytest.raises(SystemExit) as exit_info:
        aclip.main(['--steps', '1', '--time-steps', '0'] + argv + ['--out', str(tmp_path), '--workers', '0'])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith('error:') and message in err[0]


def test_given_values_are_kept_and_defaults_filled(tmp_path):
    args = aclip.get_args(['--crop-scale', '0.3', '--head-hidden', '7', '--out', str(tmp_path)])
    assert (args.crop_scale, args.head_hidden) == (0.3, 7)
    assert aclip.transforms(args, TINY)[0].scale == (0.3, 1.0)
    args = aclip.get_args(['--out', str(tmp_path)])
    assert (args.crop_scale, args.head_hidden, args.ema_momentum) == (0.8, 512, 0.95)  # tiny, synthetic data
    args = aclip.get_args(['--model', 'ViT-B-16', '--train-data', 'train.csv', '--out', str(tmp_path)])
    assert (args.crop_scale, args.head_hidden, args.ema_momentum) == (0.5, 4096, 0.996)  # the paper's


def test_default_lr_is_linear_in_the_global_batch(tmp_path):
    """5e-4 at the paper's global batch 4096, lr proportional to the global batch; tiny keeps 1e-3 at any batch."""
    args = aclip.get_args(['--model', 'ViT-B-16', '--out', str(tmp_path)])
    for batch_size, lr in ((4096, 5e-4), (256, 3.125e-5), (8192, 1e-3)):
        assert aclip.default_lr(args, batch_size) == pytest.approx(lr, rel=1e-12)
    args = aclip.get_args(['--model', 'ViT-B-16', '--batch-size', '512', '--out', str(tmp_path)])
    common.fill_run_defaults(args, 100_000, 8, 10, aclip.default_lr)  # torchrun: 8 x 512 = the paper's 4096
    assert args.lr == pytest.approx(5e-4, rel=1e-12)
    args = aclip.get_args(['--model', 'ViT-B-16', '--batch-size', '256', '--out', str(tmp_path)])
    common.fill_run_defaults(args, 100_000, 1, 10, aclip.default_lr)  # one GPU: 16x fewer samples a step, 16x lower
    assert args.lr == pytest.approx(5e-4 / 16, rel=1e-12)
    args = aclip.get_args(['--model', 'ViT-B-16', '--lr', '2e-4', '--out', str(tmp_path)])
    common.fill_run_defaults(args, 100_000, 1, 10, aclip.default_lr)
    assert args.lr == 2e-4  # a given --lr wins
    args = aclip.get_args(['--out', str(tmp_path)])
    assert aclip.default_lr(args, 64) == aclip.default_lr(args, 4096) == 1e-3
