"""data.py: the synthetic world is deterministic and holds pairs out; data order is a pure function of the step;
bad samples are skipped and counted, bad paths stop the run."""
import argparse
import io
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import common
import data

TOK = common.tokenizer_for(common.model_config('tiny'))
TO_TENSOR = lambda im: torch.from_numpy(np.asarray(im.resize((16, 16)), dtype=np.float32)).permute(2, 0, 1) / 255


def args(**kw):
    a = argparse.Namespace(train_data=None, dataset_type='auto', csv_img_key='filepath', csv_caption_key='title',
                           csv_separator='\t', train_num_samples=None, workers=0, batch_size=4, seed=0,
                           imagenet_val=None, zeroshot_folder=None)
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
