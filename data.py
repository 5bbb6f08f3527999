"""Data loading, and nothing else: the embedded synthetic dataset, CSV/TSV files, WebDataset shards and zero-shot
evaluation folders. Methods pass their own (multi-view) image transforms in; this file does not know about methods.

Every training loader yields `(images, texts, skipped)` per step, where `images` is whatever the method's transform
returns (collated), `texts` is (B, context_length) token ids and `skipped` counts the unreadable samples that were
replaced while filling the batch (logged by the loop, never silent).

Exact resume: for the synthetic and CSV datasets, the sample at global position p = step * global_batch + rank * B + j
is a pure function of (seed, p) -- which item (a per-epoch permutation) and its random augmentation (seeded by p) --
so a run resumed at step k reads exactly what the uninterrupted run would have read. WebDataset streams resume
with a fresh deterministic shard stream seeded by (seed, rank, worker, step): no position inside a tar is kept.
"""
import csv
import math
import os
import random
import re
import sys

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

# -----------------------------------------------------------------------------
# The embedded synthetic dataset: coloured shapes at named positions, captioned in varied words.
# Held-out (colour, shape) pairs never occur in training, so zero-shot accuracy on them measures generalisation.

SHAPES = ['circle', 'square', 'triangle', 'star', 'cross', 'diamond', 'ring', 'crescent']
COLOURS = {'red': (215, 40, 40), 'green': (40, 165, 60), 'blue': (45, 80, 220), 'yellow': (235, 205, 40),
           'purple': (135, 60, 185), 'orange': (245, 135, 25), 'cyan': (40, 200, 215), 'pink': (240, 120, 185)}
COLOUR_NAMES = list(COLOURS)
# 3x3 grid of positions (row, col) and how a caption names them
POSITIONS = ['top left', 'top', 'top right', 'left', 'center', 'right', 'bottom left', 'bottom', 'bottom right']
WHERE = {'top left': 'in the top left', 'top': 'at the top', 'top right': 'in the top right',
         'left': 'on the left', 'center': 'in the center', 'right': 'on the right',
         'bottom left': 'in the bottom left', 'bottom': 'at the bottom', 'bottom right': 'in the bottom right'}
SIZES = {'small': 0.12, 'large': 0.18}  # object radius as a fraction of the image side
SIZE_WORDS = {'small': ['small', 'little', 'tiny'], 'large': ['large', 'big', 'huge']}
TEMPLATES = ['a {size} {colour} {shape} {where}', 'a photo of a {colour} {shape} {where}',
             '{where}, a {size} {colour} {shape}', 'there is a {size} {colour} {shape} {where}',
             'an image with a {colour} {shape} {where}', 'a {colour} {shape}, {size}, {where}']
SECOND = ['a {size} {colour} {shape} {where}', 'a {colour} {shape} {where}']  # after 'and'
CANONICAL = 'a {size} {colour} {shape} {where}'  # retrieval captions


def is_heldout(colour, shape):
    """8 of the 64 (colour, shape) pairs never appear in training: each colour misses one shape and vice versa."""
    return (COLOUR_NAMES.index(colour) - SHAPES.index(shape)) % len(SHAPES) == 0


def _shape_mask(draw, shape, cx, cy, r, angle):
    """Draw `shape` as 255 on an 'L' mask centred at (cx, cy) with radius r, rotated by `angle` radians."""
    def poly(points):  # points in units of r around the centre, rotated
        c, s = math.cos(angle), math.sin(angle)
        draw.polygon([(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in points], fill=255)
    if shape == 'circle':
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == 'ring':
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        draw.ellipse([cx - .55 * r, cy - .55 * r, cx + .55 * r, cy + .55 * r], fill=0)
    elif shape == 'crescent':
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        ox, oy = .5 * r * math.cos(angle), .5 * r * math.sin(angle)
        draw.ellipse([cx + ox - .85 * r, cy + oy - .85 * r, cx + ox + .85 * r, cy + oy + .85 * r], fill=0)
    elif shape == 'square':
        poly([(-.8, -.8), (.8, -.8), (.8, .8), (-.8, .8)])
    elif shape == 'triangle':
        poly([(0, -1), (.87, .5), (-.87, .5)])
    elif shape == 'diamond':
        poly([(0, -1), (.6, 0), (0, 1), (-.6, 0)])
    elif shape == 'star':
        poly([((1 if i % 2 == 0 else .42) * math.sin(i * math.pi / 5), -(1 if i % 2 == 0 else .42) * math.cos(i * math.pi / 5))
              for i in range(10)])
    elif shape == 'cross':
        w = .33
        poly([(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)])


def render_scene(objects, size, rng):
    """objects: list of dicts with colour, shape, size, position. Returns a PIL RGB image of side `size`."""
    s = 2 * size  # draw at twice the resolution, then downsample: anti-aliased edges
    grey = rng.randint(70, 150)
    bg = tuple(grey + rng.randint(-12, 12) for _ in range(3))  # a near-grey background
    canvas = Image.new('RGB', (s, s), bg)
    for obj in objects:
        row, col = divmod(POSITIONS.index(obj['position']), 3)
        cx = (col + .5 + rng.uniform(-.15, .15)) * s / 3
        cy = (row + .5 + rng.uniform(-.15, .15)) * s / 3
        r = SIZES[obj['size']] * s * rng.uniform(.85, 1.15)
        mask = Image.new('L', (s, s), 0)
        _shape_mask(ImageDraw.Draw(mask), obj['shape'], cx, cy, r, rng.uniform(0, 2 * math.pi))
        colour = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in COLOURS[obj['colour']])
        canvas.paste(colour, (0, 0, s, s), mask)
    image = np.asarray(canvas.resize((size, size), Image.BILINEAR), dtype=np.int16)
    noise = np.random.default_rng(rng.getrandbits(32)).integers(-18, 19, image.shape, dtype=np.int16)  # pixel noise
    return Image.fromarray(np.clip(image + noise, 0, 255).astype(np.uint8))


def describe(obj, rng=None, templates=TEMPLATES):
    """One object's phrase; a random template and wording with `rng`, the canonical one without."""
    words = dict(colour=obj['colour'], shape=obj['shape'], where=WHERE[obj['position']],
                 size=rng.choice(SIZE_WORDS[obj['size']]) if rng else obj['size'])
    text = (rng.choice(templates) if rng else CANONICAL).format(**words)
    return re.sub(r'\ba (?=[aeiou])', 'an ', text)


def sample_scene(rng, train, n_objects=None):
    """A random scene: 1 or 2 objects in distinct cells; training scenes never contain a held-out pair."""
    n = n_objects or rng.choice([1, 2])
    objects = []
    for position in rng.sample(POSITIONS, n):
        while True:
            colour, shape = rng.choice(COLOUR_NAMES), rng.choice(SHAPES)
            if not (train and is_heldout(colour, shape)):
                break
        objects.append(dict(colour=colour, shape=shape, size=rng.choice(list(SIZES)), position=position))
    return objects


def caption(objects, rng=None):
    if len(objects) == 1:
        return describe(objects[0], rng)
    return f'{describe(objects[0], rng)} and {describe(objects[1], rng, SECOND)}'


class SyntheticShapes(Dataset):
    """Item i is a deterministic function of (seed, split, i): a rendered scene and a caption."""

    def __init__(self, size, seed, split='train', length=100_000, n_objects=None):
        self.size, self.seed, self.split, self.length, self.n_objects = size, seed, split, length, n_objects

    def __len__(self):
        return self.length

    def scene(self, i):
        rng = random.Random(f'{self.seed}-{self.split}-{i}')  # str seeds are hashed with sha512: stable
        objects = sample_scene(rng, self.split == 'train', self.n_objects)
        return objects, render_scene(objects, self.size, rng), rng

    def __getitem__(self, i):
        objects, image, rng = self.scene(i)
        return image, caption(objects, rng if self.split == 'train' else None)


def synthetic_eval_sets(size, seed, transform, n_zeroshot=1200, n_retrieval=500):
    """Held-out images (a split no training index reaches) for zero-shot tasks and retrieval.
    Zero-shot tasks use single-object images over all 64 (colour, shape) pairs; 'object_heldout' scores only the
    images whose pair never occurred in training. Prompts are ensembles over the other attributes, as in CLIP's
    prompt ensembling, in the words training captions use."""
    single = SyntheticShapes(size, seed, 'eval-zeroshot', n_zeroshot, n_objects=1)
    scenes = [single.scene(i) for i in range(n_zeroshot)]
    images = torch.stack([transform(im) for _, im, _ in scenes])
    objs = [o[0] for o, _, _ in scenes]
    objects = [f'{c} {s}' for c in COLOUR_NAMES for s in SHAPES]
    held = torch.tensor([is_heldout(o['colour'], o['shape']) for o in objs])
    tasks = {
        'shape': (SHAPES, [o['shape'] for o in objs], [lambda c, k=k: f'a photo of a {k} {c}' for k in COLOUR_NAMES]),
        'colour': (COLOUR_NAMES, [o['colour'] for o in objs], [lambda c, k=k: f'a photo of a {c} {k}' for k in SHAPES]),
        'position': (POSITIONS, [o['position'] for o in objs],
                     [lambda c, k=k: f'a {k} {WHERE[c]}' for k in ['red circle', 'blue square', 'green star',
                                                                   'yellow triangle', 'purple cross', 'pink ring']]),
        'object': (objects, [f"{o['colour']} {o['shape']}" for o in objs], ['a photo of a {}', 'a {}']),
    }
    out = {}
    for name, (classes, labels, templates) in tasks.items():
        labels = torch.tensor([classes.index(x) for x in labels])
        out[name] = dict(images=images, labels=labels, classnames=classes, templates=templates)
    out['object_heldout'] = dict(out['object'], images=images[held], labels=out['object']['labels'][held])
    pairs, scenes, seen, i = SyntheticShapes(size, seed, 'eval-retrieval'), [], set(), 0
    while len(scenes) < n_retrieval:  # distinct captions, so each has exactly one matching image
        objects, image, _ = pairs.scene(i)
        i += 1
        if caption(objects) not in seen:
            seen.add(caption(objects))
            scenes.append((caption(objects), transform(image)))
    retrieval = dict(images=torch.stack([im for _, im in scenes]), captions=[c for c, _ in scenes])
    return out, retrieval


# -----------------------------------------------------------------------------
# Errors in the user's input: one line, exit code 2, no traceback.

class DataError(ValueError):
    pass


def fail(msg):
    print(f'error: {msg}', file=sys.stderr)
    sys.exit(2)


def resolve_dataset_type(train_data, dataset_type):
    if dataset_type != 'auto':
        return dataset_type
    if train_data is None:
        return 'synthetic'
    if train_data.endswith(('.csv', '.tsv')):
        return 'csv'
    if '.tar' in train_data:
        return 'webdataset'
    raise DataError(f'cannot tell the type of --train-data {train_data!r}: pass --dataset-type csv or webdataset')


# -----------------------------------------------------------------------------
# Map-style datasets (synthetic, CSV): the step sampler makes data order a pure function of (seed, step).

_warned = [0]


def _warn_bad(err):
    if _warned[0] < 5:  # the count goes to the log; the first few reasons to stderr
        print(f'warning: skipping an unreadable sample ({err})', file=sys.stderr)
    _warned[0] += 1


class CsvDataset(Dataset):
    """OpenCLIP's CSV/TSV format: one row per sample, image path column and caption column."""

    def __init__(self, path, img_key, caption_key, sep):
        if not os.path.isfile(path):
            raise DataError(f'--train-data {path} does not exist')
        with open(path, newline='', encoding='utf-8') as f:
            reader = csv.DictReader(f, delimiter=sep)
            missing = [k for k in (img_key, caption_key) if k not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f'{path} has no column {missing[0]!r} (columns: {reader.fieldnames}); '
                                f'set --csv-img-key/--csv-caption-key/--csv-separator')
            rows = [(r[img_key], r[caption_key]) for r in reader]
        if not rows:
            raise DataError(f'{path} has no rows')
        root = os.path.dirname(os.path.abspath(path))
        self.items = [(os.path.join(root, p), c) for p, c in rows]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, text = self.items[i]
        try:
            with Image.open(path) as im:
                return im.convert('RGB'), text
        except Exception as err:
            raise OSError(f'{path}: {err}') from None


class Samples(Dataset):
    """Wraps a map-style (image, caption) dataset: key (index, position) -> (transform(image), tokens, skipped).
    Augmentation randomness is seeded by (seed, position); an unreadable item is replaced by the next one."""

    def __init__(self, base, transform, tokenizer, seed):
        self.base, self.transform, self.tokenizer, self.seed = base, transform, tokenizer, seed

    def __getitem__(self, key):
        index, position = key
        for skipped in range(len(self.base)):
            try:
                image, text = self.base[(index + skipped) % len(self.base)]
                break
            except Exception as err:  # unreadable image: count it, take the next one, keep the batch full
                _warn_bad(err)
        else:
            raise RuntimeError('no readable sample in the whole dataset')
        rng_state = torch.get_rng_state()  # restored below, in case this runs in the main process (--workers 0)
        torch.default_generator.manual_seed(self.seed * 1_000_003 + position)
        image = self.transform(image)
        torch.set_rng_state(rng_state)
        return image, self.tokenizer([text])[0], skipped


class StepSampler:
    """Yields, for each step from `start_step` on, this rank's slice of the global batch as (index, position) keys.
    Position p = step * world * B + rank * B + j; index = permutation(seed, epoch)[p mod n]."""

    def __init__(self, n, batch_size, rank, world, seed, start_step=0):
        self.n, self.B, self.rank, self.world, self.seed, self.start = n, batch_size, rank, world, seed, start_step
        self._perm = (None, None)

    def index(self, p):
        epoch, i = divmod(p, self.n)
        if self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g).tolist())
        return self._perm[1][i]

    def __iter__(self):
        step = self.start
        while True:
            p0 = (step * self.world + self.rank) * self.B
            yield [(self.index(p), p) for p in range(p0, p0 + self.B)]
            step += 1


def _collate(batch):
    images, texts, skipped = zip(*batch)
    return torch.utils.data.default_collate(images), torch.stack(texts), sum(skipped)


# -----------------------------------------------------------------------------
# WebDataset tar shards.

class ShardList(IterableDataset):
    """Shard urls for this (rank, worker): a disjoint slice reshuffled every pass when there are enough shards,
    otherwise shards resampled with replacement; seeded by (seed, rank, worker, start_step)."""

    def __init__(self, urls, seed, rank, world, start_step):
        self.urls, self.seed, self.rank, self.world, self.start = urls, seed, rank, world, start_step

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        rng = random.Random(f'{self.seed}-{self.rank}-{wid}-{self.start}')
        slot, slots = self.rank * nw + wid, self.world * nw
        if len(self.urls) >= slots:
            mine = self.urls[slot::slots]
            while True:
                rng.shuffle(mine)
                yield from (dict(url=u) for u in mine)
        while True:
            yield dict(url=rng.choice(self.urls))


_wds_skipped = [0]  # per worker process: samples dropped since the last yielded one


def _wds_handler(err):
    _warn_bad(err)
    _wds_skipped[0] += 1
    return True  # continue with the next sample


def expand_urls(spec):
    import braceexpand
    return [u for part in spec.split('::') for u in braceexpand.braceexpand(part)]


def webdataset_pipeline(spec, transform, tokenizer, seed, rank, world, start_step):
    import webdataset as wds
    urls = expand_urls(spec)
    local = [u for u in urls if '://' not in u and not u.startswith('pipe:')]
    for u in (local[:1] + local[-1:]):
        if not os.path.exists(u):
            raise DataError(f'--train-data shard {u} does not exist')

    def to_sample(sample):
        image, text = sample
        skipped, _wds_skipped[0] = _wds_skipped[0], 0
        return transform(image), tokenizer([text])[0], skipped

    return wds.DataPipeline(
        ShardList(urls, seed, rank, world, start_step),
        wds.tarfile_to_samples(handler=_wds_handler),
        wds.shuffle(1000, initial=100, seed=f'{seed}-{rank}-{start_step}'),
        wds.decode('pilrgb', handler=_wds_handler),
        wds.to_tuple('jpg;png;jpeg;webp', 'txt', handler=_wds_handler),
        wds.map(to_sample, handler=_wds_handler),
    )


# -----------------------------------------------------------------------------
# The one entry point for training data.

def train_loader(args, transform, tokenizer, image_size, rank, world, start_step):
    """An endless loader of (images, texts, skipped) batches for this rank, starting at `start_step`.
    Returns (loader, num_samples) where num_samples is the dataset size used to default --steps."""
    kind = resolve_dataset_type(args.train_data, args.dataset_type)
    common = dict(num_workers=args.workers, collate_fn=_collate, pin_memory=torch.cuda.is_available(),
                  persistent_workers=args.workers > 0)
    if kind == 'webdataset':
        if args.train_data is None:
            raise DataError('--dataset-type webdataset needs --train-data')
        ds = webdataset_pipeline(args.train_data, transform, tokenizer, args.seed, rank, world, start_step)
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + rank * 7919 + start_step)  # worker aug seeds
        loader = DataLoader(ds, batch_size=args.batch_size, generator=g, **common)
        return loader, args.train_num_samples
    if kind == 'synthetic':
        base = SyntheticShapes(image_size, args.seed, 'train', args.train_num_samples or 100_000)
    elif kind == 'csv':
        if args.train_data is None:
            raise DataError('--dataset-type csv needs --train-data')
        base = CsvDataset(args.train_data, args.csv_img_key, args.csv_caption_key, args.csv_separator)
    else:
        raise DataError(f'unknown --dataset-type {kind}')
    sampler = StepSampler(len(base), args.batch_size, rank, world, args.seed, start_step)
    loader = DataLoader(Samples(base, transform, tokenizer, args.seed), batch_sampler=sampler, **common)
    return loader, len(base)


# -----------------------------------------------------------------------------
# Evaluation data: the synthetic held-out sets, or ImageFolders for zero-shot classification.

class Folder(Dataset):
    def __init__(self, root, transform):
        from torchvision.datasets import ImageFolder
        if not os.path.isdir(root):
            raise DataError(f'evaluation folder {root} does not exist')
        self.folder, self.transform = ImageFolder(root), transform

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, i):
        path, label = self.folder.samples[i]
        with Image.open(path) as im:
            return self.transform(im.convert('RGB')), label


def eval_sets(args, transform, image_size):
    """Zero-shot tasks {name: dict(loader or images, labels, classnames, templates)} and a retrieval set (or None)."""
    tasks, retrieval = {}, None
    for name, root, classnames, templates in [
            ('imagenet', args.imagenet_val, IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES),
            ('folder', args.zeroshot_folder, None, OPENAI_IMAGENET_TEMPLATES)]:
        if root:
            ds = Folder(root, transform)
            names = classnames or [c.replace('_', ' ') for c in ds.folder.classes]
            loader = DataLoader(ds, batch_size=args.batch_size, num_workers=args.workers)
            tasks[name] = dict(loader=loader, classnames=list(names), templates=templates)
    if resolve_dataset_type(args.train_data, args.dataset_type) == 'synthetic':
        syn, retrieval = synthetic_eval_sets(image_size, 0, transform)  # one fixed evaluation set for every run
        tasks.update(syn)
    return tasks, retrieval
