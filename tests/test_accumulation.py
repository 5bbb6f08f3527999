"""Big batches, exactly: for every method, --accum-freq K x --batch-size b gives the gradients (every parameter, the
logit scale and temperatures included) and the loss of one batch of K x b; 2 processes x K = 2 equal 1 process x K = 4;
--grad-checkpointing changes no gradient. All in fp32 on the CPU, from the same initialisation."""
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch

import common
from accum_worker import first_step_grads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', '29523']

UTA_TEACHER = os.path.join(tempfile.mkdtemp(prefix='uta-teacher-'), 'open_clip')  # written by the uta_teacher fixture

# method: flags that make one step small and exact (A-CLIP: BatchNorm sees micro-batch statistics; see its docstring)
METHODS = {
    'flip': [],
    'uta': ['--teacher', f'local-dir:{UTA_TEACHER}', '--unmasked-fraction', '0'],  # a block-masked alignment step
    'uta-contrastive': ['--teacher', f'local-dir:{UTA_TEACHER}', '--steps', '0', '--contrastive-steps', '1'],
    'uniclip': [],  # no BatchNorm, no random draw in the step: exact as it is
    'attentive_mask_clip': ['--head-bn', 'eval', '--time-steps', '0'],  # BN on running statistics; no step timer
    'maskclip': ['--precision', 'fp32', '--time-steps', '0', '--prototypes', '64'],
}
BASE = ['--steps', '1', '--workers', '0', '--log-every', '1', '--warmup', '1', '--lr', '1e-3']
MODULE = {'uta-contrastive': 'uta'}  # the entries that are another stage of a method: that method's file


@pytest.fixture(scope='module', autouse=True)
def uta_teacher():
    """uta's frozen teacher: a random tiny CLIP exported as a local-dir: folder, removed afterwards."""
    torch.manual_seed(0)
    cfg = common.model_config('tiny')
    common.export_open_clip(common.CLIP(cfg), cfg, UTA_TEACHER)
    yield
    shutil.rmtree(os.path.dirname(UTA_TEACHER))


def run(method, out, *extra):
    import importlib
    return first_step_grads(importlib.import_module(MODULE.get(method, method)),
                            BASE + METHODS[method] + ['--out', str(out)] + list(extra))


def assert_same(a, b, tol):
    """Per parameter: |a - b| <= tol |b| (as norms); the loss to the same relative tolerance."""
    (ga, la), (gb, lb) = a, b
    assert len(ga) == len(gb)
    for i, (x, y) in enumerate(zip(ga, gb)):
        err = (x - y).norm().item()
        assert err <= tol * max(y.norm().item(), 1e-12), (i, tuple(y.shape), err, y.norm().item())
    assert la == pytest.approx(lb, rel=tol)


@pytest.mark.parametrize('method', list(METHODS))
def test_accumulated_gradients_equal_one_big_batch(tmp_path, method):
    big = run(method, tmp_path / 'big', '--batch-size', '16')
    accumulated = run(method, tmp_path / 'acc', '--batch-size', '4', '--accum-freq', '4')
    assert any(g.abs().sum() > 0 for g in big[0])
    assert_same(accumulated, big, 1e-5)


@pytest.mark.parametrize('method', list(METHODS))
def test_grad_checkpointing_changes_no_gradient(tmp_path, method):
    plain = run(method, tmp_path / 'plain', '--batch-size', '8', '--accum-freq', '2')
    checkpointed = run(method, tmp_path / 'ckpt', '--batch-size', '8', '--accum-freq', '2', '--grad-checkpointing')
    assert_same(checkpointed, plain, 1e-6)


@pytest.mark.parametrize('method', list(METHODS))
def test_two_processes_accumulating_equal_one(tmp_path, method):
    argv = BASE + METHODS[method] + ['--batch-size', '4']
    env = dict(os.environ, OMP_NUM_THREADS='1')
    for name, cmd in (('one', [sys.executable]), ('two', TORCHRUN)):
        k = '4' if name == 'one' else '2'
        worker = ['tests/accum_worker.py', MODULE.get(method, method), str(tmp_path / f'{name}.pt')]
        proc = subprocess.run(cmd + worker + argv + ['--accum-freq', k, '--out', str(tmp_path / name)],
                              cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (torch.load(tmp_path / f'{n}.pt') for n in ('one', 'two'))
    assert_same((two['grads'], two['losses']), (one['grads'], one['losses']), 1e-5)
