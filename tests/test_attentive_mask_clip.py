"""attentive_mask_clip.py: block masks, the box mapping, the attention scores, the SimCLR pairing, the EMA, and the
script end to end through main(argv): smoke run, exact resume including the EMA, export round trip, bad input."""
import copy
import json
import os
import signal

import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import attentive_mask_clip as aclip
import common
import data

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


# ----------------------------------------------------------------------------- the script


def test_smoke_learns_reports_cost_and_exports(tmp_path):
    out = tmp_path / 'run'
    assert run(out, '--steps', '30', '--batch-size', '16', '--log-every', '5', '--time-steps', '1') == 30
    logged = [r for r in records(out) if 'loss' in r]
    assert {'loss', 'clip_1', 'clip_2', 'simclr', 'byol', 'lr', 'ema_momentum', 'samples_per_sec'} <= set(logged[0])
    assert logged[-1]['loss'] < logged[0]['loss'] - 1.0, logged
    assert logged[0]['ema_momentum'] < logged[-1]['ema_momentum'] <= 1
    final = {k: v for r in records(out) for k, v in r.items()}
    assert final['step_seconds/aclip'] > 0 and final['step_seconds/clip'] > 0
    for task in ('shape', 'colour', 'position', 'object', 'object_heldout'):
        assert 0 <= final[f'zeroshot/{task}'] <= 1
    assert json.load(open(out / 'args.json'))['mask'] == 'attentive'
    state = common.load_checkpoint(out / 'ckpt.pt')
    assert state['step'] == 30 and set(state['ema']) >= {'visual.proj', 'byol_proj.0.weight'}

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


def test_exact_resume_including_the_ema(tmp_path, monkeypatch):
    """SIGTERM during step 3 of 6: checkpoint, return; the resumed run logs the same losses and ends with the same
    online and EMA weights (and BN statistics) as the uninterrupted one, bit for bit."""
    monkeypatch.setattr(data, 'eval_sets', lambda *args: ({}, None))  # evaluation is the smoke test's business
    monkeypatch.setattr(common, 'evaluate', lambda *args: {})
    flags = ['--steps', '6', '--save-every', '100']
    assert run(tmp_path / 'full', *flags) == 6
    calls, real = [0], aclip.losses

    def losses(*args):
        calls[0] += 1
        if calls[0] == 3:
            signal.raise_signal(signal.SIGTERM)
        return real(*args)
    with monkeypatch.context() as patch:
        patch.setattr(aclip, 'losses', losses)
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


@pytest.mark.parametrize('argv, message', [
    (['--mask-ratio', '1.0'], '--mask-ratio'),
    (['--ema-momentum', '1.5'], '--ema-momentum'),
    (['--byol-weight', '-1'], 'weights'),
    (['--model', 'RN50'], 'RN50'),
])
def test_bad_input_exits_2(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        aclip.main(argv + ['--out', str(tmp_path), '--workers', '0'])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith('error:') and message in err[0]
