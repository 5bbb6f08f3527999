"""common.py against open_clip: same weights -> same embeddings; same loss; same token dropping."""
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

import common
import flip


def pair(name):
    cfg = common.model_config(name)
    ref = open_clip.model.CLIP(**cfg) if name == 'tiny' else open_clip.create_model(name)
    ours = common.CLIP(cfg)
    ours.load_state_dict(ref.state_dict(), strict=True)  # the parameter layout is open_clip's, exactly
    return cfg, ref.eval(), ours.eval()


@pytest.mark.parametrize('name', ['tiny', 'ViT-B-16', 'ViT-B-32-quickgelu'])
def test_forward_matches_open_clip(name):
    torch.manual_seed(0)
    cfg, ref, ours = pair(name)
    size = cfg['vision_cfg']['image_size']
    images = torch.randn(2, 3, size, size)
    texts = common.tokenizer_for(cfg)(['a small red circle on the left', 'two blue squares'])
    with torch.no_grad():
        assert (ours.encode_image(images) - ref.encode_image(images)).abs().max() <= 1e-5
        assert (ours.encode_text(texts) - ref.encode_text(texts)).abs().max() <= 1e-5


def test_clip_loss_matches_open_clip():
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(8, 16), dim=-1), F.normalize(torch.randn(8, 16), dim=-1)
    scale = torch.tensor(math.log(1 / 0.07)).exp()
    ref = open_clip.ClipLoss()(img, txt, scale)
    assert torch.allclose(common.clip_loss(img, txt, scale), ref, atol=1e-6)


@pytest.mark.parametrize('ratio', [0.5, 0.75])
def test_masking_matches_patch_dropout(ratio):
    """Same kept indices -> the same output as open_clip's PatchDropout, and the same number of kept tokens."""
    torch.manual_seed(0)
    cfg, ref, ours = pair('tiny')
    ref.visual.patch_dropout = open_clip.transformer.PatchDropout(ratio)
    ref.visual.train()
    B, L = 3, ours.visual.num_patches
    images = torch.randn(B, 3, 64, 64)
    torch.manual_seed(1)
    with torch.no_grad():
        expected = ref.encode_image(images)
    torch.manual_seed(1)  # PatchDropout draws randn(B, L) and keeps the top-k
    ids_keep = torch.randn(B, L).topk(max(1, int(L * (1 - ratio))), dim=-1).indices
    with torch.no_grad():
        assert (ours.encode_image(images, ids_keep=ids_keep) - expected).abs().max() <= 1e-5
    g = torch.Generator().manual_seed(0)
    ids = flip.random_masking(B, L, ratio, g)
    assert ids.shape == ids_keep.shape
    assert all(len(set(row.tolist())) == ids.shape[1] for row in ids) and ids.min() >= 0 and ids.max() < L


def test_masking_is_uniform_and_per_sample():
    g = torch.Generator().manual_seed(0)
    ids = flip.random_masking(4000, 16, 0.5, g)
    counts = torch.bincount(ids.flatten(), minlength=16).float() / 4000
    assert (counts - 0.5).abs().max() < 0.04  # every patch kept half the time
    assert not torch.equal(ids[0].sort().values, ids[1].sort().values)


def test_attention_maps_agree_with_sdpa():
    torch.manual_seed(0)
    model = common.CLIP(common.model_config('tiny')).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = common.attention_maps(model.visual, images)  # (B, layers, heads, N, N)
        x = model.visual.embed(images)
        for i, block in enumerate(model.visual.transformer.resblocks):
            q, k, v = block.attn.qkv(block.ln_1(x))
            assert torch.allclose(maps[:, i] @ v, F.scaled_dot_product_attention(q, k, v), atol=1e-5)
            x = block(x)
    assert maps.shape == (2, 4, 4, 65, 65)
    assert torch.allclose(maps.sum(-1), torch.ones(()), atol=1e-5)


@pytest.mark.parametrize('name', ['RN50', 'ViT-B-16-SigLIP', 'no-such-model'])
def test_unsupported_models_are_refused(name):
    with pytest.raises(ValueError):
        common.model_config(name)


def test_param_groups_and_schedule():
    model = common.CLIP(common.model_config('tiny'))
    decay, no_decay = common.param_groups(model, 0.2)
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay['params']}
    assert {'logit_scale', 'positional_embedding', 'visual.positional_embedding', 'visual.class_embedding',
            'ln_final.weight', 'visual.transformer.resblocks.0.attn.in_proj_bias'} <= skipped
    assert all(p.ndim >= 2 for p in decay['params']) and 'token_embedding.weight' not in skipped
    lrs = [common.lr_at(s, 100, 10, 1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.5, abs=0.02) and lrs[-1] < 1e-3
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
