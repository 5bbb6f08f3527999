"""Data loading, and nothing else: the embedded synthetic dataset, CSV/TSV files, WebDataset shards and zero-shot
evaluation folders. Methods pass their own (multi-view) image transforms in; this file does not know about methods.

Every training loader yields `(images, texts, skipped)` per step, where `images` is whatever the method's transform
returns (collated), `texts` is (B, context_length) token ids and `skipped` counts the unreadable samples that were
replaced while filling the batch (logged by the loop, never silent).

Exact resume: for the synthetic and CSV datasets, the sample at global position p (StepSampler: step * global_batch +
(rank * accum_freq + micro-batch) * B + j) is a pure function of (seed, p) -- which item (a per-epoch permutation)
and its random augmentation (seeded by p) -- so a run resumed at step k reads exactly what the uninterrupted run would
have read, and any split of a global batch into ranks x micro-batches reads the same samples. WebDataset streams resume
with a fresh deterministic shard stream seeded by (seed, rank, worker, step): no position inside a tar is kept.
"""
import csv
import io
import json
import math
import os
import random
import re
import sys
import tarfile

import numpy as np
import torch
import torch.distributed as dist
import torchvision.transforms as T
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

# -----------------------------------------------------------------------------
# The embedded synthetic dataset: coloured shapes at named positions, captioned in varied words.
# Held-out (colour, shape) pairs never occur in training, so zero-shot accuracy on them measures generalisation.
# Training scenes come in hard-negative groups (--synthetic-group-size, consecutive in every batch): with independent
# scenes, the colours alone tell almost every caption in a batch from the others, and a contrastive model never needs
# shape or position (feature suppression); captions that differ in one attribute only make each attribute necessary.
# Objects are larger than in the first version, unrotated, one per scene and nearer their cell's centre: the README
# says what each change gave.

SHAPES = ['circle', 'square', 'triangle', 'star', 'cross', 'diamond', 'ring', 'crescent']
COLOURS = {'red': (215, 40, 40), 'green': (40, 165, 60), 'blue': (45, 80, 220), 'yellow': (235, 205, 40),
           'purple': (135, 60, 185), 'orange': (245, 135, 25), 'cyan': (40, 200, 215), 'pink': (240, 120, 185)}
COLOUR_NAMES = list(COLOURS)
# 3x3 grid of positions (row, col) and how a caption names them
POSITIONS = ['top left', 'top', 'top right', 'left', 'center', 'right', 'bottom left', 'bottom', 'bottom right']
WHERE = {'top left': 'in the top left', 'top': 'at the top', 'top right': 'in the top right',
         'left': 'on the left', 'center': 'in the center', 'right': 'on the right',
         'bottom left': 'in the bottom left', 'bottom': 'at the bottom', 'bottom right': 'in the bottom right'}
SIZES = {'small': 0.2, 'large': 0.28}  # object radius as a fraction of the image side (was 0.12 / 0.18)
ROTATE = False  # draw each object at a random angle (was True)
JITTER = 0.05  # how far (a fraction of a cell) an object's centre moves from its cell's centre (was 0.15)
OBJECTS = [1]  # objects per scene, one drawn at random (was [1, 2]: captions joined by 'and')
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
        cx = (col + .5 + rng.uniform(-JITTER, JITTER)) * s / 3
        cy = (row + .5 + rng.uniform(-JITTER, JITTER)) * s / 3
        r = SIZES[obj['size']] * s * rng.uniform(.85, 1.15)
        mask = Image.new('L', (s, s), 0)
        _shape_mask(ImageDraw.Draw(mask), obj['shape'], cx, cy, r, rng.uniform(0, 2 * math.pi) if ROTATE else 0.0)
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
    """A random scene: n_objects (default: one of OBJECTS) objects in distinct cells; training scenes never contain a
    held-out pair."""
    n = n_objects or rng.choice(OBJECTS)
    objects = []
    for position in rng.sample(POSITIONS, n):
        while True:
            colour, shape = rng.choice(COLOUR_NAMES), rng.choice(SHAPES)
            if not (train and is_heldout(colour, shape)):
                break
        objects.append(dict(colour=colour, shape=shape, size=rng.choice(list(SIZES)), position=position))
    return objects


# What a hard-negative group varies, and how often: the attributes a batch of random scenes lets colour stand in for.
# Size is not varied (two values only) and stays caption noise.
GROUP_VARIES = {'shape': 0.4, 'position': 0.4, 'colour': 0.2}
MAX_GROUP = 7  # a colour has 7 training shapes (and a shape 7 training colours)


def sample_group(rng, train, size, n_objects=None):
    """`size` scenes that are one random scene with one attribute of one of its objects changed (GROUP_VARIES), each
    member a different value of it: captions of a group differ in that attribute's words only, so telling them apart
    takes that attribute (hard negatives). Training groups never contain a held-out pair."""
    base = sample_scene(rng, train, n_objects)
    k = rng.randrange(len(base))
    attribute = rng.choices(list(GROUP_VARIES), weights=list(GROUP_VARIES.values()))[0]
    obj, others = base[k], [o for j, o in enumerate(base) if j != k]
    if attribute == 'shape':
        values = [s for s in SHAPES if not (train and is_heldout(obj['colour'], s))]
    elif attribute == 'colour':
        values = [c for c in COLOUR_NAMES if not (train and is_heldout(c, obj['shape']))]
    else:
        values = [p for p in POSITIONS if p not in {o['position'] for o in others}]
    return [base[:k] + [dict(obj, **{attribute: v})] + base[k + 1:] for v in rng.sample(values, size)]


def caption(objects, rng=None):
    if len(objects) == 1:
        return describe(objects[0], rng)
    return f'{describe(objects[0], rng)} and {describe(objects[1], rng, SECOND)}'


class SyntheticShapes(Dataset):
    """Item i is a deterministic function of (seed, split, i): a rendered scene and a caption. With group > 1, items
    g * group ... g * group + group - 1 are a hard-negative group (sample_group, drawn from (seed, split, g)); each
    member's rendering (jitter, rotation, background, noise) and caption wording are its own (seed, split, i)."""

    def __init__(self, size, seed, split='train', length=100_000, n_objects=None, group=1):
        if not 1 <= group <= MAX_GROUP:
            raise DataError(f'--synthetic-group-size must be 1 to {MAX_GROUP} (a colour has {MAX_GROUP} training '
                            f'shapes), got {group}')
        if length < group:
            raise DataError(f'--train-num-samples {length} is fewer than one group of --synthetic-group-size {group}')
        self.size, self.seed, self.split, self.length, self.n_objects = size, seed, split, length, n_objects
        self.group = group

    def __len__(self):
        return self.length

    def scene(self, i):
        rng = random.Random(f'{self.seed}-{self.split}-{i}')  # str seeds are hashed with sha512: stable
        if self.group == 1:
            objects = sample_scene(rng, self.split == 'train', self.n_objects)
        else:
            g, j = divmod(i, self.group)
            group_rng = random.Random(f'{self.seed}-{self.split}-group{self.group}-{g}')
            objects = sample_group(group_rng, self.split == 'train', self.group, self.n_objects)[j]
        return objects, render_scene(objects, self.size, rng), rng

    def __getitem__(self, i):
        objects, image, rng = self.scene(i)
        return image, caption(objects, rng if self.split == 'train' else None)


def synthetic_eval_sets(size, seed, transform, n_zeroshot=3000, n_retrieval=1000):
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
    if os.path.isdir(train_data):
        return 'imagefolder'  # images without captions: image_loader (UTA's alignment stage)
    raise DataError(f'cannot tell the type of --train-data {train_data!r}: pass --dataset-type csv or webdataset')


# -----------------------------------------------------------------------------
# Map-style datasets (synthetic, CSV): the step sampler makes data order a pure function of (seed, step).

_warned = [0]


def _warn_bad(err):
    if _warned[0] < 5:  # the count goes to the log; the first few reasons to stderr
        print(f'warning: skipping an unreadable sample ({err})', file=sys.stderr)
    _warned[0] += 1


def read_csv(path, img_key, caption_key, sep, flag='--train-data'):
    """OpenCLIP's CSV/TSV format -> [(image path, caption)], paths relative to the file's folder made absolute.
    A missing file, a missing column, a row with another number of fields than the header, or no rows: DataError."""
    if not os.path.isfile(path):
        raise DataError(f'{flag} {path} does not exist')
    rows = []
    try:
        with open(path, newline='', encoding='utf-8') as f:
            reader = csv.DictReader(f, delimiter=sep)
            missing = [k for k in (img_key, caption_key) if k not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f'{path} has no column {missing[0]!r} (columns: {reader.fieldnames}); '
                                f'set --csv-img-key/--csv-caption-key/--csv-separator')
            for r in reader:
                extra, given = r.pop(None, []), [v for v in r.values() if v is not None]  # DictReader's marks
                if extra or len(given) < len(r):  # too many or too few fields
                    raise DataError(f'{path} line {reader.line_num}: {len(given) + len(extra)} fields, the header has '
                                    f'{len(reader.fieldnames)}; check --csv-separator')
                rows.append((r[img_key], r[caption_key]))
    except (csv.Error, UnicodeDecodeError) as err:
        raise DataError(f'{path} is not a readable CSV ({err})') from None
    if not rows:
        raise DataError(f'{flag} {path} has no rows')
    root = os.path.dirname(os.path.abspath(path))
    return [(os.path.join(root, p), c) for p, c in rows]


class CsvDataset(Dataset):
    """OpenCLIP's CSV/TSV format: one row per sample, image path column and caption column."""

    def __init__(self, path, img_key, caption_key, sep):
        self.items = read_csv(path, img_key, caption_key, sep)

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
            raise DataError(f'no readable image in the whole of --train-data ({len(self.base)} samples)')
        rng_state = torch.get_rng_state()  # restored below, in case this runs in the main process (--workers 0)
        torch.default_generator.manual_seed(self.seed * 1_000_003 + position)
        image = self.transform(image)
        torch.set_rng_state(rng_state)
        return image, self.tokenizer([text])[0], skipped


class StepSampler:
    """Yields, for each step from `start_step` on, this rank's K = accum_freq micro-batches of the global batch as
    (index, position) keys. Micro-batch k of rank r holds positions p = step * G + (r * K + k) * B + j, G = world * K * B
    the global batch; index = permutation(seed, epoch)[p mod n], a permutation of whole groups of `group` consecutive
    items (the synthetic data's hard-negative groups stay together, at consecutive positions). So a sample, and its
    augmentation, depend on its position in the global batch only: any split of the same global batch into ranks x
    micro-batches reads the same."""

    def __init__(self, n, batch_size, rank, world, seed, start_step=0, accum_freq=1, group=1):
        self.B, self.rank, self.world, self.seed, self.start = batch_size, rank, world, seed, start_step
        self.K, self.group, self.n = accum_freq, group, n // group * group
        self._perm = (None, None)

    def index(self, p):
        epoch, i = divmod(p, self.n)
        if self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._perm = (epoch, torch.randperm(self.n // self.group, generator=g).tolist())
        return self._perm[1][i // self.group] * self.group + i % self.group

    def __iter__(self):
        step = self.start
        while True:
            for k in range(self.K):
                p0 = step * self.world * self.K * self.B + (self.rank * self.K + k) * self.B
                yield [(self.index(p), p) for p in range(p0, p0 + self.B)]
            step += 1


def _collate(batch):
    images, texts, skipped = zip(*batch)
    return torch.utils.data.default_collate(images), torch.stack(texts), sum(skipped)


# -----------------------------------------------------------------------------
# WebDataset tar shards.

MAX_FAILURES = 1000  # unreadable WebDataset samples in a row before the loader stops with an error


class MissingMember(ValueError):
    """A sample without the member a key names; `found` lists the members it has."""

    def __init__(self, sample, what, key):
        self.found = sorted(k for k in sample if not k.startswith('__'))
        super().__init__(f"{sample.get('__key__')}: no {what} member {key!r} (members: {', '.join(self.found)})")


class Members:
    """Which members of a WebDataset sample hold the image and the caption (--wds-image-key, --wds-caption-key):
    ';'-separated member suffixes, the first one present wins; a caption key json:FIELD reads FIELD of the .json
    member (a string, or a list of strings: several captions)."""

    def __init__(self, image_key, caption_key):
        self.image_key, self.caption_key = image_key, caption_key
        self.image_keys = [k.strip().lower() for k in image_key.split(';') if k.strip()]
        self.caption_keys = [k.strip() for k in caption_key.split(';') if k.strip()]
        if not self.image_keys or not self.caption_keys:
            raise DataError('--wds-image-key and --wds-caption-key must each name a member')

    def image(self, sample):
        """The image member's bytes."""
        for key in self.image_keys:
            if key in sample:
                return sample[key]
        raise MissingMember(sample, 'image', self.image_key)

    def captions(self, sample):
        """The sample's captions: a non-empty list of str."""
        for key in self.caption_keys:
            member, _, field = key.partition(':')
            value = sample.get(member.lower())
            if value is not None and field:
                value = json.loads(value).get(field)
            value = [value] if isinstance(value, (str, bytes)) else value or []
            texts = [t.decode('utf-8') if isinstance(t, bytes) else t for t in value]
            if texts and all(isinstance(t, str) for t in texts):
                return texts
        raise MissingMember(sample, 'caption', self.caption_key)


class Failures:
    """Per loader process: the WebDataset samples skipped since the last good one (handed on with the next, for the
    log) and the failures in a row. After MAX_FAILURES unreadable samples in a row, or ten passes over the shards
    without a sample (empty tars), a DataError names the members found and the flags that pick them: a loader that
    can read nothing stops instead of skipping forever."""

    def __init__(self, members):
        self.members = members
        self.skipped = self.in_a_row = self.shards = 0
        self.found = self.last = None

    def handler(self, err):  # webdataset's exception handler: count it, go on with the next sample
        if not isinstance(err, MissingMember):  # a missing member is counted in the log, not printed
            _warn_bad(err)
        self.skipped, self.in_a_row, self.last = self.skipped + 1, self.in_a_row + 1, err
        self.found = getattr(err, 'found', self.found)
        if self.in_a_row >= MAX_FAILURES:
            raise DataError(self.message(f'{self.in_a_row} samples in a row'))
        return True

    def shard(self, limit):  # a shard is about to be read
        self.shards += 1
        if self.shards > limit and self.members:
            raise DataError(self.message(f'{limit} shards in a row (empty tars?)'))

    def seen(self, sample):  # a sample came out of a tar
        self.shards = 0
        return sample

    def good(self):  # a sample was read: returns the samples skipped before it
        skipped, self.skipped, self.in_a_row = self.skipped, 0, 0
        return skipped

    def message(self, what):
        last = str(self.last).splitlines()[0][:300] if self.last else 'none'
        return (f'no sample could be read from --train-data in {what}: members found: '
                f'{", ".join(self.found) if self.found else "none"}; set --wds-image-key (now '
                f'{self.members.image_key!r}) and --wds-caption-key (now {self.members.caption_key!r}) to the members '
                f'that hold them (json:FIELD reads a field of the .json member); last error: {last}')


class ShardList(IterableDataset):
    """Shard urls for this (rank, worker): a disjoint slice reshuffled every pass when there are enough shards,
    otherwise shards resampled with replacement; seeded by (seed, rank, worker, start_step)."""

    def __init__(self, urls, seed, rank, world, start_step, failures=None):
        self.urls, self.seed, self.rank, self.world, self.start = urls, seed, rank, world, start_step
        self.failures = failures or Failures(None)  # None: shards without samples are not counted

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        rng = random.Random(f'{self.seed}-{self.rank}-{wid}-{self.start}')
        slot, slots = self.rank * nw + wid, self.world * nw
        if len(self.urls) >= slots:
            mine = self.urls[slot::slots]
            while True:
                rng.shuffle(mine)
                for u in mine:
                    self.failures.shard(10 * len(mine))
                    yield dict(url=u)
        while True:
            self.failures.shard(10 * len(self.urls))
            yield dict(url=rng.choice(self.urls))


PIL_RESAMPLE = {T.InterpolationMode.NEAREST: Image.NEAREST, T.InterpolationMode.BILINEAR: Image.BILINEAR,
                T.InterpolationMode.BICUBIC: Image.BICUBIC, T.InterpolationMode.LANCZOS: Image.LANCZOS}


def _rgb(image):
    return image if image.mode == 'RGB' else image.convert('RGB')


class Decoder:
    """Image bytes -> transform(image). When the transform is a T.Compose that starts with a RandomResizedCrop, the
    crop is drawn first, from the image's size alone (the transform's own draws from torch's RNG, in its order), and a
    JPEG is decoded at the largest DCT reduction (1/2, 1/4 or 1/8; PIL's Image.draft) that leaves the crop at least
    the output size in both sides; the same region is then resized to the output (bicubic, antialiased, as the crop
    would be). The crops, scales and flips are the transform's, the pixels those of a slightly different downscaler;
    the decode costs a fraction (a 500x375 JPEG at 64 px: 1/4 of the pixels decoded; at 224 px nothing is reduced).
    Any other transform or format: a full decode, then the transform as given."""

    def __init__(self, transform, draft=True):
        self.transform, self.crop = transform, None
        steps = getattr(transform, 'transforms', None)
        if draft and isinstance(transform, T.Compose) and steps and isinstance(steps[0], T.RandomResizedCrop):
            self.crop, self.rest = steps[0], T.Compose(steps[1:])

    def __call__(self, payload):
        with io.BytesIO(payload) as f, Image.open(f) as image:
            if self.crop is None or image.format != 'JPEG':
                image.load()
                return self.transform(_rgb(image))
            top, left, h, w = self.crop.get_params(image, self.crop.scale, self.crop.ratio)  # reads the size only
            out_h, out_w = self.crop.size
            scale = 1
            while scale < 8 and w / (2 * scale) >= out_w and h / (2 * scale) >= out_h:
                scale *= 2
            if scale == 1:  # exactly the transform's own path
                image.load()
                crop = T.functional.resized_crop(_rgb(image), top, left, h, w, self.crop.size,
                                                 self.crop.interpolation, antialias=self.crop.antialias)
                return self.rest(crop)
            W, H = image.size
            image.draft('RGB', (W // scale, H // scale))  # decodes at ceil(W / scale) x ceil(H / scale)
            sx, sy = image.size[0] / W, image.size[1] / H
            box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)  # the same region, in reduced pixels
            crop = _rgb(image).resize((out_w, out_h), PIL_RESAMPLE[self.crop.interpolation], box=box)
            return self.rest(crop)


_wds_skipped = [0]  # per worker process: samples dropped since the last yielded one (image_webdataset's count)


def _wds_handler(err):
    _warn_bad(err)
    _wds_skipped[0] += 1
    return True  # continue with the next sample


def expand_urls(spec):
    import braceexpand
    return [u for part in spec.split('::') for u in braceexpand.braceexpand(part)]


def check_shards(urls, flag):
    local = [u for u in urls if '://' not in u and not u.startswith('pipe:')]
    for u in (local[:1] + local[-1:]):
        if not os.path.exists(u):
            raise DataError(f'{flag} shard {u} does not exist')


def webdataset_pipeline(spec, transform, tokenizer, seed, rank, world, start_step, members, draft=True):
    """(transform(image), tokens, skipped) samples from the shards of `spec` for this rank (and loader worker).
    `members`: a Members; draft=False decodes every image in full (bench.py loader compares)."""
    import webdataset as wds
    urls = expand_urls(spec)
    check_shards(urls, '--train-data')
    failures, decode = Failures(members), Decoder(transform, draft)

    def to_sample(sample):
        text = members.captions(sample)[0]
        image = decode(members.image(sample))
        return image, tokenizer([text])[0], failures.good()

    return wds.DataPipeline(
        ShardList(urls, seed, rank, world, start_step, failures),
        wds.tarfile_to_samples(handler=failures.handler),
        wds.map(failures.seen),
        wds.shuffle(1000, initial=100, seed=f'{seed}-{rank}-{start_step}'),
        wds.map(to_sample, handler=failures.handler),
    )


class Loader:
    """A DataLoader whose DataError reaches the caller as one DataError with one line: raised in a worker process, it
    comes back from torch with the worker's traceback as its text, whose last line is the message."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        batches = iter(self.loader)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except DataError as err:
                lines = str(err).strip().splitlines() or ['']
                raise DataError(lines[-1].split('DataError: ', 1)[-1] if len(lines) > 1 else lines[0]) from None
            yield batch


# -----------------------------------------------------------------------------
# The one entry point for training data.

def train_loader(args, transform, tokenizer, image_size, rank, world, start_step):
    """An endless loader of (images, texts, skipped) batches for this rank, starting at `start_step`.
    Returns (loader, num_samples) where num_samples is the dataset size used to default --steps. Data that cannot be
    read at all (no readable sample in the whole CSV; WebDataset: data.MAX_FAILURES samples in a row) raises a
    one-line DataError from next() on the loader's iterator, also when it happened in a worker process."""
    kind = resolve_dataset_type(args.train_data, args.dataset_type)
    common = dict(num_workers=args.workers, collate_fn=_collate, pin_memory=torch.cuda.is_available(),
                  persistent_workers=args.workers > 0)
    if kind == 'webdataset':
        if args.train_data is None:
            raise DataError('--dataset-type webdataset needs --train-data')
        ds = webdataset_pipeline(args.train_data, transform, tokenizer, args.seed, rank, world, start_step,
                                 Members(args.wds_image_key, args.wds_caption_key))
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + rank * 7919 + start_step)  # worker aug seeds
        loader = DataLoader(ds, batch_size=args.batch_size, generator=g, **common)
        return Loader(loader), args.train_num_samples
    if kind == 'synthetic':
        base = SyntheticShapes(image_size, args.seed, 'train', args.train_num_samples or 100_000,
                               group=args.synthetic_group_size)
    elif kind == 'csv':
        if args.train_data is None:
            raise DataError('--dataset-type csv needs --train-data')
        base = CsvDataset(args.train_data, args.csv_img_key, args.csv_caption_key, args.csv_separator)
    elif kind == 'imagefolder':
        raise DataError(f'--train-data {args.train_data} is a folder of images without captions, which only '
                        "uta.py's alignment stage trains on; give a CSV or WebDataset shards with captions")
    else:
        raise DataError(f'unknown --dataset-type {kind}')
    sampler = StepSampler(len(base), args.batch_size, rank, world, args.seed, start_step, args.accum_freq,
                          getattr(base, 'group', 1))
    loader = DataLoader(Samples(base, transform, tokenizer, args.seed), batch_sampler=sampler, **common)
    return Loader(loader), len(base)


# -----------------------------------------------------------------------------
# Image-only training data (UTA's alignment stage; ImageNet-21K in the paper): batches of (images, (B, 0) token ids:
# no captions, skipped), with train_loader's order, augmentation seeds and resume.

class ImageFolderImages(Dataset):
    """A torchvision ImageFolder (class folders of images; the classes are not used) as (image, '') items."""

    def __init__(self, root):
        from torchvision.datasets import ImageFolder
        try:
            self.paths = [path for path, _ in ImageFolder(root).samples]
        except (FileNotFoundError, RuntimeError) as err:  # no class folders, or no images in them
            raise DataError(f'--train-data {root}: {str(err).splitlines()[0]}') from None

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            with Image.open(self.paths[i]) as im:
                return im.convert('RGB'), ''
        except Exception as err:
            raise OSError(f'{self.paths[i]}: {err}') from None


def _no_tokens(texts):
    return torch.zeros(len(texts), 0, dtype=torch.long)  # (n, 0): no captions


def image_webdataset(spec, transform, seed, rank, world, start_step, members):
    """webdataset_pipeline reading each sample's image member alone (members.image): shards with or without
    captions. The same shard order, shuffle, decoding and bounded failures."""
    import webdataset as wds
    urls = expand_urls(spec)
    check_shards(urls, '--train-data')
    failures, decode = Failures(members), Decoder(transform)

    def to_sample(sample):
        return decode(members.image(sample)), _no_tokens([''])[0], failures.good()

    return wds.DataPipeline(
        ShardList(urls, seed, rank, world, start_step, failures),
        wds.tarfile_to_samples(handler=failures.handler),
        wds.map(failures.seen),
        wds.shuffle(1000, initial=100, seed=f'{seed}-{rank}-{start_step}'),
        wds.map(to_sample, handler=failures.handler),
    )


def image_loader(args, transform, rank, world, start_step):
    """train_loader for images alone: an ImageFolder (--train-data DIR) or WebDataset shards, whose captions, if
    any, are not read. Returns (loader, num_samples)."""
    kind = resolve_dataset_type(args.train_data, args.dataset_type)
    common = dict(num_workers=args.workers, collate_fn=_collate, pin_memory=torch.cuda.is_available(),
                  persistent_workers=args.workers > 0)
    if kind == 'webdataset':
        ds = image_webdataset(args.train_data, transform, args.seed, rank, world, start_step,
                              Members(args.wds_image_key, args.wds_caption_key))
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + rank * 7919 + start_step)  # worker aug seeds
        return Loader(DataLoader(ds, batch_size=args.batch_size, generator=g, **common)), args.train_num_samples
    if kind != 'imagefolder':
        raise DataError(f'image-only loading reads an ImageFolder or WebDataset shards, not --dataset-type {kind}')
    base = ImageFolderImages(args.train_data)
    sampler = StepSampler(len(base), args.batch_size, rank, world, args.seed, start_step, args.accum_freq)
    loader = DataLoader(Samples(base, transform, _no_tokens, args.seed), batch_sampler=sampler, **common)
    return Loader(loader), len(base)


# -----------------------------------------------------------------------------
# Evaluation data: the synthetic held-out sets, ImageFolders for zero-shot classification, --val-data for retrieval.
# Every rank loads its own batches of each set (eval_batches); common.evaluate sums the counts over ranks.

def eval_batches(n, batch_size, rank, world):
    """The batches of an evaluation set of n items that `rank` scores: batch c (items c*B ... c*B + B - 1) goes to rank
    c mod world, so each item is encoded in the batch a single process would put it in: the totals summed over ranks
    are the single process's, exactly, whatever n."""
    return [range(s, min(s + batch_size, n)) for s in range(rank * batch_size, n, world * batch_size)]


def _rank_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


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


class RetrievalImages(Dataset):
    """The images of a retrieval set: item i -> (transform(image i), i). A source is a file path (CSV) or the
    (shard, offset, size) of a tar member (WebDataset)."""

    def __init__(self, sources, transform):
        self.sources, self.transform = sources, transform

    def __len__(self):
        return len(self.sources)

    def __getitem__(self, i):
        source = self.sources[i]
        if isinstance(source, str):
            with Image.open(source) as im:
                return self.transform(im.convert('RGB')), i
        url, offset, size = source
        with open(url, 'rb') as f:
            f.seek(offset)
            with Image.open(io.BytesIO(f.read(size))) as im:
                return self.transform(im.convert('RGB')), i


def _val_csv(path, args):
    rows = read_csv(path, args.csv_img_key, args.csv_caption_key, args.csv_separator, '--val-data')
    images = list(dict.fromkeys(p for p, _ in rows))  # in order of first appearance
    missing = [p for p in images if not os.path.isfile(p)]
    if missing:
        raise DataError(f'--val-data {path}: {len(missing)} of its {len(images)} images do not exist, e.g. {missing[0]}')
    index = {p: i for i, p in enumerate(images)}
    return images, [c for _, c in rows], [index[p] for p, _ in rows]


def _val_shards(spec, members):
    from webdataset.tariterators import base_plus_ext
    caption_members = {key.partition(':')[0].lower() for key in members.caption_keys}
    sources, captions, image_of = [], [], []
    for url in expand_urls(spec):
        if not os.path.isfile(url):
            raise DataError(f'--val-data shard {url} does not exist (local shards only)')
        try:
            with tarfile.open(url) as tar:
                samples = {}  # key -> {member suffix: TarInfo}, in tar order
                for info in tar:
                    prefix, suffix = base_plus_ext(info.name)
                    if info.isfile() and prefix:
                        samples.setdefault(prefix, {'__key__': prefix})[suffix.lower()] = info
                for sample in samples.values():
                    sample.update({k: tar.extractfile(sample[k]).read() for k in caption_members if k in sample})
                    try:
                        image = members.image(sample)
                        texts = [line.strip() for c in members.captions(sample) for line in c.splitlines()]
                    except (ValueError, UnicodeDecodeError) as err:  # MissingMember, bad JSON, bad UTF-8
                        raise DataError(f'--val-data {url}: {str(err).splitlines()[0]}; '
                                        'set --wds-image-key / --wds-caption-key') from None
                    texts = [t for t in texts if t]
                    if not texts:  # an image without a caption is not part of the set (OpenCLIP drops it too)
                        continue
                    sources.append((url, image.offset_data, image.size))
                    image_of += [len(sources) - 1] * len(texts)
                    captions += texts
        except tarfile.TarError as err:
            raise DataError(f'--val-data shard {url} is not a readable tar ({err})') from None
    return sources, captions, image_of


def val_set(args, transform):
    """--val-data: a retrieval set with several captions per image (COCO / Flickr30K Karpathy test splits), as a CSV/TSV
    of (image path, caption) rows, rows of one image grouped by its path (--csv-img-key, --csv-caption-key); or local
    WebDataset shards, one image per sample and its captions one per line of the caption member (or a list under
    json:FIELD). -> dict(loader of this rank's batches of (images, indices), num_images, captions, image_of: the
    image index of each caption)."""
    path = args.val_data
    if path.endswith(('.csv', '.tsv')):
        sources, captions, image_of = _val_csv(path, args)
    elif '.tar' in path:
        sources, captions, image_of = _val_shards(path, Members(args.wds_image_key, args.wds_caption_key))
    else:
        raise DataError(f'cannot tell the type of --val-data {path!r}: give a .csv/.tsv file or .tar shards')
    if not captions:
        raise DataError(f'--val-data {path} holds no image with a caption')
    ds = RetrievalImages(sources, transform)
    loader = DataLoader(ds, batch_sampler=eval_batches(len(ds), args.batch_size, *_rank_world()),
                        num_workers=args.workers)
    return dict(loader=loader, num_images=len(ds), captions=captions, image_of=torch.tensor(image_of))


# --zeroshot-templates: OpenAI's 80 prompts, or the 7 that FLIP's official code evaluates with (open_clip's 'simple'
# set, OpenAI's selection: 'itap of a {}.', 'a bad photo of the {}.', ...)
ZEROSHOT_TEMPLATES = {'openai': OPENAI_IMAGENET_TEMPLATES, 'flip': SIMPLE_IMAGENET_TEMPLATES}


def eval_sets(args, transform, image_size):
    """Zero-shot tasks {name: dict(loader or images, labels, classnames, templates)} and retrieval sets
    {name: dict(...)} (or None): 'retrieval' on the synthetic data, 'val' for --val-data. Loaders hold this rank's
    batches (eval_batches)."""
    tasks, retrieval = {}, {}
    for name, root, classnames, templates in [
            ('imagenet', args.imagenet_val, IMAGENET_CLASSNAMES, ZEROSHOT_TEMPLATES[args.zeroshot_templates]),
            ('folder', args.zeroshot_folder, None, ZEROSHOT_TEMPLATES[args.zeroshot_templates])]:
        if root:
            ds = Folder(root, transform)
            names = classnames or [c.replace('_', ' ') for c in ds.folder.classes]
            loader = DataLoader(ds, batch_sampler=eval_batches(len(ds), args.batch_size, *_rank_world()),
                                num_workers=args.workers)
            tasks[name] = dict(loader=loader, classnames=list(names), templates=templates)
    if resolve_dataset_type(args.train_data, args.dataset_type) == 'synthetic':
        syn, retrieval['retrieval'] = synthetic_eval_sets(image_size, 0, transform)  # one fixed set for every run
        tasks.update(syn)
    if getattr(args, 'val_data', None):
        retrieval['val'] = val_set(args, transform)
    return tasks, retrieval or None
