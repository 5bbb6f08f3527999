"""bench.py at toy sizes: the speed table's numbers are consistent, the quality runs link UTA to its teacher."""
import json
import platform

import pytest

import bench


def test_speed_table(tmp_path):
    bench.main(['speed', '--batch-size', '4', '--rounds', '1', '--warmup', '0', '--out', str(tmp_path)])
    result = json.load(open(tmp_path / 'speed-tiny-cpu.json'))
    rows = result['methods']
    assert list(rows) == list(bench.STEPS)
    assert rows['clip']['ratio'] == 1.0 and rows['clip']['flop_ratio'] == 1.0
    # FLIP drops 50% / 75% of the 64 patches: fewer FLOPs and less saved for backward; the text tower is unchanged,
    # so the FLOP ratio stays above the patch fraction
    assert 0.5 < rows['flip50']['flop_ratio'] < 1 and 0.25 < rows['flip75']['flop_ratio'] < rows['flip50']['flop_ratio']
    assert rows['flip75']['saved_MiB'] < rows['flip50']['saved_MiB'] < rows['clip']['saved_MiB']
    # two online views plus an EMA pass (A-CLIP), a second image pass plus decoders (MaskCLIP), two full views
    # (UniCLIP): each costs more FLOPs than CLIP
    for name in ('aclip', 'maskclip', 'uniclip'):
        assert rows[name]['flop_ratio'] > 1, name
    # MaskCLIP's variants: a second (bidirectional) text pass costs more, dropping the full-image pass less
    less, more = rows['maskclip-masked-view'], rows['maskclip-bidirectional-text']
    assert less['flops'] < rows['maskclip']['flops'] < more['flops']
    assert less['saved_MiB'] < rows['maskclip']['saved_MiB'] < more['saved_MiB']
    for row in rows.values():
        assert row['seconds'] > 0 and 0 < row['of_matmul'] and row['flops'] > 0
    assert set(result['vision_tower']) == {'common.py', 'open_clip'}
    report = (tmp_path / 'speed-tiny-cpu.md').read_text()
    assert report.count('\n| ') == len(rows) + 1  # header + one row each
    # glibc keeps freed memory for reuse while timing, as CUDA's caching allocator does, and the table says so
    glibc = platform.system() == 'Linux' and platform.libc_ver()[0] == 'glibc'
    assert result['args']['malloc'] == ('kept' if glibc else 'unchanged')
    assert ('freed memory kept for reuse' in report) == glibc


def test_quality_runs_and_reuses(tmp_path, capsys):
    argv = ['quality', '--steps', '2', '--batch-size', '8', '--seeds', '0', '--eval-every', '1', '--no-plot',
            '--methods', 'uta', 'flip50-equal-time', 'flip50', 'clip', '--runs', str(tmp_path / 'runs'),
            '--out', str(tmp_path)]
    bench.main(argv)  # given out of order: runs in table order, teachers and timings first
    result = json.load(open(tmp_path / 'quality.json'))
    assert list(result['summary']) == ['clip', 'flip50', 'flip50-equal-time', 'uta']
    runs = result['runs']
    for name in ('clip-s0', 'flip50-s0', 'uta-s0'):
        assert [e['step'] for e in runs[name]['evals']] == [1, 2]  # every --eval-every steps, and the final one
        assert runs[name]['train_seconds'] > 0 and runs[name]['wall_seconds'] > runs[name]['train_seconds']
    # equal time: FLIP gets the steps that fit in CLIP's training seconds at FLIP's own step time
    equal = runs['flip50-equal-time-s0']
    assert equal['steps'] == round(runs['clip-s0']['train_seconds'] / runs['flip50-s0']['step_seconds']) >= 1
    assert json.load(open(tmp_path / 'runs' / 'flip50-equal-time-s0' / 'args.json'))['steps'] == equal['steps']
    uta = json.load(open(tmp_path / 'runs' / 'uta-s0' / 'args.json'))
    assert uta['teacher'] == f"local-dir:{tmp_path / 'runs'}/flip50-s0/open_clip"
    report = (tmp_path / 'quality.md').read_text()
    assert 'UTA: the student' in report and 'FLIP: masking 50%' in report
    # FLIP at equal training time on the curve: CLIP's evaluation nearest FLIP's last step x its step-time ratio,
    # here the runs' own; with --speed, a speed table's (fabricated here: FLIP50 at half of CLIP's step time)
    ratio = runs['flip50-s0']['step_seconds'] / runs['clip-s0']['step_seconds']
    row, steps = result['equal_time']['clip-at-flip50-time']
    assert steps == {'0': min((1, 2), key=lambda s: abs(s - 2 * ratio))}
    speed = tmp_path / 'speed.json'
    speed.write_text(json.dumps({'args': {'model': 'tiny', 'batch_size': 4}, 'machine': 'a test',
                                 'methods': {'clip': {'ratio': 1.0}, 'flip50': {'ratio': 0.5}, 'flip75': {'ratio': 0.4}}}))
    capsys.readouterr()
    bench.main(['quality', '--report-only', '--speed', str(speed), '--methods', 'clip', 'flip50', 'flip75',
                *argv[argv.index('--steps'):argv.index('--methods')], '--runs', str(tmp_path / 'runs'),
                '--out', str(tmp_path / 'report')])  # trains nothing: flip75 has no run and is left out
    assert 'flip75 seed 0: not finished' in capsys.readouterr().err
    result = json.load(open(tmp_path / 'report' / 'quality.json'))
    assert list(result['summary']) == ['clip', 'flip50']
    row, steps = result['equal_time']['clip-at-flip50-time']
    assert steps == {'0': 1} and row['per_seed']['0'] == bench.final(runs['clip-s0']['evals'][0])
    report = (tmp_path / 'report' / 'quality.md').read_text()
    assert 'equal training time, on the curve' in report and '(CLIP at step 1)' in report and 'a test' in report
    capsys.readouterr()
    bench.main(argv)  # finished runs are read back, not trained again
    assert capsys.readouterr().out.count('done already') == 4
    # ... but only those made with the flags the command gives now, defaults the run fills in itself included (--lr),
    # finished or not: a stopped run would otherwise be resumed under other flags
    runs = tmp_path / 'runs'

    def refused(run, change, message):
        path = runs / run / 'args.json'
        saved = path.read_text()
        path.write_text(json.dumps({**json.loads(saved), **change}))
        with pytest.raises(SystemExit) as exit_info:
            bench.main(argv)
        path.write_text(saved)
        assert exit_info.value.code == 2
        assert f'{run} holds a run made with other flags ({message})' in capsys.readouterr().err
    refused('clip-s0', {'lr': 0.5}, '--lr: 0.5 then, 0.001 now')
    (runs / 'flip50-s0' / 'open_clip' / 'open_clip_config.json').unlink()  # as if stopped before the end
    refused('flip50-s0', {'mask_ratio': 0.75}, '--mask-ratio: 0.75 then, 0.5 now')


def test_quality_stops_on_a_run_that_stopped_early(tmp_path, monkeypatch, capsys):
    """A script stopped by SIGTERM checkpoints and exits 0: bench must not read its partial log as a finished run."""
    monkeypatch.setattr(bench.subprocess, 'run', lambda cmd, **kw: bench.subprocess.CompletedProcess(cmd, 0, '', ''))
    with pytest.raises(SystemExit) as exit_info:
        bench.main(['quality', '--steps', '2', '--batch-size', '8', '--seeds', '0', '--methods', 'clip', '--no-plot',
                    '--runs', str(tmp_path / 'runs'), '--out', str(tmp_path)])
    assert exit_info.value.code == 1
    assert 'clip seed 0 stopped before its last step' in capsys.readouterr().err
    assert not (tmp_path / 'quality.json').exists()


@pytest.mark.parametrize('argv, message', [
    (['speed', '--methods', 'nope'], 'unknown method'),
    (['quality', '--methods', 'uta'], 'add flip50'),
    (['quality', '--methods', 'flip50-equal-time'], 'add both'),
    (['quality', '--speed', 'no-such-file.json'], 'not a bench.py speed table'),
    (['speed', '--model', 'RN50'], 'RN50'),
])
def test_bad_input_exits_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and message in err[0]


def row(per_seed):
    """A summary row as bench.summarise makes it, every measure at the given per-seed values."""
    values = {s: {t: v for t in bench.MEASURES} for s, v in per_seed.items()}
    row = {'per_seed': values, 'seeds': len(values)}
    for t in bench.MEASURES:
        vals = list(per_seed.values())
        row[t] = (sum(vals) / len(vals), (max(vals) - min(vals)) / 2)
    return row


def test_verdicts():
    """The claim table's rule: paired by seed; 'beats' needs two measures ahead beyond the smallest detectable
    difference and none behind."""
    high, low = row({0: 0.30, 1: 0.31, 2: 0.29}), row({0: 0.20, 1: 0.21, 2: 0.19})
    assert bench.verdict(high, low, 'beats') == 'reproduced'
    assert bench.verdict(low, high, 'beats') == 'not reproduced'
    mixed = dict(high, per_seed={s: dict(v, **{bench.MEASURES[0]: 0.10}) for s, v in high['per_seed'].items()},
                 **{bench.MEASURES[0]: (0.10, 0.0)})
    assert bench.verdict(mixed, low, 'beats') == 'not reproduced'  # three ahead, but one behind
    assert bench.verdict(high, high, 'beats') == 'not reproduced: within noise'
    assert bench.verdict(high, high, 'matches') == 'reproduced' and bench.verdict(low, high, 'matches') == 'not reproduced'
    # the student / teacher ratio is over the seeds both have: a student of seed 0 only is read against teacher 0
    teacher, student = row({0: 0.40, 1: 0.30, 2: 0.30}), row({0: 0.32})
    assert bench.verdict(student, teacher, 'teacher') == 'not reproduced (student / teacher 0.80)'
    task = 'zeroshot/object'
    # paired: a 3-point gap that every seed shows is detected although each side's seed spread (3 points) is as large
    a, b = row({0: 0.23, 1: 0.26, 2: 0.29}), row({0: 0.20, 1: 0.23, 2: 0.26})
    diff, detectable = bench.paired(a, b, task)
    # no seed noise left: what is detectable is the evaluation set's 2 standard errors (binomial, 3000 images)
    assert diff == pytest.approx(0.03) and detectable == pytest.approx(2 * ((0.26 * 0.74 + 0.23 * 0.77) / 3000) ** 0.5)
    assert bench.sign(a, b, task) == '↑'
    # the same means, seeds disagreeing on the sign: t(95%, 2 dof) x their standard error swamps the gap
    c = row({0: 0.16, 1: 0.27, 2: 0.26})
    diff, detectable = bench.paired(a, c, task)
    assert diff == pytest.approx(0.03) and detectable > 0.10 and bench.sign(a, c, task) == '≈'
    assert bench.sign(row({0: 0.205, 1: 0.205}), row({0: 0.20, 1: 0.20}), task) == '≈'  # inside the set's sampling error
    assert bench.verdict(row({0: 0.3}), low, 'beats').startswith('n/a')  # one common seed: no noise estimate
    teacher = {'zeroshot/object': (0.20, 0.0)}
    assert bench.verdict({'zeroshot/object': (0.19, 0.0)}, teacher, 'teacher').startswith('reproduced')
    assert bench.verdict({'zeroshot/object': (0.15, 0.0)}, teacher, 'teacher').startswith('not reproduced')


def test_attention_flops_are_counted_on_cpu():
    """torch's counter knows the CUDA attention kernels only; the bench adds the CPU one: 2 matmuls of b*h*s*s*d
    multiply-adds forward, 2.5x that backward (torch's own formulas)."""
    import torch
    import torch.nn.functional as F
    b, h, s, d = 2, 4, 16, 32
    q, k, v = (torch.randn(b, h, s, d, requires_grad=True) for _ in range(3))
    assert bench.count_flops(lambda: F.scaled_dot_product_attention(q, k, v)) == 4 * b * h * s * s * d
    assert bench.count_flops(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward()) == 14 * b * h * s * s * d


def test_accum_mode_times_the_real_loops_and_shows_openclip_inexact(tmp_path):
    """bench.py accum: per-sample ratios for K = 2 against 1, checkpointing memory below 1x, and OpenCLIP's
    accumulation (restated) against one big batch: its logit scale gets K times the gradient, its towers' gradients
    are off (patch dropout draws new masks on the re-forward); ours matches."""
    bench.main(['accum', '--model', 'tiny', '--batch-size', '4', '--methods', 'clip', '--accum-freqs', '1', '2',
                '--rounds', '1', '--accum-steps', '1', '--out', str(tmp_path)])
    result = json.load(open(tmp_path / 'accum-tiny-cpu.json'))
    row, oc = result['methods']['clip'], result['open_clip']
    assert row['accum_2_ratio'] > 0 and 0 < row['ckpt_memory_ratio'] < 0.5
    assert oc['openclip_logit_scale_ratio'] == pytest.approx(2.0, rel=0.1)  # ~K: the re-forward's masks differ
    assert oc['openclip_tower_rel_err'] > 1e-2 and oc['ours_tower_rel_err'] < 1e-5
    assert oc['ours_logit_scale_rel_err'] < 1e-5


def test_gpu_check_runs_on_cpu_at_tiny(tmp_path):
    bench.main(['gpu', '--model', 'tiny', '--batch-size', '4', '--methods', 'clip', '--gpu-steps', '3',
                '--gpu-warmup', '1', '--out', str(tmp_path)])
    result = json.load(open(tmp_path / 'gpu-tiny-cpu.json'))
    assert list(result['runs']) == ['clip compile off'] and result['failures'] == []
    assert result['runs']['clip compile off']['step_s'] > 0
