"""bench.py at toy sizes: the speed table's numbers are consistent, the quality runs link UTA to its teacher."""
import json

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
    for row in rows.values():
        assert row['seconds'] > 0 and 0 < row['of_matmul'] and row['flops'] > 0
    assert set(result['vision_tower']) == {'common.py', 'open_clip'}
    assert (tmp_path / 'speed-tiny-cpu.md').read_text().count('\n| ') == len(rows) + 1  # header + one row each


def test_quality_runs_and_reuses(tmp_path, capsys):
    argv = ['quality', '--steps', '2', '--batch-size', '8', '--seeds', '0', '--eval-every', '1', '--no-plot',
            '--methods', 'clip', 'flip50', 'uta', '--runs', str(tmp_path / 'runs'), '--out', str(tmp_path)]
    bench.main(argv)
    result = json.load(open(tmp_path / 'quality.json'))
    assert set(result['summary']) == {'clip', 'flip50', 'uta'}
    for run in result['runs'].values():
        assert [e['step'] for e in run['evals']] == [1, 2]  # every --eval-every steps, and the final one
        assert run['train_seconds'] > 0 and run['wall_seconds'] > run['train_seconds']
    uta = json.load(open(tmp_path / 'runs' / 'uta-s0' / 'args.json'))
    assert uta['teacher'] == f"local-dir:{tmp_path / 'runs'}/flip50-s0/open_clip"
    report = (tmp_path / 'quality.md').read_text()
    assert 'UTA: the student' in report and 'FLIP: masking 50%' in report
    capsys.readouterr()
    bench.main(argv)  # finished runs are read back, not trained again
    assert capsys.readouterr().out.count('done already') == 3


@pytest.mark.parametrize('argv, message', [
    (['speed', '--methods', 'nope'], 'unknown method'),
    (['quality', '--methods', 'uta'], 'add flip50'),
    (['speed', '--model', 'RN50'], 'RN50'),
])
def test_bad_input_exits_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and message in err[0]
