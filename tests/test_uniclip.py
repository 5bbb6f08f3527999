"""uniclip.py: MP-NCE against InfoNCE and against Eq. 1 written as loops, the offsets, the denominators, the folded
export, distributed against single-process, a smoke run, exact resume and the open_clip round trip."""
import json
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

TAU = torch.tensor([0.1, 0.07, 0.05])


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
    for loss in ('mpnce', 'infonce'):
        value, _ = uniclip.universal_loss(z, [domain, domain], TAU, offset, loss)
        torch.testing.assert_close(value, reference)


def test_mpnce_matches_equation_1_written_as_loops():
    z, domains = embeddings(3, 3), [0, 0, 1]
    offset = torch.tensor([0.3, -0.2, 0.1])
    flat, dom, sample = z.reshape(9, -1), domains * 3, [a // 3 for a in range(9)]
    s = lambda i, j: (flat[i] @ flat[j] - offset[dom[i] + dom[j]]) / TAU[dom[i] + dom[j]]  # noqa: E731
    per_anchor = []
    for i in range(9):
        negatives = torch.stack([s(i, n).exp() for n in range(9) if sample[n] != sample[i]]).sum()
        per_anchor.append(torch.stack([-torch.log(s(i, p).exp() / (s(i, p).exp() + negatives))
                                       for p in range(9) if sample[p] == sample[i] and p != i]).mean())
    value, parts = uniclip.universal_loss(z, domains, TAU, offset)
    torch.testing.assert_close(value, torch.stack(per_anchor).mean())
    assert set(parts) == {'loss_image_image', 'loss_image_text'}


def test_offsets_are_a_no_op_with_a_single_domain_pair():
    z = embeddings(5, 3).requires_grad_()  # three image views, no caption: only image-image pairs
    offset = torch.tensor([0.7, -0.4, 0.2], requires_grad=True)
    value, _ = uniclip.universal_loss(z, [0, 0, 0], TAU, offset)
    torch.testing.assert_close(value, uniclip.universal_loss(z, [0, 0, 0], TAU, torch.zeros(3))[0])
    offset_grad, = torch.autograd.grad(value, offset)
    assert offset_grad.abs().max() < 1e-6
    # with two domains in one softmax they do matter
    assert (uniclip.universal_loss(z, [0, 0, 1], TAU, offset)[0] - uniclip.universal_loss(z, [0, 0, 1], TAU, torch.zeros(3))[0]).abs() > 1e-2


def test_positives_never_appear_in_another_positives_denominator():
    logits, pos, neg, _ = uniclip.universal_logits(embeddings(4, 3), [0, 0, 1], TAU, torch.zeros(3))
    logits = logits.detach().requires_grad_()
    mp, info = uniclip.mp_nce(logits, pos, neg), uniclip.info_nce(logits, pos, neg)
    for i in range(len(logits)):
        positives = pos[i].nonzero().flatten().tolist()
        assert len(positives) == 2 and neg[i].sum() == 9
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
        model.log_tau.copy_(torch.tensor([0.2, 0.03, 0.05]).log())
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
    for aug_embed, similarity, loss in [('none', 'domain', 'mpnce'), ('add', 'domain', 'infonce'),
                                        ('concat', 'shared', 'mpnce')]:
        model = uniclip.UniCLIP(MICRO, aug_embed, 16, similarity)
        value, grads = loss_and_grads(model, model, images, params, texts, loss)
        assert torch.isfinite(value) and all(torch.isfinite(g).all() for g in grads.values())
        assert hasattr(model, 'aug_mlp') == (aug_embed != 'none')
        assert ('offset' in grads) == (similarity == 'domain') and len(model.log_tau) == (3 if similarity == 'domain' else 1)
        assert 'clip.logit_scale' not in grads


def test_views_are_deterministic_and_report_their_parameters():
    image = data.SyntheticShapes(64, 0)[0][0]
    views = uniclip.Views(64, 'paper', 2)
    torch.manual_seed(3)
    a, pa = views(image)
    torch.manual_seed(3)
    b, pb = views(image)
    assert a.shape == (2, 3, 64, 64) and pa.shape == (2, len(uniclip.AUG_PARAMS))
    assert torch.equal(a, b) and torch.equal(pa, pb) and not torch.equal(pa[0], pa[1])
    assert ((pa[:, 2:4] > 0) & (pa[:, 2:4] <= 1)).all()  # crop width and height as fractions of the image
    mild = uniclip.Views(64, 'mild', 16)(image)[1]
    assert (mild[:, 4] == 0).all() and (mild[:, 8] == 0).all() and (mild[:, 2] * mild[:, 3] >= 0.79).all()

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

ARGS = ['--steps', '4', '--batch-size', '4', '--workers', '0', '--log-every', '1']


@pytest.fixture(scope='module')
def smoke_run(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setattr(data, 'eval_sets', small_eval_sets)
    out = str(tmp_path_factory.mktemp('uniclip'))
    step = uniclip.main(ARGS + ['--out', out])
    mp.undo()
    return out, step


def test_smoke_run(smoke_run):
    out, step = smoke_run
    assert step == 4
    records = read_log(out)
    losses = [r for r in records if 'loss' in r]
    assert [r['step'] for r in losses] == [1, 2, 3, 4]
    for r in losses:
        assert all(k in r for k in ('lr', 'samples_per_sec', 'loss_image_image', 'loss_image_text', 'tau_image_text'))
        assert 0 < r['loss'] < 20
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
    torch.testing.assert_close(loaded.logit_scale.exp(), 1 / model.log_tau[1].exp())


def test_exact_resume(smoke_run, tmp_path, monkeypatch):  # the smoke run is the uninterrupted one
    monkeypatch.setattr(data, 'eval_sets', small_eval_sets)
    lr_at = common.lr_at

    def interrupt_at_step_2(step, *rest):  # SIGTERM arrives during step index 1; the loop stops after step 2
        if step == 1:
            signal.raise_signal(signal.SIGTERM)
        return lr_at(step, *rest)

    monkeypatch.setattr(common, 'lr_at', interrupt_at_step_2)
    assert uniclip.main(ARGS + ['--out', str(tmp_path / 'b')]) == 2
    monkeypatch.setattr(common, 'lr_at', lr_at)
    assert uniclip.main(ARGS + ['--out', str(tmp_path / 'b')]) == 4
    a, b = read_log(smoke_run[0]), read_log(tmp_path / 'b')
    assert [r['step'] for r in a] == [r['step'] for r in b] == [1, 2, 3, 4, 4]
    for ra, rb in zip(a[:4], b[:4]):
        assert ra['loss'] == rb['loss'] and ra['loss_image_image'] == rb['loss_image_image']
    sa, sb = [common.load_checkpoint(os.path.join(x, 'ckpt.pt'))['model'] for x in (smoke_run[0], tmp_path / 'b')]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_bad_input_exits_2(tmp_path):
    for argv in (['--num-views', '0'], ['--tau-init', '0.1', '2', '0.1'], ['--batch-size', '1']):
        with pytest.raises(SystemExit) as exit:
            uniclip.main(argv + ['--out', str(tmp_path)])
        assert exit.value.code == 2
