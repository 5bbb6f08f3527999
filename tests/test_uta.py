"""uta.py: the frozen teacher, the alignment loss and its positions, reversed block masking, zero-shot through the
teacher's text tower, a smoke run from a tiny teacher made by flip.py, exact resume, and the open_clip export."""
import copy
import json
import os
import signal

import open_clip
import pytest
import torch

import common
import data
import flip
import uta

BASE = ['--batch-size', '8', '--workers', '0', '--log-every', '1']


@pytest.fixture(autouse=True)
def small_eval_sets(monkeypatch):
    """Smaller held-out sets than the default 1200 + 500 images: these tests check plumbing, not accuracy."""
    real = data.synthetic_eval_sets
    monkeypatch.setattr(data, 'synthetic_eval_sets', lambda size, seed, tf: real(size, seed, tf, 48, 24))


@pytest.fixture(scope='module')
def teacher_dir(tmp_path_factory):
    """A tiny CLIP teacher exported by a short flip.py run."""
    out = tmp_path_factory.mktemp('flip')
    with pytest.MonkeyPatch.context() as mp:
        real = data.synthetic_eval_sets
        mp.setattr(data, 'synthetic_eval_sets', lambda size, seed, tf: real(size, seed, tf, 16, 8))
        mp.setattr(common, 'evaluate', lambda *args: {})  # the teacher's accuracy does not matter here
        flip.main(['--steps', '2', '--save-every', '100', '--out', str(out)] + BASE)
    return out / 'open_clip'


def records(out):
    with open(os.path.join(out, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


def losses(out):
    return [(r['step'], r['loss']) for r in records(out) if 'loss' in r]


def tiny_clip(seed=0):
    """The tiny CLIP with CLS pooling, so a copy of the teacher is a student (whose aligned token is CLS)."""
    torch.manual_seed(seed)
    cfg = common.model_config('tiny')
    cfg['vision_cfg']['pool_type'] = 'tok'
    return common.CLIP(cfg).eval()


def adjacent_pairs(ids_keep, grid):
    """Kept 4-neighbour pairs per sample: high for blocks, low for scattered patches."""
    H, W = grid
    kept = torch.zeros(ids_keep.shape[0], H * W, dtype=torch.bool).scatter_(1, ids_keep, True).view(-1, H, W)
    return ((kept[:, 1:] & kept[:, :-1]).sum((1, 2)) + (kept[:, :, 1:] & kept[:, :, :-1]).sum((1, 2))).float()


# ----------------------------------------------------------------------------- method pieces


@pytest.mark.parametrize('grid, ratio', [((8, 8), 0.5), ((14, 14), 0.5), ((14, 14), 0.75), ((7, 9), 0.3)])
def test_block_mask_keeps_exactly_k_and_forms_blocks(grid, ratio):
    L = grid[0] * grid[1]
    K = int(L * (1 - ratio))
    ids = uta.block_masking(256, grid, ratio, torch.Generator().manual_seed(0))
    assert ids.shape == (256, K)
    assert all(len(set(row.tolist())) == K for row in ids) and ids.min() >= 0 and ids.max() < L
    assert torch.equal(ids, uta.block_masking(256, grid, ratio, torch.Generator().manual_seed(0)))  # a pure function
    rand = uta.random_masking(256, L, ratio, torch.Generator().manual_seed(0))
    block_pairs, rand_pairs = adjacent_pairs(ids, grid).mean(), adjacent_pairs(rand, grid).mean()
    assert block_pairs > 1.3 * rand_pairs, (block_pairs, rand_pairs)  # kept patches touch each other: blocks


def test_block_mask_inside_one_block():
    """When the first block alone has more than K patches, the visible set is K patches of that one rectangle."""
    ids = uta.block_masking(1000, (14, 14), 0.92, torch.Generator().manual_seed(1), min_block=32)  # blocks of ~32
    assert ids.shape == (1000, 15)
    rows, cols = ids // 14, ids % 14
    box = (rows.amax(1) - rows.amin(1) + 1) * (cols.amax(1) - cols.amin(1) + 1)  # bounding-box area
    assert box.max() <= 36  # the largest rectangle of area ~32 the aspect-ratio range allows (e.g. 6 x 6)


def test_copy_of_teacher_with_identity_head_gives_loss_minus_one():
    """A student that is the teacher, seeing every patch in the order its mask function returns them (mask ratio 0:
    ids_keep is a permutation), matches the teacher token for token. With patches removed it no longer can: its
    tokens attend over fewer tokens than the teacher's."""
    teacher = tiny_clip()
    with torch.no_grad():
        teacher.visual.proj.copy_(torch.eye(128))  # width == embed_dim == 128 for tiny: an identity head
    student, images = copy.deepcopy(teacher), torch.randn(4, 3, 64, 64)
    targets = uta.Teacher(teacher, (8, 8))(images)
    for mask in (uta.block_masking(4, (8, 8), 0.0, torch.Generator().manual_seed(3)),
                 uta.random_masking(4, 64, 0.0, torch.Generator().manual_seed(3))):
        assert not torch.equal(mask, torch.arange(64).expand(4, 64))  # a real permutation
        with torch.no_grad():
            tokens = uta.Student(student)(images, mask)  # (4, 65, 128)
            loss, cos = uta.uta_loss(tokens, targets, mask)
            shifted, _ = uta.uta_loss(tokens, targets, (mask + 1) % 64)  # the wrong positions
            masked, _ = uta.uta_loss(uta.Student(student)(images, mask[:, :32]), targets, mask[:, :32])
        assert abs(loss.item() + 1) < 1e-5 and cos.shape == (4, 65)
        assert shifted.item() > -0.99 and -1 + 1e-4 < masked.item() < -0.5


def test_kept_positions_index_the_right_teacher_tokens():
    B, L, D = 3, 64, 16
    teacher_tokens = torch.randn(B, 1 + L, D)
    ids_keep = uta.random_masking(B, L, 0.7, torch.Generator().manual_seed(0))  # K = 19
    student = torch.stack([torch.stack([teacher_tokens[b, 0]] + [teacher_tokens[b, 1 + p] for p in ids_keep[b]])
                           for b in range(B)])  # (B, 1 + K, D) by hand: CLS, then patch p is teacher token 1 + p
    loss, cos = uta.uta_loss(2.5 * student, teacher_tokens, ids_keep)  # cosine: scale does not matter
    assert abs(loss.item() + 1) < 1e-6 and torch.allclose(cos, torch.ones(B, 20))
    # and the teacher's targets: first row = its CLIP image embedding (CLS or patch mean), patch rows = tokens @ proj
    teacher, images = tiny_clip(), torch.randn(2, 3, 64, 64)
    for pool_type in ('tok', 'avg'):
        teacher.visual.pool_type = pool_type
        with torch.no_grad():
            targets = uta.Teacher(teacher, (8, 8))(images)
            patches = teacher.visual.forward_tokens(images)[:, 1:] @ teacher.visual.proj
            assert torch.allclose(targets[:, 0], teacher.encode_image(images), atol=1e-5)
            assert torch.allclose(targets[:, 1:], patches, atol=1e-5)


def test_different_grids_resample_the_teacher_tokens():
    teacher = tiny_clip()
    with torch.no_grad():
        targets = uta.Teacher(teacher, (4, 4))(torch.randn(2, 3, 64, 64))  # teacher 8x8 -> student 4x4
        assert targets.shape == (2, 17, 128)
        smooth = torch.randn(1, 4, 8, 8).repeat_interleave(2, 2).repeat_interleave(2, 3)  # constant 2x2 cells
        down = uta.resample_tokens(smooth.flatten(2).transpose(1, 2), (16, 16), (8, 8))
        assert torch.allclose(down, smooth[:, :, ::2, ::2].flatten(2).transpose(1, 2), atol=1e-6)  # cell means
        assert uta.resample_tokens(torch.randn(2, 16, 5), (4, 4), (7, 7)).shape == (2, 49, 5)  # finer: bilinear
        up = uta.Teacher(teacher, (8, 8))(torch.randn(2, 3, 32, 32))  # a smaller image is resized to 64 px first
        assert up.shape == (2, 65, 128)

# ----------------------------------------------------------------------------- end to end through main(argv)


def test_smoke_teacher_frozen_zero_shot_and_export(tmp_path, teacher_dir, monkeypatch):
    seen, real = {}, uta.load_teacher

    def spy(*args):
        teacher, cfg = real(*args)
        seen['teacher'], seen['before'] = teacher, {k: v.clone() for k, v in teacher.state_dict().items()}
        return teacher, cfg
    monkeypatch.setattr(uta, 'load_teacher', spy)
    out = tmp_path / 'run'
    assert uta.main(BASE + ['--teacher', f'local-dir:{teacher_dir}', '--steps', '12', '--out', str(out)]) == 12
    ls = [l for _, l in losses(out)]
    assert -1 <= ls[-1] < ls[0] - 0.1, ls

    # the teacher never changed, never trained, and is the one on disk
    teacher = seen['teacher']
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(v, seen['before'][k]) for k, v in teacher.state_dict().items())
    disk = open_clip.create_model(f'local-dir:{teacher_dir}').state_dict()
    assert all(torch.equal(v, disk[k]) for k, v in teacher.state_dict().items())

    # student and teacher zero-shot reported side by side
    final = records(out)[-1]
    for task in ('shape', 'colour', 'position', 'object'):
        assert 0 <= final[f'zeroshot/{task}'] <= 1 and 0 <= final[f'teacher/zeroshot/{task}'] <= 1

    # the export: the student's image tower, the teacher's text tower, loadable in open_clip
    exported, _, preprocess = open_clip.create_model_and_transforms(f'local-dir:{out / "open_clip"}')
    exported.eval()
    state = common.load_checkpoint(out / 'ckpt.pt')['model']
    teacher_cfg = json.load(open(teacher_dir / 'open_clip_config.json'))['model_cfg']
    student = common.CLIP(uta.student_config(teacher_cfg, 'tiny'))
    student.load_state_dict(state, strict=True)
    student.eval()
    for k, v in exported.state_dict().items():
        assert torch.equal(v, (disk if not k.startswith('visual.') else state)[k]), k
    images = torch.stack([preprocess(data.SyntheticShapes(64, 0, 'eval-zeroshot')[i][0]) for i in range(4)])
    texts = open_clip.get_tokenizer(f'local-dir:{out / "open_clip"}')(['a red circle', 'a blue star'])
    with torch.no_grad():
        head = uta.Student(student)(images, torch.arange(64).expand(4, 64))[:, 0]  # CLS -> ln_post -> head
        assert (exported.encode_image(images) - head).abs().max() <= 1e-5
        assert (exported.encode_text(texts) - teacher.encode_text(texts)).abs().max() <= 1e-5

    # zero-shot scores student images against the teacher's text tower: the class embeddings are the teacher's
    tokenizer = common.tokenizer_for(teacher_cfg)
    classifiers = [open_clip.build_zero_shot_classifier(m, tokenizer, ['circle', 'star'], ['a photo of a {}.'],
                                                        num_classes_per_batch=None, device='cpu') for m in (student, teacher)]
    assert torch.equal(*classifiers)


def interrupt_at(monkeypatch, k):
    """SIGTERM arrives during step k (counted by the schedule, called once per step in both stages)."""
    calls, real = [0], common.lr_at

    def lr_at(*args):
        calls[0] += 1
        if calls[0] == k:
            signal.raise_signal(signal.SIGTERM)
        return real(*args)
    monkeypatch.setattr(uta.common, 'lr_at', lr_at)


def test_exact_resume_across_both_stages(tmp_path, teacher_dir, monkeypatch):
    """Interrupted at the end of alignment (step 3) and inside the contrastive stage (step 4): the same losses and
    weights as the uninterrupted run, bit for bit."""
    argv = BASE + ['--teacher', f'local-dir:{teacher_dir}', '--steps', '3', '--contrastive-steps', '2',
                   '--save-every', '100']
    monkeypatch.setattr(common, 'evaluate', lambda *args: {})  # not under test here; the slowest part of main
    assert uta.main(argv + ['--out', str(tmp_path / 'full')]) == 5
    for k in (3, 1):  # the second run resumes at 3 and is stopped during its first step, step 4
        with monkeypatch.context() as mp:
            interrupt_at(mp, k)
            uta.main(argv + ['--out', str(tmp_path / 'part')])
    assert common.load_checkpoint(tmp_path / 'part' / 'ckpt.pt')['step'] == 4
    assert uta.main(argv + ['--out', str(tmp_path / 'part')]) == 5
    assert losses(tmp_path / 'part') == losses(tmp_path / 'full')
    assert [r['stage'] for r in records(tmp_path / 'full') if 'loss' in r] == ['align'] * 3 + ['contrastive'] * 2
    a = common.load_checkpoint(tmp_path / 'full' / 'ckpt.pt')['model']
    b = common.load_checkpoint(tmp_path / 'part' / 'ckpt.pt')['model']
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_unmasked_fraction_ends_the_alignment_on_every_patch(tmp_path, teacher_dir, monkeypatch, capsys):
    ratios, real = [], uta.block_masking

    def spy(batch, grid, ratio, generator):
        ratios.append(ratio)
        return real(batch, grid, ratio, generator)
    monkeypatch.setattr(uta, 'block_masking', spy)
    monkeypatch.setattr(common, 'evaluate', lambda *args: {})
    argv = BASE + ['--teacher', f'local-dir:{teacher_dir}', '--steps', '4', '--save-every', '100']
    assert uta.main(argv + ['--unmasked-fraction', '0.5', '--out', str(tmp_path / 'run')]) == 4
    assert ratios == [0.5, 0.5, 0.0, 0.0]
    ids_keep = real(8, (8, 8), 0.0, torch.Generator().manual_seed(0))  # ratio 0: every patch, each once
    assert torch.equal(ids_keep.sort(dim=1).values, torch.arange(64).expand(8, 64))
    capsys.readouterr()  # the run's progress bar
    with pytest.raises(SystemExit) as exit_info:
        uta.main(argv + ['--unmasked-fraction', '1.5', '--out', str(tmp_path / 'bad')])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err == ['error: --unmasked-fraction must be in [0, 1]']
    assert uta.get_args([]).unmasked_fraction == 0.5 and uta.get_args(['--model', 'ViT-B-16']).unmasked_fraction == 0


def test_missing_teacher_exits_2_with_how_to_make_one(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        uta.main(['--teacher', f'local-dir:{tmp_path / "none"}', '--out', str(tmp_path / 'o'), '--workers', '0'])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and 'python flip.py' in err[0] and 'ViT-B-16/openai' in err[0]


def test_every_kind_of_teacher_loads_the_same_weights(teacher_dir):
    """local-dir folder, our ckpt.pt, and an open_clip state-dict file with --teacher-model: one set of weights."""
    ref, cfg = uta.load_teacher(f'local-dir:{teacher_dir}')
    for spec, name in [(str(teacher_dir.parent / 'ckpt.pt'), None),
                       (str(teacher_dir / 'open_clip_pytorch_model.bin'), 'tiny')]:
        teacher, other = uta.load_teacher(spec, name)
        assert other['vision_cfg'] == cfg['vision_cfg'] and not teacher.training
        assert all(torch.equal(v, ref.state_dict()[k]) for k, v in teacher.state_dict().items())
    with pytest.raises(ValueError, match='--teacher-model'):
        uta.load_teacher(str(teacher_dir / 'open_clip_pytorch_model.bin'))
