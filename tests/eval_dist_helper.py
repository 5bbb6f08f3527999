"""Run as `python tests/eval_dist_helper.py OUT SETS` (one process) or under torchrun: common.evaluate of a tiny random
CLIP on the synthetic zero-shot and retrieval sets (101 and 37 items, batches of 16), the ImageFolder and --val-data CSV
that make_sets(SETS) wrote; rank 0 saves the results and the number of images each rank encoded to OUT."""
import argparse
import contextlib
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import data  # noqa: E402


def make_sets(folder):
    """An ImageFolder of 13 synthetic images in 3 classes, and a val.csv of 7 images with 1-3 captions each."""
    shapes = data.SyntheticShapes(64, 0, 'eval-zeroshot', 20, n_objects=1)
    for i in range(13):
        objects, image, _ = shapes.scene(i)
        os.makedirs(folder / 'folder' / ['red', 'green', 'blue'][i % 3], exist_ok=True)
        image.save(folder / 'folder' / ['red', 'green', 'blue'][i % 3] / f'{i}.png')
    rows = ['filepath\ttitle']
    for i in range(7):
        objects, image, _ = shapes.scene(13 + i)
        image.save(folder / f'val{i}.png')
        rows += [f'val{i}.png\t{data.caption(objects)}'] + [f'val{i}.png\ta photo number {i}.{k}' for k in range(i % 3)]
    (folder / 'val.csv').write_text('\n'.join(rows) + '\n')


if __name__ == '__main__':
    import open_clip
    out, sets = sys.argv[1], sys.argv[2]
    rank, world, device = common.init_distributed()
    torch.manual_seed(0)
    cfg = common.model_config('tiny')
    model = common.CLIP(cfg)
    encoded = [0]
    encode_image = model.encode_image

    def counting(images, **kwargs):
        encoded[0] += len(images)
        return encode_image(images, **kwargs)
    model.encode_image = counting
    transform = open_clip.image_transform(64, is_train=False)
    tasks, synthetic = data.synthetic_eval_sets(64, 0, transform, n_zeroshot=101, n_retrieval=37)
    args = argparse.Namespace(train_data='x.csv', dataset_type='auto', imagenet_val=None, batch_size=4, workers=0,
                              zeroshot_folder=os.path.join(sets, 'folder'), val_data=os.path.join(sets, 'val.csv'),
                              csv_img_key='filepath', csv_caption_key='title', csv_separator='\t',
                              zeroshot_templates='openai')
    more_tasks, more_retrieval = data.eval_sets(args, transform, 64)
    results = common.evaluate(model, common.tokenizer_for(cfg), {**tasks, **more_tasks},
                              {'retrieval': synthetic, **more_retrieval}, device, contextlib.nullcontext(), batch_size=16)
    counts = [None] * world
    if world > 1:
        dist.all_gather_object(counts, encoded[0])
    else:
        counts = encoded
    if rank == 0:
        with open(out, 'w') as f:
            json.dump({'results': results, 'images_encoded': counts}, f, indent=1)
    common.cleanup()
