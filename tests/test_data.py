"""data.py: the synthetic world is deterministic and holds pairs out; data order is a pure function of the step;
bad samples are skipped and counted, bad paths stop the run."""
import argparse
import io
import json
import os
import random
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

import common
import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK = common.tokenizer_for(common.model_config('tiny'))
TO_TENSOR = lambda im: torch.from_numpy(np.asarray(im.resize((16, 16)), dtype=np.float32)).permute(2, 0, 1) / 255


def args(**kw):
    a = argparse.Namespace(train_data=None, dataset_type='auto', csv_img_key='filepath', csv_caption_key='title',
                           csv_separator='\t', train_num_samples=None, workers=0, batch_size=4, seed=0,
                           imagenet_val=None, zeroshot_folder=None, accum_freq=1, wds_image_key='jpg;png;jpeg;webp',
                           wds_caption_key='txt', val_data=None, zeroshot_templates='openai', synthetic_group_size=4)
    vars(a).update(kw)
    return a


def test_synthetic_is_deterministic_and_holds_pairs_out():
    a, b = data.SyntheticShapes(64, 0), data.SyntheticShapes(64, 0)
    im1, cap1 = a[123]
    im2, cap2 = b[123]
    assert cap1 == cap2 and np.array_equal(np.asarray(im1), np.asarray(im2))
    assert data.SyntheticShapes(64, 1)[123][1] != cap1 or not np.array_equal(np.asarray(data.SyntheticShapes(64, 1)[123][0]), np.asarray(im1))
    held = sum(data.is_heldout(c, s) for c in data.COLOUR_NAMES for s in data.SHAPES)
    assert held == 8
    for i in range(1500):  # no training scene contains a held-out pair
        objects, _, _ = a.scene(i)
        assert not any(data.is_heldout(o['colour'], o['shape']) for o in objects)


def test_eval_sets_cover_heldout_pairs_and_are_fixed():
    tasks, retrieval = data.synthetic_eval_sets(32, 0, TO_TENSOR, n_zeroshot=200, n_retrieval=50)
    assert set(tasks) == {'shape', 'colour', 'position', 'object', 'object_heldout'}
    assert 0 < len(tasks['object_heldout']['labels']) < 200
    names = tasks['object']['classnames']
    assert all(data.is_heldout(*names[i].split()) for i in tasks['object_heldout']['labels'].tolist())
    # every shape occurs with several colours: colour alone cannot solve the shape task
    shapes, colours = tasks['shape']['labels'], tasks['colour']['labels']
    for s in range(len(data.SHAPES)):
        assert len(set(colours[shapes == s].tolist())) >= 4
    assert len(set(retrieval['captions'])) == 50
    again, _ = data.synthetic_eval_sets(32, 0, TO_TENSOR, n_zeroshot=200, n_retrieval=50)
    assert torch.equal(again['shape']['images'], tasks['shape']['images'])


def test_step_sampler_global_batch_and_resume():
    one = iter(data.StepSampler(50, 8, 0, 1, seed=3))
    r0, r1 = iter(data.StepSampler(50, 4, 0, 2, seed=3)), iter(data.StepSampler(50, 4, 1, 2, seed=3))
    for _ in range(20):  # 2 ranks x 4 read exactly what 1 rank x 8 reads, across epoch boundaries
        assert next(one) == next(r0) + next(r1)
    resumed = iter(data.StepSampler(50, 8, 0, 1, seed=3, start_step=7))
    fresh = iter(data.StepSampler(50, 8, 0, 1, seed=3))
    for _ in range(7):
        next(fresh)
    assert next(resumed) == next(fresh)
    epoch = [index for index, _ in next(iter(data.StepSampler(50, 50, 0, 1, seed=3)))]
    assert sorted(epoch) == list(range(50))


def test_hard_negative_groups_differ_in_one_attribute():
    """--synthetic-group-size G: items g*G ... g*G + G - 1 are one scene with one attribute of one object changed, a
    different value in each member, no held-out pair in training; each member is rendered and worded on its own."""
    G = 4
    d = data.SyntheticShapes(64, 0, group=G)
    varied = {'shape': 0, 'position': 0, 'colour': 0}
    for g in range(300):
        members = [d.scene(g * G + j)[0] for j in range(G)]
        assert len({len(m) for m in members}) == 1
        diffs = {(k, a) for m in members[1:] for k, (o, o0) in enumerate(zip(m, members[0]))
                 for a in ('colour', 'shape', 'position', 'size') if o[a] != o0[a]}
        assert len(diffs) == 1, diffs  # one attribute of one object, the same in the whole group
        (k, a), = diffs
        assert len({m[k][a] for m in members}) == G  # every member a different value
        assert all(len({o['position'] for o in m}) == len(m) for m in members)  # objects stay in distinct cells
        assert not any(data.is_heldout(o['colour'], o['shape']) for m in members for o in m)
        varied[a] += 1
    assert all(n > 30 for n in varied.values()), varied  # shape, position and colour groups all occur
    assert d[0][1] != d[1][1] and data.SyntheticShapes(64, 0, group=G)[5][1] == d[5][1]
    assert data.SyntheticShapes(64, 0).scene(5)[0] == data.sample_scene(random.Random('0-train-5'), True)  # G = 1: as before
    with pytest.raises(data.DataError, match='--synthetic-group-size'):
        data.SyntheticShapes(64, 0, group=data.MAX_GROUP + 1)


def test_step_sampler_keeps_groups_together():
    """With group G the permutation moves whole groups: every G-aligned run of positions is one group, in order,
    also across epochs, ranks and micro-batches (2 ranks x K = 2 read what 1 rank x K = 4 reads)."""
    G, n = 4, 40
    one = iter(data.StepSampler(n, 8, 0, 1, seed=3, accum_freq=4, group=G))
    r = [iter(data.StepSampler(n, 8, rank, 2, seed=3, accum_freq=2, group=G)) for rank in range(2)]
    seen = []
    for _ in range(12):  # 32 samples a step: epochs of 40 end inside steps
        keys = [k for _ in range(4) for k in next(one)]
        assert keys == [k for it in r for _ in range(2) for k in next(it)]
        for i in range(0, len(keys), G):
            first = keys[i][0]
            assert first % G == 0 and [k[0] for k in keys[i:i + G]] == list(range(first, first + G))
        seen += [k[0] for k in keys]
    assert sorted(seen[:n]) == list(range(n))  # an epoch is every item once
    assert [k for k, _ in next(iter(data.StepSampler(50, 50, 0, 1, seed=3)))] == \
        [k for k, _ in next(iter(data.StepSampler(50, 50, 0, 1, seed=3, group=1)))]


def write_csv(tmp_path, rows, header='filepath\ttitle'):
    for name in ('a.png', 'b.png', 'c.png'):
        Image.new('RGB', (20, 20), (200, 10, 10)).save(tmp_path / name)
    (tmp_path / 'bad.png').write_bytes(b'not an image')
    path = tmp_path / 'train.csv'
    path.write_text('\n'.join([header] + rows) + '\n')
    return str(path)


def test_csv_skips_and_counts_bad_images(tmp_path):
    path = write_csv(tmp_path, ['a.png\ta red', 'bad.png\tbroken', 'b.png\tb red', 'missing.png\tgone', 'c.png\tc red'])
    loader, n = data.train_loader(args(train_data=path, batch_size=5), TO_TENSOR, TOK, 16, 0, 1, 0)
    images, texts, skipped = next(iter(loader))
    assert n == 5 and images.shape == (5, 3, 16, 16) and texts.shape == (5, 32)
    assert skipped == 2  # one epoch of 5 keys hits both bad rows once; each was replaced, the batch stays full


def test_csv_errors(tmp_path):
    with pytest.raises(data.DataError, match='does not exist'):
        data.train_loader(args(train_data=str(tmp_path / 'nope.csv')), TO_TENSOR, TOK, 16, 0, 1, 0)
    path = write_csv(tmp_path, ['a.png\tx'], header='image\tcaption')
    with pytest.raises(data.DataError, match="no column 'filepath'"):
        data.train_loader(args(train_data=path), TO_TENSOR, TOK, 16, 0, 1, 0)
    with pytest.raises(data.DataError, match='cannot tell'):
        data.resolve_dataset_type('/data/something.json', 'auto')


def write_shard(path, n, corrupt=()):
    with tarfile.open(path, 'w') as tar:
        for i in range(n):
            buf = io.BytesIO()
            Image.new('RGB', (20, 20), (i * 10 % 255, 0, 0)).save(buf, format='PNG')
            png = b'garbage' if i in corrupt else buf.getvalue()
            for ext, payload in (('png', png), ('txt', f'caption {i}'.encode())):
                info = tarfile.TarInfo(f'{i:05d}.{ext}')
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def test_webdataset_skips_and_counts_corrupt_members(tmp_path):
    for s in range(2):
        write_shard(tmp_path / f'{s:03d}.tar', 10, corrupt=(3,) if s == 0 else ())
    spec = str(tmp_path / '{000..001}.tar')
    loader, _ = data.train_loader(args(train_data=spec, batch_size=6), TO_TENSOR, TOK, 16, 0, 1, 0)
    it = iter(loader)
    batches = [next(it) for _ in range(10)]  # 60 samples: both shards are read at least twice
    assert all(b[0].shape == (6, 3, 16, 16) for b in batches)
    assert sum(b[2] for b in batches) >= 1
    with pytest.raises(data.DataError, match='does not exist'):
        data.train_loader(args(train_data=str(tmp_path / '{000..005}.tar')), TO_TENSOR, TOK, 16, 0, 1, 0)


def test_zeroshot_folder_names(tmp_path):
    for cls in ('golden_retriever', 'tabby_cat'):
        os.makedirs(tmp_path / cls)
        Image.new('RGB', (20, 20)).save(tmp_path / cls / '0.png')
    tasks, retrieval = data.eval_sets(args(zeroshot_folder=str(tmp_path), train_data='x.csv'), TO_TENSOR, 16)
    assert retrieval is None and tasks['folder']['classnames'] == ['golden retriever', 'tabby cat']
    with pytest.raises(data.DataError):
        data.eval_sets(args(imagenet_val=str(tmp_path / 'none')), TO_TENSOR, 16)


def write_json_shard(path, n, caption_member='json'):
    """Samples of a .jpg and the caption under a .json member's 'caption' field: no .txt member."""
    with tarfile.open(path, 'w') as tar:
        for i in range(n):
            buf = io.BytesIO()
            Image.new('RGB', (20, 20), (i * 10 % 255, 0, 0)).save(buf, format='JPEG')
            for ext, payload in (('jpg', buf.getvalue()), (caption_member, json.dumps({'caption': f'caption {i}'}).encode())):
                info = tarfile.TarInfo(f'{i:05d}.{ext}')
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


READ_ONE_BATCH = '''
import sys, argparse
sys.path.insert(0, {root!r})
import common, data
a = argparse.Namespace(**{args!r})
loader, _ = data.train_loader(a, lambda im: common.torch.zeros(3, 8, 8), common.tokenizer_for(common.model_config('tiny')), 8, 0, 1, 0)
try:
    next(iter(loader))
except data.DataError as err:
    data.fail(err)
'''


def test_webdataset_without_the_caption_member_stops_in_one_line(tmp_path):
    """Shards whose captions are under .json (no .txt): after data.MAX_FAILURES samples in a row the loader stops
    with one line naming the members found and the flag, exit 2, also when the failure is in worker processes
    (it used to skip forever)."""
    for s in range(2):
        write_json_shard(tmp_path / f'{s:03d}.tar', 10)
    spec = str(tmp_path / '{000..001}.tar')
    script = READ_ONE_BATCH.format(root=ROOT, args=vars(args(train_data=spec, workers=2)))
    start = time.time()
    proc = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS='1'))
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr[-2000:]
    assert err[0].startswith('error: no sample could be read from --train-data in 1000 samples in a row: members '
                             'found: jpg, json; set --wds-image-key'), err[0]
    assert "--wds-caption-key (now 'txt')" in err[0] and 'json:FIELD' in err[0]
    assert time.time() - start < 60
    # the flag it names reads them
    loader, _ = data.train_loader(args(train_data=spec, wds_caption_key='json:caption', batch_size=5), TO_TENSOR,
                                  TOK, 16, 0, 1, 0)
    images, texts, skipped = next(iter(loader))
    assert images.shape == (5, 3, 16, 16) and skipped == 0
    assert {TOK.decode(t[1:t.argmax()].tolist()).strip() for t in texts} <= {f'caption {i}' for i in range(10)}
    # shards without any sample (empty tars) stop too, after ten passes over them
    for s in range(2):
        with tarfile.open(tmp_path / f'empty{s}.tar', 'w'):
            pass
    loader, _ = data.train_loader(args(train_data=str(tmp_path / 'empty{0..1}.tar')), TO_TENSOR, TOK, 16, 0, 1, 0)
    with pytest.raises(data.DataError, match='in 20 shards in a row'):
        next(iter(loader))


def web_jpeg(w=500, h=375, seed=0):
    """A JPEG with smooth structure and some texture, about as large as a web image."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    pixels = np.asarray(image).astype(np.int16) + rng.integers(-20, 21, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format='JPEG', quality=90)
    return buf.getvalue()


def test_draft_decoding_keeps_the_augmentation(monkeypatch):
    """A RandomResizedCrop that leaves room decodes the JPEG at 1/2..1/8 size: the same crops and flips (the same
    draws from torch's RNG), nearly the same pixels; where it leaves none (224 px from 500x375, crops >= 306 px), the
    transform's own output, bit for bit."""
    from PIL import JpegImagePlugin
    drafts = []
    draft = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, 'draft',
                        lambda self, mode, size: drafts.append(size) or draft(self, mode, size))
    payload = web_jpeg()
    for size, reduced in ((64, True), (224, False)):
        transform = T.Compose([T.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                               T.RandomHorizontalFlip(), T.ToTensor()])
        for seed in range(8):
            drafts.clear()
            torch.manual_seed(seed)
            fast = data.Decoder(transform)(payload)
            after = torch.get_rng_state()
            torch.manual_seed(seed)
            with Image.open(io.BytesIO(payload)) as im:
                full = transform(im.convert('RGB'))
            assert torch.equal(after, torch.get_rng_state())  # the same draws: the same crop and flip
            assert bool(drafts) == reduced
            if reduced:
                assert drafts[0][0] <= 250  # decoded at 1/2 or less
                assert fast.shape == full.shape and (fast - full).abs().mean() < 0.02  # 5/255: interpolation only
            else:
                assert torch.equal(fast, full)
    # a PNG, or a transform that does not start with a crop: decoded in full, the transform as given
    buf = io.BytesIO()
    Image.open(io.BytesIO(payload)).save(buf, format='PNG')
    flip = T.Compose([T.RandomHorizontalFlip(1.0), T.ToTensor()])
    assert torch.equal(data.Decoder(flip)(payload), flip(Image.open(io.BytesIO(payload)).convert('RGB')))
    crop = T.Compose([T.RandomResizedCrop(64), T.ToTensor()])
    torch.manual_seed(0)
    assert data.Decoder(crop)(buf.getvalue()).shape == (3, 64, 64)


def test_bench_loader_mode_runs(tmp_path):
    """bench.py loader on one tiny generated shard: the three pipelines' rows, OpenCLIP's as the 1.00x reference."""
    import bench
    bench.main(['loader', '--batch-size', '4', '--rounds', '2', '--loader-batches', '1', '--shards', '1',
                '--shard-samples', '8', '--image-size', '32', '--source-size', '96', '72', '--workers', '0',
                '--out', str(tmp_path)])
    rows = json.load(open(tmp_path / 'loader-32px-96x72.json'))['pipelines']
    assert list(rows) == ['open_clip', 'ours, full decode', 'ours'] and rows['open_clip']['ratio_to_open_clip'] == 1
    assert all(r['images_per_s_per_worker'] > 0 for r in rows.values())
    assert (tmp_path / 'loader-32px-96x72.md').read_text().count('\n| ') == 4  # header + 3 rows
