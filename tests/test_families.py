"""Clip & Concat on every family of timm ViT it supports, applied in place by models.apply_clip_concat:
distilled DeiT (class + distillation tokens, two heads), DeiT III (LayerScale, position embedding without the
class token), ViTs with register tokens, at 384 px, with global average pooling and no class token, with
32-pixel patches, with oblong patches, with attention narrower than the width, with a gated attention, with gated
MLPs (SwiGLU), hybrids (a CNN stem; one without a position embedding), with a head per token (no pooling).
Each at small depth and width with random weights, against independent references: timm's own model (all masks
True), the reference semantics written out with boolean indexing and timm's own block (pruned), autograd (Taylor
scores) and torch's FLOP counter."""
import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import AttentionPoolLatent
from timm.models.vision_transformer import Block, VisionTransformer
from torch.utils.flop_counter import FlopCounterMode

import models
import pruning
from conftest import NarrowAttention

class GatedAttention(timm.layers.attention.Attention):
    """timm's attention with its sigmoid gate on the output (gated=True): one more linear layer, C to H*D."""

    def __init__(self, dim, **kwargs):
        super().__init__(dim, gated=True, **kwargs)


FAMILIES = {
    'distilled': ('deit_tiny_distilled_patch16_224', dict(img_size=64, depth=3)),
    'layerscale': ('deit3_small_patch16_224', dict(img_size=64, depth=3, embed_dim=64, num_heads=2,
                                                  init_values=0.5)),
    'registers': ('vit_small_patch14_reg4_dinov2', dict(img_size=56, depth=3, embed_dim=64, num_heads=2,
                                                       init_values=0.5)),
    '384px': ('deit_base_patch16_384', dict(depth=2, embed_dim=64, num_heads=2)),
    'gap_no_class_token': ('vit_base_patch16_gap_224', dict(img_size=64, depth=3, embed_dim=64, num_heads=2)),
    'registers_gap': ('vit_base_patch16_reg4_gap_256', dict(img_size=64, depth=3, embed_dim=64, num_heads=2)),
    'patch32': ('vit_base_patch32_224', dict(img_size=128, depth=3, embed_dim=64, num_heads=2)),
    # patches taller than wide on an image wider than tall: 6 x 4 patches of 8 x 16 pixels
    'oblong_patches': ('vit_small_patch16_224', dict(img_size=(48, 64), patch_size=(8, 16), depth=3, embed_dim=64,
                                                     num_heads=2)),
    # heads of 16 channels whatever the width: qkv maps C=64 to 3*2*16, the projection 32 to 64 (D != C)
    'narrow_attention': ('vit_small_patch16_224', dict(img_size=64, depth=3, embed_dim=64, num_heads=2,
                                                       attn_layer=NarrowAttention)),
    # a gated attention: the gate (C to H*D) is a fourth product
    'gated_attention': ('vit_small_patch16_224', dict(img_size=64, depth=3, embed_dim=64, num_heads=2,
                                                      attn_layer=GatedAttention)),
    # gated MLPs: DINOv2-g's packed SwiGLU (fc1 makes 2H channels, fc2 reads H) and AIMv2's SwiGLU (fc1_g, fc1_x)
    'packed_swiglu': ('vit_giant_patch14_dinov2', dict(img_size=56, depth=3, embed_dim=48, num_heads=2,
                                                     init_values=0.5)),
    'swiglu': ('aimv2_large_patch14_224', dict(img_size=56, depth=3, embed_dim=64, num_heads=2)),
    # hybrids: a CNN backbone before the patches (ResNet and 8x8 patches of its map: 32 px a token; ViTamin's
    # MbConv stem with no projection and a GeGLU MLP)
    'hybrid_resnet': ('vit_tiny_r_s16_p8_224', dict(img_size=128, depth=3)),
    'hybrid_no_projection': ('vitamin_small_224', dict(img_size=64, depth=3)),
    # ... and without a position embedding: nothing in timm's model stops images of another size
    'hybrid_no_position_embedding': ('vitamin_small_224', dict(img_size=64, depth=3, pos_embed='none')),
    # attention-pooling heads over the tokens of the last block: latent queries (SigLIP's 'map', no prefix token;
    # with a class token, which timm drops before the pool; with a register token it pools, pool_include_prefix)
    # and the tokens attending to each other without projections ('prr', which pools the class token too)
    'map_head': ('vit_base_patch16_siglip_224', dict(img_size=64, depth=3, embed_dim=64, num_heads=2)),
    'map_head_class_token': ('vit_small_patch16_224', dict(img_size=64, depth=3, embed_dim=64, num_heads=2,
                                                           global_pool='map')),
    'map_head_pooled_prefix': ('vit_small_patch16_224', dict(img_size=64, depth=3, embed_dim=64, num_heads=2,
                                                             global_pool='map', class_token=False, reg_tokens=1,
                                                             pool_include_prefix=True)),
    'prr_head': ('vit_small_patch16_224', dict(img_size=64, depth=3, embed_dim=64, num_heads=2, global_pool='prr')),
    # no pooling: the head predicts each token (in their original order), so it runs once per token
    'per_token_head': ('vit_small_patch16_224', dict(img_size=64, depth=3, embed_dim=64, num_heads=2,
                                                     global_pool='', class_token=False)),
    # ... with a class token: the head predicts it too (timm pools nothing), one row more than the patches
    'per_token_head_class_token': ('vit_small_patch16_224', dict(img_size=64, depth=3, embed_dim=64, num_heads=2,
                                                                 global_pool='')),
}


def pair(family, seed=0):
    """(timm's own model, the same weights converted in place to Clip & Concat), both in eval mode."""
    name, kwargs = FAMILIES[family]
    torch.manual_seed(seed)
    reference = timm.create_model(name, num_classes=5, **kwargs).eval()
    converted = timm.create_model(name, num_classes=5, **kwargs)
    converted.load_state_dict(reference.state_dict())
    assert models.apply_clip_concat(converted) is converted
    return reference, converted.eval()


def images(model, n=2, seed=1):
    size = model.patch_embed.img_size
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed))


def revisiting_plan(depth, num_patches, seed):
    """A random plan in which some patch is clipped at one block and processed again at a later one."""
    g = torch.Generator().manual_seed(seed)
    plan = torch.rand(depth, num_patches, generator=g) > 0.4
    assert any(not plan[l, j] and plan[l2, j] for j in range(num_patches) for l in range(depth)
               for l2 in range(l + 1, depth))
    return plan


def reference_forward(model, x, concat_masks):
    """The method's definition with timm's own pieces: boolean indexing, timm's Block.forward on the kept
    tokens, kept first and clipped after; then the tokens back in their original order (which a head that
    predicts per token shows), timm's embedding, norm and head."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    order = torch.arange(x.shape[1])
    for blk, m in zip(model.blocks, concat_masks):
        keep, rest = x[:, m], x[:, ~m]
        x = torch.cat([Block.forward(blk, keep), rest], dim=1)
        order = torch.cat([order[m], order[~m]])
    return model.forward_head(model.norm(x[:, torch.argsort(order)]))


def test_deit3_file_of_the_deit_repository_loads_as_timms_model(tmp_path):
    """DeiT III's released files name LayerScale gamma_1 and gamma_2 (timm: ls1.gamma, ls2.gamma)."""
    name, kwargs = FAMILIES['layerscale']
    reference, _ = pair('layerscale')
    released = {k.replace('ls1.gamma', 'gamma_1').replace('ls2.gamma', 'gamma_2'): v
                for k, v in reference.state_dict().items()}
    assert 'blocks.0.gamma_1' in released
    torch.save({'model': released}, tmp_path / 'deit_3_small_224_1k.pth')
    loaded = models.create_model(name, num_classes=5, checkpoint_path=str(tmp_path / 'deit_3_small_224_1k.pth'),
                                 **kwargs).eval()
    x = images(reference)
    with torch.no_grad():
        assert torch.equal(loaded(x), reference(x))


@pytest.mark.parametrize('family', list(FAMILIES))
def test_all_masks_true_equals_timms_own_model(family):
    reference, cc = pair(family)
    assert all(bool(m.all()) for m in cc.masks) and len(cc.masks[0]) == cc.num_tokens
    x = images(cc)
    with torch.no_grad():
        assert (cc(x) - reference(x)).abs().max().item() < 1e-5
        assert (cc.forward_features(x) - reference.forward_features(x)).abs().max().item() < 1e-5
    # the weights keep their timm names; only the masks are added
    extra = set(cc.state_dict()) - set(reference.state_dict())
    assert extra == {f'blocks.{l}.{models.MASK_KEY}' for l in range(len(cc.blocks))}


@pytest.mark.parametrize('family', list(FAMILIES))
def test_pruned_equals_the_reference_semantics_and_prefix_tokens_are_kept(family):
    _, cc = pair(family)
    depth, prefix = len(cc.blocks), cc.num_prefix_tokens
    num_patches = cc.num_tokens - prefix
    plan = revisiting_plan(depth, num_patches, seed=3)
    channels = pruning.apply_masks(cc, plan)
    assert channels == [prefix + int(row.sum()) for row in plan]
    for mask in cc.masks:  # prefix tokens are kept in every block, at the front
        assert bool(mask[:prefix].all())
    kept = cc.kept_token_ids()
    assert len(kept) == depth  # one list per block: the zip below leaves none out
    for ids, row in zip(kept, plan):  # the blocks process exactly the planned patches
        expected = list(range(prefix)) + (row.nonzero().squeeze(1) + prefix).tolist()
        assert sorted(ids.tolist()) == expected
    x = images(cc)
    with torch.no_grad():
        ours = cc(x)
        ref = reference_forward(cc, x, [m.clone() for m in cc.masks])
        dense = reference_forward(cc, x, [torch.ones_like(m) for m in cc.masks])
    assert (ours - ref).abs().max().item() < 1e-4
    # the masks really change the result (by 5% of the largest logit where the logits are small: SigLIP's map head)
    assert (ours - dense).abs().max().item() > min(1e-3, 0.05 * dense.abs().max().item())


@pytest.mark.parametrize('family', ['distilled', 'registers'])
def test_a_mask_that_clips_a_distillation_or_register_token_is_refused_and_changes_nothing(family):
    """Every prefix token is kept (the class token alone has its own test): a mask clearing the last one is refused,
    naming the positions, by set_masks (leaving the masks and the plan as they were) and by load_state_dict."""
    _, cc = pair(family)
    prefix = cc.num_prefix_tokens
    assert prefix >= 2
    pruning.apply_masks(cc, revisiting_plan(len(cc.blocks), cc.num_tokens - prefix, seed=4))
    x = images(cc)
    with torch.no_grad():
        before = cc(x)
    masks = [m.clone() for m in cc.masks]
    bad = [m.clone() for m in masks]
    bad[2][prefix - 1] = False
    rule = (rf'blocks\.2\.attn\.token_index: the {prefix} prefix tokens \(positions 0-{prefix - 1}: class, '
            rf'distillation or register tokens\) must be kept')
    with pytest.raises(ValueError, match=rule):
        cc.set_masks(bad)
    with pytest.raises(ValueError, match=r'2 masks for 3 blocks'):
        cc.set_masks(masks[:2])
    assert all(torch.equal(a, b) for a, b in zip(cc.masks, masks))
    with torch.no_grad():
        assert torch.equal(cc(x), before)
    sd = dict(cc.state_dict(), **{'blocks.2.attn.token_index': bad[2]})
    with pytest.raises(RuntimeError, match=rule):
        pair(family)[1].load_state_dict(sd)


@pytest.mark.parametrize('family', list(FAMILIES))
def test_flops_formula_equals_torch_flop_counter(family):
    """Attention runs unfused here (QK^T and AV as aten.bmm, which every torch's counter counts; whether it
    counts the fused CPU kernel depends on the version, 2.11 does not): tests/test_flops_compile.py checks the
    fused op where the counter has it."""
    _, cc = pair(family)
    assert_priced_as_torchs_counter_counts(cc)


def assert_priced_as_torchs_counter_counts(cc):
    """count_macs(cc) is half torch's FLOP count of a forward, dense and under a plan that clips and revisits
    tokens, with attention unfused (QK^T and AV as aten.bmm, which every torch's counter counts)."""
    depth, num_patches = len(cc.blocks), cc.num_tokens - cc.num_prefix_tokens
    for attn in [blk.attn for blk in cc.blocks] + [cc.attn_pool]:
        if attn is not None:
            attn.fused_attn = False
    for plan in (torch.ones(depth, num_patches, dtype=torch.bool), revisiting_plan(depth, num_patches, 4)):
        pruning.apply_masks(cc, plan)
        counter = FlopCounterMode(display=False)
        with counter:  # (not under no_grad: there the counter's module tracker fails on timm's latent queries)
            cc(images(cc, n=1))
        assert models.count_macs(cc) == counter.get_total_flops() // 2


class _LinearPool(torch.nn.Module):
    """An attention-pool stand-in of a kind count_macs does not know: a product per token, then the mean."""

    def __init__(self, width):
        super().__init__()
        self.fc = torch.nn.Linear(width, width)

    def forward(self, x):
        return self.fc(x).mean(1)


def test_a_pooling_head_of_another_kind_is_counted_by_torchs_counter():
    _, cc = pair('map_head')
    cc.attn_pool = None
    without_pool = models.count_macs(cc)
    cc.attn_pool = _LinearPool(cc.embed_dim)
    assert models.count_macs(cc) - without_pool == cc.num_tokens * cc.embed_dim ** 2  # its product on every token


def test_an_attention_pool_of_several_latent_queries_is_counted_as_torchs_counter_counts_it():
    """timm's AttentionPoolLatent with latent_len > 1 (the models built by name have one query): every latent query
    attends to the tokens and goes through the projection and the MLP, so those products are priced once per
    query, as torch's counter counts them, dense and pruned."""
    _, cc = pair('map_head')
    torch.manual_seed(1)
    cc.attn_pool = AttentionPoolLatent(cc.embed_dim, num_heads=2, latent_len=3, norm_layer=nn.LayerNorm).eval()
    assert_priced_as_torchs_counter_counts(cc)


def test_a_model_without_position_embedding_refuses_images_of_another_size():
    """timm's hybrid without a position embedding takes images of any size (its CNN stem does not check it); the
    masks hold one entry per token of the model's size, so a pruned block would drop the tokens past them (or fail
    on an index for fewer): the converted model refuses, naming both sizes and counts, pruned or dense (whose
    masks have that length too), by every path that embeds patches, until set_input_size gives it the new size."""
    reference, cc = pair('hybrid_no_position_embedding')
    assert reference.pos_embed is None and cc.patch_embed.num_patches == 16
    large, small = torch.randn(1, 3, 96, 96), torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert reference.forward_features(large).shape[1] == 36  # timm's own model runs on 36 tokens
    pruning.apply_masks(cc, revisiting_plan(len(cc.blocks), 16, seed=3))
    for x, tokens in ((large, 36), (small, 4)):
        size = x.shape[-1]
        message = (rf'^images of {size}x{size} pixels give {tokens} patch tokens; this Clip & Concat model has '
                   rf'masks for 16 \(64x64 pixels\)')
        for run in (cc, cc.forward_features, cc.forward_intermediates):
            with torch.no_grad(), pytest.raises(ValueError, match=message):
                run(x)
    with torch.no_grad():  # its own size still runs
        x = images(cc)
        assert (cc(x) - reference_forward(cc, x, [m.clone() for m in cc.masks])).abs().max().item() < 1e-4
    cc.set_dense()
    with torch.no_grad(), pytest.raises(ValueError, match='images of 96x96 pixels give 36 patch tokens'):
        cc(large)
    cc.set_input_size(img_size=96)
    with torch.no_grad():
        assert cc.num_tokens == 36 and (cc(large) - reference(large)).abs().max().item() < 1e-5
        with pytest.raises(ValueError, match=r'give 16 patch tokens; .* masks for 36 \(96x96 pixels\)'):
            cc(images(reference))


def test_hybrid_tokens_cover_the_backbones_stride_and_counting_its_flops_leaves_it_as_it_was():
    """A hybrid's patch_size is counted in cells of the backbone's feature map: a token covers the backbone's
    stride times that (what --input-size must be a multiple of).  Its FLOPs are counted by running the stem once,
    which must not move BatchNorm statistics nor leave the model in another mode."""
    assert models.patch_size('vit_base_r50_s16_384') == (16, 16)
    assert models.patch_size('vit_tiny_r_s16_p8_224') == (32, 32)
    assert models.patch_size('cc_vit_small_r26_s32_224') == (32, 32)
    torch.manual_seed(0)
    cc = models.create_model('vit_small_resnet26d_224', img_size=64, depth=1, num_classes=5).train()
    assert any(isinstance(m, nn.BatchNorm2d) for m in cc.patch_embed.modules())
    before = {k: v.clone() for k, v in cc.state_dict().items()}
    models.count_macs(cc)
    assert cc.training and all(m.training for m in cc.modules())
    assert all(torch.equal(v, before[k]) for k, v in cc.state_dict().items())


@pytest.mark.parametrize('family', ['distilled', 'registers', 'gap_no_class_token'])
def test_taylor_scores_skip_prefix_tokens_and_equal_autograd(family):
    """Scores from the hook on timm's attention equal A·dL/dA from an explicit forward written here."""
    _, cc = pair(family)
    prefix = cc.num_prefix_tokens
    x = images(cc, n=3)
    y = torch.tensor([0, 3, 1])
    criterion = nn.CrossEntropyLoss()
    ours = pruning.attention_taylor_scores(cc, [(x, y)], criterion)
    assert ours.shape == (len(cc.blocks), cc.num_tokens - prefix)

    probs = []
    t = cc.norm_pre(cc._pos_embed(cc.patch_embed(x)))
    for blk in cc.blocks:
        h = blk.norm1(t)
        B, N, C = h.shape
        H, D = blk.attn.num_heads, blk.attn.head_dim
        q, k, v = blk.attn.qkv(h).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) * D ** -0.5).softmax(-1)
        a.retain_grad()
        probs.append(a)
        t = t + blk.ls1(blk.attn.proj((a @ v).transpose(1, 2).reshape(B, N, H * D)))
        t = t + blk.ls2(blk.mlp(blk.norm2(t)))
    logits = cc.forward_head(cc.norm(t))
    criterion(logits, y).backward()
    expected = torch.stack([((a * a.grad).sum(dim=(0, 1, 2)) / (a.shape[0] * a.shape[1] * a.shape[2])).abs()
                            for a in probs])[:, prefix:]
    cc.zero_grad(set_to_none=True)
    assert torch.allclose(ours, expected.float(), rtol=1e-4, atol=1e-12)


def test_distilled_model_trains_both_heads_and_averages_them_at_eval():
    reference, cc = pair('distilled')
    x = images(cc)
    cc.set_distilled_training(True)
    cc.train()
    out = cc(x)
    assert isinstance(out, tuple) and len(out) == 2  # (class head, distillation head), as timm trains DeiT
    cc.eval()
    with torch.no_grad():
        tokens = reference.forward_features(x)
        head, head_dist = reference.head(tokens[:, 0]), reference.head_dist(tokens[:, 1])
        assert torch.allclose(cc(x), (head + head_dist) / 2, atol=1e-5)


@pytest.mark.parametrize('name, reason', [
    ('resnet50', 'not a timm VisionTransformer'),
    ('vit_base_patch16_224.augreg_in21k', None),
    ('vit_small_patch16_224.bogus', "timm has no pretrained tag 'bogus' for vit_small_patch16_224 \\(augreg_in1k, "),
])
def test_model_names_are_checked_against_timms_registry(name, reason):
    if reason is None:
        assert models.check_model_name('cc_' + name.split('.')[0]) == name.split('.')[0]
        assert models.check_model_name(name) == name  # a pretrained tag timm knows
    else:
        with pytest.raises(ValueError, match=reason):
            models.check_model_name(name)


def test_a_mask_that_clips_the_only_register_token_names_it():
    """A model whose one prefix token is a register token (no class token, as vit_little_patch16_reg1_gap_256):
    the refusal names the token the mask clipped, by set_masks and by load_state_dict."""
    torch.manual_seed(0)
    cc = models.create_model('vit_little_patch16_reg1_gap_256', img_size=64, depth=2, embed_dim=64, num_heads=2)
    assert cc.num_prefix_tokens == 1 and cc.cls_token is None
    bad = [m.clone() for m in cc.masks]
    bad[1][0] = False
    rule = r'blocks\.1\.attn\.token_index: the register token \(position 0\) must be kept'
    with pytest.raises(ValueError, match=rule):
        cc.set_masks(bad)
    with pytest.raises(RuntimeError, match=rule):
        cc.load_state_dict(dict(cc.state_dict(), **{'blocks.1.attn.token_index': bad[1]}))


class _ProbabilitiesViT(timm.models.vision_transformer.VisionTransformer):
    """A VisionTransformer subclass with a forward of its own: class probabilities instead of logits."""

    def forward(self, x, attn_mask=None, is_causal=False):
        return super().forward(x, attn_mask=attn_mask, is_causal=is_causal).softmax(-1)


class _ImagesOnlyViT(timm.models.vision_transformer.VisionTransformer):
    """The same with a forward that takes the images alone (as most subclasses written for one task do)."""

    def forward(self, x):
        return super().forward(x).softmax(-1)


def _subclass_pair(cls, **extra):
    """(``cls``'s model, the same weights converted to Clip & Concat, images), small; the conversion with every
    mask True checked equal to the model itself."""
    kwargs = dict(img_size=64, patch_size=16, depth=3, embed_dim=64, num_heads=2, num_classes=5, **extra)
    torch.manual_seed(0)
    reference = cls(**kwargs).eval()
    cc = cls(**kwargs)
    cc.load_state_dict(reference.state_dict())
    cc = models.apply_clip_concat(cc).eval()
    x = images(cc)
    with torch.no_grad():
        assert torch.equal(cc(x), reference(x))
    return reference, cc, x


@pytest.mark.parametrize('cls', [_ProbabilitiesViT, _ImagesOnlyViT])
def test_a_subclass_with_its_own_forward_runs_that_forward(cls):
    """The conversion puts its forward before the class's: a subclass's own forward must still run, dense (equal to
    the subclass's model) and pruned (the reference semantics, then the subclass's step)."""
    reference, cc, x = _subclass_pair(cls)
    with torch.no_grad():
        pruning.apply_masks(cc, revisiting_plan(3, 16, seed=5))
        expected = reference_forward(cc, x, [m.clone() for m in cc.masks]).softmax(-1)
        assert (cc(x) - expected).abs().max().item() < 1e-6
        assert (cc(x) - reference(x)).abs().max().item() > 1e-4


class _DampedBlock(Block):
    """A Block subclass with a forward of its own that takes the tokens alone (timm's VisionTransformer calls its
    blocks so when it has no attention mask): the block's update scaled by a half."""

    def forward(self, x):
        return x + 0.5 * (super().forward(x) - x)


def test_a_block_subclass_with_its_own_forward_runs_it_on_the_kept_tokens():
    reference, cc, x = _subclass_pair(VisionTransformer, block_fn=_DampedBlock)
    with torch.no_grad():
        pruning.apply_masks(cc, revisiting_plan(3, 16, seed=6))
        t = cc.norm_pre(cc._pos_embed(cc.patch_embed(x)))
        order = torch.arange(t.shape[1])
        for blk, m in zip(cc.blocks, [m.clone() for m in cc.masks]):
            t = torch.cat([_DampedBlock.forward(blk, t[:, m]), t[:, ~m]], dim=1)
            order = torch.cat([order[m], order[~m]])
        expected = cc.forward_head(cc.norm(t[:, torch.argsort(order)]))
        assert (cc(x) - expected).abs().max().item() < 1e-5
        assert (cc(x) - reference(x)).abs().max().item() > 1e-3


def test_unsupported_structure_is_refused_with_the_reason():
    model = timm.create_model('vit_small_patch16_224', img_size=32, depth=2, dynamic_img_size=True)
    with pytest.raises(ValueError, match='dynamic_img_size'):
        models.apply_clip_concat(model)
    parallel = timm.create_model('vit_small_patch16_224', img_size=32, depth=2,
                                 block_fn=timm.models.vision_transformer.ParallelScalingBlock)
    with pytest.raises(ValueError, match="blocks.0 is a ParallelScalingBlock; Clip & Concat patches timm's Block"):
        models.apply_clip_concat(parallel)
    empty = timm.create_model('vit_small_patch16_224', img_size=32, depth=0)  # timm runs it: embedding, norm, head
    with pytest.raises(ValueError, match=r'^cannot apply Clip & Concat: it has no blocks \(depth=0\)'):
        models.apply_clip_concat(empty)
    assert type(empty) is VisionTransformer and not hasattr(empty, 'num_tokens')  # left as it was


def test_differential_attention_scores_sum_both_maps():
    """timm's DiffAttention applies the hook module to both softmax maps of each head before their difference:
    scoring captures (B, 2H, N, N) probabilities whose rows each sum to 1, and a token's score is the Taylor
    term summed over both maps, each weighted as a head (the taylor module's docstring), checked against the
    two maps scored apart with the same gradients."""
    torch.manual_seed(0)
    model = models.create_model('vit_dwee_patch16_reg1_gap_256', img_size=64, depth=2, num_classes=5).eval()
    images, targets = torch.randn(3, 3, 64, 64), torch.tensor([0, 3, 1])
    criterion = nn.CrossEntropyLoss()
    heads, n = model.blocks[0].attn.num_heads, model.num_tokens
    with pruning.taylor.attention_probabilities(model) as probs:
        loss = criterion(model(images), targets)
        grads = torch.autograd.grad(loss, probs)
        assert all(a.shape == (3, 2 * heads, n, n) for a in probs)
        maps = [(a.detach().view(3, heads, 2, n, n), g.view(3, heads, 2, n, n)) for a, g in zip(probs, grads)]
    first, second = ([(a[:, :, k] * g[:, :, k]).sum(dim=(0, 1, 2)) for a, g in maps] for k in (0, 1))
    assert torch.allclose(maps[0][0].sum(-1), torch.ones(3, heads, 2, n))
    expected = torch.stack([(f + s).abs() / (3 * 2 * heads * n) for f, s in zip(first, second)])
    scores = pruning.attention_taylor_scores(model, [(images, targets)], criterion)
    prefix = model.num_prefix_tokens
    assert torch.allclose(scores, expected[:, prefix:].float(), rtol=1e-5, atol=0)
    assert not torch.allclose(scores, torch.stack([f.abs() for f in first])[:, prefix:].float() / (3 * heads * n),
                              rtol=1e-3, atol=0)
