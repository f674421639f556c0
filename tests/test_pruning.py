"""Choosing masks: Taylor scores against an independent autograd computation, the budget and its tie rule,
the random baseline, and the concat-order conversion on a hand-worked example."""
import math

import pytest
import timm
import torch
import torch.nn as nn

import models
import pruning


def _small_model(seed=0, depth=3, name='cc_deit_tiny_patch16_224'):
    torch.manual_seed(seed)
    # 64x64 input with patch 16: 16 patches + class token (and a distillation token), DeiT-Ti width.
    return models.create_model(name, img_size=64, depth=depth, num_classes=7)


def _independent_scores(model, batches, criterion):
    """Σ_batches |Σ_{b,h,i} A·∂L/∂A| / (B·H·N) per key token, A from a forward written here, ∂L/∂A from autograd."""
    return sum(c.abs() for c in _signed_contributions(model, batches, criterion))


def _signed_contributions(model, batches, criterion):
    """Each batch's Σ_{b,h,i} A·∂L/∂A / (B·H·N) per (layer, patch), before the absolute value."""
    depth = len(model.blocks)
    contributions = []
    for images, targets in batches:
        total = torch.zeros(depth, model.num_tokens, dtype=torch.float64)
        probs = []
        x = model.patch_embed(images)
        prefix = [t.expand(x.shape[0], -1, -1) for t in (model.cls_token, getattr(model, 'dist_token', None))
                  if t is not None]
        x = torch.cat(prefix + [x], dim=1) + model.pos_embed
        for blk in model.blocks:
            h = blk.norm1(x)
            B, N, C = h.shape
            H = blk.attn.num_heads
            q, k, v = blk.attn.qkv(h).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
            a = ((q @ k.transpose(-2, -1)) * (C // H) ** -0.5).softmax(-1)
            a.retain_grad()
            probs.append(a)
            x = x + blk.attn.proj((a @ v).transpose(1, 2).reshape(B, N, C))
            x = x + blk.mlp(blk.norm2(x))
        x = model.norm(x)
        logits = model.head(x[:, 0])
        if len(prefix) == 2:  # a distilled DeiT in eval mode: the mean of its class and distillation heads
            logits = (logits + model.head_dist(x[:, 1])) / 2
        loss = criterion(logits, targets)
        model.zero_grad()
        loss.backward()
        for layer, a in enumerate(probs):
            B, H, N, _ = a.shape
            total[layer] += ((a * a.grad).sum(dim=(0, 1, 2)) / (B * H * N)).double()
        contributions.append(total[:, len(prefix):].float())
    model.zero_grad(set_to_none=True)
    return contributions


def _batches(n=2, batch=3, seed=1, classes=7):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 64, 64, generator=g), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(n)]


@pytest.mark.parametrize('name', ['cc_deit_tiny_patch16_224', 'deit_tiny_distilled_patch16_224'])
def test_scores_equal_independent_autograd_computation(name):
    model = _small_model(name=name)
    model.eval()
    batches = _batches()
    criterion = nn.CrossEntropyLoss()
    ours = pruning.attention_taylor_scores(model, batches, criterion)
    reference = _independent_scores(model, batches, criterion)
    assert ours.shape == (3, 16) and ours.dtype == torch.float32
    assert torch.allclose(ours, reference, rtol=1e-4, atol=1e-12)
    assert (ours > 0).all()


def test_scores_take_absolute_value_per_batch_then_sum():
    model = _small_model()
    criterion = nn.CrossEntropyLoss()
    batches = _batches(n=3)
    signed = torch.stack(_signed_contributions(model, batches, criterion))  # (batch, layer, patch)
    # these batches disagree in sign on many slots: there |Σ| < Σ|.| by a wide margin, so an absolute value
    # taken once after summing, or none at all, shows
    mixed = (signed > 0).any(dim=0) & (signed < 0).any(dim=0)
    assert mixed.sum() >= 10
    sum_of_abs, abs_of_sum = signed.abs().sum(dim=0), signed.sum(dim=0).abs()
    assert ((sum_of_abs - abs_of_sum)[mixed] > 0.1 * sum_of_abs[mixed]).sum() >= 5
    ours = pruning.attention_taylor_scores(model, batches, criterion)
    assert torch.allclose(ours, sum_of_abs, rtol=1e-4, atol=1e-12)
    each = sum(pruning.attention_taylor_scores(model, [b], criterion) for b in batches)
    assert torch.allclose(ours, each, rtol=1e-5)
    first = pruning.attention_taylor_scores(model, batches, criterion, max_batches=1)
    assert torch.allclose(first, pruning.attention_taylor_scores(model, batches[:1], criterion))


def test_each_batch_is_divided_by_its_own_number_of_images():
    """A loader's last batch is often smaller: each batch's |sum| is divided by its own B (3, then 1 here), not by
    the first batch's size nor by the mean size over the batches."""
    model = _small_model()
    criterion = nn.CrossEntropyLoss()
    batches = _batches(n=1, batch=3, seed=1) + _batches(n=1, batch=1, seed=2)
    assert [len(targets) for _, targets in batches] == [3, 1]
    ours = pruning.attention_taylor_scores(model, batches, criterion)
    assert torch.allclose(ours, _independent_scores(model, batches, criterion), rtol=1e-4, atol=1e-12)
    # the batch of one image weighs in: the scores are not those of the first batch plus a third of the second's
    first, second = (c.abs() for c in _signed_contributions(model, batches, criterion))
    assert not torch.allclose(ours, first + second / 3, rtol=1e-2, atol=0)


def test_max_batches_draws_no_batch_past_the_cap():
    """An iterator the caller goes on using after scoring (a DataLoader's, say) loses no batch to the cap: scoring
    with max_batches=2 takes the first two and leaves the third for the caller."""
    model = _small_model()
    batches = _batches(n=3)
    stream = iter(batches)
    capped = pruning.attention_taylor_scores(model, stream, nn.CrossEntropyLoss(), max_batches=2)
    assert torch.equal(capped, pruning.attention_taylor_scores(model, batches[:2], nn.CrossEntropyLoss()))
    left = next(stream, None)
    assert left is not None and left[0] is batches[2][0]


def test_an_empty_batch_adds_nothing_to_the_scores():
    """A batch of no images (a loader's filtered last batch) adds nothing, where dividing its sum by B = 0 made
    every score NaN (which plan_masks then blamed on a non-finite loss)."""
    model = _small_model()
    batches = _batches(n=2)
    criterion = nn.CrossEntropyLoss(reduction='sum')
    empty = (batches[0][0][:0], batches[0][1][:0])
    with_empty = pruning.attention_taylor_scores(model, [batches[0], empty, batches[1]], criterion)
    assert torch.equal(with_empty, pruning.attention_taylor_scores(model, batches, criterion))


def test_max_batches_may_be_a_numpy_integer():
    """A whole number of NumPy's (a count computed with an array) caps the batches as a Python int does."""
    import numpy as np
    model = _small_model()
    batches = _batches(n=3)
    capped = pruning.attention_taylor_scores(model, batches, nn.CrossEntropyLoss(), max_batches=np.int64(2))
    assert torch.equal(capped, pruning.attention_taylor_scores(model, batches, nn.CrossEntropyLoss(), max_batches=2))


def test_a_model_with_frozen_weights_is_scored_as_the_same_model_training():
    """With every weight frozen (a teacher's requires_grad_(False)) the attention maps need no gradient, so the
    capture makes each a leaf that does, and the forward must go on from that leaf: if the hook kept the leaf but
    let the model go on with the original map, the loss did not depend on what was captured.  The scores are
    those of the same weights unfrozen (which test_scores_equal_independent_autograd_computation checks)."""
    model = _small_model()
    batches = _batches()
    reference = pruning.attention_taylor_scores(model, batches, nn.CrossEntropyLoss())
    model.requires_grad_(False)
    frozen = pruning.attention_taylor_scores(model, batches, nn.CrossEntropyLoss())
    assert torch.allclose(frozen, reference, rtol=1e-5, atol=0) and bool((frozen > 0).all())
    assert not any(p.requires_grad for p in model.parameters())


def test_scores_hold_no_autograd_graph_and_keep_no_batch_alive():
    """A · ∂L/∂A summed without detaching A made the scores a node of every batch's graph: each batch's
    activations stayed alive until the scores were dropped, and the scores came back requiring gradients.  They
    are plain numbers: no grad_fn, and once scoring returns no attention map of any batch is still referenced."""
    import gc
    import weakref
    model = _small_model()
    maps = []

    def remember(module, inputs, output):
        maps.append(weakref.ref(output))
    handles = [blk.attn.attn_drop.register_forward_hook(remember) for blk in model.blocks]
    try:
        scores = pruning.attention_taylor_scores(model, _batches(n=2), nn.CrossEntropyLoss())
    finally:
        for handle in handles:
            handle.remove()
    assert not scores.requires_grad and scores.grad_fn is None
    gc.collect()
    assert len(maps) == 2 * 3 and all(ref() is None for ref in maps)


def test_scoring_changes_nothing_in_the_model():
    model = _small_model()
    model.blocks[1].attn.fused_attn = False  # the user's choice for one block: it comes back as it was
    plan = torch.ones(3, 16, dtype=torch.bool)
    plan[1, :5] = False
    pruning.apply_masks(model, plan)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        out_before = model(x)
    model.train()
    pruning.attention_taylor_scores(model, _batches(), nn.CrossEntropyLoss())
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    # each block's fused attention is back as it was (on, but where the user turned it off) and the capture hooks
    # are gone
    assert [blk.attn.fused_attn for blk in model.blocks] == [True, False, True]
    assert not any(blk.attn.attn_drop._forward_hooks for blk in model.blocks)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), out_before)


def test_scoring_restores_each_modules_mode_and_keeps_a_fast_path_valid():
    """Each submodule's own train/eval flag comes back (not just the model's), and the plan's version is the one
    before scoring: the masks are the same, so a fast path built from them still runs."""
    from models.fast_path import build_fast_path
    model = _small_model()
    pruning.apply_masks(model, pruning.random_masks(3, 16, 0.3, torch.Generator().manual_seed(0)))
    model.eval()
    fast = build_fast_path(model, backend='torch')
    model.train()
    model.blocks[1].eval()
    modes = {name: m.training for name, m in model.named_modules()}
    pruning.attention_taylor_scores(model, _batches(), nn.CrossEntropyLoss())
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert not model.blocks[1].training and model.blocks[0].training
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(fast(x), model(x), atol=1e-5)


def test_scoring_after_a_mask_changed_in_place_leaves_an_older_fast_path_refused():
    """A mask changed in place and not yet run is a new plan, which scoring takes up before it saves the model's
    state: the fast path built before that change is still refused afterwards, not run on the older masks."""
    from models.fast_path import build_fast_path
    model = _small_model()
    pruning.apply_masks(model, pruning.random_masks(3, 16, 0.3, torch.Generator().manual_seed(0)))
    model.eval()
    fast = build_fast_path(model, backend='torch')
    model.masks[1][4] = not bool(model.masks[1][4])
    pruning.attention_taylor_scores(model, _batches(), nn.CrossEntropyLoss())
    with torch.no_grad(), pytest.raises(RuntimeError, match='build it again'):
        fast(torch.randn(2, 3, 64, 64))


def test_a_compiled_model_is_scored_as_the_model_itself():
    model = _small_model()
    batches = _batches()
    reference = pruning.attention_taylor_scores(model, batches, nn.CrossEntropyLoss())
    assert torch.equal(pruning.attention_taylor_scores(torch.compile(model), batches, nn.CrossEntropyLoss()),
                       reference)


@pytest.mark.parametrize('case, error, message', [
    ('not_clip_concat', TypeError, 'needs a Clip & Concat model, got a VisionTransformer'),
    ('no_batches', ValueError, 'no batch was scored'),
    ('max_batches_0', ValueError, 'max_batches must be a whole number >= 1'),
    ('per_sample_loss', ValueError, r'batch 0: the criterion must return a scalar loss, got \(3,\)'),
    ('detached_loss', ValueError, 'batch 0: the loss does not depend on the model'),
    ('inference_mode', RuntimeError, 'outside torch.inference_mode'),
    # a loader that also gives the paths, or dicts: refused in Python's words ('too many values to unpack')
    ('batch_of_three', ValueError, r'^batch 0: batches must give \(images, targets\) pairs of tensors, got a '
                                   r'list of 3: Tensor, Tensor, list$'),
    ('batch_of_dict', ValueError, r'^batch 0: batches must give \(images, targets\) pairs of tensors, got a dict$'),
])
def test_scoring_refuses_what_it_cannot_score(case, error, message):
    model, batches, criterion, kwargs = _small_model(), _batches(), nn.CrossEntropyLoss(), {}
    if case == 'not_clip_concat':
        model = timm.create_model('deit_tiny_patch16_224', img_size=64, depth=3, num_classes=7)
    elif case == 'no_batches':
        batches = []
    elif case == 'max_batches_0':
        kwargs['max_batches'] = 0
    elif case == 'batch_of_three':
        batches = [[images, targets, ['a.png'] * len(targets)] for images, targets in batches]
    elif case == 'batch_of_dict':
        batches = [{'image': images, 'label': targets} for images, targets in batches]
    elif case == 'per_sample_loss':
        criterion = nn.CrossEntropyLoss(reduction='none')
    elif case == 'detached_loss':
        criterion = lambda output, targets: nn.functional.cross_entropy(output, targets).detach()  # noqa: E731
    context = torch.inference_mode() if case == 'inference_mode' else torch.enable_grad()
    with context, pytest.raises(error, match=message):
        pruning.attention_taylor_scores(model, batches, criterion, **kwargs)


def test_scores_are_taken_in_eval_mode_with_all_masks_true():
    """Dropout in the model and masks already present must not change the scores."""
    model = _small_model()
    batches = _batches()
    reference = pruning.attention_taylor_scores(model, batches, nn.CrossEntropyLoss())
    noisy = timm.create_model('cc_deit_tiny_patch16_224', img_size=64, depth=3, num_classes=7,
                              drop_rate=0.5, attn_drop_rate=0.5, drop_path_rate=0.5)
    noisy.load_state_dict(model.state_dict())
    plan = torch.ones(3, 16, dtype=torch.bool)
    plan[:, 3:9] = False
    pruning.apply_masks(noisy, plan)
    noisy.train()
    assert torch.allclose(pruning.attention_taylor_scores(noisy, batches, nn.CrossEntropyLoss()), reference)


def _score_in_two_processes(rank, port, out, batches):
    """Rank 0 scores ``batches`` while rank 1 is given none, then both are given none; each result (scores, or
    the ValueError's message) saved."""
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=2)
    try:
        results = []
        for given in (batches if rank == 0 else [], []):
            try:
                results.append(pruning.attention_taylor_scores(_small_model(), given, nn.CrossEntropyLoss()))
            except ValueError as e:
                results.append(str(e))
        torch.save(results, f'{out}/rank{rank}.pth')
    finally:
        dist.destroy_process_group()


def test_a_process_given_no_batch_neither_hangs_nor_fails_alone(tmp_path):
    """Under torch.distributed the scores are all-reduced: a process given no batch used to raise 'no batch was
    scored' alone, leaving the other waiting in the all-reduce for ever. The count now travels with the scores:
    a process without a batch adds nothing (both get the scores of the batches one process was given, as that
    process alone would), and with no batch anywhere both raise."""
    import time
    import torch.multiprocessing as mp
    from conftest import free_port
    batches = _batches()
    job = mp.spawn(_score_in_two_processes, args=(free_port(), str(tmp_path), batches), nprocs=2, join=False)
    deadline = time.monotonic() + 180
    while not job.join(timeout=2):
        if time.monotonic() > deadline:
            for process in job.processes:
                process.kill()
            pytest.fail('the processes did not finish: one waits in the all-reduce the other never joined')
    reference = pruning.attention_taylor_scores(_small_model(), batches, nn.CrossEntropyLoss())
    for rank in range(2):
        scores, nothing = torch.load(tmp_path / f'rank{rank}.pth', weights_only=True)
        assert isinstance(scores, torch.Tensor) and torch.allclose(scores, reference, rtol=1e-6, atol=0), rank
        assert nothing == 'no batch was scored: `batches` gave none in any process'


# --------------------------------------------------------------------------------------------------------
# the budget

def _reference_plan(scores, rate, decay=0.005):
    depth, n = scores.shape
    weighted = []
    for l in range(depth):
        norm = scores[l].double().norm()
        for j in range(n):
            weighted.append(((scores[l, j].double() / norm).item() * (1 - decay * l), l, j))
    weighted.sort()  # by weight, then lower layer, then lower token index
    keep = torch.ones(depth, n, dtype=torch.bool)
    for _, l, j in weighted[:int(n * depth * rate)]:
        keep[l, j] = False
    return keep


@pytest.mark.parametrize('rate', [0.1, 0.25, 0.3, 0.4, 0.77])
def test_plan_clips_exactly_the_budget(rate):
    scores = torch.rand(12, 196, generator=torch.Generator().manual_seed(0))
    plan = pruning.plan_masks(scores, rate)
    assert plan.shape == (12, 196) and plan.dtype == torch.bool
    assert int((~plan).sum()) == int(196 * 12 * rate)
    assert torch.equal(plan, _reference_plan(scores, rate))


def test_plan_normalises_each_layer():
    scores = torch.rand(4, 10, generator=torch.Generator().manual_seed(1))
    scaled = scores * torch.tensor([[1.0], [1e3], [1e-3], [7.0]])
    assert torch.equal(pruning.plan_masks(scores, 0.3), pruning.plan_masks(scaled, 0.3))


@pytest.mark.parametrize('scale', [1e-200, 1e200, 1e-310])
def test_plan_normalises_layers_of_scores_far_from_1(scale):
    """Finite scores whose squares underflow to 0 or overflow to inf, or that are below float64's smallest normal
    number (1e-310): the layer is normalised all the same, not weighed (about) 0 everywhere (as a layer of zeros,
    clipped first) because its norm came out 0 or inf."""
    scores = torch.tensor([[1.0, 3.0, 2.0, 4.0], [5.0, 1.0, 3.0, 2.0]], dtype=torch.float64)
    expected = pruning.plan_masks(scores, 0.25, layer_decay=0.0)
    assert expected.tolist() == [[False, True, True, True], [True, False, True, True]]
    far = scores * torch.tensor([[scale], [1.0]], dtype=torch.float64)
    assert torch.equal(pruning.plan_masks(far, 0.25, layer_decay=0.0), expected)


def test_plan_takes_scores_as_a_list_of_rows():
    """Scores given as one tensor per layer (a list or tuple of rows, as apply_masks takes a plan) are the scores
    stacked, where they were refused as not being 'a list'; rows of different lengths are refused naming them."""
    scores = torch.rand(3, 8)
    expected = pruning.plan_masks(scores, 0.3)
    assert torch.equal(pruning.plan_masks(list(scores), 0.3), expected)
    assert torch.equal(pruning.plan_masks(tuple(scores), 0.3), expected)
    with pytest.raises(ValueError, match=r'^scores: its rows have different shapes \(\(8,\), \(7,\)\)'):
        pruning.plan_masks([scores[0], scores[1, :7]], 0.3)


def test_a_layer_of_zero_scores_is_clipped_first():
    """s / ||s|| is undefined for a layer of zeros: it counts as 0 everywhere, below every positive score, so its
    slots go before any other layer's (here the deepest, whose prior would otherwise make it go first)."""
    scores = torch.rand(3, 8) + 0.5
    scores[1] = 0
    plan = pruning.plan_masks(scores, 5 / 24)
    assert (~plan).sum() == 5 and (~plan[1]).sum() == 5
    assert plan[1].tolist() == [False] * 5 + [True] * 3  # ties among the zeros: the lower patch index first


def test_a_layer_with_some_zero_scores_is_normalised_by_its_other_scores():
    """A score of exactly 0 (a token whose Taylor terms cancel) is the smallest of its layer and only that: the
    layer is still divided by its L2 norm, its other slots weighed as the rule weighs them, not the whole layer
    taken for one of zeros and clipped first."""
    scores = torch.rand(3, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64) + 0.5
    scores[1] = torch.tensor([5.0, 5.0, 0.0, 5.0, 5.0, 0.0, 5.0, 5.0], dtype=torch.float64)
    # layer 1 normalised: 0 at patches 2 and 5, 5 / sqrt(6 * 25) = 0.41 elsewhere, above most of layers 0 and 2
    plan = pruning.plan_masks(scores, 0.25)  # 6 slots
    assert torch.equal(plan, _reference_plan(scores, 0.25))
    assert (~plan[1]).nonzero().squeeze(1).tolist() == [2, 5]
    assert int((~plan).sum()) == 6


def test_depth_prior_clips_deeper_layers_first():
    flat = torch.ones(6, 20)  # every slot has the same normalised score; only the prior separates layers
    plan = pruning.plan_masks(flat, 0.1)  # 12 slots
    expected = torch.ones(6, 20, dtype=torch.bool)
    expected[5, :12] = False  # all from the deepest layer, lowest token indices first
    assert torch.equal(plan, expected)
    # A token a shallow layer values slightly more than a deep one still loses there: the prior tips it.
    scores = torch.tensor([[1.0, 2.0, 2.0, 2.0], [1.004, 2.0, 2.0, 2.0]])
    # normalised: 1/√13 = 0.27735 in layer 0, 1.004/√13.008 = 0.27837 in layer 1, times 0.995 = 0.27698
    plan = pruning.plan_masks(scores, 0.125)  # 1 slot
    assert (~plan).nonzero().tolist() == [[1, 0]]
    assert (~pruning.plan_masks(scores, 0.125, layer_decay=0.0)).nonzero().tolist() == [[0, 0]]


def test_ties_go_to_lower_layer_then_lower_token():
    flat = torch.ones(3, 8)
    plan = pruning.plan_masks(flat, 0.25, layer_decay=0.0)  # 6 slots, all weights equal
    expected = torch.ones(3, 8, dtype=torch.bool)
    expected[0, :6] = False
    assert torch.equal(plan, expected)
    plan = pruning.plan_masks(flat, 0.5, layer_decay=0.0)  # 12 slots
    expected[0, :] = False
    expected[1, :4] = False
    assert torch.equal(plan, expected)


def test_plan_rejects_bad_rates_and_shapes():
    with pytest.raises(ValueError, match='prune_rate'):
        pruning.plan_masks(torch.rand(2, 4), 1.0)
    with pytest.raises(ValueError, match='prune_rate'):
        pruning.plan_masks(torch.rand(2, 4), -0.1)
    with pytest.raises(ValueError, match='depth, num_patches'):
        pruning.plan_masks(torch.rand(8), 0.2)
    with pytest.raises(TypeError, match='prune_rate must be a number, got str'):
        pruning.plan_masks(torch.rand(2, 4), '0.2')
    with pytest.raises(ValueError, match='layer_decay must be a finite number'):
        pruning.plan_masks(torch.rand(2, 4), 0.2, layer_decay=float('nan'))


def test_plan_masks_refuses_negative_scores_which_would_turn_the_depth_prior_round():
    """Scaled by 1 - decay x l, a negative score of a deeper layer rises towards 0 and is kept before the same score
    of a shallower layer: the opposite of the prior's meaning (deeper layers give up tokens more readily), which
    holds for magnitudes.  Taylor scores are magnitudes; negative ones are refused, naming their layers."""
    equal = torch.ones(3, 4)
    plan = pruning.plan_masks(equal, 0.25)  # 3 of 12 slots clipped: the deepest layer's, as the prior says
    assert (~plan).nonzero()[:, 0].tolist() == [2, 2, 2]
    scores = -equal
    scores[0] = 1.0
    with pytest.raises(ValueError, match=r'^scores hold negative values \(layers \[1, 2\]\): importance scores are '
                                         r'magnitudes'):
        pruning.plan_masks(scores, 0.25)


def test_budget_arguments_of_the_wrong_kind_are_named():
    """A rate of several values, a layer_decay or scores that are no numbers, a fractional or negative depth were
    refused in torch's or Python's words ('Boolean value of Tensor with more than one value is ambiguous', "could
    not convert string to float: 'a'", "'list' object has no attribute 'dim'", 'Trying to create tensor with
    negative dimension'); scores as an array or a list are the same scores as a tensor."""
    import numpy as np
    scores = torch.rand(3, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    planned = pruning.plan_masks(scores, 0.25)
    assert int((~planned).sum()) == 6
    for same in (scores.numpy(), scores.tolist()):
        assert torch.equal(pruning.plan_masks(same, 0.25), planned)
    assert torch.equal(pruning.plan_masks(scores, np.float32(0.25), layer_decay=np.float64(0.005)), planned)
    with pytest.raises(TypeError, match=r'^prune_rate must be a number, got a tensor of shape \(2,\)'):
        pruning.plan_masks(scores, torch.tensor([0.25, 0.5]))
    for decay, said in (('a', 'str'), (None, 'NoneType')):
        with pytest.raises(TypeError, match=rf'^layer_decay must be a number, got {said}$'):
            pruning.plan_masks(scores, 0.25, layer_decay=decay)
    with pytest.raises(TypeError, match=r'^scores must be numbers \(depth, num_patches\).*got list'):
        pruning.plan_masks([['a'] * 8] * 3, 0.25)
    with pytest.raises(TypeError, match=r'^scores must be real numbers'):
        pruning.plan_masks(scores.to(torch.complex64), 0.25)
    with pytest.raises(TypeError, match=r'^depth must be a whole number, got float 3\.0$'):
        pruning.random_masks(3.0, 8, 0.25)
    with pytest.raises(ValueError, match=r'^num_patches must be >= 0, got -8$'):
        pruning.random_masks(3, -8, 0.25)
    assert int((~pruning.random_masks(np.int64(3), 8, 0.25)).sum()) == 6


def test_plan_refuses_a_depth_prior_that_is_not_positive():
    """A layer_decay past 1/(depth-1) gave the deepest layers a prior of 0 or below: their weights sank below every
    other layer's and, negative, ranked their most important tokens first, which were then clipped first."""
    scores = torch.rand(12, 16, generator=torch.Generator().manual_seed(2))
    for decay in (1 / 11, 0.1, 0.5):
        with pytest.raises(ValueError, match=r'depth prior of layer 11, .* not positive'):
            pruning.plan_masks(scores, 0.25, layer_decay=decay)
    plan = pruning.plan_masks(scores, 0.25, layer_decay=0.09)  # every prior positive: planned as the reference
    assert torch.equal(plan, _reference_plan(scores, 0.25, decay=0.09))
    assert torch.equal(pruning.plan_masks(scores[:1], 0.25, layer_decay=5.0), _reference_plan(scores[:1], 0.25, 5.0))


@pytest.mark.parametrize('bad', [float('nan'), float('inf')])
def test_plan_refuses_scores_that_are_not_finite(bad):
    """One NaN made its layer's norm NaN, the whole layer's weights zero, and that layer was clipped first."""
    scores = torch.rand(3, 16)
    scores[1, 3] = bad
    with pytest.raises(ValueError, match=r'scores hold NaN or infinite values \(layers \[1\]\)'):
        pruning.plan_masks(scores, 0.25)


def test_random_masks_clip_exactly_the_budget_distinct_and_seeded():
    a = pruning.random_masks(12, 196, 0.4, generator=torch.Generator().manual_seed(0))
    b = pruning.random_masks(12, 196, 0.4, generator=torch.Generator().manual_seed(0))
    c = pruning.random_masks(12, 196, 0.4, generator=torch.Generator().manual_seed(1))
    assert int((~a).sum()) == int(196 * 12 * 0.4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (~a).sum(dim=1).min() > 0  # uniform over all slots: every layer gets some


def test_random_masks_are_one_uniform_draw_over_all_slots():
    """12 of 4 x 10 slots, 4000 times: each slot is clipped 30% of the time, and a layer's count of clipped slots
    follows the hypergeometric law (12 draws from 40 slots, 10 of them in the layer): it varies from draw to
    draw, it is not a per-layer quota."""
    from scipy.stats import chi2
    depth, n, rate, draws = 4, 10, 0.3, 4000
    budget = int(depth * n * rate)
    g = torch.Generator().manual_seed(0)
    clipped = torch.stack([~pruning.random_masks(depth, n, rate, generator=g) for _ in range(draws)])
    assert (clipped.sum(dim=(1, 2)) == budget).all()
    # every slot equally often: within 5 standard deviations of draws * 12/40
    p = budget / (depth * n)
    per_slot = clipped.sum(dim=0).double()
    assert ((per_slot - draws * p).abs() < 5 * math.sqrt(draws * p * (1 - p))).all()
    # each layer's count: hypergeometric, by a chi-square test (cells with expectation >= 5; p > 0.001)
    pmf = [math.comb(n, k) * math.comb(depth * n - n, budget - k) / math.comb(depth * n, budget) for k in range(n + 1)]
    for layer in range(depth):
        counts = torch.bincount(clipped[:, layer].sum(dim=1), minlength=n + 1).tolist()
        top = max(k for k in range(n + 1) if draws * pmf[k] >= 5)  # counts 0, 1, ..., top - 1 and ">= top"
        observed = counts[:top] + [sum(counts[top:])]
        expected = [draws * q for q in pmf[:top]] + [draws * sum(pmf[top:])]
        assert min(expected) >= 5
        stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
        assert chi2.sf(stat, len(observed) - 1) > 0.001, (layer, observed, expected)
        variance = clipped[:, layer].sum(dim=1).double().var().item()
        exact = budget * (n / (depth * n)) * (1 - n / (depth * n)) * (depth * n - budget) / (depth * n - 1)
        assert variance == pytest.approx(exact, rel=0.15)


# --------------------------------------------------------------------------------------------------------
# concat order

# Patches 1..4 plus the class token 0, three blocks (worked by hand):
#   block 0 keeps {1, 3}: order 0 1 2 3 4 -> mask T T F T F -> new order 0 1 3 | 2 4
#   block 1 keeps {2, 3}: order 0 1 3 2 4 -> mask T F T T F -> new order 0 3 2 | 1 4
#   block 2 keeps {1, 4}: order 0 3 2 1 4 -> mask T F F T T -> new order 0 1 4 | 3 2
HAND_PLAN = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 0], [1, 0, 0, 1]], dtype=torch.bool)
HAND_CONCAT = torch.tensor([[1, 1, 0, 1, 0], [1, 0, 1, 1, 0], [1, 0, 0, 1, 1]], dtype=torch.bool)


def test_concat_order_conversion_hand_worked():
    assert torch.equal(pruning.to_concat_order(HAND_PLAN), HAND_CONCAT)


@pytest.mark.parametrize('args, message', [
    ((HAND_PLAN.numpy(),), 'masks must be a bool tensor'), ((HAND_PLAN.tolist(),), 'masks must be a bool tensor'),
    ((HAND_PLAN, -1), 'num_prefix_tokens must be a whole number >= 0, got -1'),
    ((HAND_PLAN, 1.5), 'num_prefix_tokens must be a whole number >= 0, got 1.5')])
def test_concat_order_conversion_refuses_what_it_cannot_convert(args, message):
    with pytest.raises(ValueError, match=message):
        pruning.to_concat_order(*args)


def test_apply_masks_writes_concat_order_buffers_and_returns_channels():
    model = timm.create_model('cc_deit_tiny_patch16_224', img_size=32, depth=3)  # 4 patches
    channels = pruning.apply_masks(model, HAND_PLAN)
    assert channels == [3, 3, 3]
    for blk, expected in zip(model.blocks, HAND_CONCAT):
        assert torch.equal(blk.attn.token_index, expected)
    # Original ids processed by each block: the kept set of the plan, class token included.
    assert [ids.tolist() for ids in model.kept_token_ids()] == [[0, 1, 3], [0, 3, 2], [0, 1, 4]]
    for ids in model.kept_token_ids():  # copies: what the caller does with them leaves the model's plan alone
        ids.zero_()
    assert [ids.tolist() for ids in model.kept_token_ids()] == [[0, 1, 3], [0, 3, 2], [0, 1, 4]]
    sd = model.state_dict()
    assert sd['blocks.1.attn.token_index'].dtype == torch.bool
    fresh = timm.create_model('cc_deit_tiny_patch16_224', img_size=32, depth=3)
    fresh.load_state_dict(sd)
    assert [ids.tolist() for ids in fresh.kept_token_ids()] == [[0, 1, 3], [0, 3, 2], [0, 1, 4]]


def test_apply_masks_rejects_a_plan_of_the_wrong_shape():
    model = timm.create_model('cc_deit_tiny_patch16_224', img_size=32, depth=3)
    with pytest.raises(ValueError, match=r'\(3, 4\)'):
        pruning.apply_masks(model, torch.ones(3, 5, dtype=torch.bool))


def test_apply_masks_refuses_scores_and_takes_zero_one_arrays():
    """Scores passed instead of the plan were read as booleans: every nonzero score kept its token (the dense
    model, without a word).  A plan of 0s and 1s, as a tensor, an array or nested lists, is the same plan."""
    import numpy as np
    model = timm.create_model('cc_deit_tiny_patch16_224', img_size=32, depth=3)
    with pytest.raises(ValueError, match='values other than 0 and 1'):
        pruning.apply_masks(model, torch.rand(3, 4))
    assert models_counts(model) == [5, 5, 5]  # refused before anything was written
    plan = torch.tensor([[1, 0, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1]])
    expected = pruning.apply_masks(model, plan.bool())
    for same in (plan, plan.float(), plan.numpy(), plan.tolist(), np.asarray(plan, dtype=bool)):
        model.set_dense()
        assert pruning.apply_masks(model, same) == expected == [4, 3, 5]
    with pytest.raises(TypeError, match='needs a Clip & Concat model'):
        pruning.apply_masks(timm.create_model('deit_tiny_patch16_224', img_size=32, depth=3), plan.bool())


def test_masks_that_hold_no_numbers_are_refused_naming_the_argument():
    """A plan or a row of masks of strings, None or objects was refused by torch's conversion, in its words ('too
    many dimensions 'str'', 'Could not infer dtype of NoneType'); a plan given as a list of per-block rows was
    refused too ('only integer tensors of a single element can be converted to an index')."""
    import numpy as np
    model = timm.create_model('cc_deit_tiny_patch16_224', img_size=32, depth=3)
    plan = torch.tensor([[1, 0, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    expected = pruning.apply_masks(model, plan)
    model.set_dense()
    assert pruning.apply_masks(model, list(plan)) == expected == [4, 3, 5]  # rows as tensors
    for bad, said in ((None, 'got None'), ('1011', 'got a str'), ([['1'] * 4] * 3, 'got a list of list'),
                      (np.array([[None] * 4] * 3), 'of object')):
        with pytest.raises(TypeError, match=rf'^masks must be bool, or numbers .*{said}'):
            pruning.apply_masks(model, bad)
    with pytest.raises(ValueError, match=r'^masks: its rows have different shapes \(\(4,\), \(3,\), \(4,\)\)'):
        pruning.apply_masks(model, [plan[0], plan[1, :3], plan[2]])
    rows = [m.clone() for m in model.masks]
    for bad, said in (([['x'] * 5] * 3, r'^blocks\.0\.attn\.token_index must be bool, .*got a list of str'),
                      ([rows[0], None, rows[2]], r'^blocks\.1\.attn\.token_index must be bool, .*got None'),
                      (None, r'^set_masks takes one mask per block .*got None'),
                      ('abc', r'^set_masks takes one mask per block .*got a str')):
        with pytest.raises(TypeError, match=said):
            model.set_masks(bad)
    with pytest.raises(ValueError, match=r'^blocks\.2\.attn\.token_index holds no values \(a tensor of the meta'):
        model.set_masks(rows[:2] + [torch.ones(5, dtype=torch.bool, device='meta')])
    with pytest.raises(ValueError, match=r'^masks holds no values \(rows that are tensors of the meta device\)'):
        pruning.apply_masks(model, [plan[0], plan[1], torch.ones(4, dtype=torch.bool, device='meta')])
    assert models_counts(model) == expected  # nothing written by a refusal


def models_counts(model):
    return [int(m.sum()) for m in model.masks]


class _Labelled(torch.utils.data.TensorDataset):
    classes = ['a', 'b', 'c']  # the image folder's class names (its validation set must match)


def _smoothed_cross_entropy(smoothing):
    """The recipe's loss written out: (1 - ε) · NLL + ε · mean over classes of -log p."""
    def loss(logits, targets):
        logp = logits.log_softmax(-1)
        nll = -logp.gather(1, targets[:, None])[:, 0]
        return ((1 - smoothing) * nll - smoothing * logp.mean(-1)).mean()
    return loss


@pytest.mark.parametrize('smoothing', [0.1, 0.0, 0.3])
def test_the_prune_command_scores_its_training_images_with_the_recipes_loss(tmp_path, capsys, monkeypatch,
                                                                              smoothing):
    """--prune end to end: the scores it saves are the Taylor scores (computed here independently) of the dense
    model on the images the scoring set gives, under label-smoothed cross-entropy with --smoothing's ε (0: plain
    cross-entropy; 0.3, not the default, so an ε fixed at the recipe's 0.1 shows).  One batch holds the whole scoring
    set, so the loader's shuffling cannot change the sum."""
    import finetune
    from conftest import make_image_folder, official_checkpoint
    data = make_image_folder(tmp_path / 'data', per_class=(1, 2), size=(32, 32))
    dense = official_checkpoint(tmp_path / 'dense.pth', 'cc_deit_digits_patch4_32', seed=2, num_classes=3)
    g = torch.Generator().manual_seed(3)
    images, labels = torch.randn(6, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])
    monkeypatch.setattr(finetune, 'scoring_dataset', lambda args: (_Labelled(images, labels), 3))
    out = tmp_path / 'out'
    assert finetune.main(['--prune', '--resume', dense, '--model', 'deit_digits_patch4_32', '--data-path', data,
                          '--smoothing', str(smoothing), '--batch-size', '6', '--device', 'cpu',
                          '--num_workers', '0', '--output_dir', str(out)]) == 0
    capsys.readouterr()
    saved = torch.load(out / 'pruned_0.25.pth')['scores']
    model = timm.create_model('cc_deit_digits_patch4_32', checkpoint_path=dense, num_classes=3).eval()
    other_eps = 0.0 if smoothing == 0.1 else 0.1  # the default where another ε is given, else none
    expected, other = (_independent_scores(model, [(images, labels)], _smoothed_cross_entropy(eps))
                       for eps in (smoothing, other_eps))
    assert torch.allclose(saved, expected, rtol=1e-4, atol=1e-10)
    assert (saved - other).abs().max() > 100 * (saved - expected).abs().max()  # the loss shows in the scores


def test_a_plan_of_nested_lists_of_different_lengths_is_a_value_error():
    """Rows of different lengths given as nested lists were refused as holding no numbers (a TypeError, 'got a
    list of list'), where rows given as tensors were a ValueError naming their shapes: both are a ValueError."""
    model = timm.create_model('cc_deit_tiny_patch16_224', img_size=32, depth=3)
    with pytest.raises(ValueError, match=r'^masks: its rows have different lengths \(4, 3, 4\)'):
        pruning.apply_masks(model, [[1, 0, 1, 1], [0, 1, 1], [1, 1, 1, 1]])
    assert models_counts(model) == [5, 5, 5]
