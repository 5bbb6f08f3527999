"""uta.py: the frozen teacher (open_clip's ViT, timm towers such as EVA-CLIP, the compact ViT), the alignment loss and
its positions, reversed block masking and its even coverage, zero-shot through the teacher's text tower, image-only
data, a smoke run from a tiny teacher made by flip.py, exact resume, and the open_clip export."""
import argparse
import copy
import io
import json
import os
import signal
import tarfile

import open_clip
import pytest
import torch
import torchvision.transforms as T
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

import common
import data
import flip
import uta

BASE = ['--batch-size', '8', '--workers', '0', '--log-every', '1']


@pytest.fixture(autouse=True)
def small_eval_sets(monkeypatch):
    """Smaller held-out sets than the tests' 1200 + 500 images: these tests check plumbing, not accuracy."""
    real = data.synthetic_eval_sets
    monkeypatch.setattr(data, 'synthetic_eval_sets', lambda size, seed, tf: real(size, seed, tf, 48, 24))


@pytest.fixture(scope='module')
def teacher_dir(tmp_path_factory):
    """A tiny CLIP teacher exported by a short flip.py run."""
    out = tmp_path_factory.mktemp('flip')
    with pytest.MonkeyPatch.context() as mp:
        real = data.synthetic_eval_sets
        mp.setattr(data, 'synthetic_eval_sets', lambda size, seed, tf: real(size, seed, tf, 16, 16))
        mp.setattr(common, 'evaluate', lambda *args: {})  # the teacher's accuracy does not matter here
        flip.main(['--steps', '2', '--save-every', '100', '--out', str(out)] + BASE)
    return out / 'open_clip'


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
    """A tiny ImageFolder without captions: 2 class folders of 8 synthetic 64 px images each."""
    root = tmp_path_factory.mktemp('images')
    shapes = data.SyntheticShapes(64, 0, 'train', 16)
    for i in range(16):
        os.makedirs(root / f'class_{i % 2}', exist_ok=True)
        shapes[i][0].save(root / f'class_{i % 2}' / f'{i}.png')
    return root


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


def boundary_edges(ids_keep, grid):
    """4-neighbour pairs with one patch kept and one removed, per sample: short for blocks, long for scattered
    patches (unlike counting kept neighbours, it does not favour sets crowded away from the border)."""
    H, W = grid
    kept = torch.zeros(ids_keep.shape[0], H * W, dtype=torch.bool).scatter_(1, ids_keep, True).view(-1, H, W)
    return ((kept[:, 1:] ^ kept[:, :-1]).sum((1, 2)) + (kept[:, :, 1:] ^ kept[:, :, :-1]).sum((1, 2))).float()


def keep_frequency(ids_keep, num_patches):
    """(B, K) kept indices -> (L,) fraction of samples that keep each position."""
    return torch.zeros(ids_keep.shape[0], num_patches).scatter_(1, ids_keep, 1.0).mean(0)

# ----------------------------------------------------------------------------- masking


@pytest.mark.parametrize('inside', [False, True])
@pytest.mark.parametrize('grid, ratio', [((8, 8), 0.5), ((14, 14), 0.5), ((14, 14), 0.75), ((7, 9), 0.3)])
def test_block_mask_keeps_exactly_k_and_forms_blocks(grid, ratio, inside):
    L = grid[0] * grid[1]
    K = int(L * (1 - ratio))
    ids = uta.block_masking(256, grid, ratio, torch.Generator().manual_seed(0), inside=inside)
    assert ids.shape == (256, K)
    assert all(len(set(row.tolist())) == K for row in ids) and ids.min() >= 0 and ids.max() < L
    again = uta.block_masking(256, grid, ratio, torch.Generator().manual_seed(0), inside=inside)
    assert torch.equal(ids, again)  # a pure function of the generator
    rand = uta.random_masking(256, L, ratio, torch.Generator().manual_seed(0))
    block, scattered = boundary_edges(ids, grid).mean(), boundary_edges(rand, grid).mean()
    assert block < scattered / 2, (block, scattered)  # blocks: less than half the random set's boundary (2.2-3.4x)


@pytest.mark.parametrize('grid, ratio', [((14, 14), 0.5), ((8, 8), 0.5), ((14, 14), 0.75), ((8, 8), 0.25)])
def test_block_mask_covers_every_position_evenly(grid, ratio):
    """Every position is kept 1 - r of the time, +-0.1, over many samples: the visible blocks cover the image evenly.
    Blocks placed inside the grid (BEiT's placement, the first version here) keep the centre far more often."""
    L = grid[0] * grid[1]
    even = keep_frequency(uta.block_masking(8000, grid, ratio, torch.Generator().manual_seed(0)), L)
    assert (even - (1 - ratio)).abs().max() <= 0.1, (even.min(), even.max())
    biased = keep_frequency(uta.block_masking(8000, grid, ratio, torch.Generator().manual_seed(0), inside=True), L)
    assert (biased - (1 - ratio)).abs().max() > 0.1, (biased.min(), biased.max())
    if grid == (14, 14) and ratio == 0.5:  # the numbers of the review: corners 7%, centre 86%
        biased = biased.view(grid)
        assert biased[0, 0] < 0.12 and biased[6:8, 6:8].min() > 0.8


def test_masks_keep_at_least_one_patch():
    """int(L * (1 - r)) is 0 at r = 0.99 on 64 patches; both masks keep one patch, as OpenCLIP's PatchDropout, so the
    student always sees a patch and the loss has a patch term."""
    for ids in (uta.block_masking(16, (8, 8), 0.99, torch.Generator().manual_seed(0)),
                uta.block_masking(16, (8, 8), 0.99, torch.Generator().manual_seed(0), inside=True),
                uta.random_masking(16, 64, 0.99, torch.Generator().manual_seed(0))):
        assert ids.shape == (16, 1) and 0 <= ids.min() and ids.max() < 64
    student, teacher, images = tiny_clip(0), tiny_clip(1), torch.randn(2, 3, 64, 64)
    ids_keep = uta.random_masking(2, 64, 0.99, torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss, cos = uta.uta_loss(uta.Student(student)(images, ids_keep), uta.Teacher(teacher, (8, 8))(images), ids_keep)
    assert cos.shape == (2, 2) and torch.isfinite(loss)


def test_block_mask_inside_one_block():
    """When the first block alone has more than K patches, the visible set is K patches of that one rectangle."""
    ids = uta.block_masking(1000, (14, 14), 0.92, torch.Generator().manual_seed(1), min_block=32, inside=True)
    assert ids.shape == (1000, 15)
    rows, cols = ids // 14, ids % 14
    box = (rows.amax(1) - rows.amin(1) + 1) * (cols.amax(1) - cols.amin(1) + 1)  # bounding-box area
    assert box.max() <= 36  # the largest rectangle of area ~32 the aspect-ratio range allows (e.g. 6 x 6)

# ----------------------------------------------------------------------------- teacher, student, loss


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


@pytest.mark.parametrize('pool_type', ['tok', 'avg'])
def test_open_clip_vit_teacher_targets(pool_type):
    """open_clip's ViT as the teacher: the first row is its own encode_image; the patch rows are its patch tokens as
    its forward returns them (output_tokens: after ln_post) through its projection; for a mean-pooled teacher they
    average to its image embedding. The compact ViT with the same weights gives the same targets."""
    cfg = common.model_config('tiny')
    cfg['vision_cfg']['pool_type'] = pool_type
    torch.manual_seed(0)
    clip = open_clip.CLIP(**cfg).eval()
    compact = common.CLIP(cfg).eval()
    compact.load_state_dict(clip.state_dict(), strict=True)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        targets = uta.Teacher(clip, (8, 8))(images)  # (2, 65, 128)
        clip.visual.output_tokens = True
        embedding, tokens = clip.visual(images)  # open_clip's forward: (B, D), (B, L, width) after ln_post
        clip.visual.output_tokens = False
        assert targets.shape == (2, 65, 128)
        assert torch.allclose(targets[:, 0], embedding, atol=1e-5)
        assert torch.allclose(targets[:, 0], clip.encode_image(images), atol=1e-5)
        assert torch.allclose(targets[:, 1:], tokens @ clip.visual.proj, atol=1e-5)
        if pool_type == 'avg':
            assert torch.allclose(targets[:, 1:].mean(1), targets[:, 0], atol=1e-5)
        assert torch.allclose(uta.Teacher(compact, (8, 8))(images), targets, atol=1e-4)


def shrunken_eva02_cfg():
    """EVA02-B-16's open_clip config (a timm EVA-02 trunk whose own head is the projection, CLS-pooled, and a custom
    text tower) with EVA-02's tiny trunk and a small text tower: the same code paths at a size for tests."""
    cfg = copy.deepcopy(open_clip.get_model_config('EVA02-B-16'))
    cfg['vision_cfg']['timm_model_name'] = 'eva02_tiny_patch14_224'
    cfg['embed_dim'] = 128
    cfg['text_cfg'] = {'context_length': 32, 'vocab_size': 49408, 'width': 128, 'heads': 4, 'layers': 2}
    return cfg


@pytest.mark.parametrize('name, size', [('EVA02-B-16', 128), ('vit_medium_patch16_gap_256', 64)])
def test_timm_tower_teacher_targets_and_text_tower(name, size):
    """The paper's teacher family, EVA-CLIP (a timm EVA-02 trunk, its head as the projection, CLS pooling), and a timm
    ViT with open_clip's own linear projection and mean pooling, randomly initialised (no download), at a small image
    size. The first row is the teacher's encode_image; patch p's row is what timm's own head (forward_head: pooling,
    fc_norm, head) and open_clip's projection give for a sequence holding that one token. The student takes the
    teacher's text tower (EVA-CLIP's under 'text.') and encodes text as the teacher does; the loss trains the student
    only."""
    torch.manual_seed(0)
    clip = open_clip.create_model(name, pretrained=None, force_image_size=size).eval().requires_grad_(False)
    cfg = open_clip.get_model_config(name)
    uta.check_tower(clip.visual, name)
    student = common.CLIP(uta.student_config(cfg, 'tiny'))
    uta.copy_text_tower(student, clip)
    images = torch.randn(2, 3, 64, 64)
    trunk = clip.visual.trunk
    with torch.no_grad():
        targets = uta.Teacher(clip, (8, 8))(images)  # the student's 8x8 grid; the image resized to `size` first
        resized = torch.nn.functional.interpolate(images, size=(size, size), mode='bicubic', align_corners=False)
        assert torch.allclose(targets[:, 0], clip.encode_image(resized), atol=1e-5)
        x = trunk.forward_features(resized)  # (2, prefix + Lt, width)
        grid = trunk.patch_embed.grid_size
        reference = torch.stack([clip.visual.head(trunk.forward_head(x[:, [trunk.num_prefix_tokens + p]]))
                                 for p in range(grid[0] * grid[1])], dim=1)  # (2, Lt, D): one token at a time
        if tuple(grid) != (8, 8):
            reference = uta.resample_tokens(reference, tuple(grid), (8, 8))
        assert torch.allclose(targets[:, 1:], reference, atol=1e-5)
        texts = open_clip.get_tokenizer(name)(['a red circle', 'a blue star'])
        assert torch.allclose(student.encode_text(texts), clip.encode_text(texts), atol=1e-5)
    ids_keep = uta.block_masking(2, (8, 8), 0.5, torch.Generator().manual_seed(0))
    for n, p in student.named_parameters():
        p.requires_grad_(n.startswith('visual.'))
    loss, _ = uta.uta_loss(uta.Student(student)(images, ids_keep), targets, ids_keep)
    loss.backward()
    assert torch.isfinite(loss) and student.visual.proj.grad.abs().sum() > 0


def test_teacher_renormalises_to_its_own_statistics():
    """A teacher whose preprocessing uses other mean/std (0.5, as SigLIP's) sees the image it would see from its own
    transform, though the loader normalises with OpenAI's statistics for the student."""
    torch.manual_seed(0)
    clip = open_clip.CLIP(**common.model_config('tiny')).eval()
    open_clip.model.set_model_preprocess_cfg(clip, dict(open_clip.get_model_preprocess_cfg(clip), mean=(0.5,) * 3,
                                                        std=(0.5,) * 3))
    image = data.SyntheticShapes(64, 0)[0][0]
    ours = T.Compose([T.ToTensor(), T.Normalize(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)])(image)[None]
    theirs = T.Compose([T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])(image)[None]
    with torch.no_grad():
        teacher = uta.Teacher(clip, (8, 8))
        assert teacher.renormalise
        assert torch.allclose(teacher(ours)[:, 0], clip.encode_image(theirs), atol=1e-4)
        assert not torch.allclose(teacher(ours)[:, 0], clip.encode_image(ours), atol=1e-2)


def test_towers_without_patch_tokens_and_foreign_text_towers_are_refused():
    with pytest.raises(ValueError, match='no patch tokens'):
        uta.check_tower(open_clip.create_model('RN50', pretrained=None).visual, 'RN50')
    with pytest.raises(ValueError, match='text_cfg.hf_tokenizer_name'):
        uta.student_config(open_clip.get_model_config('ViT-B-16-SigLIP'), 'tiny')


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


def test_recipe_defaults_are_eva02s():
    args = uta.get_args([])
    assert args.grad_clip_norm == 3.0 and args.wd == 0.05 and args.mask == 'block'
    assert uta.get_args(['--grad-clip-norm', '1']).grad_clip_norm == 1.0

# ----------------------------------------------------------------------------- image-only data


def test_image_only_loaders_read_a_folder_and_shards_without_captions(image_folder, tmp_path):
    """An ImageFolder and WebDataset shards with image members only: batches of images and (B, 0) token ids. The
    folder's order and augmentation follow the step sampler (the same batch at the same step, so resume is exact)."""
    a = argparse.Namespace(train_data=str(image_folder), dataset_type='auto', workers=0, batch_size=4, seed=0,
                           train_num_samples=None, accum_freq=1, wds_image_key='jpg;png', wds_caption_key='txt')
    a.dataset_type = data.resolve_dataset_type(a.train_data, 'auto')
    assert a.dataset_type == 'imagefolder'
    tf = T.ToTensor()
    loader, n = data.image_loader(a, tf, 0, 1, 0)
    images, texts, skipped = next(iter(loader))
    assert n == 16 and images.shape == (4, 3, 64, 64) and texts.shape == (4, 0) and skipped == 0
    batches = iter(data.image_loader(a, tf, 0, 1, 0)[0])
    next(batches)
    assert torch.equal(next(batches)[0], next(iter(data.image_loader(a, tf, 0, 1, 1)[0]))[0])  # step 1 from a resume
    with pytest.raises(data.DataError, match='without captions'):
        data.train_loader(a, tf, None, 64, 0, 1, 0)  # the other scripts need captions: one line
    shard = tmp_path / 'images-000.tar'
    with tarfile.open(shard, 'w') as tar:
        for i in range(6):
            buf = io.BytesIO()
            data.SyntheticShapes(64, 0)[i][0].save(buf, format='JPEG')
            info = tarfile.TarInfo(f'{i:04d}.jpg')
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))
    w = argparse.Namespace(**dict(vars(a), train_data=str(shard), dataset_type='webdataset', train_num_samples=6))
    images, texts, _ = next(iter(data.image_loader(w, tf, 0, 1, 0)[0]))
    assert images.shape == (4, 3, 64, 64) and texts.shape == (4, 0)


def test_alignment_trains_on_an_image_folder_and_a_contrastive_stage_needs_captions(tmp_path, teacher_dir, image_folder,
                                                                                     capsys):
    out = tmp_path / 'run'
    argv = BASE + ['--teacher', f'local-dir:{teacher_dir}', '--train-data', str(image_folder), '--steps', '12',
                   '--zeroshot-folder', str(image_folder)]
    assert uta.main(argv + ['--out', str(out)]) == 12
    ls = [l for _, l in losses(out)]
    assert ls[-1] < ls[0] - 0.1, ls  # it learned: the cosine to the teacher's tokens rose by 0.1
    assert json.load(open(out / 'args.json'))['steps'] == 12 and 'teacher/zeroshot/folder' in records(out)[-1]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        uta.main(argv + ['--contrastive-steps', '2', '--out', str(tmp_path / 'bad')])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and '--contrastive-steps needs captions' in err[0], err


def test_eva_clip_teacher_through_main(tmp_path, image_folder, monkeypatch):
    """A local-dir EVA-CLIP teacher (EVA02-B-16's config, shrunk: shrunken_eva02_cfg) with its own preprocessing
    (224 px, mean/std 0.5): open_clip builds it, the student takes its text tower, learns its tokens from a folder of
    images, and exports as a plain open_clip CLIP with that text tower."""
    cfg = shrunken_eva02_cfg()
    torch.manual_seed(0)
    eva = open_clip.CustomTextCLIP(**{k: v for k, v in cfg.items() if k != 'custom_text'}).eval()
    folder = tmp_path / 'eva'
    os.makedirs(folder)
    torch.save(eva.state_dict(), folder / 'open_clip_pytorch_model.bin')
    preprocess = {'size': 224, 'mean': [0.5] * 3, 'std': [0.5] * 3, 'interpolation': 'bicubic', 'resize_mode': 'shortest'}
    json.dump({'model_cfg': cfg, 'preprocess_cfg': preprocess}, open(folder / 'open_clip_config.json', 'w'))
    evaluated = []  # the models evaluated at the end (no evaluation sets here: the folder's images have no names)
    monkeypatch.setattr(common, 'evaluate', lambda model, *args: evaluated.append(type(model).__name__) or {})
    out = tmp_path / 'run'
    assert uta.main(BASE + ['--teacher', f'local-dir:{folder}', '--train-data', str(image_folder), '--steps', '8',
                            '--out', str(out)]) == 8
    ls = [l for _, l in losses(out)]
    assert ls[-1] < ls[0] - 0.1, ls
    assert evaluated == ['CLIP', 'CustomTextCLIP']  # the student, then open_clip's EVA-CLIP itself
    exported = open_clip.create_model(f'local-dir:{out / "open_clip"}').eval()
    assert type(exported).__name__ == 'CLIP'
    texts = open_clip.get_tokenizer(f'local-dir:{out / "open_clip"}')(['a red circle', 'a blue star'])
    with torch.no_grad():
        assert torch.allclose(exported.encode_text(texts), eva.encode_text(texts), atol=1e-5)

# ----------------------------------------------------------------------------- end to end through main(argv)


def test_smoke_teacher_frozen_zero_shot_and_export(tmp_path, teacher_dir, monkeypatch):
    seen, real = {}, uta.load_teacher

    def spy(*args):
        teacher, cfg = real(*args)
        seen['teacher'], seen['before'] = teacher, {k: v.clone() for k, v in teacher.state_dict().items()}
        return teacher, cfg
    monkeypatch.setattr(uta, 'load_teacher', spy)
    clipped, real_clip = [], common.clip_grad_norm
    monkeypatch.setattr(common, 'clip_grad_norm', lambda model, max_norm: clipped.append(max_norm) or real_clip(model, max_norm))
    out = tmp_path / 'run'
    assert uta.main(BASE + ['--teacher', f'local-dir:{teacher_dir}', '--steps', '12', '--out', str(out)]) == 12
    ls = [l for _, l in losses(out)]
    assert -1 <= ls[-1] < ls[0] - 0.1, ls  # it learned: the cosine to the teacher's tokens rose by 0.1
    assert clipped == [3.0] * 12  # EVA-02's clipping, every step
    groups = common.load_checkpoint(out / 'ckpt.pt')['optimizer']['param_groups']
    assert {g['eps'] for g in groups} == {1e-6} and {g['betas'] for g in groups} == {(0.9, 0.98)}

    # the teacher never changed, never trained, and is the one on disk, run by open_clip itself
    teacher = seen['teacher']
    assert isinstance(teacher, open_clip.CLIP) and not isinstance(teacher, common.CLIP)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(v, seen['before'][k]) for k, v in teacher.state_dict().items())
    disk = open_clip.create_model(f'local-dir:{teacher_dir}').state_dict()
    assert all(torch.equal(v, disk[k]) for k, v in teacher.state_dict().items())

    # student and teacher zero-shot reported side by side: the numbers of each model, evaluated here again
    final = records(out)[-1]
    teacher_cfg = json.load(open(teacher_dir / 'open_clip_config.json'))['model_cfg']
    state = common.load_checkpoint(out / 'ckpt.pt')['model']
    student = common.CLIP(uta.student_config(teacher_cfg, 'tiny'))
    student.load_state_dict(state, strict=True)
    student.eval()
    tokenizer = common.tokenizer_for(teacher_cfg)
    tasks, retrieval = data.eval_sets(uta.get_args(['--workers', '0']), open_clip.image_transform(64, False), 64)
    amp, cpu = common.autocast(torch.device('cpu'), 'fp32'), torch.device('cpu')
    for prefix, model in (('', student), ('teacher/', teacher)):
        again = common.evaluate(model, tokenizer, tasks, retrieval, cpu, amp)
        assert len(again) >= 5 and all(final[prefix + k] == v for k, v in again.items()), prefix
    assert any(final[k] != final[f'teacher/{k}'] for k in again)  # two models, not one reported twice

    # the export: the student's image tower, the teacher's text tower, loadable in open_clip
    exported, _, preprocess = open_clip.create_model_and_transforms(f'local-dir:{out / "open_clip"}')
    exported.eval()
    for k, v in exported.state_dict().items():
        assert torch.equal(v, (disk if not k.startswith('visual.') else state)[k]), k
    images = torch.stack([preprocess(data.SyntheticShapes(64, 0, 'eval-zeroshot')[i][0]) for i in range(4)])
    texts = open_clip.get_tokenizer(f'local-dir:{out / "open_clip"}')(['a red circle', 'a blue star'])
    with torch.no_grad():
        head = uta.Student(student)(images, torch.arange(64).expand(4, 64))[:, 0]  # CLS -> ln_post -> head
        assert (exported.encode_image(images) - head).abs().max() <= 1e-5
        assert (exported.encode_text(texts) - teacher.encode_text(texts)).abs().max() <= 1e-5

    # zero-shot scores student images against the teacher's text tower: the class embeddings are the teacher's
    classifiers = [open_clip.build_zero_shot_classifier(m, tokenizer, ['circle', 'star'], ['a photo of a {}.'],
                                                        num_classes_per_batch=None, device='cpu') for m in (student, teacher)]
    assert torch.allclose(*classifiers, atol=1e-5)


def interrupt_at(monkeypatch, k):
    """SIGTERM arrives during step k (counted by the schedule, called once per step in both stages)."""
    calls, real = [0], common.lr_at

    def lr_at(*args):
        calls[0] += 1
        if calls[0] == k:
            signal.raise_signal(signal.SIGTERM)
        return real(*args)
    monkeypatch.setattr(uta.common, 'lr_at', lr_at)


@pytest.mark.parametrize('accum', ['1', '2'])
def test_exact_resume_across_both_stages(tmp_path, teacher_dir, monkeypatch, accum):
    """Interrupted at the end of alignment (step 3) and inside the contrastive stage (step 4): the same losses and
    weights as the uninterrupted run, bit for bit; also with 2 micro-batches per step (accumulated alignment, GradCache
    in the contrastive stage)."""
    argv = BASE + ['--teacher', f'local-dir:{teacher_dir}', '--steps', '3', '--contrastive-steps', '2',
                   '--save-every', '100', '--accum-freq', accum]
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


def test_pretrained_initialises_the_image_tower_and_keeps_the_teachers_text_tower(tmp_path, teacher_dir, monkeypatch):
    """--pretrained: the student starts from that CLIP's image tower, and the teacher's text tower and logit scale are
    put back, since zero-shot reads the teacher's text space (the pretrained CLIP's text tower here is another one)."""
    torch.manual_seed(5)
    cfg = common.model_config('tiny')
    other = common.CLIP(cfg)
    common.export_open_clip(other, cfg, str(tmp_path / 'pretrained'))
    teacher = open_clip.create_model(f'local-dir:{teacher_dir}').state_dict()
    monkeypatch.setattr(common, 'evaluate', lambda *args: {})
    out = tmp_path / 'run'
    argv = BASE + ['--teacher', f'local-dir:{teacher_dir}', '--pretrained', f'local-dir:{tmp_path / "pretrained"}']
    assert uta.main(argv + ['--steps', '1', '--lr', '1e-12', '--out', str(out)]) == 1  # a step that moves nothing
    state = common.load_checkpoint(out / 'ckpt.pt')['model']
    assert set(state) == set(other.state_dict())
    for k, v in other.state_dict().items():
        if k.startswith('visual.'):
            assert torch.allclose(state[k], v, atol=1e-6), k
        else:
            assert torch.equal(state[k], teacher[k]), k
    assert not torch.allclose(other.state_dict()['token_embedding.weight'], teacher['token_embedding.weight'])


def test_unmasked_fraction_ends_the_alignment_on_every_patch(tmp_path, teacher_dir, monkeypatch, capsys):
    ratios, real = [], uta.block_masking

    def spy(batch, grid, ratio, generator, **kwargs):
        ratios.append(ratio)
        return real(batch, grid, ratio, generator, **kwargs)
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
    for spec in (f'local-dir:{tmp_path / "none"}', 'EVA02-B-16'):  # no folder; a name without pretrained weights
        with pytest.raises(SystemExit) as exit_info:
            uta.main(['--teacher', spec, '--out', str(tmp_path / 'o'), '--workers', '0'])
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
