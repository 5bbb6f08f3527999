"""maskclip.py: masking, the decoder's targets, the EMA teacher and its temperature, MLM masking and loss, the
distillation loss against a hand computation, fp32 prototype logits under bf16, lambda = 0 is flip.py's CLIP step,
2 processes = 1 process, a run that learns, exact resume (teacher and centre included) and the open_clip export."""
import contextlib
import copy
import inspect
import json
import math
import os
import random
import signal
import subprocess
import sys

import open_clip
import pytest
import torch
import torch.nn.functional as F

import common
import data
import flip
import maskclip

RUN = ['--batch-size', '4', '--workers', '0', '--log-every', '1']
CFG = common.model_config('tiny')


@contextlib.contextmanager
def small_eval():
    """A small held-out set (data.eval_sets' construction, fewer images); signal handlers restored afterwards."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(data, 'eval_sets', lambda args, tf, size: data.synthetic_eval_sets(size, 0, tf, 48, 24))
            yield
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


@pytest.fixture(autouse=True)
def everywhere_small_eval():
    with small_eval():
        yield


def read_log(out):
    with open(os.path.join(out, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


def student(*argv):
    torch.manual_seed(0)
    return maskclip.MaskCLIP(CFG, maskclip.get_args(['--out', 'unused', *argv]))


def captions(n):
    return [data.caption(data.sample_scene(random.Random(i), True), random.Random(i)) for i in range(n)]


@pytest.fixture(scope='module')
def learned_run(tmp_path_factory):
    """30 steps of the same 16 training samples (flip's smoke test): the model must fit them. Smoke and export."""
    out = str(tmp_path_factory.mktemp('maskclip') / 'learned')
    with small_eval():
        assert maskclip.main(['--steps', '30', '--batch-size', '16', '--train-num-samples', '16', '--workers', '0',
                              '--log-every', '1', '--time-steps', '1', '--out', out]) == 30
    return out

# ----------------------------------------------------------------------------- masking and the decoder's targets


@pytest.mark.parametrize('block', [False, True])
def test_patch_masking_partitions_the_grid(block):
    g = torch.Generator().manual_seed(0)
    ids_keep, ids_mask = maskclip.patch_masking(512, (8, 8), 0.75, g, block)
    assert ids_keep.shape == (512, 16) and ids_mask.shape == (512, 48)
    assert torch.equal(torch.cat([ids_keep, ids_mask], 1).sort(1).values, torch.arange(64).expand(512, -1))
    if not block:  # the same draw as FLIP's masking: the kept patches are the 16 smallest of the same noise
        assert torch.equal(ids_keep, flip.random_masking(512, 64, 0.75, torch.Generator().manual_seed(0)))


@pytest.mark.parametrize('block', [False, True])
def test_masking_keeps_at_least_one_patch(block):
    """int(64 x 0.01) = 0 patches would leave the student nothing (NaN with tiny's mean pooling): OpenCLIP keeps 1."""
    ids_keep, ids_mask = maskclip.patch_masking(8, (8, 8), 0.99, torch.Generator().manual_seed(0), block)
    assert ids_keep.shape == (8, 1) and ids_mask.shape == (8, 63)
    args = maskclip.get_args(['--out', 'unused', '--mask-ratio', '0.99'])
    model = student('--mask-ratio', '0.99')
    teacher = copy.deepcopy(model.distilled()).requires_grad_(False)
    loss, terms, _, _ = maskclip.losses(model, model, teacher, torch.zeros(args.prototypes), torch.randn(4, 3, 64, 64),
                                        common.tokenizer_for(CFG)(captions(4)), args, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and terms['distill_loss'] > 0


@pytest.mark.parametrize('block', [False, True])
def test_masks_are_drawn_for_the_global_batch(block):
    """draw_masks: 2 micro-batches of 2 get rows 0-1 and 2-3 of one draw for 4 rows, the same masks as 1 micro-batch
    of 4 (and the same MLM normaliser); a draw per micro-batch would repeat rows 0-1."""
    texts = common.tokenizer_for(CFG)(captions(4))
    args = maskclip.get_args(['--out', 'unused'] + (['--mask-type', 'block'] if block else []))

    def masks(*cuts):
        micro = [common.Micro(torch.zeros(r.stop - r.start, 3, 64, 64), texts[r], r) for r in cuts]
        per_sample = maskclip.draw_masks(micro, 4, (8, 8), args, common.batch_generator(torch.device('cpu'), 0, 5))
        return [torch.cat(x) for x in zip(*(m.cache['masks'] for m in micro))], per_sample
    (split, split_n), (whole, whole_n) = masks(slice(0, 2), slice(2, 4)), masks(slice(0, 4))
    assert all(torch.equal(a, b) for a, b in zip(split, whole)) and torch.equal(split_n, whole_n)
    ids_keep, ids_mask, masked_texts, text_ids, valid = whole
    assert not torch.equal(ids_keep[:2], ids_keep[2:]) and not torch.equal(text_ids[:2], text_ids[2:])
    assert whole_n == pytest.approx(valid.sum().item() / 4) and (masked_texts == maskclip.MASK_ID).sum() == valid.sum()


def test_block_masking_masks_neighbours_together():
    def neighbour_rate(ids_mask):  # P(right or lower neighbour masked | patch masked)
        m = torch.zeros(ids_mask.shape[0], 64, dtype=torch.bool).scatter_(1, ids_mask, True).view(-1, 8, 8)
        both = (m[:, 1:] & m[:, :-1]).sum() + (m[:, :, 1:] & m[:, :, :-1]).sum()
        return (both / (m[:, :-1].sum() + m[:, :, :-1].sum())).item()
    rates = [neighbour_rate(maskclip.patch_masking(2000, (8, 8), 0.5, torch.Generator().manual_seed(0), b)[1])
             for b in (False, True)]
    assert abs(rates[0] - 31 / 63) < 0.02  # uniform: another of the 31 remaining masked among 63
    assert rates[1] > rates[0] + 0.15


def test_decoder_predicts_the_masked_positions_from_the_kept_patches_only():
    model = student()
    teacher = copy.deepcopy(model.distilled()).requires_grad_(False)
    torch.manual_seed(1)
    images = torch.randn(2, 3, 64, 64)
    texts = common.tokenizer_for(CFG)(captions(2))
    ids_keep, ids_mask = maskclip.patch_masking(2, (8, 8), 0.75, torch.Generator().manual_seed(1))

    def pred(x, keep=ids_keep, mask=ids_mask):
        with torch.no_grad():
            return model(x, texts, keep, mask)[3]

    def perturb(patch):  # add noise to the pixels of one patch of image 0
        r, c = divmod(patch, 8)
        x = images.clone()
        x[0, :, 8 * r:8 * r + 8, 8 * c:8 * c + 8] += torch.randn(3, 8, 8)
        return x

    base = pred(images)
    assert base.shape == (2, 48, 256)
    assert torch.equal(pred(perturb(ids_mask[0, 5].item())), base)  # the student never sees a masked patch
    assert not torch.allclose(pred(perturb(ids_keep[0, 5].item()))[0], base[0])  # but sees the kept ones
    perm = torch.randperm(48)
    assert torch.allclose(pred(images, mask=ids_mask[:, perm]), base[:, perm], atol=1e-6)  # pred j is at ids_mask[j]
    assert torch.allclose(pred(images, keep=ids_keep[:, torch.randperm(16)]), base, atol=1e-5)
    target = maskclip.teacher_targets(teacher, images, ids_mask)  # (B, M, prototypes)
    with torch.no_grad():
        tokens = teacher['visual'].forward_tokens(images)  # (B, 1 + L, width)
        expected = torch.stack([teacher['head'](tokens[b, 1 + ids_mask[b]]) for b in range(2)])
    assert torch.allclose(target, expected, atol=1e-6) and not target.requires_grad

# ----------------------------------------------------------------------------- the distillation loss and its precision


def test_distill_loss_against_a_hand_computation():
    """iBOT's patch loss by hand, one patch, 3 prototypes: H(softmax((t - c) / tau_t), softmax(s / tau_s))."""
    t, c, s = [0.5, -0.2, 0.1], [0.3, 0.0, -0.1], [0.2, 0.4, -0.3]

    def by_hand(t, c, s, tau_t, tau_s):
        p = [math.exp((ti - ci) / tau_t) for ti, ci in zip(t, c)]
        q = [math.exp(si / tau_s) for si in s]
        return -sum(pi / sum(p) * math.log(qi / sum(q)) for pi, qi in zip(p, q))

    args = maskclip.get_args(['--out', 'unused'])  # --student-temp 0.1
    value = maskclip.distill_loss(torch.tensor([[s]]), torch.tensor([[t]]), torch.tensor(c), 0.05, args).item()
    assert value == pytest.approx(by_hand(t, c, s, 0.05, 0.1), rel=1e-5)
    for wrong in (by_hand(t, [-x for x in c], s, 0.05, 0.1), by_hand(t, c, s, 0.1, 0.05)):  # centre added; swapped
        assert abs(wrong - value) > 0.1
    args = maskclip.get_args(['--out', 'unused', '--target', 'mse'])
    cos = sum(a * b for a, b in zip(s, t)) / math.sqrt(sum(a * a for a in s) * sum(b * b for b in t))
    value = maskclip.distill_loss(torch.tensor([[s]]), torch.tensor([[t]]), None, None, args).item()
    assert value == pytest.approx(2 - 2 * cos, rel=1e-5)


def test_teacher_temperature_warms_up_as_ibot():
    temps = [maskclip.teacher_temp(s, 60, 0.04, 0.07) for s in (0, 30, 60, 199)]
    assert temps == pytest.approx([0.04, 0.055, 0.07, 0.07])
    assert maskclip.teacher_temp(0, 0, 0.04, 0.07) == 0.07  # no warm-up
    args = maskclip.get_args(['--out', 'unused'])
    assert (args.warmup_teacher_temp, args.teacher_temp, args.student_temp) == (0.04, 0.07, 0.1)  # main_ibot.py
    args.steps = 200
    assert maskclip.teacher_temp_warmup(args) == 60  # iBOT's 30 warm-up epochs of its default 100


def test_prototype_logits_are_fp32_under_bf16():
    args = maskclip.get_args(['--out', 'unused', '--precision', 'bf16'])
    model = student()
    teacher = copy.deepcopy(model.distilled()).requires_grad_(False)
    seen = {}

    def train_model(*inputs):
        out = model(*inputs)
        seen['pred'] = out[3]
        return out
    amp = common.autocast(torch.device('cpu'), args.precision)
    with amp:
        _, _, _, target = maskclip.losses(model, train_model, teacher, torch.zeros(args.prototypes),
                                          torch.randn(4, 3, 64, 64), common.tokenizer_for(CFG)(captions(4)), args,
                                          torch.Generator().manual_seed(0))
        x = torch.randn(4, 48, 128)
        z = model.head.mlp(x)  # bf16 under autocast
        logits = model.head(x)
    assert z.dtype == torch.bfloat16
    assert seen['pred'].dtype == target.dtype == logits.dtype == torch.float32
    expected = F.normalize(z.float(), dim=-1) @ F.normalize(model.head.prototypes, dim=-1).T  # fp32 cosines
    assert (logits - expected).abs().max() < 1e-6  # a bf16 product would be off by ~1e-3

# ----------------------------------------------------------------------------- the image branch: --target, --clip-view


def test_mse_target_regresses_the_teacher_tokens(tmp_path):
    args = maskclip.get_args(['--out', 'unused', '--target', 'mse'])
    model = student('--target', 'mse')
    assert isinstance(model.head, torch.nn.Identity)  # no tokenizer
    teacher = copy.deepcopy(model.distilled()).requires_grad_(False)
    images = torch.randn(4, 3, 64, 64)
    _, terms, _, target = maskclip.losses(model, model, teacher, None, images, common.tokenizer_for(CFG)(captions(4)),
                                          args, torch.Generator().manual_seed(0))
    ids_keep, ids_mask = maskclip.patch_masking(4, (8, 8), 0.75, torch.Generator().manual_seed(0))
    with torch.no_grad():
        pred = model.img_decoder(model.clip.visual.forward_tokens(images, ids_keep), ids_keep, ids_mask)  # (B, M, w)
        tokens = teacher['visual'].forward_tokens(images)[:, 1:]  # (B, L, width)
        tokens = torch.stack([tokens[b, ids_mask[b]] for b in range(4)])
    assert torch.allclose(target, tokens, atol=1e-6)
    expected = (2 - 2 * F.cosine_similarity(pred, tokens, dim=-1)).mean()
    assert terms['distill_loss'].item() == pytest.approx(expected.item(), rel=1e-5)
    # and through main: no tokenizer head in the checkpoint, the centre never moves
    maskclip.main(RUN + ['--steps', '2', '--target', 'mse', '--time-steps', '0', '--out', str(tmp_path)])
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert not any(k.startswith('head.') for k in ckpt['model']) and not ckpt['center'].any()
    assert all(r['distill_loss'] > 0 for r in read_log(tmp_path) if 'loss' in r)


def test_masked_clip_view_embeds_the_masked_pass_only():
    model = student('--clip-view', 'masked').eval()
    images, texts = torch.randn(2, 3, 64, 64), common.tokenizer_for(CFG)(captions(2))
    ids_keep, ids_mask = maskclip.patch_masking(2, (8, 8), 0.75, torch.Generator().manual_seed(0))
    passes = []
    hook = model.clip.visual.transformer.register_forward_hook(lambda module, args, out: passes.append(out.shape[1]))
    with torch.no_grad():
        image_features, _, _, pred, _ = model(images, texts, ids_keep, ids_mask)
        hook.remove()
        assert passes == [17]  # one image pass, CLS + 16 kept patches
        assert torch.allclose(image_features, model.clip.encode_image(images, True, ids_keep), atol=1e-6)
        assert not torch.allclose(image_features, model.clip.encode_image(images, True), atol=1e-3)
        x = images.clone()
        r, c = divmod(ids_mask[0, 0].item(), 8)
        x[0, :, 8 * r:8 * r + 8, 8 * c:8 * c + 8] += 5.0  # a masked patch: the CLIP embedding never sees it
        assert torch.equal(model(x, texts, ids_keep, ids_mask)[0], image_features)
        full = student().eval()  # the same weights (seed 0), the default view: two image passes, the same prediction
        assert torch.allclose(full(images, texts, ids_keep, ids_mask)[3], pred, atol=1e-6)

# ----------------------------------------------------------------------------- text masking, the MLM text pass


def noise_for(texts, seed):  # text_masking's noise, (B, T) uniform: the draw the previous version made itself
    return torch.rand(texts.shape, generator=torch.Generator().manual_seed(seed))


def is_masked_of(texts, ids_mask, valid):  # (B, T) bool from text_masking's indices
    return torch.zeros(texts.shape, dtype=torch.bool).scatter(1, ids_mask, valid)


def old_text_masking(texts, mask_ratio, generator):  # the previous version: words told by id, a (B, T) mask
    words = (texts != maskclip.SOT) & (texts != maskclip.EOT) & (texts != 0)
    noise = torch.rand(texts.shape, generator=generator).masked_fill(~words, 2.0)
    n = (words.sum(dim=1, keepdim=True) * mask_ratio).round().clamp(min=1)
    return (noise.argsort(dim=1).argsort(dim=1) < n) & words


def test_text_masking_never_masks_special_tokens():
    texts = common.tokenizer_for(CFG)(captions(300) + ['', 'red'])
    masked, ids_mask, valid = maskclip.text_masking(texts, 0.15, noise_for(texts, 0))
    assert ids_mask.shape == valid.shape == (302, 4)  # N = round(0.15 x 30): static
    is_masked = is_masked_of(texts, ids_mask, valid)
    eot = (texts == maskclip.EOT).int().argmax(1, keepdim=True)
    words = (torch.arange(32) > 0) & (torch.arange(32) < eot)  # between SOT (position 0) and EOT: no padding
    assert not (is_masked & ~words).any()
    assert (masked[is_masked] == maskclip.MASK_ID).all() and torch.equal(masked[~is_masked], texts[~is_masked])
    n = words.sum(1)
    assert torch.equal(is_masked.sum(1), torch.where(n > 0, (n * 0.15).round().clamp(min=1), 0).long())
    assert 0.12 < is_masked.sum() / words.sum() < 0.2
    assert torch.equal(masked.argmax(-1), texts.argmax(-1))  # encode_text's pooling position does not move
    # captions without the word piece 0 ('!' inside a word) get the previous version's masks, draw for draw
    assert torch.equal(is_masked, old_text_masking(texts, 0.15, torch.Generator().manual_seed(0)))


def test_exclamation_mark_can_be_masked():
    """Token id 0 is padding and also '!' inside a word ('!$' -> [SOT, 0, 259, EOT]): it is a word, padding is not."""
    texts = common.tokenizer_for(CFG)(['!$', 'a red circle !$'])
    assert texts[0, :4].tolist() == [maskclip.SOT, 0, 259, maskclip.EOT]
    masked, ids_mask, valid = maskclip.text_masking(texts, 1.0, noise_for(texts, 0))
    assert masked[0, :4].tolist() == [maskclip.SOT, maskclip.MASK_ID, maskclip.MASK_ID, maskclip.EOT]
    assert (masked[0, 4:] == 0).all() and is_masked_of(texts, ids_mask, valid)[1].sum() == 5
    hits = sum(bool(maskclip.text_masking(texts[1:], 0.15, noise_for(texts[1:], s))[0][0, 4] ==
                    maskclip.MASK_ID) for s in range(200))
    assert 10 < hits < 70  # at 15%, 1 of its 5 words: the '!' piece among them about 40 times in 200


def test_mlm_loss_has_a_static_shape_and_the_old_value():
    texts = common.tokenizer_for(CFG)(captions(16))
    _, ids_mask, valid = maskclip.text_masking(texts, 0.15, noise_for(texts, 0))
    hidden, embedding = torch.randn(16, 32, 128), torch.randn(49408, 128)
    is_masked = is_masked_of(texts, ids_mask, valid)
    old = F.cross_entropy(hidden[is_masked] @ embedding.T, texts[is_masked])  # the boolean-indexed version
    per_sample = valid.sum() / 16  # one micro-batch, one rank: masked tokens per sample
    assert torch.allclose(maskclip.mlm_loss(hidden, texts, ids_mask, valid, embedding, per_sample), old, rtol=1e-5)
    hidden[~is_masked] = 1e3  # the unmasked positions do not enter
    assert torch.allclose(maskclip.mlm_loss(hidden, texts, ids_mask, valid, embedding, per_sample), old, rtol=1e-5)


def test_bidirectional_mlm_pass_sees_both_sides():
    model = student('--mlm-pass', 'bidirectional').eval()
    tok = common.tokenizer_for(CFG)
    masked = tok(['a small red circle on the left'])
    masked[0, 3] = maskclip.MASK_ID  # 'red'
    later = masked.clone()
    later[0, 7] = tok(['right'])[0, 1]  # a word after the masked one
    with torch.no_grad():
        images = torch.randn(1, 3, 64, 64)
        hidden = [model(images, masked, masked_texts=t)[4] for t in (masked, later)]
        causal = [model.clip.text_tokens(t, causal=True) for t in (masked, later)]
        assert torch.allclose(hidden[0], model.txt_decoder(model.clip.text_tokens(masked, causal=False)))
        assert not torch.allclose(hidden[0], model.txt_decoder(causal[0]))
    assert torch.allclose(causal[0][0, 3], causal[1][0, 3], atol=1e-6)  # causal: the masked token cannot see what follows
    assert (hidden[0][0, 3] - hidden[1][0, 3]).abs().max() > 1e-3  # bidirectional: it does


def test_default_mlm_pass_is_the_clip_pass_of_the_masked_caption():
    texts = common.tokenizer_for(CFG)(captions(6))
    masked, _, _ = maskclip.text_masking(texts, 0.15, noise_for(texts, 0))
    images = torch.randn(6, 3, 64, 64)

    def forward(model):  # -> the model's outputs and the causal flag of each text-tower pass
        passes = []
        hook = model.clip.transformer.register_forward_hook(lambda module, args, out: passes.append(args[1]))
        with torch.no_grad():
            out = model(images, texts, masked_texts=masked)
        hook.remove()
        return out, passes
    (_, intact, _, _, _), passes = forward(student('--mlm-pass', 'bidirectional').eval())
    assert passes == [True, False]  # CLIP's causal pass over the caption, and a bidirectional one for MLM
    model = student().eval()
    (_, text_features, _, _, hidden), passes = forward(model)
    assert passes == [True]  # one text pass, causal, over the masked caption
    with torch.no_grad():
        assert torch.allclose(text_features, model.clip.encode_text(masked, normalize=True), atol=1e-6)
        assert not torch.allclose(text_features, model.clip.encode_text(texts, normalize=True), atol=1e-3)
        assert torch.allclose(intact, model.clip.encode_text(texts, normalize=True), atol=1e-6)
        assert torch.allclose(hidden, model.txt_decoder(model.clip.text_tokens(masked, causal=True)), atol=1e-6)


def test_without_mlm_clip_reads_the_intact_caption():
    args = maskclip.get_args(['--out', 'unused', '--lambda-txt', '0'])
    model = student('--lambda-txt', '0')
    teacher = copy.deepcopy(model.distilled()).requires_grad_(False)
    seen = []

    def train_model(*inputs):  # records the masked captions the model is given
        seen.append(inputs[4])
        return model(*inputs)
    _, terms, _, _ = maskclip.losses(model, train_model, teacher, torch.zeros(args.prototypes), torch.randn(4, 3, 64, 64),
                                     common.tokenizer_for(CFG)(captions(4)), args, torch.Generator().manual_seed(0))
    assert model.txt_decoder is None and seen == [None] and set(terms) == {'clip_loss', 'distill_loss'}

# ----------------------------------------------------------------------------- EMA teacher, lambda = 0


def test_ema_momentum_schedule():
    assert maskclip.ema_momentum(0, 100, 0.996) == 0.996
    assert maskclip.ema_momentum(50, 100, 0.996) == pytest.approx(0.998)
    assert maskclip.ema_momentum(100, 100, 0.996) == 1.0


def test_tiny_teacher_is_not_its_random_initialisation():
    """The share of the teacher still its initialisation after the run, prod_t m_t: under 1% for the tiny default
    (0.996 would leave 67% after 200 steps); the paper's 0.996 elsewhere."""
    def init_left(args, steps):
        return math.prod(maskclip.ema_momentum(s, steps, args.ema_momentum) for s in range(steps))
    tiny = maskclip.get_args(['--out', 'unused'])
    assert tiny.ema_momentum == 0.95 and init_left(tiny, 200) < 0.01
    paper = maskclip.get_args(['--out', 'unused', '--ema-momentum', '0.996'])
    assert init_left(paper, 200) == pytest.approx(0.67, abs=0.01)
    assert maskclip.get_args(['--out', 'unused', '--model', 'ViT-B-16']).ema_momentum == 0.996


def test_teacher_gets_no_gradients_and_follows_the_ema(tmp_path, monkeypatch):
    seen, ema_update = [], maskclip.ema_update

    def spy(teacher, student, momentum):
        assert all(not t.requires_grad and t.grad is None for t in teacher.parameters())
        before = [t.clone() for t in teacher.parameters()]
        ema_update(teacher, student, momentum)
        seen.append((momentum, before, [t.clone() for t in teacher.parameters()],
                     [s.detach().clone() for s in student.parameters()]))

    temps, distill_loss = [], maskclip.distill_loss

    def temp_spy(pred, target, center, tau_t, args):
        temps.append(tau_t)
        return distill_loss(pred, target, center, tau_t, args)

    monkeypatch.setattr(maskclip, 'ema_update', spy)
    monkeypatch.setattr(maskclip, 'distill_loss', temp_spy)
    maskclip.main(RUN + ['--steps', '3', '--time-steps', '0', '--warmup-teacher-temp-steps', '2', '--out',
                         str(tmp_path)])  # no timing's updates
    assert [m for m, *_ in seen] == [maskclip.ema_momentum(s, 3, 0.95) for s in range(3)]
    assert temps == pytest.approx([0.04, 0.055, 0.07])  # the loop's loss uses the step's warmed-up temperature
    initial = list(student().distilled().parameters())  # the teacher starts as a copy of the student
    assert len(initial) == len(seen[0][1]) and all(torch.equal(a, b) for a, b in zip(initial, seen[0][1]))
    for m, before, after, current in seen:
        for b, a, s in zip(before, after, current):
            assert torch.allclose(a, m * b + (1 - m) * s, atol=1e-6, rtol=1e-6)
    ckpt = torch.load(os.path.join(tmp_path, 'ckpt.pt'), weights_only=True)
    assert all(torch.equal(ckpt['teacher'][k], v) for k, v in zip(ckpt['teacher'], seen[-1][2]))


def _centre_worker(rank, init, out):
    torch.distributed.init_process_group('gloo', init_method=f'file://{init}', rank=rank, world_size=2)
    center = torch.zeros(4)
    maskclip.update_center(center, torch.full((2, 3, 4), rank + 1.0))  # rank 0's logits are all 1, rank 1's all 2
    torch.save(center, f'{out}{rank}.pt')
    torch.distributed.destroy_process_group()


def test_centre_is_synchronised_across_ranks(tmp_path):
    torch.multiprocessing.spawn(_centre_worker, args=(str(tmp_path / 'init'), str(tmp_path / 'centre')), nprocs=2)
    centres = [torch.load(tmp_path / f'centre{r}.pt', weights_only=True) for r in range(2)]
    assert torch.equal(centres[0], centres[1])
    assert torch.allclose(centres[0], torch.full((4,), 0.1 * 1.5))  # (1 - 0.9) x the global mean


def test_two_processes_train_as_one_on_the_global_batch(tmp_path):
    """maskclip.main under torchrun, 2 processes x 2 micro-batches of 1, against 1 x 4: every loss term step after
    step (the centre's all-reduce over micro-batches and ranks enters from step 2 on, MLM's global token count at
    every step), and the final student, teacher and centre."""
    helper = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'maskclip_dist_helper.py')
    env = dict(os.environ, OMP_NUM_THREADS='1')
    flags = ['--steps', '3', '--warmup-teacher-temp-steps', '2']
    for cmd in ([sys.executable, helper, str(tmp_path / 'one'), '--batch-size', '4', *flags],
                [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', helper,
                 str(tmp_path / 'two'), '--batch-size', '1', '--accum-freq', '2', *flags]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = ([r for r in read_log(tmp_path / d) if 'loss' in r] for d in ('one', 'two'))
    assert len(one) == len(two) == 3
    # step 1 agreed to 2.4e-7 (asserted to 1e-6); from step 2 on, Adam turns float-noise gradients (the key bias,
    # below) into lr-sized steps, which moved step 3's clip_loss by 1.1e-5 relative (measured, CLS pooling)
    for step, (a, b) in enumerate(zip(one, two)):
        for k in ('loss', 'clip_loss', 'distill_loss', 'mlm_loss'):
            assert a[k] == pytest.approx(b[k], rel=1e-6 if step == 0 else 5e-5), (k, a, b)
    a, b = (torch.load(tmp_path / d / 'ckpt.pt', weights_only=True) for d in ('one', 'two'))
    assert torch.allclose(a['center'], b['center'], atol=1e-6) and a['center'].abs().sum() > 0
    for part in ('model', 'teacher'):
        for k, v in a[part].items():
            w = b[part][k]
            if k.endswith('attn.in_proj_bias'):  # the key bias has no gradient (softmax ignores it): Adam turns its
                v, w = (torch.cat(x.chunk(3)[::2]) for x in (v, w))  # float noise into lr-sized steps; q and v only
            assert (v - w).norm() <= 1e-4 * v.norm(), (part, k)  # per tensor: Adam's first steps move a few elements
            # whose gradient is float noise by up to lr, so an element-wise bound fails by chance on some data


def test_accumulated_steps_equal_one_big_batch(tmp_path):
    """2 micro-batches of 2 against one batch of 4, 3 steps through main: every loss term (MLM over the step's count,
    the distillation against the centre, which the targets of both micro-batches moved), the student, the teacher and
    the centre."""
    flags = RUN + ['--steps', '3', '--warmup-teacher-temp-steps', '2', '--time-steps', '0']
    maskclip.main(flags + ['--out', str(tmp_path / 'one')])
    maskclip.main(flags + ['--batch-size', '2', '--accum-freq', '2', '--out', str(tmp_path / 'acc')])
    one, acc = ([r for r in read_log(tmp_path / d) if 'loss' in r] for d in ('one', 'acc'))
    for a, b in zip(one, acc):
        for k in ('loss', 'clip_loss', 'distill_loss', 'mlm_loss'):
            assert a[k] == pytest.approx(b[k], abs=1e-5), (k, a, b)
    a, b = (torch.load(tmp_path / d / 'ckpt.pt', weights_only=True) for d in ('one', 'acc'))
    assert torch.allclose(a['center'], b['center'], atol=1e-6) and a['center'].abs().sum() > 0
    for part in ('model', 'teacher'):
        for k, v in a[part].items():
            w = b[part][k]
            if k.endswith('attn.in_proj_bias'):  # as in the 2-process test: q and v only
                v, w = (torch.cat(x.chunk(3)[::2]) for x in (v, w))
            assert (v - w).norm() <= 1e-4 * v.norm(), (part, k)  # as in the 2-process test


@pytest.mark.parametrize('off', ['--lambda-img', '--lambda-txt'])
def test_a_zero_weight_removes_its_branch(off):
    expected = {'--lambda-img': {'clip', 'txt_decoder'}, '--lambda-txt': {'clip', 'img_decoder', 'head'}}[off]
    assert {n.split('.')[0] for n, _ in student(off, '0').named_parameters()} == expected


def test_zero_lambdas_is_exactly_a_clip_step(tmp_path):
    flip.main(RUN + ['--steps', '2', '--mask-ratio', '0', '--out', str(tmp_path / 'clip')])
    maskclip.main(RUN + ['--steps', '2', '--lambda-img', '0', '--lambda-txt', '0', '--out', str(tmp_path / 'mc')])
    clip, ours = read_log(tmp_path / 'clip'), read_log(tmp_path / 'mc')
    assert [r['loss'] for r in clip[:2]] == [r['loss'] for r in ours[:2]] == [r['clip_loss'] for r in ours[:2]]
    assert clip[-1] == ours[-1]  # the same evaluation
    a, b = (torch.load(tmp_path / d / 'ckpt.pt', weights_only=True) for d in ('clip', 'mc'))
    assert set(b['model']) == {f'clip.{k}' for k in a['model']} and b['teacher'] is None
    assert all(torch.equal(v, b['model'][f'clip.{k}']) for k, v in a['model'].items())

# ----------------------------------------------------------------------------- runs: smoke, resume, export


def test_smoke_run_learns(learned_run):
    records = read_log(learned_run)
    steps = [r for r in records if 'loss' in r]
    assert [r['step'] for r in steps] == list(range(1, 31))
    for r in steps:
        parts = r['clip_loss'] + 0.1 * r['distill_loss'] + 0.1 * r['mlm_loss']
        assert r['loss'] == pytest.approx(parts, rel=1e-5)
        assert r['momentum'] == maskclip.ema_momentum(r['step'] - 1, 30, 0.95)
        assert r['teacher_temp'] == pytest.approx(maskclip.teacher_temp(r['step'] - 1, 9, 0.04, 0.07))
    assert steps[0]['mlm_loss'] == pytest.approx(10.8, abs=0.5)  # ln(49408): uniform over the vocabulary at start
    # it fits its 16 samples: CLIP from above ln 16 = 2.77 to well below, MLM down by more than a nat
    first, last = steps[0], {k: sum(r[k] for r in steps[-3:]) / 3 for k in ('loss', 'clip_loss', 'mlm_loss')}
    assert first['clip_loss'] > 2.5 and last['clip_loss'] < 1.9, (first, last)
    assert last['mlm_loss'] < first['mlm_loss'] - 1.0 and last['loss'] < first['loss'] - 1.0, (first, last)
    assert 'zeroshot/object' in records[-1] and records[-2]['step_seconds/maskclip'] > 0
    assert all(os.path.exists(os.path.join(learned_run, f)) for f in ('args.json', 'ckpt.pt', 'open_clip'))


@pytest.mark.parametrize('accum', ['1', '2'])
def test_exact_resume_including_the_teacher(tmp_path, monkeypatch, accum):
    """Interrupted after step 3, resumed: the same log, student, teacher and centre, bit for bit; also with 2
    micro-batches per step."""
    lr_at, run = common.lr_at, RUN + ['--steps', '4', '--time-steps', '0', '--accum-freq', accum]

    def interrupt_at_step_2(step, *args):
        if step == 2:
            signal.raise_signal(signal.SIGTERM)  # StopSignal sets its flag; the loop checkpoints after this step
        return lr_at(step, *args)

    full_run, resumed = str(tmp_path / 'full'), str(tmp_path / 'resumed')
    assert maskclip.main(run + ['--out', full_run]) == 4
    monkeypatch.setattr(common, 'lr_at', interrupt_at_step_2)
    assert maskclip.main(run + ['--out', resumed]) == 3
    monkeypatch.setattr(common, 'lr_at', lr_at)
    assert maskclip.main(run + ['--out', resumed]) == 4
    timing = ('samples_per_sec', 'data_seconds', 'compute_seconds')
    drop = lambda r: {k: v for k, v in r.items() if k not in timing}
    assert [drop(r) for r in read_log(resumed)] == [drop(r) for r in read_log(full_run)]
    a, b = (torch.load(os.path.join(d, 'ckpt.pt'), weights_only=True) for d in (full_run, resumed))
    for part in ('model', 'teacher'):
        assert all(torch.equal(v, b[part][k]) for k, v in a[part].items())
    assert torch.equal(a['center'], b['center']) and a['center'].abs().sum() > 0


def test_teacher_starts_from_the_pretrained_clip(learned_run, tmp_path, monkeypatch):
    """--pretrained loads the CLIP before the EMA teacher is copied from it: the teacher's image tower starts as the
    pretrained one (here the learned run's student), not as the random initialisation."""
    first, ema_update = {}, maskclip.ema_update

    def spy(teacher, student, momentum):
        first.setdefault('visual', {k: v.clone() for k, v in teacher['visual'].state_dict().items()})
        ema_update(teacher, student, momentum)
    monkeypatch.setattr(maskclip, 'ema_update', spy)
    maskclip.main(RUN + ['--steps', '1', '--time-steps', '0', '--pretrained', os.path.join(learned_run, 'ckpt.pt'),
                         '--out', str(tmp_path)])
    pretrained = torch.load(os.path.join(learned_run, 'ckpt.pt'), weights_only=True)['model']
    random = student().clip.visual.state_dict()
    assert all(torch.equal(v, pretrained[f'clip.visual.{k}']) for k, v in first['visual'].items())
    assert not torch.equal(first['visual']['proj'], random['proj'])


def test_export_round_trip(learned_run):
    exported, _, _ = open_clip.create_model_and_transforms(f'local-dir:{os.path.join(learned_run, "open_clip")}')
    state = torch.load(os.path.join(learned_run, 'ckpt.pt'), weights_only=True)['model']
    ours = common.CLIP(CFG)
    ours.load_state_dict({k[len('clip.'):]: v for k, v in state.items() if k.startswith('clip.')}, strict=True)
    assert set(exported.state_dict()) == set(ours.state_dict())  # the student CLIP only: no decoder, no teacher
    images, texts = torch.randn(2, 3, 64, 64), common.tokenizer_for(CFG)(captions(2))
    exported.eval()
    with torch.no_grad():
        assert (exported.encode_image(images) - ours.encode_image(images)).abs().max() < 1e-5
        assert (exported.encode_text(texts) - ours.encode_text(texts)).abs().max() < 1e-5


def test_shared_blocks_stay_identical_to_flip():
    assert inspect.getsource(maskclip.transforms) == inspect.getsource(flip.transforms)


@pytest.mark.parametrize('argv', [['--mask-ratio', '1'], ['--lambda-txt', '-1'], ['--prototypes', '0'],
                                  ['--clip-view', 'masked', '--lambda-img', '0'], ['--warmup-teacher-temp', '0'],
                                  ['--warmup-teacher-temp-steps', '-1'], ['--ema-momentum', '1.5']])
def test_bad_flags_exit_2(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        maskclip.main(argv + ['--out', str(tmp_path)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert err.value.code == 2 and len(lines) == 1 and 'error' in lines[0], lines


def test_bad_choice_exits_2(tmp_path):
    with pytest.raises(SystemExit) as err:
        maskclip.main(['--target', 'l1', '--out', str(tmp_path)])
    assert err.value.code == 2  # argparse's own message (usage and error)
