"""flip.py end to end through main(argv): it learns, resumes exactly, stops cleanly, refuses bad input, exports."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import open_clip
import pytest
import torch

import common
import data
import flip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ['--steps', '8', '--batch-size', '16', '--workers', '0', '--log-every', '1', '--save-every', '4']


def run(out, *extra):
    return flip.main(BASE + ['--out', str(out)] + list(extra))


def records(out):
    with open(os.path.join(out, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


def losses(out):
    return [(r['step'], r['loss']) for r in records(out) if 'loss' in r]


def interrupt_at(monkeypatch, k):
    """SIGTERM arrives during step k: the loop must checkpoint at the end of step k and return."""
    calls, real = [0], common.clip_loss

    def loss(*args):
        calls[0] += 1
        if calls[0] == k:
            signal.raise_signal(signal.SIGTERM)
        return real(*args)
    monkeypatch.setattr(flip.common, 'clip_loss', loss)


def test_smoke_learns_evaluates_and_exports(tmp_path):
    out = tmp_path / 'run'
    # 16 training samples seen every step: the model must fit them (loss from ln 16 = 2.77 to well below)
    assert run(out, '--steps', '30', '--batch-size', '16', '--train-num-samples', '16', '--log-every', '1',
               '--save-every', '100') == 30
    ls = [loss for _, loss in losses(out)]
    assert ls[-1] < 1.5 and ls[0] > 2.5, ls
    final = records(out)[-1]  # learning is the loss above; here: every evaluation ran and was logged
    assert {f'zeroshot/{t}' for t in ('shape', 'colour', 'position', 'object', 'object_heldout')} <= set(final)
    assert final['retrieval/image_to_text_R@1'] <= final['retrieval/image_to_text_R@5']
    assert {'step', 'loss', 'lr', 'samples_per_sec', 'data_seconds', 'compute_seconds'} <= set(records(out)[0])
    assert json.load(open(out / 'args.json'))['mask_ratio'] == 0.5
    assert common.load_checkpoint(out / 'ckpt.pt')['step'] == 30

    # the export loads in open_clip and gives the training code's embeddings
    path = f'local-dir:{out / "open_clip"}'
    ref, _, preprocess = open_clip.create_model_and_transforms(path)
    ref.eval()
    ours = common.CLIP(common.model_config('tiny'))
    ours.load_state_dict(common.load_checkpoint(out / 'ckpt.pt')['model'])
    ours.eval()
    scenes = [data.SyntheticShapes(64, 0, 'eval-zeroshot')[i] for i in range(4)]
    images = torch.stack([preprocess(im) for im, _ in scenes])
    _, eval_tf = flip.transforms(flip.get_args([]), common.model_config('tiny'))
    assert torch.equal(images, torch.stack([eval_tf(im) for im, _ in scenes]))
    texts = open_clip.get_tokenizer(path)([c for _, c in scenes])
    assert torch.equal(texts, common.tokenizer_for(common.model_config('tiny'))([c for _, c in scenes]))
    with torch.no_grad():
        assert (ref.encode_image(images) - ours.encode_image(images)).abs().max() <= 1e-5
        assert (ref.encode_text(texts) - ours.encode_text(texts)).abs().max() <= 1e-5


@pytest.mark.parametrize('k, accum', [(3, '1'), (8, '1'), (5, '2')])
def test_exact_resume(tmp_path, monkeypatch, k, accum, capsys):
    """Interrupted at step k (8 = the switch to unmasked tuning), resumed: the same losses and weights, bit for bit;
    also with 2 micro-batches per step (4 in the tuning steps)."""
    tuning = ['--unmasked-tuning-steps', '4', '--accum-freq', accum]
    run(tmp_path / 'full', *tuning)
    interrupt_at(monkeypatch, k)
    assert run(tmp_path / 'part', *tuning) == k
    assert common.load_checkpoint(tmp_path / 'part' / 'ckpt.pt')['step'] == k
    monkeypatch.undo()
    capsys.readouterr()
    assert run(tmp_path / 'part', *tuning) == 12
    assert 'warning' not in capsys.readouterr().err  # the same flags: nothing to say
    assert losses(tmp_path / 'part') == losses(tmp_path / 'full')
    a = common.load_checkpoint(tmp_path / 'full' / 'ckpt.pt')
    b = common.load_checkpoint(tmp_path / 'part' / 'ckpt.pt')
    assert all(torch.equal(a['model'][n], b['model'][n]) for n in a['model'])
    assert [r['mask_ratio'] for r in records(tmp_path / 'full') if 'loss' in r] == [0.5] * 8 + [0.0] * 4


def test_unmasked_tuning_uses_fresh_optimizer_and_low_lr(tmp_path, monkeypatch):
    """What the optimizer itself holds at each step: a new AdamW with empty state at the switch, its lr warmed up
    to lr / 100, and the tuning steps cut into 2 micro-batches (r = 0.5: the same global batch, half at a time)."""
    seen, real = [], torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        seen.append((id(self), len(self.state), [g['lr'] for g in self.param_groups]))
        return real(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.AdamW, 'step', step)
    sizes, split = [], common.split_micro
    monkeypatch.setattr(common, 'split_micro', lambda micro, n: sizes.append(n) or split(micro, n))
    run(tmp_path, '--unmasked-tuning-steps', '5', '--unmasked-tuning-warmup', '2', '--lr', '1e-3')
    assert len(seen) == 13
    assert len({i for i, _, _ in seen[:8]}) == 1 and len({i for i, _, _ in seen[8:]}) == 1 and seen[8][0] != seen[0][0]
    assert seen[8][1] == 0 and seen[9][1] > 0 and seen[1][1] > 0  # fresh state at the switch, then kept
    tuning_lr = [lrs[0] for _, _, lrs in seen[8:]]
    assert tuning_lr[:2] == pytest.approx([0.5e-5, 1e-5]) and max(tuning_lr) == pytest.approx(1e-5)
    assert max(lrs[0] for _, _, lrs in seen[:8]) == pytest.approx(1e-3)
    assert sizes == [2] * 5


def test_unmasked_tuning_needs_no_more_activation_memory(tmp_path):
    """r = 0.5: a tuning micro-batch (half the batch, every patch) saves no more for backward than a masked step,
    measured as bench.py measures activation memory."""
    import bench
    model = common.CLIP(common.model_config('tiny'))
    images, texts = torch.randn(16, 3, 64, 64), torch.randint(1, 49407, (16, 32))
    ids_keep = flip.random_masking(16, model.visual.num_patches, 0.5, torch.Generator().manual_seed(0))

    def masked():
        common.clip_loss(*model(images, texts, ids_keep)).backward()

    def tuning():  # what accumulate() runs per micro-batch in its second pass
        common.clip_loss(*model(images[:8], texts[:8])).backward()
    args = flip.get_args(['--out', str(tmp_path)])
    assert args.unmasked_accum_freq == 2
    assert bench.saved_bytes(tuning, model) <= bench.saved_bytes(masked, model)


def test_pretrained_checkpoint_initialises_weights_with_a_fresh_optimizer(tmp_path):
    run(tmp_path / 'a', '--steps', '2')
    run(tmp_path / 'b', '--steps', '1', '--lr', '1e-30', '--wd', '0', '--pretrained', str(tmp_path / 'a' / 'ckpt.pt'))
    a, b = (common.load_checkpoint(tmp_path / n / 'ckpt.pt') for n in ('a', 'b'))
    assert all(torch.allclose(a['model'][n], b['model'][n], atol=1e-6) for n in a['model'])
    assert b['step'] == 1 and all(s['step'] == 1 for s in b['optimizer']['state'].values())


def test_second_signal_exits_at_once_while_waiting_for_data(tmp_path):
    """The loader blocks (an image that is a FIFO nobody writes): the first SIGINT cannot reach a step boundary, the
    second exits at once, writing nothing."""
    os.mkfifo(tmp_path / 'blocked.jpg')
    (tmp_path / 'train.csv').write_text('filepath\ttitle\nblocked.jpg\ta red circle\n')
    out = tmp_path / 'run'
    proc = subprocess.Popen([sys.executable, 'flip.py', '--train-data', str(tmp_path / 'train.csv'), '--steps', '5',
                             '--workers', '0', '--batch-size', '1', '--out', str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith('FLIP:')  # started: the loop now waits for its first batch
    time.sleep(1)
    proc.send_signal(signal.SIGINT)
    time.sleep(1)
    assert proc.poll() is None  # the first signal only asks for a stop at the step boundary
    t = time.time()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=20)
    assert time.time() - t < 10 and proc.returncode == 128 + signal.SIGINT
    assert 'second SIGINT' in proc.stderr.read() and not os.path.exists(out / 'ckpt.pt')


def test_pretrained_sources_load_strictly(tmp_path):
    cfg = common.model_config('tiny')
    torch.manual_seed(1)
    source = common.CLIP(cfg)
    common.export_open_clip(source, cfg, str(tmp_path / 'oc'))
    for spec in (f'local-dir:{tmp_path / "oc"}', str(tmp_path / 'wrapped.pt')):
        torch.save({'model': {**{f'clip.{k}': v for k, v in source.state_dict().items()}, 'head.weight': torch.ones(3)}},
                   tmp_path / 'wrapped.pt')
        model = common.CLIP(cfg)
        common.load_pretrained(model, spec, 'tiny')
        assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items()), spec
    with pytest.raises(ValueError, match='not a pretrained tag'):
        common.load_pretrained(common.CLIP(cfg), 'no-such-tag', 'ViT-B-16')
    with pytest.raises(ValueError, match='does not fit'):
        common.load_pretrained(common.CLIP(common.model_config('ViT-S-16')), f'local-dir:{tmp_path / "oc"}', 'ViT-S-16')


def test_bf16_auto_only_where_the_gpu_supports_it(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *a, **k: False)
    ctx = common.autocast(torch.device('cuda'), 'auto')
    assert not isinstance(ctx, torch.autocast) and 'fp32' in capsys.readouterr().out
    assert isinstance(common.autocast(torch.device('cpu'), 'bf16'), torch.autocast)
    assert not isinstance(common.autocast(torch.device('cpu'), 'auto'), torch.autocast)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    calls, real = [0], common.clip_loss

    def loss(*args):
        calls[0] += 1
        return real(*args) * (float('nan') if calls[0] == 6 else 1.0)
    monkeypatch.setattr(flip.common, 'clip_loss', loss)
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, '--save-every', '2')
    assert exit_info.value.code == 1
    assert 'non-finite loss at step 6' in capsys.readouterr().err
    state = common.load_checkpoint(tmp_path / 'ckpt.pt')
    assert state['step'] == 4 and all(torch.isfinite(v).all() for v in state['model'].values())


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / 'ckpt.pt')
    common.save_checkpoint(path, {'step': 1, 'w': torch.ones(3)})

    def killed_mid_write(obj, f):
        f.write(b'half a checkpoint')
        raise KeyboardInterrupt
    monkeypatch.setattr(common.torch, 'save', killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        common.save_checkpoint(path, {'step': 2, 'w': torch.zeros(3)})
    assert common.load_checkpoint(path)['step'] == 1


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path):
    out = tmp_path / 'run'
    cmd = [sys.executable, 'flip.py', '--steps', '100000', '--batch-size', '8', '--workers', '0', '--log-every', '1',
           '--save-every', '100000', '--out', str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    while time.time() < deadline and not (os.path.exists(out / 'log.jsonl') and len(records(out)) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-2000:]
    state = common.load_checkpoint(out / 'ckpt.pt')
    assert 2 <= state['step'] < 100000 and state['step'] >= records(out)[-1]['step']


def test_bad_path_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, 'flip.py', '--train-data', str(tmp_path / 'missing.csv'), '--out',
                           str(tmp_path / 'o')], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error:') and 'missing.csv' in lines[0], proc.stderr


@pytest.mark.parametrize('argv, message', [
    (['--model', 'RN50'], 'RN50'),
    (['--mask-ratio', '1.5'], '--mask-ratio'),
    (['--resume', '/no/such/ckpt.pt'], '--resume'),
    (['--train-data', 'shards.json'], 'cannot tell'),
    (['--dataset-type', 'webdataset'], 'needs --train-data'),
    (['--batch-size', '0'], '--batch-size'),
    (['--accum-freq', '0'], '--accum-freq'),
    (['--accum-freq', '-2'], '--accum-freq'),
    (['--accum-freq', '2', '--unmasked-accum-freq', '3'], '--unmasked-accum-freq'),
    (['--grad-clip-norm', '0'], '--grad-clip-norm'),
    (['--pretrained', 'no-such-tag'], '--pretrained'),
    (['--pretrained', 'local-dir:/no/such/dir'], '--pretrained'),
    (['--synthetic-group-size', '8'], '--synthetic-group-size'),
    (['--synthetic-group-size', '0'], '--synthetic-group-size'),
])
def test_bad_input_exits_2(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        flip.main(argv + ['--out', str(tmp_path), '--workers', '0'])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith('error:') and message in err[0]


def test_corrupt_checkpoint_is_refused(tmp_path, capsys):
    (tmp_path / 'ckpt.pt').write_bytes(b'garbage')
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path)
    assert exit_info.value.code == 2 and 'cannot resume' in capsys.readouterr().err


def test_checkpoint_of_another_model_config_is_refused(tmp_path, capsys):
    """Same parameter shapes (CLS vs mean pooling), so only the saved config can tell: resume must refuse it."""
    run(tmp_path, '--steps', '1')
    state = common.load_checkpoint(tmp_path / 'ckpt.pt', common.model_config('tiny'))  # its own config loads
    state['cfg']['vision_cfg']['pool_type'] = 'avg'
    common.save_checkpoint(tmp_path / 'ckpt.pt', state)
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, '--steps', '2')
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and 'cannot resume' in err[-1] and 'vision_cfg.pool_type' in err[-1]


def test_checkpoint_past_the_run_or_with_another_optimizer_is_refused(tmp_path, capsys):
    run(tmp_path, '--steps', '2')
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, '--steps', '1')  # nothing would train or be evaluated
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err[-1] == (f"error: cannot resume from {tmp_path / 'ckpt.pt'}: it is at "
                                                     "step 2, past this run's 1; give more --steps or another --out")
    state = common.load_checkpoint(tmp_path / 'ckpt.pt')
    state['optimizer']['param_groups'][0]['params'].pop()  # an optimizer over other parameters
    common.save_checkpoint(tmp_path / 'ckpt.pt', state)
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, '--steps', '3')
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and 'its optimizer does not fit this run' in err[-1]


def test_resume_with_other_flags_names_them(tmp_path, capsys):
    run(tmp_path, '--steps', '2')
    capsys.readouterr()
    run(tmp_path, '--steps', '3', '--mask-ratio', '0.25')  # a longer run, another ratio: it fits, so it goes on
    err = capsys.readouterr().err
    assert f"warning: {tmp_path / 'ckpt.pt'} was saved by a run with other flags (" in err
    assert '--steps: 2 then, 3 now' in err and '--mask-ratio: 0.5 then, 0.25 now' in err and '--out' not in err
    assert [s for s, _ in losses(tmp_path)] == [1, 2, 3]


def test_compile_on_matches_eager(tmp_path):
    """The one torch.compile run of the suite (~40 s of start-up on a CPU)."""
    run(tmp_path / 'eager', '--steps', '2', '--compile', 'off')
    run(tmp_path / 'compiled', '--steps', '2', '--compile', 'on')
    eager, compiled = losses(tmp_path / 'eager'), losses(tmp_path / 'compiled')
    assert np.allclose([l for _, l in eager], [l for _, l in compiled], atol=1e-4)


def test_zeroshot_templates_flip_are_the_official_seven(tmp_path):
    for name in ('a', 'b'):
        os.makedirs(tmp_path / 'folder' / name)
        data.render_scene([], 64, __import__('random').Random(0)).save(tmp_path / 'folder' / name / '0.png')
    _, eval_tf = flip.transforms(flip.get_args([]), common.model_config('tiny'))
    for flag, count, first in (('flip', 7, 'itap of a x.'), ('openai', 80, 'a bad photo of a x.')):
        args = flip.get_args(['--zeroshot-folder', str(tmp_path / 'folder'), '--zeroshot-templates', flag,
                              '--out', str(tmp_path)])
        templates = data.eval_sets(args, eval_tf, 64)[0]['folder']['templates']
        assert len(templates) == count and templates[0]('x') == first
