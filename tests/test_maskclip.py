"""maskclip.py: masking, the decoder's targets, the EMA teacher, MLM masking, lambda = 0 is flip.py's CLIP step,
smoke run, exact resume (teacher and centre included) and the open_clip export."""
import contextlib
import copy
import inspect
import json
import os
import random
import signal

import open_clip
import pytest
import torch

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
def full_run(tmp_path_factory):
    """One uninterrupted 4-step run: the smoke test, the export and the resume reference."""
    out = str(tmp_path_factory.mktemp('maskclip') / 'full')
    with small_eval():
        assert maskclip.main(RUN + ['--steps', '4', '--out', out]) == 4
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

# ----------------------------------------------------------------------------- text masking, the MLM text pass


def test_text_masking_never_masks_special_tokens():
    texts = common.tokenizer_for(CFG)(captions(300) + ['', 'red'])
    masked, is_masked = maskclip.text_masking(texts, 0.15, torch.Generator().manual_seed(0))
    words = (texts != maskclip.SOT) & (texts != maskclip.EOT) & (texts != maskclip.PAD)
    assert not (is_masked & ~words).any()
    assert (masked[is_masked] == maskclip.MASK_ID).all() and torch.equal(masked[~is_masked], texts[~is_masked])
    n = words.sum(1)
    assert torch.equal(is_masked.sum(1), torch.where(n > 0, (n * 0.15).round().clamp(min=1), 0).long())
    assert 0.12 < is_masked.sum() / words.sum() < 0.2
    assert torch.equal(masked.argmax(-1), texts.argmax(-1))  # encode_text's pooling position does not move


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
    masked, _ = maskclip.text_masking(texts, 0.15, torch.Generator().manual_seed(0))
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


def test_teacher_gets_no_gradients_and_follows_the_ema(tmp_path, monkeypatch):
    seen, ema_update = [], maskclip.ema_update

    def spy(teacher, student, momentum):
        assert all(not t.requires_grad and t.grad is None for t in teacher.parameters())
        before = [t.clone() for t in teacher.parameters()]
        ema_update(teacher, student, momentum)
        seen.append((momentum, before, [t.clone() for t in teacher.parameters()],
                     [s.detach().clone() for s in student.parameters()]))

    monkeypatch.setattr(maskclip, 'ema_update', spy)
    maskclip.main(RUN + ['--steps', '3', '--time-steps', '0', '--out', str(tmp_path)])  # no timing's updates
    assert [m for m, *_ in seen] == [maskclip.ema_momentum(s, 3, 0.996) for s in range(3)]
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


def test_smoke_run(full_run):
    records = read_log(full_run)
    steps = [r for r in records if 'loss' in r]
    assert [r['step'] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        parts = r['clip_loss'] + 0.1 * r['distill_loss'] + 0.1 * r['mlm_loss']
        assert all(torch.isfinite(torch.tensor(r[k])) for k in ('loss', 'clip_loss', 'distill_loss', 'mlm_loss'))
        assert r['loss'] == pytest.approx(parts, rel=1e-5) and 0.996 <= r['momentum'] <= 1
    assert steps[0]['mlm_loss'] == pytest.approx(10.8, abs=0.5)  # ln(49408): uniform over the vocabulary at start
    assert 'zeroshot/object' in records[-1] and records[-2]['step_seconds/maskclip'] > 0
    assert all(os.path.exists(os.path.join(full_run, f)) for f in ('args.json', 'ckpt.pt', 'open_clip'))


def test_exact_resume_including_the_teacher(full_run, tmp_path, monkeypatch):
    lr_at = common.lr_at

    def interrupt_at_step_2(step, *args):
        if step == 2:
            signal.raise_signal(signal.SIGTERM)  # StopSignal sets its flag; the loop checkpoints after this step
        return lr_at(step, *args)

    monkeypatch.setattr(common, 'lr_at', interrupt_at_step_2)
    assert maskclip.main(RUN + ['--steps', '4', '--out', str(tmp_path)]) == 3
    monkeypatch.setattr(common, 'lr_at', lr_at)
    assert maskclip.main(RUN + ['--steps', '4', '--out', str(tmp_path)]) == 4
    drop = lambda r: {k: v for k, v in r.items() if k != 'samples_per_sec' and not k.startswith('step_seconds')}
    assert [drop(r) for r in read_log(tmp_path)] == [drop(r) for r in read_log(full_run)]
    a, b = (torch.load(os.path.join(d, 'ckpt.pt'), weights_only=True) for d in (full_run, tmp_path))
    for part in ('model', 'teacher'):
        assert all(torch.equal(v, b[part][k]) for k, v in a[part].items())
    assert torch.equal(a['center'], b['center']) and a['center'].abs().sum() > 0


def test_export_round_trip(full_run):
    exported, _, _ = open_clip.create_model_and_transforms(f'local-dir:{os.path.join(full_run, "open_clip")}')
    state = torch.load(os.path.join(full_run, 'ckpt.pt'), weights_only=True)['model']
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


@pytest.mark.parametrize('argv', [['--mask-ratio', '1'], ['--lambda-txt', '-1'], ['--mask-ratio', '0.99'],
                                  ['--target', 'l1']])
def test_bad_flags_exit_2(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        maskclip.main(argv + ['--out', str(tmp_path)])
    assert err.value.code == 2 and 'error' in capsys.readouterr().err
