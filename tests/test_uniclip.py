"""uniclip.py: MP-NCE against InfoNCE and against Eq. 1 written as loops, the offsets, the denominators, the
domain-pair parameters' stable values, the folded export, the evaluation view, distributed against single-process,
a smoke run that learns, exact resume and the open_clip round trip."""
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import common
import data
import uniclip
from uniclip_dist_helper import MICRO, global_batch, loss_and_grads  # tests/ is on sys.path under pytest

TAU = torch.tensor([0.1, 0.07, 0.05])  # per domain pair, in uniclip.PAIRS order


def embeddings(B, E, D=16, seed=0):
    return F.normalize(torch.randn(B, E, D, generator=torch.Generator().manual_seed(seed)), dim=-1)


def small_eval_sets(args, transform, size):  # the synthetic evaluation, 60 images instead of 1700
    return data.synthetic_eval_sets(size, 0, transform, n_zeroshot=40, n_retrieval=20)


def read_log(out):
    with open(os.path.join(out, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]

# ----------------------------------------------------------------------------- the loss


@pytest.mark.parametrize('domain', [0, 1])
def test_mpnce_is_infonce_with_one_positive_and_one_domain_pair(domain):
    z = embeddings(6, 2)  # two embeddings per sample, same domain: one positive each
    offset = torch.tensor([0.3, -0.2, 0.1])
    flat = z.reshape(12, -1)
    logits = ((flat @ flat.T - offset[2 * domain]) / TAU[2 * domain]).fill_diagonal_(float('-inf'))
    reference = F.cross_entropy(logits, torch.arange(12) ^ 1)  # SimCLR's NT-Xent: the partner is the label
    for loss in ('mpnce', 'infonce'):  # two captions per sample give text-text positives: 'tied' keeps them
        value, _ = uniclip.universal_loss(z, [domain, domain], TAU, offset, loss, 'tied')
        torch.testing.assert_close(value, reference)


@pytest.mark.parametrize('text_text', ['none', 'tied'])
def test_mpnce_matches_equation_1_written_as_loops(text_text):
    z, domains = embeddings(3, 3), [0, 0, 1]
    offset = torch.tensor([0.3, -0.2, 0.1])
    flat, dom, sample = z.reshape(9, -1), domains * 3, [a // 3 for a in range(9)]
    s = lambda i, j: (flat[i] @ flat[j] - offset[dom[i] + dom[j]]) / TAU[dom[i] + dom[j]]  # noqa: E731
    kept = lambda i, j: text_text == 'tied' or dom[i] + dom[j] != 2  # noqa: E731  (none: no text-text pair)
    per_anchor = []
    for i in range(9):
        negatives = torch.stack([s(i, n).exp() for n in range(9) if sample[n] != sample[i] and kept(i, n)]).sum()
        per_anchor.append(torch.stack([-torch.log(s(i, p).exp() / (s(i, p).exp() + negatives))
                                       for p in range(9) if sample[p] == sample[i] and p != i]).mean())
    value, parts = uniclip.universal_loss(z, domains, TAU, offset, text_text=text_text)
    torch.testing.assert_close(value, torch.stack(per_anchor).mean())
    assert set(parts) == {'loss_image_image', 'loss_image_text'}
    if text_text == 'none':  # the text-text temperature and offset then have no effect at all
        other = uniclip.universal_loss(z, domains, TAU * torch.tensor([1, 1, 9]), offset + torch.tensor([0, 0, 5]),
                                       text_text='none')[0]
        torch.testing.assert_close(other, value, atol=0, rtol=0)


def test_offsets_are_a_no_op_with_a_single_domain_pair():
    z = embeddings(5, 3).requires_grad_()  # three image views, no caption: only image-image pairs
    offset = torch.tensor([0.7, -0.4, 0.2], requires_grad=True)
    value, _ = uniclip.universal_loss(z, [0, 0, 0], TAU, offset)
    torch.testing.assert_close(value, uniclip.universal_loss(z, [0, 0, 0], TAU, torch.zeros(3))[0])
    offset_grad, = torch.autograd.grad(value, offset)
    assert offset_grad.abs().max() < 1e-6
    # with two domains in one softmax they do matter, but only their differences: b_d -> b_d + 0.8 tau_d shifts every
    # logit by -0.8, which no softmax row sees, so the model fixes b_image-text at 0 and learns b_image-image alone
    for text_text in ('none', 'tied'):
        value = uniclip.universal_loss(z, [0, 0, 1], TAU, offset, text_text=text_text)[0]
        assert (value - uniclip.universal_loss(z, [0, 0, 1], TAU, torch.zeros(3), text_text=text_text)[0]).abs() > 1e-2
        shifted = uniclip.universal_loss(z, [0, 0, 1], TAU, offset + 0.8 * TAU, text_text=text_text)[0]
        torch.testing.assert_close(shifted, value)


def test_positives_never_appear_in_another_positives_denominator():
    logits, pos, neg, _ = uniclip.universal_logits(embeddings(4, 3), [0, 0, 1], TAU, torch.zeros(3))
    logits = logits.detach().requires_grad_()
    mp, info = uniclip.mp_nce(logits, pos, neg), uniclip.info_nce(logits, pos, neg)
    for i in range(len(logits)):
        positives = pos[i].nonzero().flatten().tolist()
        assert len(positives) == 2 and neg[i].sum() == 9  # --text-text tied: other captions are negatives too
        for p in positives:
            grad, = torch.autograd.grad(mp[i, p], logits, retain_graph=True)
            others = [j for j in range(logits.shape[1]) if j != p and not neg[i, j]]  # self and the other positive
            assert (grad[i, others] == 0).all() and (grad[i, neg[i]] > 0).all()
            assert (grad[:i] == 0).all() and (grad[i + 1:] == 0).all()
            grad, = torch.autograd.grad(info[i, p], logits, retain_graph=True)  # the ablation shares the denominator
            q = [x for x in positives if x != p][0]
            assert grad[i, q] > 0

# ----------------------------------------------------------------------------- model, export, ablation switches


@pytest.mark.parametrize('aug_embed', ['add', 'concat'])
def test_identity_export_equals_the_training_models_evaluation_embedding(aug_embed):
    torch.manual_seed(0)
    model = uniclip.UniCLIP(MICRO, aug_embed).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.aug_mlp[2].weight, std=0.3)  # a trained, non-zero augmentation term
        torch.nn.init.normal_(model.aug_mlp[2].bias, std=0.3)
        model.log_tau.copy_(torch.tensor([0.2, 0.03]).log())
    images = torch.randn(6, 3, 32, 32)
    clip = uniclip.fold_export(model)
    with torch.no_grad():
        ours, exported = model.encode_image(images, normalize=True), clip.encode_image(images, normalize=True)
        assert (ours - model.clip.encode_image(images, normalize=True)).abs().max() > 1e-2  # the fold matters
        torch.testing.assert_close(exported, ours, atol=1e-5, rtol=0)
        # params given explicitly as the identity are the same path as params=None
        torch.testing.assert_close(model.encode_image(images, True, model.identity.expand(6, -1)), ours)
    torch.testing.assert_close(clip.logit_scale.exp(), torch.tensor(1 / 0.03))


def test_ablation_switches():
    images, params, texts = global_batch()
    for aug_embed, tau, offset, loss in [('none', 'domain', 'domain', 'mpnce'), ('add', 'domain', 'domain', 'infonce'),
                                         ('concat', 'shared', 'none', 'mpnce'), ('add', 'shared', 'domain', 'mpnce'),
                                         ('add', 'domain', 'none', 'mpnce')]:
        model = uniclip.UniCLIP(MICRO, aug_embed, 16, tau, offset)
        value, grads = loss_and_grads(model, model, images, params, texts, loss)
        assert torch.isfinite(value) and all(torch.isfinite(g).all() for g in grads.values())
        assert hasattr(model, 'aug_mlp') == (aug_embed != 'none')
        assert ('offset' in grads) == (offset == 'domain')
        assert grads['log_tau'].shape == ((2,) if tau == 'domain' else (1,))
        assert 'clip.logit_scale' not in grads
        # each switch changes one thing: the starting temperatures are --tau-init's under both --tau choices
        start_tau, start_offset = model.similarity()
        torch.testing.assert_close(start_tau, torch.tensor([0.1, 0.07, 0.07]))
        assert not start_offset.any()


def test_shared_tau_moves_both_temperatures_together():
    model = uniclip.UniCLIP(MICRO, 'none', 16, 'shared')
    with torch.no_grad():
        model.log_tau.add_(0.5)
    tau = model.similarity()[0]
    torch.testing.assert_close(tau, torch.tensor([0.1, 0.07, 0.07]) * math.exp(0.5))
    # all three switches together are the old single ablation: one temperature from 0.07, no offsets
    args = uniclip.get_args(['--tau', 'shared', '--offset', 'none', '--tau-init', '0.07', '0.07'])
    model = uniclip.UniCLIP(MICRO, args.aug_embed, 16, args.tau, args.offset, args.tau_init)
    assert [n for n, _ in model.named_parameters() if not n.startswith(('clip.', 'aug_'))] == ['log_tau']
    torch.testing.assert_close(model.similarity()[0], torch.full((3,), 0.07))


@pytest.mark.parametrize('tau,text_text', [('domain', 'tied'), ('domain', 'none'), ('shared', 'tied')])
def test_domain_pair_parameters_settle_at_finite_values(tau, text_text):
    """300 Adam steps on the similarity parameters alone (lr 0.05), the loss and clamp of training, one batch of 16
    samples whose two views and caption are noisy copies of a per-sample direction (captions noisier). Every
    temperature and offset must settle inside its range. The file before this test had a learnable text-text
    temperature and offset: text-text pairs are only negatives, so b_text-text rose without end (0.73, 0.94, 1.14 at
    steps 100, 200, 300) and tau_text-text fell towards the clamp (0.12 -> 0.09), while the learnable image-image and
    image-text offsets drifted apart along the direction in which the loss is flat (-0.32 / -0.89)."""
    torch.manual_seed(0)
    model = uniclip.UniCLIP(MICRO, 'none', 16, tau, 'domain')
    optimizer = torch.optim.Adam([model.log_tau, model.offset], lr=0.05, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(0)
    base = F.normalize(torch.randn(16, 1, 16, generator=g), dim=-1)  # (B, 1, D) what a sample is
    noise = torch.randn(16, 3, 16, generator=g) * torch.tensor([1.5, 1.5, 2.0])[None, :, None] / 4  # (B, 3, D)
    z = F.normalize(base + noise, dim=-1)  # (B, views + caption, D)
    history = []
    for step in range(300):
        loss, _ = uniclip.universal_loss(z, [0, 0, 1], *model.similarity(), text_text=text_text)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        uniclip.clamp_tau_(model)
        history.append(torch.cat(model.similarity()).detach())  # (6,) tau then b of every domain pair
    history = torch.stack(history)  # (300, 6)
    assert ((history[-1, :3] > 0.05) & (history[-1, :3] < 0.5)).all(), history[-1]  # clear of both clamps
    assert (history[-1, 3:].abs() < 0.5).all(), history[-1]
    assert (history[-100:] - history[-1]).abs().max() < 0.01, history[-100]  # settled: no drift in the last 100


def test_views_are_deterministic_and_report_their_parameters():
    image = data.SyntheticShapes(64, 0)[0][0]
    views = uniclip.Views(64, 'slip', 2)
    torch.manual_seed(3)
    a, pa = views(image)
    torch.manual_seed(3)
    b, pb = views(image)
    assert a.shape == (2, 3, 64, 64) and pa.shape == (2, len(uniclip.AUG_PARAMS))
    assert torch.equal(a, b) and torch.equal(pa, pb) and not torch.equal(pa[0], pa[1])
    assert ((pa[:, 2:4] > 0) & (pa[:, 2:4] <= 1)).all()  # crop width and height as fractions of the image
    mild = uniclip.Views(64, 'mild', 16)(image)[1]
    assert (mild[:, 4] == 0).all() and (mild[:, 8] == 0).all() and (mild[:, 2] * mild[:, 3] >= 0.79).all()
    for argv, recipe in (([], 'mild'), (['--train-data', 'train.csv'], 'slip')):  # --augment auto
        assert uniclip.transforms(uniclip.get_args(argv), MICRO)[0].r is uniclip.RECIPES[recipe]


def test_identity_parameters_describe_the_evaluation_view(monkeypatch):
    """On a 96 x 64 image the evaluation transform (resize the short side, centre crop) sees the centre 64 x 64
    square. A training view cropped there, unaugmented, must look like the evaluation image and be described by
    IDENTITY. (Before, crop boxes were fractions of the full image, so that view was [1/6, 0, 2/3, 1] and IDENTITY's
    (0, 0, 1, 1) described the full image, which evaluation never sees.)"""
    image = data.SyntheticShapes(96, 0)[0][0].crop((0, 16, 96, 80))  # (W, H) = (96, 64)
    views = uniclip.Views(32, 'mild', 1)
    views.r = dict(views.r, p_jitter=0.0, blur=0.0)  # the crop alone
    monkeypatch.setattr(uniclip.T.RandomResizedCrop, 'get_params', lambda *a: (0, 16, 64, 64))  # top, left, h, w
    view, params = views(image)
    assert params[0].tolist() == uniclip.IDENTITY
    evaluation = uniclip.transforms(uniclip.get_args([]), MICRO)[1](image)
    assert (view[0] - evaluation).abs().mean() < 0.01  # the same pixels up to resize-then-crop vs crop-then-resize
    monkeypatch.setattr(uniclip.T.RandomResizedCrop, 'get_params', lambda *a: (0, 0, 64, 96))  # the full image
    view, params = views(image)
    assert (view[0] - evaluation).abs().mean() > 0.05 and params[0, :4].tolist() == [-0.25, 0.0, 1.5, 1.0]

# ----------------------------------------------------------------------------- distributed


def test_distributed_equals_single_process_on_the_global_batch(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    helper = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'uniclip_dist_helper.py')
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                           helper, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dist = torch.load(tmp_path / 'dist.pt')
    torch.manual_seed(0)
    model = uniclip.UniCLIP(MICRO, 'add')
    with torch.no_grad():
        torch.nn.init.normal_(model.aug_mlp[2].weight, std=0.1)
        model.offset.normal_(std=0.1)
    loss, grads = loss_and_grads(model, model, *global_batch())
    torch.testing.assert_close(dist['loss'], loss, atol=1e-6, rtol=1e-5)
    assert dist['grads'].keys() == grads.keys()
    for k in grads:
        torch.testing.assert_close(dist['grads'][k], grads[k], atol=1e-6, rtol=1e-4, msg=k)
    records = read_log(tmp_path / 'run')
    assert [r['step'] for r in records] == [1, 2, 2] and os.path.isdir(tmp_path / 'run' / 'open_clip')

# ----------------------------------------------------------------------------- runs through main(argv)

ARGS = ['--steps', '16', '--batch-size', '8', '--train-num-samples', '8', '--workers', '0', '--log-every', '1']


@pytest.fixture(scope='module')
def smoke_run(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setattr(data, 'eval_sets', small_eval_sets)
    out = str(tmp_path_factory.mktemp('uniclip'))
    step = uniclip.main(ARGS + ['--out', out])
    mp.undo()
    return out, step


def test_smoke_run_learns(smoke_run):
    out, step = smoke_run
    assert step == 16
    records = read_log(out)
    losses = [r for r in records if 'loss' in r]
    assert [r['step'] for r in losses] == list(range(1, 17))
    for r in losses:
        assert all(k in r for k in ('lr', 'samples_per_sec', 'loss_image_image', 'loss_image_text', 'tau_image_image',
                                    'tau_image_text', 'offset_image_image'))
    # the same 8 samples every step: the model must fit them. Measured: 8.0 at step 1, 0.6 over the last four; a
    # model that does not learn (--lr 1e-9) stays at 8.0-8.6
    first, last = losses[0]['loss'], sum(r['loss'] for r in losses[-4:]) / 4
    assert last < 0.4 * first, [r['loss'] for r in losses]
    assert 'zeroshot/shape' in records[-1] and 'retrieval/image_to_text_R@1' in records[-1]
    for name in ('ckpt.pt', 'args.json', 'open_clip/open_clip_config.json', 'open_clip/open_clip_pytorch_model.bin'):
        assert os.path.exists(os.path.join(out, name)), name


def test_export_round_trip(smoke_run):
    import open_clip
    out, _ = smoke_run
    model = uniclip.UniCLIP(common.model_config('tiny'))
    model.load_state_dict(common.load_checkpoint(os.path.join(out, 'ckpt.pt'))['model'], strict=True)
    model.eval()
    loaded, _, preprocess = open_clip.create_model_and_transforms(f'local-dir:{os.path.join(out, "open_clip")}')
    loaded.eval()
    image = data.SyntheticShapes(64, 0, 'eval-retrieval', 4)[0][0]
    images = torch.stack([preprocess(image), uniclip.Views(64, 'mild', 1)(image)[0][0]])
    texts = common.tokenizer_for(common.model_config('tiny'))(['a red circle on the left', 'a blue star'])
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), model.encode_image(images), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loaded.encode_text(texts), model.encode_text(texts), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loaded.logit_scale.exp(), 1 / model.similarity()[0][1])


@pytest.mark.parametrize('accum', ['1', '2'])
def test_exact_resume(smoke_run, tmp_path, monkeypatch, accum):
    """Interrupted after step 2, resumed: the same losses and weights, bit for bit; also with the same global batch of
    8 in 2 micro-batches of 4 (the smoke run is the uninterrupted run with 1)."""
    monkeypatch.setattr(data, 'eval_sets', small_eval_sets)
    argv = ARGS + ['--accum-freq', accum, '--batch-size', str(8 // int(accum))]
    full = smoke_run[0] if accum == '1' else str(tmp_path / 'a')
    if accum != '1':
        assert uniclip.main(argv + ['--out', full]) == 16
    lr_at = common.lr_at

    def interrupt_at_step_2(step, *rest):  # SIGTERM arrives during step index 1; the loop stops after step 2
        if step == 1:
            signal.raise_signal(signal.SIGTERM)
        return lr_at(step, *rest)

    monkeypatch.setattr(common, 'lr_at', interrupt_at_step_2)
    assert uniclip.main(argv + ['--out', str(tmp_path / 'b')]) == 2
    monkeypatch.setattr(common, 'lr_at', lr_at)
    assert uniclip.main(argv + ['--out', str(tmp_path / 'b')]) == 16
    a, b = read_log(full), read_log(tmp_path / 'b')
    if accum != '1':  # the same global batch as the smoke run: its first step's loss
        assert a[0]['loss'] == pytest.approx(read_log(smoke_run[0])[0]['loss'], rel=1e-5)
    assert [r['step'] for r in a] == [r['step'] for r in b] == list(range(1, 17)) + [16]
    for ra, rb in zip(a[:16], b[:16]):
        assert ra['loss'] == rb['loss'] and ra['loss_image_image'] == rb['loss_image_image']
    sa, sb = [common.load_checkpoint(os.path.join(x, 'ckpt.pt'))['model'] for x in (full, tmp_path / 'b')]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_bad_input_exits_2(tmp_path):
    for argv in (['--views', '0'], ['--tau-init', '0.1', '2'], ['--batch-size', '1'], ['--augment', 'paper']):
        with pytest.raises(SystemExit) as exit:
            uniclip.main(argv + ['--out', str(tmp_path)])
        assert exit.value.code == 2
