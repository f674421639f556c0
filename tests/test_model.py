"""The patched DeiT: equal to timm's dense model, equal to the reference semantics (docs/method.md) when pruned,
strict about what it loads."""
import argparse
import copy
import re
import types

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import AttentionPoolLatent
from timm.models.vision_transformer import VisionTransformer

import models
import pruning
from conftest import formula_macs, official_checkpoint
from utils import UserError


def _dense_pair(name, seed=0):
    torch.manual_seed(seed)
    dense = timm.create_model(name).eval()
    cc = timm.create_model('cc_' + name).eval()
    cc.load_state_dict(dense.state_dict())  # official keys only: masks become all True
    return dense, cc


@pytest.mark.parametrize('name', ['deit_tiny_patch16_224', 'deit_small_patch16_224'])
def test_all_masks_true_equals_timm_deit(name):
    dense, cc = _dense_pair(name)
    assert all(bool(m.all()) for m in cc.masks)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        diff = (cc(x) - dense(x)).abs().max().item()
    assert diff < 1e-4


def test_official_checkpoint_loads_through_timm_create_model(tmp_path):
    path = official_checkpoint(tmp_path / 'deit_tiny.pth', seed=3)
    reference = torch.load(path, weights_only=True)['model']
    model = timm.create_model('cc_deit_tiny_patch16_224', checkpoint_path=path)
    for k, v in reference.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert all(bool(m.all()) for m in model.masks)
    assert models.kept_token_counts(model) == [197] * 12


def reference_tokens(model, x, concat_masks):
    """The reference semantics written out plainly: tokens physically reordered, boolean indexing, kept first.
    Returns the normed tokens in the final concat order and that order (position -> original id)."""
    x = model.patch_embed(x)
    x = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + model.pos_embed
    order = torch.arange(x.shape[1])
    for blk, m in zip(model.blocks, concat_masks):
        keep, rest = x[:, m], x[:, ~m]
        keep = keep + plain_attention(blk.attn, blk.norm1(keep))
        keep = keep + blk.mlp.fc2(F.gelu(blk.mlp.fc1(blk.norm2(keep))))
        x = torch.cat([keep, rest], dim=1)
        order = torch.cat([order[m], order[~m]])
    return model.norm(x), order


def reference_forward(model, x, concat_masks):
    return model.head(reference_tokens(model, x, concat_masks)[0][:, 0])


def plain_attention(attn, x):
    B, N, C = x.shape
    H = attn.num_heads
    q, k, v = F.linear(x, attn.qkv.weight, attn.qkv.bias).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
    a = ((q @ k.transpose(-2, -1)) * (C // H) ** -0.5).softmax(-1)
    return attn.proj((a @ v).transpose(1, 2).reshape(B, N, C))


def _revisiting_plan(depth, num_patches, seed):
    """Random plan in which some token is clipped at one block and processed again at a later one."""
    g = torch.Generator().manual_seed(seed)
    plan = torch.rand(depth, num_patches, generator=g) > 0.35
    comes_back = any(not plan[l, j] and plan[l2, j]
                     for j in range(num_patches) for l in range(depth) for l2 in range(l + 1, depth))
    assert comes_back
    return plan


@pytest.mark.parametrize('seed', [0, 1])
def test_pruned_model_equals_reference_semantics(seed):
    torch.manual_seed(seed)
    model = timm.create_model('cc_deit_tiny_patch16_224').eval()
    plan = _revisiting_plan(12, 196, seed)
    channels = pruning.apply_masks(model, plan)
    concat = [m.clone() for m in model.masks]
    assert channels == [int(m.sum()) for m in concat]
    assert any(not blk.dense for blk in model.blocks)
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        ours = model(x)
        ref = reference_forward(model, x, concat)
        dense = reference_forward(model, x, [torch.ones_like(m) for m in concat])
    assert (ours - ref).abs().max().item() < 1e-4
    assert (ours - dense).abs().max().item() > 1e-3  # the masks really change the result


def test_forward_features_returns_tokens_in_original_order():
    """Blocks run in concat order; forward_features puts token 1 + p back at patch p, as timm does."""
    torch.manual_seed(3)
    model = timm.create_model('cc_deit_tiny_patch16_224', img_size=64, depth=4).eval()
    plan = _revisiting_plan(4, 16, 3)
    pruning.apply_masks(model, plan)
    assert model.reordered
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = model.forward_features(x)
        tokens, order = reference_tokens(model, x, model.masks)
        ref = torch.empty_like(tokens)
        ref[:, order] = tokens
    assert (ours - ref).abs().max().item() < 1e-4
    expected_ids = [torch.cat([torch.tensor([0]), row.nonzero().squeeze(1) + 1]).sort().values for row in plan]
    assert [ids.sort().values.tolist() for ids in model.kept_token_ids()] == [e.tolist() for e in expected_ids]


@pytest.mark.parametrize('layer', [0, 1, 2])
def test_a_plan_that_clips_in_one_block_alone_is_put_back_in_original_order(layer):
    """Only block ``layer`` clips (patches 2 and 5, not at the end): its input is in the original order, its output
    is not, whichever block it is (the last one included) and forward_features puts token 1 + p back at patch p.
    The concat-order masks are written here: the blocks before it keep every token, so its mask is the plan's row
    behind the class token."""
    torch.manual_seed(5)
    model = timm.create_model('cc_deit_tiny_patch16_224', img_size=64, depth=3).eval()
    plan = torch.ones(3, 16, dtype=torch.bool)
    plan[layer, [2, 5]] = False
    pruning.apply_masks(model, plan)
    concat = [torch.cat([torch.ones(1, dtype=torch.bool), row]) for row in plan]
    assert all(torch.equal(mask, expected) for mask, expected in zip(model.masks, concat))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = model.forward_features(x)
        tokens, order = reference_tokens(model, x, concat)
        ref = torch.empty_like(tokens)
        ref[:, order] = tokens
    assert order.tolist() == [0, 1, 2, 4, 5, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 3, 6]
    assert (ours - ref).abs().max().item() < 1e-4
    assert (ours - tokens).abs().max().item() > 1e-3  # in concat order the tokens differ


def _reordering_model(seed=3, **kwargs):
    torch.manual_seed(seed)
    model = timm.create_model('cc_deit_tiny_patch16_224', img_size=64, depth=4, **kwargs).eval()
    pruning.apply_masks(model, _revisiting_plan(4, 16, seed))
    assert model.reordered
    return model


def test_prune_intermediate_layers_keeps_the_original_order_of_the_blocks_left():
    """timm's prune_intermediate_layers removes the blocks past the last index kept; the tokens then leave the
    last remaining block in another order, which forward_features must undo (it used the removed block's)."""
    model = _reordering_model()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens, order = reference_tokens(model, x, model.masks[:2])
        ref = torch.empty_like(tokens)
        ref[:, order] = tokens
        model.prune_intermediate_layers(indices=[1])
        assert len(model.blocks) == 2
        assert (model.forward_features(x) - ref).abs().max().item() < 1e-4


def test_a_head_without_pooling_predicts_per_token_in_original_order():
    """global_pool='': the head predicts every token; token 1 + p is patch p, as in timm."""
    model = _reordering_model(global_pool='')
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = model(x)
        tokens, order = reference_tokens(model, x, model.masks)
        ref = torch.empty_like(tokens)
        ref[:, order] = tokens
        expected = model.head(ref)
    assert ours.shape == (2, 17, 1000)
    assert (ours - expected).abs().max().item() < 1e-4


def test_token_pooling_without_a_prefix_token_reads_patch_0_as_timm():
    """global_pool='token' set by hand on a model without class token (timm's constructor refuses it): timm's head
    reads position 0, patch 0; the pruned model must read patch 0 too, not whichever token concat order puts first."""
    torch.manual_seed(0)
    dense = VisionTransformer(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=3,
                              class_token=False, global_pool='avg', fc_norm=False).eval()
    dense.global_pool = 'token'
    model = models.apply_clip_concat(copy.deepcopy(dense))
    masks = torch.ones(2, 16, dtype=torch.bool)
    masks[0, 0] = False  # patch 0 skips block 0 and is last in concat order after it
    model.set_masks(masks)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        t = dense.norm_pre(dense._pos_embed(dense.patch_embed(x)))
        patch0 = dense.blocks[1](torch.cat([dense.blocks[0](t[:, 1:]), t[:, :1]], dim=1))[:, -1]
        expected = dense.head(dense.norm(patch0))
        assert (model(x) - expected).abs().max().item() < 1e-5


class _LastPatchPool(VisionTransformer):
    """A subclass with a pool of its own that reads a token by its position (the last patch)."""

    def pool(self, x, pool_type=None):
        return x[:, -1]


def _position_pool_abs(model):
    model.attn_pool = AttentionPoolLatent(16, num_heads=2, pos_embed='abs', feat_size=16).eval()
    torch.nn.init.normal_(model.attn_pool.pos_embed)


@pytest.mark.parametrize('cls, pool, change', [
    (_LastPatchPool, 'token', None),  # a pool of the subclass's own
    # a pool set on the model object itself
    (VisionTransformer, 'token', lambda m: setattr(m, 'pool', types.MethodType(_LastPatchPool.pool, m))),
    (VisionTransformer, 'map', _position_pool_abs),  # an attention pool with a position embedding
    (VisionTransformer, 'prr', lambda m: setattr(m, 'pool_include_prefix', False)),  # PRR reads patch 0
])
def test_a_head_that_reads_tokens_by_position_gets_them_in_original_order(cls, pool, change):
    """Only a head known to ignore the order of the tokens may get them in concat order from forward."""
    torch.manual_seed(0)
    dense = cls(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=3,
                global_pool=pool).eval()
    if change:
        change(dense)
    model = models.apply_clip_concat(copy.deepcopy(dense))
    masks = torch.ones(2, 17, dtype=torch.bool)
    masks[0, [1, 16]] = False
    masks[1, 3] = False
    model.set_masks(masks)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        tokens, order = reference_tokens(model, x, model.masks)
        expected = dense.forward_head(tokens[:, torch.argsort(order)])
        assert (model(x) - expected).abs().max().item() < 1e-5


def test_inside_original_order_the_outputs_are_the_same_tokens_in_the_same_places():
    """Inside model.original_order() the tokens never leave their places, so forward_features must not reorder
    them again (restore_ids undoes the concat order, which did not happen there): its tokens, and a per-token
    head's predictions, are those of the reference semantics put back in original order, as outside."""
    model = _reordering_model(global_pool='')
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens, order = reference_tokens(model, x, model.masks)
        ref = torch.empty_like(tokens)
        ref[:, order] = tokens
        with model.original_order():
            features, logits = model.forward_features(x), model(x)
    assert (features - ref).abs().max().item() < 1e-4
    assert (logits - model.head(ref)).abs().max().item() < 1e-4


def test_forward_intermediates_are_the_blocks_outputs_in_original_order():
    """timm's forward_intermediates: each block's output, in original order (an NCHW map is the patch grid), with
    exactly the values the concat-order forward computes; the final features are forward_features'."""
    model = _reordering_model()
    x = torch.randn(2, 3, 64, 64)
    concat_outputs = []
    hooks = [blk.register_forward_hook(lambda m, i, o: concat_outputs.append(o)) for blk in model.blocks]
    with torch.no_grad():
        features = model.forward_features(x)
    for h in hooks:
        h.remove()
    orders = model.token_orders()[1:]  # after each block: position -> original id
    in_original = []
    for out, order in zip(concat_outputs, orders):
        y = torch.empty_like(out)
        y[:, order] = out
        in_original.append(y)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x, return_prefix_tokens=True)
        tokens = model.forward_intermediates(x, output_fmt='NLC', intermediates_only=True)
    assert torch.equal(final, features)
    assert len(maps) == len(tokens) == len(in_original) == len(model.blocks)  # one per block: zip drops no block
    for (grid, prefix), flat, y in zip(maps, tokens, in_original):
        assert torch.equal(prefix, y[:, :1]) and torch.equal(flat, y[:, 1:])
        assert torch.equal(grid, y[:, 1:].reshape(2, 4, 4, -1).permute(0, 3, 1, 2))  # patch p at (p // 4, p % 4)
    # the reference semantics agree after the last block
    tokens, order = reference_tokens(model, x, model.masks)
    assert (model.norm(in_original[-1])[:, order] - tokens).abs().max().item() < 1e-4
    assert not any(blk.in_original_order for blk in model.blocks)  # the forward is back to concat order


def test_clearing_the_class_token_by_hand_is_refused():
    model = timm.create_model('cc_deit_tiny_patch16_224', img_size=32, depth=2)
    model.blocks[1].attn.token_index[0] = False
    with pytest.raises(ValueError, match=r'blocks\.1\.attn\.token_index: the class token'):
        model.refresh_token_plan()


def test_a_mask_buffer_replaced_by_another_kind_of_tensor_is_named_by_the_next_forward():
    """A mask replaced by assignment with numbers (read as indices: an integer's ~ is not its negation), with
    another shape, or with None failed deep inside the plan (an IndexError about a shape of 130, a torch.stack
    size error, an AttributeError); each is now one error naming the block's mask.  A boolean mask of the right
    shape is taken up as an in-place change is."""
    torch.manual_seed(6)
    model = timm.create_model('cc_deit_tiny_patch16_224', img_size=32, depth=2).eval()
    x = torch.randn(2, 3, 32, 32)
    keep = torch.rand(5) > 0.4
    keep[0] = True
    for replacement, error, message in (
            (keep.long(), TypeError, r'is a tensor of dtype int64; masks are boolean: write them with '
                                     r'model\.set_masks'),
            (keep.float(), TypeError, r'is a tensor of dtype float32; masks are boolean'),
            (None, TypeError, r'is None; masks are boolean'),
            (keep[None], ValueError, r'a mask has shape \(1, 5\), the model needs \(5,\)'),
            (keep[:4], ValueError, r'a mask has shape \(4,\), the model needs \(5,\)')):
        model.blocks[1].attn.token_index = torch.ones(5, dtype=torch.bool)
        model.set_dense()
        model(x)
        model.blocks[1].attn.token_index = replacement
        with pytest.raises(error, match=r'^blocks\.1\.attn\.token_index.*' + message):
            model(x)
        with pytest.raises(error, match=r'^blocks\.1\.attn\.token_index.*' + message):
            model.refresh_token_plan()
    model.blocks[1].attn.token_index = keep.clone()
    with torch.no_grad():
        assert (model(x) - reference_forward(model, x, [m.clone() for m in model.masks])).abs().max().item() < 1e-4


def test_masks_changed_in_place_are_taken_up_by_the_next_forward():
    """model.masks are the buffers themselves: a change made to them in place (by hand, or an EMA copying its
    model's buffers) is what forward computes, as kept_token_counts and count_macs already report."""
    from timm.utils import ModelEmaV3
    torch.manual_seed(4)
    model = timm.create_model('cc_deit_tiny_patch16_224', img_size=64, depth=4).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        dense = model(x)
        model.masks[1][5] = False
        model.masks[2][3:9] = False
        concat = [m.clone() for m in model.masks]
        assert (model(x) - reference_forward(model, x, concat)).abs().max().item() < 1e-4
    assert (model(x) - dense).abs().max().item() > 1e-3
    assert [ids.numel() for ids in model.kept_token_ids()] == [17, 16, 11, 17]
    model.masks[3][0] = False
    with pytest.raises(ValueError, match=r'blocks\.3\.attn\.token_index: the class token'):
        model(x)
    model.set_dense()
    ema = ModelEmaV3(model, decay=0.5)  # (copies buffers that are not floating point)
    channels = pruning.apply_masks(model, _revisiting_plan(4, 16, 1))
    ema.update(model)
    assert models.kept_token_counts(ema.module) == channels
    with torch.no_grad():
        assert (ema.module(x) - reference_forward(ema.module, x, [m.clone() for m in model.masks])).abs().max() < 1e-4
    with torch.inference_mode():  # (its tensors have no version counter)
        built = timm.create_model('cc_deit_tiny_patch16_224', img_size=64, depth=4).eval()
        built.load_state_dict(model.state_dict())
        assert torch.equal(built(x), model(x))


def test_a_copy_takes_up_a_mask_changed_in_place_before_it_was_made():
    """A mask changed in place and copied with the model before any forward: the copy (deepcopy, pickle, torch.save
    of the whole model), whose mask tensors count versions afresh, computes the masks it holds, not the older plan."""
    import io
    import pickle
    torch.manual_seed(4)
    model = timm.create_model('cc_deit_tiny_patch16_224', img_size=64, depth=4).eval()
    pruning.apply_masks(model, _revisiting_plan(4, 16, 1))
    model.masks[1][5] = not bool(model.masks[1][5])
    concat = [m.clone() for m in model.masks]

    def saved(m):
        buffer = io.BytesIO()
        torch.save(m, buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=False)

    x = torch.randn(2, 3, 64, 64)
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)), saved(model)):
        assert [ids.numel() for ids in copied.kept_token_ids()] == [int(m.sum()) for m in concat]
        with torch.no_grad():
            assert (copied(x) - reference_forward(copied, x, concat)).abs().max().item() < 1e-4


def test_set_masks_takes_the_models_own_masks_in_another_order():
    """Rows that are the model's own mask buffers (or NumPy views of them) are read before any is written: each
    block gets the mask it is given, not one overwritten by an earlier row's copy."""
    torch.manual_seed(4)
    model = timm.create_model('cc_deit_tiny_patch16_224', img_size=64, depth=4).eval()
    pruning.apply_masks(model, _revisiting_plan(4, 16, 1))
    masks = [m.clone() for m in model.masks]
    assert len({tuple(m.tolist()) for m in masks}) == 4
    for reorder in (lambda rows: rows[::-1], lambda rows: [rows[0]] + rows[:-1]):
        for as_given in (lambda rows: rows, lambda rows: [row.numpy() for row in rows]):
            model.set_masks(masks)
            expected = [m.clone() for m in reorder(masks)]
            model.set_masks(as_given(reorder(model.masks)))
            assert all(torch.equal(m, e) for m, e in zip(model.masks, expected))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (model(x) - reference_forward(model, x, expected)).abs().max().item() < 1e-4


def test_a_distilled_model_saved_whole_loads_in_a_fresh_process(tmp_path):
    """torch.save(model) of a distilled DeiT names its class, CCVisionTransformerDistilled, which is made when a model
    of timm's class is converted: a fresh process that has only imported models makes it when unpickling."""
    import os
    import subprocess
    import sys
    torch.manual_seed(0)
    model = models.create_model('deit_tiny_distilled_patch16_224', img_size=32, patch_size=8, embed_dim=48, depth=2,
                                num_heads=3, num_classes=5).eval()
    pruning.apply_masks(model, _revisiting_plan(2, 16, 1))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.save({'model': model, 'x': x, 'y': model(x)}, tmp_path / 'whole.pt')
    script = ('import sys, torch, models\n'
              'f = torch.load(sys.argv[1], weights_only=False)\n'
              'with torch.no_grad():\n'
              '    print(type(f["model"]).__name__, torch.equal(f["model"](f["x"]), f["y"]))\n')
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, '-c', script, str(tmp_path / 'whole.pt')], cwd=root, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ['CCVisionTransformerDistilled', 'True']


def test_module_type_casts_the_weights_and_leaves_the_masks_boolean():
    """nn.Module.type(torch.float64) casts the weights as .double() does; the masks stay boolean and the token
    positions integers, so the model runs (as timm's does after it) and takes new masks."""
    torch.manual_seed(4)
    model = timm.create_model('cc_deit_tiny_patch16_224', img_size=64, depth=4).eval()
    pruning.apply_masks(model, _revisiting_plan(4, 16, 1))
    doubled = copy.deepcopy(model).double()
    model.type(torch.float64)
    assert all(m.dtype == torch.bool for m in model.masks) and model.cls_token.dtype == torch.float64
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(model(x), doubled(x))
    pruning.apply_masks(model, _revisiting_plan(4, 16, 2))
    with torch.no_grad():
        assert (model(x) - reference_forward(model, x, [m.clone() for m in model.masks])).abs().max().item() < 1e-9


def test_pruned_model_loaded_from_concat_order_masks_equals_reference():
    """Masks arriving through a state dict (any concat-order masks with the class token kept)."""
    torch.manual_seed(5)
    model = timm.create_model('cc_deit_tiny_patch16_224', img_size=64, depth=4).eval()
    g = torch.Generator().manual_seed(5)
    sd = model.state_dict()
    masks = []
    for l in range(4):
        m = torch.rand(17, generator=g) > 0.4
        m[0] = True
        sd[f'blocks.{l}.attn.token_index'] = m
        masks.append(m)
    model.load_state_dict(sd)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (model(x) - reference_forward(model, x, masks)).abs().max().item() < 1e-4


def test_pruned_training_step_reaches_every_weight():
    """Every weight gets the gradient autograd gives through the reference semantics, also the ones a token
    reaches only through blocks that clip it (its gradient passes back along the concatenation)."""
    torch.manual_seed(0)
    model = timm.create_model('cc_deit_tiny_patch16_224', img_size=64, depth=3)
    pruning.apply_masks(model, _revisiting_plan(3, 16, 2))
    model.train()
    x = torch.randn(2, 3, 64, 64)
    loss = model(x).logsumexp(1).mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    names, params = zip(*model.named_parameters())
    reference = torch.autograd.grad(reference_forward(model, x, [m.clone() for m in model.masks]).logsumexp(1).mean(),
                                    params)
    for name, p, expected in zip(names, params, reference):
        assert (p.grad - expected).norm() <= 1e-4 * expected.norm(), name


def test_forward_uses_fused_attention(monkeypatch):
    model = timm.create_model('cc_deit_tiny_patch16_224', img_size=64, depth=3).eval()
    pruning.apply_masks(model, _revisiting_plan(3, 16, 2))
    calls = []
    real = F.scaled_dot_product_attention

    def counting(q, k, v, *args, **kwargs):
        calls.append(q.shape[2])
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, 'scaled_dot_product_attention', counting)
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert calls == models.kept_token_counts(model)


def _pruned_state(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model('cc_deit_tiny_patch16_224', img_size=64, depth=3)
    pruning.apply_masks(model, _revisiting_plan(3, 16, 2))
    return model, model.state_dict()


def test_masks_stored_as_numbers_zero_and_one_load_as_the_same_masks(tmp_path):
    """A mask written by another tool as 0/1 integers or floats means the same as the booleans."""
    model, sd = _pruned_state(tmp_path)
    for dtype in (torch.uint8, torch.float32):
        numbers = {k: v.to(dtype) if k.endswith('token_index') else v for k, v in sd.items()}
        fresh = timm.create_model('cc_deit_tiny_patch16_224', img_size=64, depth=3)
        fresh.load_state_dict(numbers)
        assert all(torch.equal(a, b) for a, b in zip(model.masks, fresh.masks))


def test_a_partial_load_keeps_the_masks_of_the_blocks_it_leaves_out(tmp_path):
    """load_state_dict(strict=False) of a new head only left every block dense: the masks of blocks whose
    weights the dict does not hold stay; a block whose weights come without a mask is read as official
    weights (all kept), as a whole official file is."""
    model, sd = _pruned_state(tmp_path)
    counts = models.kept_token_counts(model)
    assert counts != [17] * 3
    model.load_state_dict({'head.weight': torch.zeros(1000, 192), 'head.bias': torch.zeros(1000)}, strict=False)
    assert models.kept_token_counts(model) == counts
    block_1 = {k: v for k, v in sd.items() if k.startswith('blocks.1.') and not k.endswith('token_index')}
    model.load_state_dict(block_1, strict=False)
    assert models.kept_token_counts(model) == [counts[0], 17, counts[2]]
    model.load_state_dict({k: v for k, v in sd.items() if not k.endswith('token_index')})
    assert models.kept_token_counts(model) == [17] * 3


def test_a_block_loaded_without_its_mask_beside_masked_blocks_is_dense_and_reported(tmp_path):
    """A state dict that holds masks but not the one of a block whose weights it holds (a pruned file that lost a
    key): that block is read as official weights (all kept), not left with the mask it had, and the key is
    reported missing: returned by strict=False, an error when strict."""
    model, sd = _pruned_state(tmp_path)
    counts = models.kept_token_counts(model)
    assert counts[1] != 17
    lost = {k: v for k, v in sd.items() if k != 'blocks.1.attn.token_index'}
    result = model.load_state_dict(lost, strict=False)
    assert models.kept_token_counts(model) == [counts[0], 17, counts[2]]
    assert result.missing_keys == ['blocks.1.attn.token_index']
    with pytest.raises(RuntimeError, match=r'Missing key.*blocks\.1\.attn\.token_index'):
        model.load_state_dict(lost)


def test_set_input_size_resizes_a_dense_model_and_refuses_a_pruned_one(tmp_path):
    """timm's set_input_size: a pruned model is refused and left as it was (its masks cover the old tokens only:
    forward kept 17 of the 37 tokens of a 96 px image and dropped the rest without a word); a dense one computes
    what timm's resized model computes, and takes masks of the new length."""
    model, _ = _pruned_state(tmp_path)
    counts = models.kept_token_counts(model)
    with pytest.raises(ValueError, match='set_input_size of a pruned model'):
        model.set_input_size(img_size=96)
    assert tuple(model.patch_embed.img_size) == (64, 64) and models.kept_token_counts(model) == counts
    model.set_dense()
    reference = timm.create_model('deit_tiny_patch16_224', img_size=64, depth=3).eval()
    reference.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith('token_index')})
    model.set_input_size(img_size=96)
    reference.set_input_size(img_size=96)
    x = torch.randn(2, 3, 96, 96)
    model.eval()
    with torch.no_grad():
        assert model.forward_features(x).shape == (2, 37, 192)
        assert torch.allclose(model(x), reference(x), atol=1e-5)
    plan = _revisiting_plan(3, 36, 0)
    pruning.apply_masks(model, plan)
    built = timm.create_model('cc_deit_tiny_patch16_224', img_size=96, depth=3).eval()  # made at 96 px
    built.load_state_dict(model.state_dict())
    pruning.apply_masks(built, plan)
    with torch.no_grad():
        assert torch.equal(model(x), built(x))


def test_a_model_built_on_the_meta_device_loads_its_weights_by_assignment(tmp_path):
    """Built on the meta device (nothing allocated), then load_state_dict(..., assign=True): the same model."""
    model, sd = _pruned_state(tmp_path)
    with torch.device('meta'):
        empty = timm.create_model('cc_deit_tiny_patch16_224', img_size=64, depth=3)
    empty.load_state_dict(sd, assign=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(empty.eval()(x), model.eval()(x))
    assert models.kept_token_counts(empty) == models.kept_token_counts(model)


@pytest.mark.parametrize('device', ['meta', 'cuda'])
def test_masks_of_official_weights_loaded_by_assignment_are_on_the_weights_device(device):
    """Official weights carry no masks: read as all True, on the device of the weights they come with (assigned,
    a mask made on the CPU left a model with weights on the GPU and masks and routing on the CPU)."""
    if device == 'cuda' and not torch.cuda.is_available():
        pytest.skip('no GPU')
    torch.manual_seed(2)
    dense = timm.create_model('deit_tiny_patch16_224', img_size=32, depth=2).eval()
    sd = {k: v.to(device) for k, v in dense.state_dict().items()}
    with torch.device('meta'):
        model = timm.create_model('cc_deit_tiny_patch16_224', img_size=32, depth=2)
    model.load_state_dict(sd, assign=True)
    assert {m.device.type for m in model.masks} == {device}
    if device == 'cuda':
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert (model.eval()(x.cuda()).cpu() - dense(x)).abs().max().item() < 1e-4


def test_masks_loaded_or_set_under_inference_mode_leave_a_model_that_trains(tmp_path):
    """Masks loaded (or set) under torch.inference_mode, as in an evaluation loop, then a training step: the
    positions the blocks index with are ordinary tensors, which autograd may save."""
    model, sd = _pruned_state(tmp_path)
    x = torch.randn(2, 3, 64, 64)
    for change in ('load', 'set'):
        torch.manual_seed(1)
        student = timm.create_model('cc_deit_tiny_patch16_224', img_size=64, depth=3)
        with torch.inference_mode():
            if change == 'load':
                student.load_state_dict(sd)
            else:
                student.load_state_dict({k: v for k, v in sd.items() if not k.endswith(models.MASK_KEY)})
                student.set_masks(model.masks)
        out = student.train()(x)
        out.sum().backward()
        assert student.blocks[0].attn.qkv.weight.grad is not None
        with torch.no_grad():
            assert torch.equal(student.eval()(x), model.eval()(x))


def test_models_create_model_loads_a_file_as_eval_does(tmp_path):
    """models.create_model(name, checkpoint_path=...) loads the trained `model` weights of a file that also
    holds `model_ema` (timm's loader prefers the EMA ones), and refuses a file that lists channels but holds no
    masks (it would have loaded the dense model)."""
    model, sd = _pruned_state(tmp_path)
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}
    path = tmp_path / 'checkpoint.pth'
    torch.save({'model': sd, 'model_ema': ema, 'channels': models.kept_token_counts(model)}, path)
    loaded = models.create_model('deit_tiny_patch16_224', img_size=64, depth=3, checkpoint_path=str(path))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in sd.items())
    through_timm = timm.create_model('cc_deit_tiny_patch16_224', img_size=64, depth=3, checkpoint_path=str(path))
    assert torch.equal(through_timm.state_dict()['head.bias'], ema['head.bias'])  # timm's rule, as the README says
    no_masks = {k: v for k, v in sd.items() if not k.endswith('token_index')}
    torch.save({'model': no_masks, 'channels': models.kept_token_counts(model)}, path)
    with pytest.raises(models.checkpoint.UserError, match='lists channels .* but holds no masks'):
        models.create_model('deit_tiny_patch16_224', img_size=64, depth=3, checkpoint_path=str(path))


def test_a_file_of_only_averaged_weights_loads_them_as_timm_does(tmp_path):
    """A file whose only weights are the averaged ones (`model_ema`, or timm's `state_dict_ema`, saved from a
    DataParallel model here) loads them, masks included, through models.create_model and --eval's builder, as
    timm's own loader does; it was refused as holding no model state dict."""
    model, sd = _pruned_state(tmp_path)
    path = str(tmp_path / 'ema_only.pth')
    x = torch.randn(2, 3, 64, 64)
    for key in ('model_ema', 'state_dict_ema'):
        torch.save({key: {f'module.{k}': v for k, v in sd.items()}, 'epoch': 3}, path)
        reference = timm.create_model('cc_deit_tiny_patch16_224', img_size=64, depth=3, checkpoint_path=path)
        assert all(torch.equal(a, b) for a, b in zip(reference.masks, model.masks))
        loaded = models.create_model('deit_tiny_patch16_224', img_size=64, depth=3, checkpoint_path=path)
        built, _ = models.build_model_from_checkpoint(path, 'deit_tiny_patch16_224', img_size=64, depth=3)
        with torch.no_grad():
            expected = reference.eval()(x)
            for m in (loaded, built):
                assert all(torch.equal(a, b) for a, b in zip(m.masks, model.masks))
                assert torch.equal(m.eval()(x), expected)


def test_released_channels_as_tensors_are_checked_against_the_masks(tmp_path):
    """A released pruned file ({'model', 'channels'} with 0-dim tensor channels, argparse.Namespace args): channels
    that agree with the masks say nothing; channels that disagree are one warning naming both lists as numbers, and
    the masks win."""
    torch.manual_seed(0)
    pruned = models.create_model('cc_deit_digits_patch4_32')
    pruning.apply_masks(pruned, pruning.random_masks(6, 64, 0.3, generator=torch.Generator().manual_seed(0)))
    kept = [int(m.sum()) for m in pruned.masks]  # (counted here from the masks themselves)
    wrong = [c - 1 for c in kept]
    path = str(tmp_path / 'released.pth')
    for channels, said in ((kept, []), (wrong, [f'warning: {path} lists channels {wrong}, but its masks keep {kept}; '
                                                 f'using the masks'])):
        torch.save({'model': pruned.state_dict(), 'channels': [torch.tensor(c) for c in channels],
                    'args': argparse.Namespace(model='deit_digits_patch4_32', prune_rate=0.3)}, path)
        lines = []
        model, _ = models.build_model_from_checkpoint(path, None, warn=lines.append)
        assert lines == said
        assert all(torch.equal(a, b) for a, b in zip(model.masks, pruned.masks))


def test_channels_that_clip_no_token_in_a_file_without_masks_are_a_warning_not_a_pruned_model(tmp_path):
    """A dense file whose channels clip no token (an empty list, or full counts for another number of blocks) was
    refused as 'a pruned model' without its masks; it loads dense with one warning, as channels that disagree with
    masks do.  Counts that clip tokens without masks stay refused."""
    torch.manual_seed(0)
    dense = models.create_model('cc_deit_digits_patch4_32')
    sd = {k: v for k, v in dense.state_dict().items() if not k.endswith('token_index')}  # (an official file's)
    path = str(tmp_path / 'dense.pth')
    full = [65] * 6
    for channels in ([], [65] * 7):
        torch.save({'model': sd, 'channels': channels,
                    'args': {'model': 'deit_digits_patch4_32'}}, path)
        lines = []
        model, _ = models.build_model_from_checkpoint(path, None, warn=lines.append)
        assert lines == [f'warning: {path} lists channels {channels} but holds no masks; loading the dense model '
                         f'(kept tokens per block: {full})']
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), dense.state_dict().values()))
    torch.save({'model': sd, 'channels': [65, 40, 65, 65, 65, 65]}, path)
    with pytest.raises(models.checkpoint.UserError, match='a pruned model, but holds no masks'):
        models.build_model_from_checkpoint(path, 'deit_digits_patch4_32')


def test_an_official_file_without_a_weight_is_refused_for_that_weight_alone(tmp_path):
    """An official file holds no masks (all True when loaded): one that lacks a weight is refused naming that weight
    only, not the masks it never holds; a pruned file that lacks a mask is refused naming that mask."""
    torch.manual_seed(0)
    dense = models.create_model('cc_deit_digits_patch4_32')
    official = {k: v for k, v in dense.state_dict().items() if not k.endswith(models.MASK_KEY)}
    assert len(official) < len(dense.state_dict())
    path = str(tmp_path / 'official.pth')
    del official['blocks.1.mlp.fc1.weight']
    torch.save({'model': official}, path)
    with pytest.raises(UserError) as e:
        models.build_model_from_checkpoint(path, 'deit_digits_patch4_32')
    assert str(e.value) == f'{path} does not fit deit_digits_patch4_32: missing keys blocks.1.mlp.fc1.weight'
    pruned = pruning.apply_masks(dense, pruning.random_masks(6, 64, 0.3, generator=torch.Generator().manual_seed(0)))
    assert min(pruned) < 65
    masked = dense.state_dict()
    del masked['blocks.3.attn.token_index']
    torch.save({'model': masked}, path)
    with pytest.raises(UserError) as e:
        models.build_model_from_checkpoint(path, 'deit_digits_patch4_32')
    assert str(e.value) == f'{path} does not fit deit_digits_patch4_32: missing keys blocks.3.attn.token_index'


def test_models_create_model_refuses_a_file_of_another_model_of_the_same_shapes(tmp_path):
    """A file whose args name ViT-Ti (the shapes of DeiT-Ti, another input normalisation) is refused by
    models.create_model('deit_tiny_patch16_224', checkpoint_path=...), as --eval refuses it; one that names the
    same model, pretrained tag or not, loads."""
    model, sd = _pruned_state(tmp_path)
    path = tmp_path / 'checkpoint.pth'
    for recorded in ('deit_tiny_patch16_224.fb_in1k', 'deit_tiny_patch16_224'):
        torch.save({'model': sd, 'args': argparse.Namespace(model=recorded)}, path)
        loaded = models.create_model('deit_tiny_patch16_224', img_size=64, depth=3, checkpoint_path=str(path))
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in sd.items())
    torch.save({'model': sd, 'args': argparse.Namespace(model='vit_tiny_patch16_224')}, path)
    with pytest.raises(UserError, match=re.escape(
            f'{path} holds vit_tiny_patch16_224 (the model its args name), not deit_tiny_patch16_224: set the model '
            f'name vit_tiny_patch16_224')):
        models.create_model('deit_tiny_patch16_224', img_size=64, depth=3, checkpoint_path=str(path))


def test_dense_copy_is_the_dense_model_and_leaves_the_pruned_one_as_it_is(tmp_path):
    """dense_copy (the dense row of --speed-only, the dense FLOPs of --prune) computes timm's model of the same
    weights, and the pruned model keeps its masks and its outputs."""
    model, sd = _pruned_state(tmp_path)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        dense = models.dense_copy(model)
        reference = timm.create_model('deit_tiny_patch16_224', img_size=64, depth=3).eval()
        reference.load_state_dict({k: v for k, v in sd.items() if not k.endswith('token_index')})
        assert torch.allclose(dense(x), reference(x), atol=1e-5)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
        assert torch.equal(model(x), before) and not torch.allclose(before, reference(x), atol=1e-3)


def test_a_file_whose_head_has_other_classes_says_num_classes(tmp_path):
    """A model finetuned on 10 classes, loaded by models.create_model with timm's default 1000: the head's
    shape names the number of classes to pass, not another model name (which would not help)."""
    torch.manual_seed(0)
    model = timm.create_model('cc_deit_tiny_patch16_224', img_size=64, depth=3, num_classes=10)
    path = str(tmp_path / 'checkpoint.pth')
    torch.save({'model': model.state_dict()}, path)
    with pytest.raises(models.checkpoint.UserError, match=re.escape(
            'head.weight has shape (10, 192) in the checkpoint but (1000, 192) in the model (another number of '
            "classes? the checkpoint's head has 10: pass num_classes=10)")):
        models.create_model('deit_tiny_patch16_224', img_size=64, depth=3, checkpoint_path=path)
    loaded = models.create_model('deit_tiny_patch16_224', img_size=64, depth=3, num_classes=10, checkpoint_path=path)
    assert torch.equal(loaded.head.weight, model.head.weight)


def test_a_distilled_file_whose_two_heads_have_other_classes_says_so(tmp_path):
    """A distilled DeiT whose class head alone was replaced (10 classes, head_dist still 1000): the hint sent
    one to num_classes=1000, whose model then sent one back to num_classes=10 (and --eval, which sizes the head
    from the file, to a num_classes it has no flag for); no number fits both, and the error says the heads differ."""
    torch.manual_seed(0)
    kw = dict(img_size=32, patch_size=16, depth=1)
    model = timm.create_model('deit_tiny_distilled_patch16_224', **kw)
    sd = model.state_dict()
    sd['head.weight'], sd['head.bias'] = torch.randn(10, 192), torch.randn(10)
    path = str(tmp_path / 'finetuned.pth')
    torch.save({'model': sd}, path)
    said = re.escape(f'{path} does not fit deit_tiny_distilled_patch16_224: its two classifier heads have different '
                     "numbers of classes (head 10, head_dist 1000), where a distilled model's heads predict the "
                     'same classes (was only one of them replaced?)')
    with pytest.raises(models.checkpoint.UserError, match=f'^{said}$'):
        models.build_model_from_checkpoint(path, 'deit_tiny_distilled_patch16_224', **kw)
    for classes in (10, 1000):
        with pytest.raises(models.checkpoint.UserError, match=f'^{said}$'):
            models.create_model('deit_tiny_distilled_patch16_224', num_classes=classes, checkpoint_path=path, **kw)


def test_a_file_missing_its_head_weight_says_so(tmp_path):
    """The head is sized from the file's head (its weight's rows, or its bias's length without the weight): a file
    that lost head.weight is reported as missing it, not as a head.bias of another model size."""
    model = timm.create_model('cc_deit_tiny_patch16_224', img_size=64, depth=3, num_classes=10)
    sd = model.state_dict()
    del sd['head.weight']
    path = str(tmp_path / 'headless.pth')
    torch.save({'model': sd}, path)
    with pytest.raises(models.checkpoint.UserError, match=r'^\S+ does not fit deit_tiny_patch16_224: missing keys '
                                                          r'head\.weight$'):
        models.build_model_from_checkpoint(path, 'deit_tiny_patch16_224', 4, img_size=64, depth=3)
    assert models.head_classes(sd, 4) == 10 and models.head_classes({}, 4) == 4


def test_a_file_whose_head_has_no_classes_says_so(tmp_path):
    """A head of 0 classes (weight (0, C)): timm builds no head for it, so its keys were 'unexpected' (and through
    models.create_model 'another number of classes? ... pass num_classes=0', which then failed the same way)."""
    model = timm.create_model('cc_deit_tiny_patch16_224', img_size=64, depth=3, num_classes=10)
    sd = model.state_dict()
    sd['head.weight'], sd['head.bias'] = sd['head.weight'][:0], sd['head.bias'][:0]
    path = str(tmp_path / 'no_classes.pth')
    torch.save({'model': sd}, path)
    said = re.escape(f'{path}: its classifier head has no classes (head.weight has shape (0, 192)): a model that '
                     'predicts nothing')
    with pytest.raises(models.checkpoint.UserError, match=f'^{said}$'):
        models.build_model_from_checkpoint(path, 'deit_tiny_patch16_224', img_size=64, depth=3)
    for classes in (1000, 0):
        with pytest.raises(models.checkpoint.UserError, match=f'^{said}$'):
            models.create_model('deit_tiny_patch16_224', img_size=64, depth=3, num_classes=classes,
                                checkpoint_path=path)

def test_a_file_of_another_input_size_names_the_size_and_the_argument_that_sets_it(tmp_path):
    """Through models.create_model there is no --input-size: the hint says img_size, and which (the square image
    of the model's patches the position embedding was made for)."""
    model, sd = _pruned_state(tmp_path)
    other = timm.create_model('cc_deit_tiny_patch16_224', img_size=48, depth=3)
    path = str(tmp_path / 'pruned_48.pth')
    torch.save({'model': other.state_dict()}, path)
    with pytest.raises(models.checkpoint.UserError, match=re.escape('(another input size? pass img_size=48)')):
        models.create_model('deit_tiny_patch16_224', img_size=64, depth=3, checkpoint_path=path)
    with pytest.raises(models.checkpoint.UserError, match=re.escape('(another input size? set --input-size 48)')):
        models.build_model_from_checkpoint(path, 'deit_tiny_patch16_224', img_size=64, depth=3)
    loaded = models.create_model('deit_tiny_patch16_224', img_size=48, depth=3, checkpoint_path=path)
    assert torch.equal(loaded.pos_embed, other.pos_embed)


def test_set_masks_refuses_scores_and_takes_zero_one_rows(tmp_path):
    model, sd = _pruned_state(tmp_path)
    counts = models.kept_token_counts(model)
    with pytest.raises(ValueError, match='blocks.0.attn.token_index: mask holds values other than 0 and 1'):
        model.set_masks([torch.rand(17) + 0.5] * 3)
    assert models.kept_token_counts(model) == counts  # refused before anything was written
    rows = [m.int().tolist() for m in model.masks]
    model.set_dense()
    assert model.set_masks(rows) == counts


def test_pruned_checkpoint_round_trip_through_create_model(tmp_path):
    model, sd = _pruned_state(tmp_path)
    path = tmp_path / 'pruned.pth'
    # Released files may hold channels as 0-dim tensors and args as a Namespace.
    torch.save({'model': sd, 'channels': [torch.tensor(c) for c in models.kept_token_counts(model)],
                'args': argparse.Namespace(model='deit_tiny_patch16_224', prune_rate=0.25)}, path)
    loaded = timm.create_model('cc_deit_tiny_patch16_224', img_size=64, depth=3, checkpoint_path=str(path))
    for a, b in zip(model.masks, loaded.masks):
        assert torch.equal(a, b)
    x = torch.randn(2, 3, 64, 64)
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x), atol=1e-6)


@pytest.mark.parametrize('change, message', [
    ('missing', 'Missing key(s)'),
    ('extra', 'Unexpected key(s)'),
    ('some_masks_missing', 'blocks.2.attn.token_index'),
    ('short_mask', 'mask has shape (16,), the model needs (17,)'),
    ('no_class_token', 'the class token (position 0) must be kept'),
    ('scores_as_mask', 'mask holds values other than 0 and 1 (torch.float32); a mask keeps (1) or clips (0) each '
                       'token'),  # read as booleans, every nonzero score kept its token without a word
])
def test_strict_loading_refuses_bad_state_dicts(tmp_path, change, message):
    model, sd = _pruned_state(tmp_path)
    sd = dict(sd)
    if change == 'missing':
        del sd['blocks.1.mlp.fc1.weight']
    elif change == 'extra':
        sd['blocks.1.attn.extra'] = torch.zeros(1)
    elif change == 'some_masks_missing':
        del sd['blocks.2.attn.token_index']
    elif change == 'short_mask':
        sd['blocks.1.attn.token_index'] = torch.ones(16, dtype=torch.bool)
    elif change == 'no_class_token':
        sd['blocks.1.attn.token_index'] = sd['blocks.1.attn.token_index'].clone()
        sd['blocks.1.attn.token_index'][0] = False
    elif change == 'scores_as_mask':
        sd['blocks.1.attn.token_index'] = torch.rand(17) + 0.5
    fresh = timm.create_model('cc_deit_tiny_patch16_224', img_size=64, depth=3)
    said = message.replace('(', r'\(').replace(')', r'\)')
    with pytest.raises(RuntimeError, match=said):
        fresh.load_state_dict(sd)
    path = tmp_path / 'bad.pth'
    torch.save({'model': sd}, path)
    with pytest.raises(RuntimeError, match=said):  # the same refusal, through timm's loader
        timm.create_model('cc_deit_tiny_patch16_224', img_size=64, depth=3, checkpoint_path=str(path))


@pytest.mark.parametrize('name, expected', [
    ('cc_deit_tiny_patch16_224', 1.3), ('cc_deit_small_patch16_224', 4.6), ('cc_deit_base_patch16_224', 17.6)])
def test_dense_gflops_match_the_paper(name, expected):
    model = timm.create_model(name)
    assert round(models.count_macs(model) / 1e9, 1) == expected


def test_flops_follow_the_per_block_channels():
    model = timm.create_model('cc_deit_tiny_patch16_224')
    channels = pruning.apply_masks(model, pruning.random_masks(12, 196, 0.4, torch.Generator().manual_seed(0)))
    expected = formula_macs(model, channels)
    assert models.count_macs(model) == expected
    assert sum(channels) == 12 * 197 - int(196 * 12 * 0.4)
    # channels given: the cost of those kept counts, whatever masks the model holds
    dense = timm.create_model('cc_deit_tiny_patch16_224')
    assert models.count_macs(dense, channels) == expected
    assert models.count_macs(model, [197] * 12) == models.count_macs(dense) != expected


class _MeanHeadViT(timm.models.vision_transformer.VisionTransformer):
    """A forward_head of its own: the head on the mean of the tokens, one row per image whatever global_pool says."""

    def forward_head(self, x, pre_logits=False):
        x = x.mean(1)
        return x if pre_logits else self.head(x)


def test_a_head_is_priced_per_token_only_where_timms_head_predicts_each_token():
    """global_pool='' makes timm's own head predict every token, priced on each of them; a forward_head of the model's
    class reads the tokens as it likes (here their mean: one row, as the output's shape says) and is priced on
    one row, as the method prices a head (the formula written out: conftest.formula_macs)."""
    kwargs = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10, global_pool='')
    own = models.apply_clip_concat(_MeanHeadViT(**kwargs))
    timms = models.apply_clip_concat(timm.models.vision_transformer.VisionTransformer(**kwargs))
    x = torch.randn(2, 3, 32, 32)
    assert own(x).shape == (2, 10) and timms(x).shape == (2, 17, 10)
    assert models.count_macs(own) == formula_macs(own, [17, 17])
    assert models.count_macs(timms) == formula_macs(timms, [17, 17]) + 16 * 64 * 10  # the head on 16 more rows


def test_flops_of_channels_that_do_not_fit_the_model_are_refused():
    """A channels list of another depth priced only the blocks it reached, or none past them, and a count above
    the model's tokens was priced as given: GFLOPs of another model, without a word.  What is no whole count (a
    fraction, a boolean: a mask's entry passed for a count) is a TypeError."""
    model = timm.create_model('cc_deit_tiny_patch16_224', img_size=32, depth=3)  # 5 tokens
    assert models.count_macs(model, torch.tensor([4, 5, 3])) == models.count_macs(model, [4, 5, 3])
    for channels, said in (([5, 5], 'channels holds 2 counts for a model of 3 blocks'),
                           ([5] * 4, 'channels holds 4 counts for a model of 3 blocks'),
                           ([5, 6, 5], r'channels \[5, 6, 5\]: a block keeps from 0 to 5 tokens'),
                           ([5, -1, 5], 'a block keeps from 0 to 5 tokens')):
        with pytest.raises(ValueError, match=said):
            models.count_macs(model, channels)
    for channels in ([4.5, 5, 5], [True, 5, 5]):  # a fraction; a mask's entry (True == 1), not a count
        with pytest.raises(TypeError, match='channels must be whole numbers'):
            models.count_macs(model, channels)


def test_routing_is_swappable_and_the_boolean_reference_agrees():
    """Each block's routing is a function of models.routing: the boolean-mask definition gives the same model."""
    torch.manual_seed(7)
    model = timm.create_model('cc_deit_tiny_patch16_224', img_size=64, depth=4).eval()
    pruning.apply_masks(model, _revisiting_plan(4, 16, 7))
    x = torch.randn(2, 3, 64, 64)
    called = []

    def boolean_mask_concat(*args):
        called.append(args[1].shape[1])
        return models.routing.boolean_mask_concat(*args)
    with torch.no_grad():
        fixed_shapes = model(x)
        for blk in model.blocks:
            blk.routing = boolean_mask_concat
        boolean = model(x)
        reference = reference_forward(model, x, [m.clone() for m in model.masks])
    assert called == [17] * 4 and not any(blk.dense for blk in model.blocks)  # each block ran the routing swapped in
    assert (fixed_shapes - boolean).abs().max().item() < 1e-5
    assert (boolean - reference).abs().max().item() < 1e-4


def test_torch_jit_script_is_refused_by_name_and_trace_records_the_pruned_model():
    """timm's own model scripts; ours failed deep inside TorchScript ("'Tensor' object has no attribute or method
    'forward'", at super().forward of a block): refused before compiling, the model or a block alone, with the
    ways that work, and torch.jit.trace gives the pruned model's outputs."""
    import warnings
    kwargs = dict(img_size=32, patch_size=8, depth=2, num_classes=5)
    torch.manual_seed(3)
    dense = timm.create_model('deit_tiny_patch16_224', **kwargs).eval()
    model = models.create_model('cc_deit_tiny_patch16_224', **kwargs).eval()
    model.load_state_dict(dense.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter('ignore')  # (torch.jit.script and trace are deprecated)
        assert torch.allclose(torch.jit.script(dense)(x), dense(x), atol=1e-5)
        for target in (model, model.blocks[0]):
            with pytest.raises(RuntimeError, match=r'^torch\.jit\.script cannot compile a Clip & Concat model: .*'
                                                   r'use torch\.jit\.trace .* or torch\.compile$'):
                torch.jit.script(target)
        pruning.apply_masks(model, _revisiting_plan(2, 16, 3))
        traced = torch.jit.trace(model, x)
        assert torch.allclose(traced(x), model(x), atol=1e-5)
        assert (traced(x) - dense(x)).abs().max().item() > 1e-3  # (the masks are in what was traced)


def test_is_clip_concat_looks_through_the_wrappers_the_mask_functions_look_through():
    model = timm.create_model('cc_deit_tiny_patch16_224', img_size=32, depth=2)
    plain = timm.create_model('deit_tiny_patch16_224', img_size=32, depth=2)
    compiled = torch.compile(model)
    assert models.is_clip_concat(model) and models.is_clip_concat(compiled)
    assert pruning.apply_masks(compiled, torch.ones(2, 4, dtype=torch.bool)) == [5, 5]  # (accepted as one)
    assert not models.is_clip_concat(plain) and not models.is_clip_concat(torch.compile(plain))
    # DistributedDataParallel's way, the model as .module (a stand-in: a real one needs a process group): the
    # kept counts and the MACs are the model's, not an AttributeError
    wrapped = torch.nn.Module()
    wrapped.module = model
    plan = torch.tensor([[1, 0, 1, 1], [0, 0, 1, 0]], dtype=torch.bool)
    assert models.is_clip_concat(wrapped) and pruning.apply_masks(wrapped, plan) == [4, 2]
    assert models.kept_token_counts(wrapped) == models.kept_token_counts(model) == [4, 2]
    assert models.count_macs(wrapped) == models.count_macs(model, [4, 2]) < models.count_macs(model, [5, 5])


def test_kept_token_counts_of_a_model_without_masks_says_so():
    plain = timm.create_model('deit_tiny_patch16_224', img_size=32, depth=2)
    with pytest.raises(TypeError, match='kept_token_counts needs a Clip & Concat model, got a VisionTransformer'):
        models.kept_token_counts(plain)


def test_mask_api_dense_and_back():
    torch.manual_seed(8)
    model = timm.create_model('cc_deit_tiny_patch16_224', img_size=64, depth=3).eval()
    plan = _revisiting_plan(3, 16, 2)
    channels = pruning.apply_masks(model, plan)
    concat = [m.clone() for m in model.masks]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        pruned = model(x)
        model.set_dense()
        assert models.kept_token_counts(model) == [17] * 3 and not model.reordered
        dense = model(x)
        assert model.set_masks(concat) == channels
        assert torch.equal(model(x), pruned)
    assert (pruned - dense).abs().max().item() > 1e-3
    with pytest.raises(ValueError, match=r'a mask has shape \(16,\), the model needs \(17,\)'):
        model.set_masks([torch.ones(16, dtype=torch.bool)] * 3)


def test_a_recorded_pretrained_tag_counts_only_where_it_changes_the_pretrained_config():
    """A file recording deit_tiny_patch16_224.fb_in1k holds the model deit_tiny_patch16_224 names (timm's default
    tag of that architecture, the same pretrained config), so it is not refused; vit_base_patch16_224.mae has
    another input normalisation than vit_base_patch16_224 (timm's configs say so), and another size is another
    model: both are refused, naming the file's model."""
    from timm.models import get_pretrained_cfg
    from models.checkpoint import check_recorded_name
    assert get_pretrained_cfg('deit_tiny_patch16_224') == get_pretrained_cfg('deit_tiny_patch16_224.fb_in1k')
    assert get_pretrained_cfg('vit_base_patch16_224').mean != get_pretrained_cfg('vit_base_patch16_224.mae').mean
    for recorded, given in (('deit_tiny_patch16_224.fb_in1k', 'cc_deit_tiny_patch16_224'),
                            ('deit_tiny_patch16_224', 'deit_tiny_patch16_224.fb_in1k'),
                            ('cc_deit_tiny_patch16_224', 'deit_tiny_patch16_224')):
        check_recorded_name({'args': {'model': recorded}}, 'f.pth', given, '--model')
    for recorded, given in (('vit_base_patch16_224.mae', 'vit_base_patch16_224'),
                            ('deit_tiny_patch16_224.fb_in1k', 'deit_small_patch16_224'),
                            ('deit_tiny_patch16_224.no_such_tag', 'deit_tiny_patch16_224')):
        with pytest.raises(UserError, match=rf'^f\.pth holds {re.escape(recorded)} \(the model its args name\), '
                                            rf'not {given}: set --model {re.escape(recorded)}$'):
            check_recorded_name({'args': {'model': recorded}}, 'f.pth', given, '--model')


def test_an_attention_module_replaced_without_its_mask_is_named():
    """Replacing a block's attention (timm's model takes any module there) drops the mask buffer it held: the
    AttributeError raised inside the ``masks`` property was reported by nn.Module as the model having no attribute
    ``masks``.  It is now a TypeError naming the block and what to do; with the mask moved over, the model runs."""
    from timm.models.vision_transformer import Attention
    torch.manual_seed(7)
    model = timm.create_model('cc_deit_tiny_patch16_224', img_size=32, depth=2, embed_dim=48, num_heads=3).eval()
    pruning.apply_masks(model, torch.tensor([[True, False, True, True], [False, True, True, False]]))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    old = model.blocks[1].attn
    new = Attention(48, num_heads=3, qkv_bias=True)
    new.load_state_dict({k: v for k, v in old.state_dict().items() if k != 'token_index'})
    model.blocks[1].attn = new
    for call in (lambda: model(x), lambda: model.masks, lambda: models.kept_token_counts(model), model.set_dense):
        with pytest.raises(TypeError, match=r'^blocks\.1\.attn \(an Attention\) has no mask buffer token_index.*'
                                            r'register_buffer'):
            call()
    new.register_buffer('token_index', old.token_index)
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_timm_feature_extractor_traces_a_pruned_model():
    """timm's ``create_feature_extractor`` (FX symbolic tracing) passes ``attn_mask`` and ``is_causal`` as proxies,
    and a pruned block refused them as attention masks (timm's model traces); the traced module now computes the
    pruned model, and refuses an attention mask it is called with."""
    from timm.models import create_feature_extractor
    torch.manual_seed(8)
    model = timm.create_model('cc_deit_tiny_patch16_224', img_size=32, depth=2, embed_dim=48, num_heads=3).eval()
    pruning.apply_masks(model, torch.tensor([[True, False, True, True], [False, True, True, False]]))
    x = torch.randn(2, 3, 32, 32)
    extractor = create_feature_extractor(model, return_nodes={'norm': 'tokens', 'head': 'logits'})
    with torch.no_grad():
        out = extractor(x)
        assert torch.allclose(out['logits'], model(x), atol=1e-6)
        assert torch.allclose(out['tokens'], model.forward_features(x, restore_order=False), atol=1e-6)
        with pytest.raises(ValueError, match='attention masks are not supported on a pruned block'):
            extractor(x, attn_mask=torch.ones(5, 5, dtype=torch.bool))


@pytest.mark.filterwarnings('ignore:There is a performance drop:UserWarning')  # (torch's vmap of CPU flash SDPA)
def test_masks_batched_by_vmap_are_refused_and_an_ensemble_of_parameters_runs():
    """torch.func's ensembling (``stack_module_state`` of copies, then ``vmap`` of ``functional_call``) batches the
    buffers too, and the masks then failed in torch's own words ("Batching rule not implemented for aten::equal"):
    they are refused, naming the mask and the way that works (the buffers not batched), which gives each member's
    output."""
    from torch.func import functional_call, stack_module_state, vmap
    torch.manual_seed(9)
    model = timm.create_model('cc_deit_tiny_patch16_224', img_size=32, depth=2, embed_dim=48, num_heads=3).eval()
    pruning.apply_masks(model, torch.tensor([[True, False, True, True], [False, True, True, False]]))
    members = [copy.deepcopy(model) for _ in range(2)]
    with torch.no_grad():
        members[1].head.weight.mul_(2)
    params, buffers = stack_module_state(members)
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(TypeError, match=r'^blocks\.0\.attn\.token_index is batched by torch\.func\.vmap.*'
                                        r'in_dims=None'):
        vmap(lambda p, b: functional_call(model, (p, b), (x,)))(params, buffers)
    single = {k: v[0] for k, v in buffers.items()}
    out = vmap(lambda p: functional_call(model, (p, single), (x,)))(params)
    with torch.no_grad():
        assert torch.allclose(out[0], members[0](x), atol=1e-6) and torch.allclose(out[1], members[1](x), atol=1e-6)


@pytest.mark.parametrize('build', [lambda **k: timm.create_model('cc_deit_tiny_patch16_224', **k),
                                   lambda **k: models.create_model('cc_deit_tiny_patch16_224', **k),
                                   lambda **k: models.create_model('deit_tiny_patch16_224', **k)],
                         ids=['timm', 'models-cc', 'models-timm-name'])
def test_a_pruned_model_saved_in_timms_hub_format_loads_back_pruned(tmp_path, build):
    """timm's save_for_hf (as push_to_hf_hub writes it) names the model's pretrained_cfg architecture, which was timm's
    dense DeiT: timm.create_model('local-dir:...', pretrained=True) (or 'hf-hub:...') built it and refused the masks
    as unexpected keys.  The config now names the cc_ model, whose weights load into the masked model; so does
    models.create_model's, by either name."""
    from timm.models import save_for_hf
    torch.manual_seed(10)
    shape = dict(img_size=32, depth=2, embed_dim=48, num_heads=3)
    model = build(**shape).eval()
    pruning.apply_masks(model, torch.tensor([[True, False, True, True], [False, True, True, False]]))
    save_for_hf(model, tmp_path, model_config=shape)
    loaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    assert loaded.pretrained_cfg['architecture'] == 'cc_deit_tiny_patch16_224'
    assert all(torch.equal(a, b) for a, b in zip(loaded.masks, model.masks))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_pretrained_without_a_source_is_refused_and_a_digits_model_round_trips_through_the_hub_format(tmp_path):
    """The digits model has no pretrained weights: pretrained=True is refused (timm's loader would warn and keep the
    random initialisation), by the same rule that lets a pruned digits model saved in timm's hub format be read
    back (it was refused by name, whatever its pretrained_cfg named)."""
    from timm.models import save_for_hf
    with pytest.raises(ValueError, match=r'^cc_deit_digits_patch4_32 has no pretrained weights'):
        timm.create_model('cc_deit_digits_patch4_32', pretrained=True)
    model = timm.create_model('cc_deit_digits_patch4_32').eval()
    pruning.apply_masks(model, pruning.random_masks(6, 64, 0.3, generator=torch.Generator().manual_seed(0)))
    save_for_hf(model, tmp_path)
    loaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    assert all(torch.equal(a, b) for a, b in zip(loaded.masks, model.masks)) and len(loaded.masks) == 6
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_the_digits_model_has_the_shape_its_registration_documents():
    """deit_digits_patch4_32 (the mini reproduction's model, whose runs the README reports) is a DeiT-shaped timm ViT
    of patch 4, width 96, depth 6, 3 heads and 10 classes on 32x32 input, as models/zoo.py documents it, and its
    cc_ twin the same with Clip & Concat masks (64 patches and the class token, all kept)."""
    for name in ('deit_digits_patch4_32', 'cc_deit_digits_patch4_32'):
        model = timm.create_model(name)
        assert isinstance(model, timm.models.vision_transformer.VisionTransformer), name
        assert tuple(model.patch_embed.patch_size) == (4, 4) and tuple(model.patch_embed.img_size) == (32, 32), name
        assert model.embed_dim == 96 and len(model.blocks) == 6 and model.num_classes == 10, name
        assert all(blk.attn.num_heads == 3 and blk.attn.head_dim == 32 for blk in model.blocks), name
        assert all(blk.mlp.fc1.out_features == 4 * 96 for blk in model.blocks), name  # DeiT's MLP ratio
        assert model.num_prefix_tokens == 1 and model.global_pool == 'token', name
    assert models.kept_token_counts(timm.create_model('cc_deit_digits_patch4_32')) == [65] * 6
