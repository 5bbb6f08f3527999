"""Two gloo processes give the loss and gradients of one process on the same global batch."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', '29517']


def sh(cmd):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_ddp_gradients_equal_single_process(tmp_path):
    sh([sys.executable, 'tests/dist_worker.py', str(tmp_path / 'one.pt')])
    sh(TORCHRUN + ['tests/dist_worker.py', str(tmp_path / 'two.pt')])
    one, two = torch.load(tmp_path / 'one.pt'), torch.load(tmp_path / 'two.pt')
    assert torch.allclose(one['loss'], two['loss'], atol=1e-6)
    for name, grad in one['grads'].items():
        assert torch.allclose(grad, two['grads'][name], atol=1e-6, rtol=1e-4), name


def test_two_process_run_matches_one_process_run(tmp_path):
    """flip.py itself: 2 x 4 samples per step under torchrun == 1 x 8 samples, step after step (mask ratio 0, so
    no masks enter)."""
    args = ['--steps', '3', '--workers', '0', '--log-every', '1', '--mask-ratio', '0']
    sh([sys.executable, 'flip.py', '--batch-size', '8', '--out', str(tmp_path / 'one')] + args)
    sh(TORCHRUN + ['flip.py', '--batch-size', '4', '--out', str(tmp_path / 'two')] + args)
    read = lambda d: [json.loads(l)['loss'] for l in open(tmp_path / d / 'log.jsonl') if '"loss"' in l]
    assert read('one') == pytest.approx(read('two'), rel=1e-5)  # fp32 reduction order, amplified by Adam's first steps
    assert len(read('one')) == 3
