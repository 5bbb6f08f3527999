"""Run as `python tests/accum_worker.py METHOD OUT ARGS...` (one process) or under torchrun: one optimizer step of
METHOD's main(ARGS); rank 0 saves the gradients of every parameter at its first optimizer step, and the logged loss,
to OUT. The gradient-equality tests of tests/test_accumulation.py compare such files."""
import importlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import data  # noqa: E402


def first_step_grads(module, argv):
    """module.main(argv), returning the gradients the first optimizer step saw (in param_groups order), and the log.
    The evaluation sets and the evaluation at the end are skipped: they are most of the run's time (a minute for uta's student and teacher on a
    loaded CPU) and not under test."""
    grads, real, evaluate, eval_sets = [], torch.optim.AdamW.step, common.evaluate, data.eval_sets

    def step(self, *args, **kwargs):
        if not grads:
            grads.extend(p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                         for g in self.param_groups for p in g['params'])
        return real(self, *args, **kwargs)
    torch.optim.AdamW.step = step
    common.evaluate, data.eval_sets = lambda *args, **kwargs: {}, lambda *args, **kwargs: ({}, None)
    try:
        module.main(argv)
    finally:
        torch.optim.AdamW.step, common.evaluate, data.eval_sets = real, evaluate, eval_sets
    out = argv[argv.index('--out') + 1]
    with open(os.path.join(out, 'log.jsonl')) as f:
        records = [json.loads(line) for line in f]
    return grads, [r['loss'] for r in records if 'loss' in r]


if __name__ == '__main__':
    method, path, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
    grads, losses = first_step_grads(importlib.import_module(method), argv)
    if int(os.environ.get('RANK', 0)) == 0:
        torch.save({'grads': grads, 'losses': losses}, path)
