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
    final = records(out)[-1]
    for task in ('shape', 'colour', 'position', 'object', 'object_heldout'):
        assert 0 <= final[f'zeroshot/{task}'] <= 1
    assert 0 <= final['retrieval/image_to_text_R@1'] <= final['retrieval/image_to_text_R@5'] <= 1
    assert {'step', 'loss', 'lr', 'samples_per_sec'} <= set(records(out)[0])
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


@pytest.mark.parametrize('k', [3, 8])
def test_exact_resume(tmp_path, monkeypatch, k, capsys):
    """Interrupted at step k (8 = the switch to unmasked tuning), resumed: the same losses and weights, bit for bit."""
    tuning = ['--unmasked-tuning-steps', '4']
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
    made = []
    real = torch.optim.AdamW

    def adamw(*args, **kwargs):
        made.append(kwargs['lr'])
        return real(*args, **kwargs)
    monkeypatch.setattr(flip.torch.optim, 'AdamW', adamw)
    run(tmp_path, '--unmasked-tuning-steps', '4', '--lr', '1e-3')
    assert len(made) == 2  # a second, fresh optimizer for the tuning phase
    lrs = [r['lr'] for r in records(tmp_path) if 'loss' in r]
    assert max(lrs[8:]) == pytest.approx(1e-5) and max(lrs[:8]) == pytest.approx(1e-3)


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
    state['cfg']['vision_cfg']['pool_type'] = 'tok'
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
