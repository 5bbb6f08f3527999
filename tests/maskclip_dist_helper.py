"""Run by tests/test_maskclip.py as `python tests/maskclip_dist_helper.py OUT --batch-size 4 ...` (one process) and
under `torch.distributed.run --nproc_per_node 2` with a quarter of the batch and --accum-freq 2 (gloo, CPU):
maskclip.main itself, its loop, its losses (CLIP gather over micro-batches and ranks, distillation with the
all-reduced centre from every micro-batch, MLM over the global count), DDP and the EMA teacher.

Nothing is patched but the evaluation sets: masks are drawn for the whole global batch from (seed, step) and every
micro-batch of every rank takes its rows, so both runs mask every sample alike, and their logs and checkpoints must
agree."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import data  # noqa: E402
import maskclip  # noqa: E402

if __name__ == '__main__':
    data.eval_sets = lambda args, transform, size: data.synthetic_eval_sets(size, 0, transform, 24, 12)
    common.evaluate = lambda *args, **kwargs: {}  # not what this compares (tests/test_eval.py: 2 ranks = 1 there)
    out, argv = sys.argv[1], sys.argv[2:]
    step = maskclip.main(['--out', out, '--workers', '0', '--log-every', '1', '--time-steps', '0', *argv])
    assert step == 3, step
