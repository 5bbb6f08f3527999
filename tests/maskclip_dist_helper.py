"""Run by tests/test_maskclip.py as `python tests/maskclip_dist_helper.py OUT --batch-size 4 ...` (one process) and
under `torch.distributed.run --nproc_per_node 2` with half the batch (gloo, CPU): maskclip.main itself, its loop, its
losses (CLIP gather, distillation with the all-reduced centre, MLM over the global count), DDP and the EMA teacher.

Masks are drawn per rank (seed + rank), so here every rank draws the masks of the whole global batch from rank 0's
stream and keeps its own rows (rank r holds global rows r*B .. r*B + B - 1, as data.StepSampler gives them): both runs
then mask every sample alike, and their logs and checkpoints must agree."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import data  # noqa: E402
import maskclip  # noqa: E402

step_generator, patch_masking, text_masking = common.step_generator, maskclip.patch_masking, maskclip.text_masking


def rows(b):
    return slice(common.rank() * b, (common.rank() + 1) * b)


def global_patch_masking(batch, grid, mask_ratio, generator, block=False):
    ids_keep, ids_mask = patch_masking(batch * common.world_size(), grid, mask_ratio, generator, block)
    return ids_keep[rows(batch)], ids_mask[rows(batch)]


def global_text_masking(texts, mask_ratio, generator):
    # this rank's captions at their global rows; each row's masks depend on its own caption and noise row only
    out = text_masking(texts.repeat(common.world_size(), 1), mask_ratio, generator)
    return tuple(x[rows(len(texts))] for x in out)


if __name__ == '__main__':
    common.step_generator = lambda device, seed, rank, step: step_generator(device, seed, 0, step)
    maskclip.patch_masking, maskclip.text_masking = global_patch_masking, global_text_masking
    data.eval_sets = lambda args, transform, size: data.synthetic_eval_sets(size, 0, transform, 24, 12)
    common.evaluate = lambda *args, **kwargs: {}  # not what this compares (tests/test_eval.py: 2 ranks = 1 there)
    out, argv = sys.argv[1], sys.argv[2:]
    step = maskclip.main(['--out', out, '--workers', '0', '--log-every', '1', '--time-steps', '0', *argv])
    assert step == 3, step
