"""Mutation check of the test suite: small bugs are planted one at a time and each must make its tests fail.

    make mutants                      # all of them (see the README for how long it takes)
    .venv/bin/python tests/mutants.py no-zero-grad best-on-ties   # some of them
    .venv/bin/python tests/mutants.py --list

The repository's files (tracked, and untracked ones git does not ignore) are copied once to a scratch
directory.  There the tests of the list are first run unmutated (they must pass), then each mutant replaces
an exact snippet of one file, runs ``pytest -x -q`` on its tests, and puts the file back.  A mutant whose tests
still pass *survived*; a snippet that is not found exactly once is *stale* (the code changed: update the list).
Exit status 1 if any mutant survived, is stale, or broke its tests in another way (a collection error or a
timeout, which says nothing about the tests' power).  Not part of ``make test``.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    edits: Tuple[Tuple[str, str], ...]  # (exact original snippet, replacement), each found exactly once
    tests: Tuple[str, ...]  # pytest ids, relative to the repository root
    what: str


def mutant(name, file, original, replacement, tests, what, *more_edits):
    return Mutant(name, file, ((original, replacement), *more_edits), tuple(tests), what)


T = 'tests/'
STEPS = T + 'test_training.py::test_two_training_steps_equal_the_hand_computation'
RESUME = T + 'test_resume.py::test_resume_continues_with_optimizer_scheduler_ema_and_best_accuracy'
SEEDED = T + 'test_seeding.py::test_seeded_finetune_reproduces_and_an_interrupted_run_resumes_bit_for_bit'
TWO_PROCESS_PRUNE = T + 'test_distributed.py::test_prune_with_two_processes_plans_the_same_masks_on_every_rank'
TWO_PROCESS_FINETUNE = T + 'test_distributed.py::test_finetune_with_two_processes_scales_the_lr_and_only_rank_0_writes'
TWO_PROCESS_RESUME = (T + 'test_distributed.py::'
                      'test_two_processes_stopped_and_resumed_equal_the_uninterrupted_run_bit_for_bit')

MUTANTS: List[Mutant] = [
    # --- training ------------------------------------------------------------------------------------------
    mutant('kd-never-computed', 'losses.py',
           '        return base + self.alpha * kd', '        return base',
           [STEPS], 'the distillation term is computed but left out of the loss'),
    mutant('distillation-switched-off', 'finetune.py',
           'criterion = DistillationLoss(base_criterion, teacher, args.distillation_type,',
           "criterion = DistillationLoss(base_criterion, teacher, 'none',",
           [STEPS], 'the CLI builds the loss without distillation whatever --distillation-type says'),
    mutant('teacher-with-masks', 'finetune.py',
           '    teacher.set_dense()  # the teacher is the dense model, whatever masks its file holds\n', '',
           [T + 'test_training.py::test_the_teacher_is_dense_whatever_masks_its_file_holds', STEPS],
           'the teacher keeps the masks of its file instead of being dense'),
    mutant('no-zero-grad', 'engine.py',
           '        optimizer.zero_grad(set_to_none=True)\n', '',
           [STEPS], 'gradients pile up from step to step'),
    mutant('clip-grad-ignored', 'engine.py',
           '        if max_norm:', '        if False:',
           [STEPS], 'the training step never clips'),
    mutant('clip-grad-not-passed', 'finetune.py',
           'clip_grad=args.clip_grad,', 'clip_grad=None,',
           [STEPS], '--clip-grad never reaches the training loop'),
    mutant('ema-never-updated', 'engine.py',
           '            model_ema.update(model)', '            pass',
           [STEPS], 'the EMA stays at the starting weights'),
    mutant('ema-decay-swapped', 'finetune.py',
           'ModelEmaV2(model, decay=args.model_ema_decay,', 'ModelEmaV2(model, decay=1 - args.model_ema_decay,',
           [STEPS], 'the EMA weighs the new weights by the decay and its own by 1 - decay'),
    mutant('distillation-alpha-not-passed', 'finetune.py',
           'args.distillation_type, args.distillation_alpha,', 'args.distillation_type, 1.0,',
           [STEPS], 'the CLI builds the loss with alpha 1 whatever --distillation-alpha says'),
    mutant('top5-counted-as-top3', 'engine.py',
           'outputs.topk(min(5, outputs.shape[1])', 'outputs.topk(min(3, outputs.shape[1])',
           [T + 'test_training.py::test_top1_top5_and_loss_counted_by_hand'], 'Acc@5 counts the top 3'),
    mutant('best-every-epoch', 'engine.py',
           "        improved = test_stats['acc1'] > max_accuracy", '        improved = True',
           [T + 'test_resume.py::test_best_pth_is_written_when_accuracy_rises_and_only_then'],
           'best.pth written after every epoch'),
    mutant('best-on-ties', 'engine.py',
           "        improved = test_stats['acc1'] > max_accuracy",
           "        improved = test_stats['acc1'] >= max_accuracy",
           [T + 'test_resume.py::test_best_pth_is_written_when_accuracy_rises_and_only_then', RESUME],
           'best.pth replaced by a later epoch of the same accuracy'),
    mutant('set-epoch-never-called', 'engine.py',
           '            run.loader_train.sampler.set_epoch(epoch)', '            pass',
           [T + 'test_training.py::test_every_epoch_and_every_process_shuffles_its_own_way'],
           'several processes shuffle the same way every epoch'),
    mutant('lr-not-scaled-by-world-size', 'finetune.py',
           'args.lr * args.batch_size * args.world_size / 512.0', 'args.lr * args.batch_size / 512.0',
           [TWO_PROCESS_FINETUNE], 'the learning rate ignores the number of processes'),
    mutant('intermediates-in-concat-order', 'models/clip_concat.py',
           '        with self.original_order():\n            return super().forward_intermediates(',
           '        if True:\n            return super().forward_intermediates(',
           [T + 'test_model.py::test_forward_intermediates_are_the_blocks_outputs_in_original_order'],
           "timm's feature maps of a pruned model hold the patches in concat order"),
    mutant('per-token-head-in-concat-order', 'models/clip_concat.py',
           "per_token = not self.global_pool and self.attn_pool is None", 'per_token = False',
           [T + 'test_model.py::test_a_head_without_pooling_predicts_per_token_in_original_order'],
           "a head without pooling predicts the tokens in concat order"),
    mutant('clipped-tokens-detached', 'models/routing.py',
           'x.index_select(1, clipped_pos)], dim=1)', 'x.index_select(1, clipped_pos).detach()], dim=1)',
           [T + 'test_model.py::test_pruned_training_step_reaches_every_weight'],
           'the tokens a block clips carry no gradient back to the blocks before it'),
    mutant('block-ignores-its-routing', 'models/clip_concat.py',
           'return self.routing(timm_forward, x, self.kept_pos, self.clipped_pos)',
           'return gather_concat(timm_forward, x, self.kept_pos, self.clipped_pos)',
           [T + 'test_model.py::test_routing_is_swappable_and_the_boolean_reference_agrees'],
           "a pruned block runs the default routing whatever its routing attribute holds"),
    mutant('in-place-block-reads-concat-positions', 'models/clip_concat.py',
           'in_place = self.in_original_order and not (self.dense and self.ids_in_order)',
           'in_place = self.in_original_order and self.dense and not self.ids_in_order',
           [T + 'test_model.py::test_forward_intermediates_are_the_blocks_outputs_in_original_order'],
           'in the original order a pruned block reads the positions of the concat order'),
    mutant('original-order-features-reordered', 'models/clip_concat.py',
           'moved = self.reordered and not self.blocks[-1].in_original_order', 'moved = self.reordered',
           [T + 'test_model.py::test_inside_original_order_the_outputs_are_the_same_tokens_in_the_same_places'],
           'inside original_order() forward_features undoes a concat order that never happened'),
    mutant('kept-counts-of-a-wrapper', 'models/clip_concat.py',
           "    model = getattr(model, 'module', model)\n    return [int(blk", '    return [int(blk',
           [T + 'test_model.py::test_is_clip_concat_looks_through_the_wrappers_the_mask_functions_look_through'],
           'kept_token_counts of a DistributedDataParallel model fails on .blocks'),
    mutant('kept-ids-handed-out-uncopied', 'models/clip_concat.py',
           'return [blk.kept_ids.clone() for blk in self.blocks]', 'return [blk.kept_ids for blk in self.blocks]',
           [T + 'test_pruning.py::test_apply_masks_writes_concat_order_buffers_and_returns_channels'],
           "kept_token_ids hands out the blocks' own buffers: a caller's in-place change alters the plan"),
    mutant('no-position-embedding-takes-any-size', 'models/clip_concat.py',
           '        model.patch_embed.register_forward_hook(_check_patch_count)\n', '        pass\n',
           [T + 'test_families.py::test_a_model_without_position_embedding_refuses_images_of_another_size'],
           'a model without a position embedding runs pruned blocks on images of another number of patches'),
    mutant('model-without-blocks-converted', 'models/clip_concat.py',
           '    if len(model.blocks) == 0:\n', '    if False:\n',
           [T + 'test_families.py::test_unsupported_structure_is_refused_with_the_reason'],
           'a ViT of depth 0 fails in an IndexError while being converted, half changed'),
    mutant('pruned-file-without-masks-runs-dense', 'models/checkpoint.py',
           '        if not holds_masks(sd):\n', '        if False:\n',
           [T + 'test_errors.py::test_a_pruned_file_without_its_masks_is_refused_not_run_dense'],
           'a pruned file whose masks are missing is evaluated as the dense model'),
    mutant('unused-teacher-taken-over', 'finetune.py',
           "if dest in ('teacher_model', 'teacher_path') and distillation == 'none':", 'if False:',
           [T + 'test_errors.py::test_a_deit_training_checkpoint_without_distillation_does_not_hand_on_its_default_'
                'teacher'],
           "a continued run without distillation takes over (and is refused for) a teacher it does not use"),
    mutant('eval-runs-dense', 'finetune.py',
           "    model.to(device)\n    rank0_print(f'Model {args.model} from {args.resume}: {describe(model)}",
           "    model.to(device)\n    model.set_dense()\n    rank0_print(f'Model {args.model} from {args.resume}: "
           "{describe(model)}",
           [T + 'test_cli.py::test_eval_of_the_pruned_checkpoint'],
           '--eval of a pruned checkpoint evaluates the dense model (its masks loaded, then cleared)'),
    mutant('dist-eval-padded', 'datasets.py',
           '            sampler = DistributedEvalSampler(dataset, args.world_size, args.rank)',
           '            sampler = torch.utils.data.DistributedSampler(dataset, args.world_size, args.rank, shuffle=False)',
           [TWO_PROCESS_FINETUNE],
           "--dist-eval with DeiT's padded sampler: an image evaluated twice when the processes cannot split evenly"),
    mutant('demo-finetuned-rows-report-pruned-accuracy', 'demo/run_demo.py',
           "        for is_ft, acc in ((False, before[tag]), (True, after[tag])):",
           "        for is_ft, acc in ((False, before[tag]), (True, before[tag])):",
           [T + 'test_demo.py::test_each_accuracy_is_the_one_its_run_logged'],
           "the demo's finetuned rows show the accuracy before finetuning"),
    mutant('study-finetuned-runs-report-pruned-accuracy', 'demo/study.py',
           "                     'acc1': r['acc1'], 'gflops': r['gflops'], 'kept_tokens': channels,",
           "                     'acc1': pruned[(mode, rate, seed)]['acc1'], 'gflops': r['gflops'], "
           "'kept_tokens': channels,",
           [T + 'test_study.py::test_each_accuracy_is_the_one_its_run_logged'],
           "the study's finetuned runs record the accuracy before finetuning"),
    mutant('readme-paragraph-hides-zero-width-interval', 'demo/study.py',
           "if c['ci_low'] is not None and c['std'] == 0 else", "if False else",
           [T + 'test_study.py::test_paired_comparison_edge_cases'],
           "the study's README paragraph calls a difference every seed shared a win without saying so"),
    # --- resume ----------------------------------------------------------------------------------------------
    mutant('log-never-repaired', 'finetune.py',
           "if reconcile_log(paths['log.txt'], epoch, checkpoint.get('log_stats')):", 'if False:',
           [RESUME], 'a resume keeps the duplicate and cut lines of log.txt'),
    mutant('sampler-shuffles-by-the-given-seed', 'finetune.py',
           "            sampler.seed = args.seed\n", "            pass\n",
           [TWO_PROCESS_RESUME], "a run of several processes continued with another --seed shuffles by it, though "
                                 "it says the seed has no effect"),
    mutant('best-pth-written-before-the-checkpoint', 'finetune.py',
           "            save_atomic(state, paths['checkpoint.pth'])\n"
           "            last_good, last_epoch = paths['checkpoint.pth'], epoch\n"
           "            if improved:\n"
           "                save_atomic(state, paths['best.pth'])\n",
           "            if improved:\n"
           "                save_atomic(state, paths['best.pth'])\n"
           "            save_atomic(state, paths['checkpoint.pth'])\n"
           "            last_good, last_epoch = paths['checkpoint.pth'], epoch\n",
           [T + 'test_resume.py::test_a_stop_between_the_checkpoint_and_best_pth_is_repaired_on_resume'],
           'a stop between the two files leaves a best.pth of an epoch no checkpoint holds'),
    mutant('seed-not-taken-over', 'finetune.py',
           "'dist_eval', 'start_epoch', 'speed_protocol',", "'dist_eval', 'start_epoch', 'seed', 'speed_protocol',",
           [TWO_PROCESS_RESUME], 'a run continued without --seed shuffles its processes\' data by seed 0'),
    mutant('tensorboard-not-repaired', 'finetune.py',
           "            epoch_scalars(tb, checkpoint['log_stats'], epoch, written)\n", '',
           [T + 'test_resume.py::test_a_run_stopped_after_its_checkpoint_before_its_logs_gets_them_on_resume'],
           'a run stopped between its checkpoint and its logs loses that epoch from TensorBoard'),
    mutant('tensorboard-repaired-twice', 'finetune.py',
           "        written = scalars_at(args.output_dir, epoch)\n", '        written = set()\n',
           [T + 'test_resume.py::test_a_run_killed_while_writing_its_log_line_gets_no_second_tensorboard_point'],
           'a run killed while writing its log line gets that epoch\'s TensorBoard points twice'),
    mutant('schedule-not-restored', 'finetune.py',
           "        training.lr_scheduler.load_state_dict(checkpoint['lr_scheduler'])\n", '',
           [RESUME, T + 'test_resume.py::test_resume_with_more_epochs_says_the_old_schedule_continues'],
           'a resume takes the schedule of its own flags instead of the checkpoint\'s'),
    mutant('new-run-schedule-not-at-start-epoch', 'finetune.py',
           '            training.lr_scheduler.step(args.start_epoch - 1)\n', '            pass\n',
           [T + 'test_recipe.py::test_a_new_run_from_a_later_start_epoch_runs_that_epoch_at_its_place_in_the_schedule'],
           'a new run from --start_epoch s runs epoch s at the schedule\'s start, then jumps to t = s'),
    mutant('best-accuracy-not-restored', 'finetune.py',
           "    max_accuracy = float(checkpoint.get('max_accuracy', -1.0))", '    max_accuracy = -1.0',
           [RESUME], 'a resume forgets the best accuracy so far'),
    mutant('random-streams-not-restored', 'finetune.py',
           '    if seeding.restore_or_reseed(', '    if (lambda *a: None)(',
           [SEEDED + '[0]'], 'a resume restarts every random stream from the seed'),
    mutant('data-generator-not-saved', 'finetune.py',
           "    return {'data': training.loader_train.generator}", '    return {}',
           [SEEDED + '[0]'], 'the shuffle after a resume repeats the first epoch\'s'),
    mutant('streams-of-rank-0-everywhere', 'utils/seeding.py',
           '            restore(states[rank], generators, device)',
           '            restore(states[0], generators, device)',
           [TWO_PROCESS_RESUME + '[0-torchrun]'], 'every process resumes with rank 0\'s random streams'),
    mutant('no-fsync-before-rename', 'utils/checkpoint_io.py',
           '            os.fsync(f.fileno())\n', '',
           [T + 'test_resume.py::test_the_temporary_file_reaches_the_disk_before_it_is_renamed_into_place'],
           'a checkpoint renamed into place before its bytes reach the disk'),
    mutant('no-flush-before-fsync', 'utils/checkpoint_io.py',
           '            f.flush()\n', '',
           [T + 'test_resume.py::test_the_temporary_file_reaches_the_disk_before_it_is_renamed_into_place'],
           'fsync of a file whose last bytes are still in Python\'s buffer'),
    mutant('out-of-memory-forgets-the-checkpoint', 'finetune.py',
           'STOPS_MIDWAY = (KeyboardInterrupt, Terminated, RuntimeError, BadImageError, OutputWriteError)',
           'STOPS_MIDWAY = (KeyboardInterrupt, Terminated, BadImageError, OutputWriteError)',
           [T + 'test_recipe.py::test_out_of_gpu_memory_is_one_line_with_the_batch_and_what_was_kept'],
           'a run out of GPU memory says nothing was written, though a checkpoint (or pruned file) was'),
    mutant('unreadable-image-forgets-the-pruned-file', 'finetune.py',
           'STOPS_MIDWAY = (KeyboardInterrupt, Terminated, RuntimeError, BadImageError, OutputWriteError)',
           'STOPS_MIDWAY = (KeyboardInterrupt, Terminated, RuntimeError, OutputWriteError)',
           [T + 'test_errors.py::test_unreadable_image_found_after_the_pruned_file_is_written_says_it_is_complete'],
           'an image found unreadable after the pruned file was written: the line does not say the file is complete'),
    mutant('full-disk-forgets-the-checkpoint', 'finetune.py',
           'STOPS_MIDWAY = (KeyboardInterrupt, Terminated, RuntimeError, BadImageError, OutputWriteError)',
           'STOPS_MIDWAY = (KeyboardInterrupt, Terminated, RuntimeError, BadImageError)',
           [T + 'test_resume.py::test_a_full_disk_while_an_epoch_is_logged_or_saved_says_which_checkpoint_is_complete'],
           'a full disk midway: the line does not say which checkpoint is complete'),
    mutant('full-disk-in-torch-save-is-a-traceback', 'utils/checkpoint_io.py',
           'failed = _behind(e, lambda x: isinstance(x, OSError))',
           'failed = e if isinstance(e, OSError) else None',
           [T + 'test_resume.py::test_a_full_disk_while_an_epoch_is_logged_or_saved_says_which_checkpoint_is_complete'],
           'a full disk inside torch.save: its zip writer\'s RuntimeError hides the OSError, a traceback'),
    mutant('one-process-reseeds-alone', 'finetune.py',
           '                                 agree=lambda ok: all_agree(ok, training.device)):',
           '                                 agree=lambda ok: ok):',
           [T + 'test_distributed.py::test_when_one_process_cannot_restore_its_random_streams_every_process_reseeds'],
           'a process that cannot restore its random streams reseeds alone and shuffles by another seed'),
    # --- seeds -----------------------------------------------------------------------------------------------
    mutant('reseed-replays-epoch-0-shuffle', 'utils/seeding.py',
           '            g.manual_seed(derived_seed(seed, rank, epoch, zlib.crc32(name.encode())))',
           '            g.manual_seed(derived_seed(seed, rank, 1))',
           [T + 'test_seeding.py::test_resume_from_a_checkpoint_without_random_state_continues_with_fresh_streams',
            T + 'test_seeding.py::test_reseeded_streams_are_not_epoch_0s_and_differ_by_rank_seed_and_epoch'],
           "a resume without random state reseeds the DataLoader's generator as a fresh run does: epoch 0's order"),
    mutant('reseed-ignores-rank', 'utils/seeding.py',
           '    seed_everything(derived_seed(seed, rank, epoch))', '    seed_everything(derived_seed(seed, 0, epoch))',
           [T + 'test_seeding.py::test_reseeded_streams_are_not_epoch_0s_and_differ_by_rank_seed_and_epoch'],
           'reseeded after a resume onto another number of processes, every rank draws the same augmentations'),
    mutant('only-torch-seeded', 'finetune.py',
           '    seeding.seed_everything(args.seed, args.rank)', '    torch.manual_seed(args.seed + args.rank)',
           [T + 'test_seeding.py::test_the_same_prune_command_twice_gives_the_same_masks[0]', SEEDED + '[0]'],
           'Python\'s random and numpy left unseeded (the original bug)'),
    mutant('numpy-unseeded', 'utils/seeding.py',
           '    s = seed + rank\n    random.seed(s)\n    np.random.seed(s % 2 ** 32)\n',
           '    s = seed + rank\n    random.seed(s)\n',
           [SEEDED + '[0]'], 'numpy (mixup, cutmix) left unseeded'),
    # --- pruning ---------------------------------------------------------------------------------------------
    mutant('partial-load-resets-masks', 'models/clip_concat.py',
           '        if k not in state_dict and str(i) in loaded:\n', '        if k not in state_dict:\n',
           [T + 'test_model.py::test_a_partial_load_keeps_the_masks_of_the_blocks_it_leaves_out'],
           'load_state_dict(strict=False) of a new head makes a pruned model dense'),
    mutant('scoring-resets-submodule-modes', 'pruning/taylor.py',
           '        for module, was_training in modes:\n            module.training = was_training\n',
           '        model.train(modes[0][1])\n',
           [T + 'test_pruning.py::test_scoring_restores_each_modules_mode_and_keeps_a_fast_path_valid'],
           'scoring leaves a submodule put in eval mode by the user in train mode'),
    mutant('random-masks-per-layer-budget', 'pruning/budget.py',
           '    keep = torch.ones(depth * num_patches, dtype=torch.bool)\n'
           '    keep[torch.randperm(depth * num_patches, generator=generator)[:budget]] = False\n'
           '    return keep.view(depth, num_patches)',
           '    keep = torch.ones(depth, num_patches, dtype=torch.bool)\n'
           '    for layer in range(depth):\n'
           '        share = budget // depth + (layer < budget % depth)\n'
           '        keep[layer, torch.randperm(num_patches, generator=generator)[:share]] = False\n'
           '    return keep',
           [T + 'test_pruning.py::test_random_masks_are_one_uniform_draw_over_all_slots'],
           'random masks: a fixed quota per layer instead of one draw over all slots'),
    mutant('scores-without-abs', 'pruning/taylor.py',
           '.sum(dim=(0, 1, 2)).abs() / (b * h * n)', '.sum(dim=(0, 1, 2)) / (b * h * n)',
           [T + 'test_pruning.py::test_scores_take_absolute_value_per_batch_then_sum'],
           'Taylor scores without the absolute value'),
    Mutant('scores-abs-after-summing', 'pruning/taylor.py',
           (('.sum(dim=(0, 1, 2)).abs() / (b * h * n)', '.sum(dim=(0, 1, 2)) / (b * h * n)'),
            ('    return scores[:, prefix:].float().cpu()', '    return scores[:, prefix:].abs().float().cpu()')),
           (T + 'test_pruning.py::test_scores_take_absolute_value_per_batch_then_sum',),
           'absolute value of the summed scores instead of per batch'),
    mutant('scores-not-all-reduced', 'pruning/taylor.py',
           '        dist.all_reduce(packed)', '        pass',
           [TWO_PROCESS_PRUNE], 'each process plans from its own half of the scores'),
    mutant('scores-keep-the-graph', 'pruning/taylor.py',
           '(a.detach() * g).sum(dim=(0, 1, 2))', '(a * g).sum(dim=(0, 1, 2))',
           [T + 'test_pruning.py::test_scores_hold_no_autograd_graph_and_keep_no_batch_alive'],
           'the scores require gradients and hold every scored batch\'s graph alive'),
    mutant('frozen-model-scores-the-map-left-behind', 'pruning/taylor.py',
           '            captured[layer] = output\n            return output\n',
           '            captured[layer] = output\n',
           [T + 'test_pruning.py::test_a_model_with_frozen_weights_is_scored_as_the_same_model_training'],
           'with frozen weights the captured leaf is not what the forward goes on with: scoring fails'),
    mutant('scoring-turns-fused-attention-on', 'pruning/taylor.py',
           '            blk.attn.fused_attn = was_fused', '            blk.attn.fused_attn = True',
           [T + 'test_pruning.py::test_scoring_changes_nothing_in_the_model'],
           "scoring turns on the fused attention of a block the user had turned it off in"),
    mutant('teacher-dropped-silently', 'finetune.py',
           "    if not mode and args.distillation_type == 'none' and unused:",
           "    if False:",
           [T + 'test_errors.py::test_bad_flags'],
           'a --teacher-path without --distillation-type trains without the teacher, saying nothing'),
    mutant('scoring-ignores-smoothing', 'finetune.py',
           '        criterion = LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing > 0 else nn.CrossEntropyLoss()',
           '        criterion = nn.CrossEntropyLoss()',
           [T + 'test_pruning.py::test_the_prune_command_scores_its_training_images_with_the_recipes_loss'],
           'Taylor scores taken under plain cross-entropy whatever --smoothing says'),
    mutant('scoring-on-validation-images', 'finetune.py',
           '        loader = data_loader(dataset_train, args, train=True)',
           '        loader = data_loader(dataset_val, args, train=True)',
           [T + 'test_pruning.py::test_the_prune_command_scores_its_training_images_with_the_recipes_loss'],
           '--prune scores the validation images instead of the training ones'),
    mutant('prune-rate-ignored', 'finetune.py',
           '        masks = pruning.plan_masks(scores, args.prune_rate)',
           '        masks = pruning.plan_masks(scores, 0.25)',
           [T + 'test_seeding.py::test_the_same_prune_command_twice_gives_the_same_masks[0]'],
           '--prune_rate ignored by the Taylor plan'),
    mutant('random-prune-rate-ignored', 'finetune.py',
           '        masks = pruning.random_masks(depth, num_patches, args.prune_rate,',
           '        masks = pruning.random_masks(depth, num_patches, 0.25,',
           [T + 'test_seeding.py::test_random_prune_mode_is_seeded'], '--prune_rate ignored by random masks'),
    mutant('macs-ignore-the-channels-given', 'models/flops.py',
           '    if channels is None:\n        channels = kept', '    if True:\n        channels = kept',
           [T + 'test_model.py::test_flops_follow_the_per_block_channels'],
           "count_macs(model, channels) prices the model's own masks instead of the kept counts given"),
    mutant('patch-macs-of-square-patches', 'models/flops.py',
           'proj.kernel_size[0] * proj.kernel_size[1]', 'proj.kernel_size[0] * proj.kernel_size[0]',
           [T + 'test_families.py::test_flops_formula_equals_torch_flop_counter'],
           'the patch embedding of oblong patches priced as square ones of their height'),
    mutant('per-token-head-priced-on-patches', 'models/flops.py',
           'return num_tokens if per_token else 1', 'return num_tokens - model.num_prefix_tokens if per_token else 1',
           [T + 'test_families.py::test_flops_formula_equals_torch_flop_counter[per_token_head_class_token]'],
           'a head without pooling priced on the patches alone, though timm runs it on the class token too'),
    # --- data sets -------------------------------------------------------------------------------------------
    mutant('ra-sampler-length-not-deits', 'samplers.py',
           'self.num_selected = int(math.floor(len(dataset) // 256 * 256 / num_replicas)) or \\',
           'self.num_selected = 0 or \\',
           [T + 'test_losses_data.py::test_repeated_augmentation_sampler_draws_deits_samples'],
           "repeated augmentation draws ceil(n / processes) samples per process, not DeiT's multiple of 256 images"),
    mutant('ra-sampler-small-set-times-repeats', 'samplers.py',
           'int(math.ceil(len(dataset) / num_replicas))', 'int(math.ceil(len(dataset) * repeats / num_replicas))',
           [T + 'test_losses_data.py::test_repeated_augmentation_sampler_gives_every_process_its_length_even_with_more_'
                'processes_than_copies'],
           'under 256 images, an epoch of repeated augmentation draws every copy: three times the training set'),
    mutant('inaturalist-labels-sorted', 'datasets.py',
           "        values = list(dict.fromkeys(_inat_labels(train_data, cat_value, train_path, cat_path).values()))",
           "        values = sorted(set(_inat_labels(train_data, cat_value, train_path, cat_path).values()))",
           [T + 'test_losses_data.py::test_inaturalist_json_layout'],
           "iNaturalist classes numbered in sorted order, not DeiT's (a DeiT-finetuned head reads shifted labels)"),
    mutant('inaturalist-supercategory-kept', 'datasets.py',
           "    if without_supercategory and len(parts) == 4 and not os.path.isabs(file_name):", "    if False:",
           [T + 'test_losses_data.py::test_inaturalist_images_as_the_archive_or_deit_lays_them_out'],
           "images laid out as DeiT's loader reads them (no supercategory folder) are not found"),
    mutant('flat-split-not-refused', 'datasets.py',
           '    if loose and not classes:', '    if False:',
           [T + 'test_errors.py::test_a_flat_split_of_images_without_class_folders_is_refused'],
           'a val/ of images without class folders (ImageNet\'s before sorting) is "no images" without a word of them'),
    mutant('color-jitter-flag-ignored', 'datasets.py',
           'is_training=True, color_jitter=args.color_jitter,', 'is_training=True, color_jitter=0.4,',
           [T + 'test_recipe.py::test_scoring_images_are_deits_training_transform_of_the_flags_without_auto_augment_or_'
                'erasing'],
           '--color-jitter ignored: the recipe\'s 0.4 whatever is given (it shows without auto-augment: scoring)'),
    mutant('train-interpolation-flag-ignored', 'datasets.py',
           'interpolation=args.train_interpolation, re_prob', "interpolation='bicubic', re_prob",
           [T + 'test_recipe.py::test_scoring_images_are_deits_training_transform_of_the_flags_without_auto_augment_or_'
                'erasing'],
           '--train-interpolation ignored above 32 px: the random-resized crop is always bicubic'),
    mutant('mixup-prob-flag-ignored', 'finetune.py',
           'prob=args.mixup_prob, switch_prob', 'prob=1.0, switch_prob',
           [T + 'test_recipe.py::test_mixup_and_cutmix_are_deits_of_the_flags'],
           '--mixup-prob ignored: every batch mixed'),
    mutant('cutmix-minmax-flag-ignored', 'finetune.py',
           'cutmix_minmax=args.cutmix_minmax,', 'cutmix_minmax=None,',
           [T + 'test_recipe.py::test_mixup_and_cutmix_are_deits_of_the_flags'],
           '--cutmix-minmax ignored: the CutMix box drawn from its alpha instead of the ratio range given'),
    mutant('launcher-overrides-the-gpu-asked-for', 'finetune.py',
           '            if device.index is not None:\n                raise UserError(f\'--device {requested}: under a',
           '            if False:\n                raise UserError(f\'--device {requested}: under a',
           [T + 'test_errors.py::test_a_gpu_the_run_cannot_use_is_refused_before_any_work'],
           '--device cuda:N under torchrun is silently replaced by the GPU of LOCAL_RANK'),
    mutant('more-processes-than-gpus-unchecked', 'finetune.py',
           '            if local_rank >= count:', '            if False:',
           [T + 'test_errors.py::test_a_gpu_the_run_cannot_use_is_refused_before_any_work',
            T + 'test_errors.py::test_the_default_device_under_a_launcher_is_the_gpu_of_local_rank_which_must_exist'],
           'a LOCAL_RANK past the GPUs of the node reaches torch.cuda.set_device (a CUDA traceback)'),
    mutant('eval-on-other-class-folders', 'finetune.py',
           "    check_recorded_classes(checkpoint, dataset_val, args, 'validation')\n", '',
           [T + 'test_errors.py::test_evaluating_or_pruning_a_model_on_other_class_folders_is_refused'],
           '--eval of a model on class folders with other names reads every label as another class'),
    mutant('foreign-log-rewritten', 'utils/run_log.py',
           "        if record is None and (not line.strip() or line.startswith('{')):",
           '        if record is None:',
           [T + 'test_resume.py::test_a_log_that_is_not_a_runs_log_is_refused_and_left_as_it_is'],
           'a log.txt of notes is rewritten by a continued run without a word'),
    mutant('rank-past-world-size-unchecked', 'utils/distributed.py',
           '        if not 0 <= value < world:', '        if not 0 <= value:',
           [T + 'test_errors.py::test_a_launcher_environment_the_job_cannot_run_with_is_refused_before_any_work'],
           'a RANK past WORLD_SIZE waits half an hour for peers that never come'),
    # --- the fast path and the speed table --------------------------------------------------------------------
    mutant('timed-choice-ignores-tolerance', 'models/fast_path.py',
           '            if err <= tol:\n                try:\n',
           '            if True:\n                try:\n',
           [T + 'test_fast_path.py::test_timed_choice_keeps_the_fastest_candidate_that_computes_the_right_thing'],
           'the build keeps the fastest candidate even when its output is wrong'),
    mutant('image-address-ignored', 'models/fast_kernels.py',
           '        if INDIRECT:\n', '        if False:\n',
           [T + 'test_fast_path.py::test_patch_embed_reads_the_images_an_address_names'],
           'the patch embedding reads the images it was given for their layout, not those the address names'),
    mutant('attention-grid-on-the-capped-axis', 'models/fast_kernels.py',
           '    grid = (triton.cdiv(n, block_m) * B * num_heads,)',
           '    grid = (triton.cdiv(n, block_m), B * num_heads)',
           [T + 'test_fast_path.py::test_attention_grid_fits_cuda_at_large_batches'],
           "the attention's (image, head) pairs on the grid axis CUDA caps at 65535 (DeiT-B fails from batch 5462)",
           ('        num_m = tl.cdiv(n, BLOCK_M)\n        pid = tl.program_id(0)\n        pid_m = pid % num_m\n'
            '        pid_bh = pid // num_m\n',
            '        pid_m = tl.program_id(0)\n        pid_bh = tl.program_id(1)\n')),
    mutant('layer-norm-eps-outside-the-sqrt', 'models/fast_kernels.py',
           '(1.0 / tl.sqrt(var + eps))', '(1.0 / (tl.sqrt(var) + eps))',
           [T + 'test_fast_path.py::test_layer_norm_kernels_add_eps_inside_the_square_root'],
           'the LayerNorm kernels divide by sqrt(var) + eps, not sqrt(var + eps) (unseen at unit variance)'),
    mutant('residual-norm-of-the-unrounded-sum', 'models/fast_kernels.py',
           '        h = (h + a).to(x_ptr.dtype.element_ty)\n', '        h = h + a\n',
           [T + 'test_fast_path.py::test_residual_layer_norm_updates_kept_rows_and_normalises'],
           "the fused residual's LayerNorm reads the fp32 sum, not the value rounded to the buffer's dtype"),
    mutant('grouped-tiles-past-the-first-group', 'models/fast_kernels.py',
           '        first_m = (pid // per_group) * GROUP_M', '        first_m = pid // per_group',
           [T + 'test_fast_path.py::test_linear_gelu'],
           'the fused products compute the wrong row tiles once there are more than GROUP_M of them'),
    mutant('patch-embed-takes-channels-last-as-they-are', 'models/fast_kernels.py',
           '    images = images.contiguous()\n', '',
           [T + 'test_fast_path.py::test_patch_embed_takes_images_of_any_layout'],
           'the patch embedding reads channels-last images as if W had unit stride'),
    mutant('residual-rows-masked-one-too-many', 'models/fast_kernels.py',
           '        rows_ok = r < num_rows\n        b = (r // n).to(tl.int64)\n        i = (r % n).to(tl.int64)\n',
           '        rows_ok = r <= num_rows\n        b = (r // n).to(tl.int64)\n        i = (r % n).to(tl.int64)\n',
           [T + 'test_fast_path.py::test_kernels_touch_no_row_past_their_images'],
           'the fused residual kernels also update the row after the last image (memory past the buffer)'),
    mutant('product-rows-masked-one-too-many', 'models/fast_kernels.py',
           '        m_ok = offs_m < M\n        n_ok = offs_n < N\n        x_rows',
           '        m_ok = offs_m <= M\n        n_ok = offs_n < N\n        x_rows',
           [T + 'test_fast_path.py::test_kernels_touch_no_row_past_their_images'],
           "the fused products' epilogue also writes the row after the last image (memory past the buffer)"),
    mutant('gather-norm-eps-fixed', 'models/fast_kernels.py',
           '                                    out.stride(0), out.stride(1), float(eps), HAS_W=has_w',
           '                                    out.stride(0), out.stride(1), 1e-6, HAS_W=has_w',
           [T + 'test_fast_path.py::test_layer_norm_kernels_add_eps_inside_the_square_root'],
           "the gathering LayerNorm uses timm's eps 1e-6 whatever the model's norm says"),
    mutant('fp16-buffer-allocated-in-fp32', 'models/fast_path.py',
           'buf = torch.empty(B, self.num_tokens, self.embed_dim, dtype=self.residual_dtype, device=images.device)',
           'buf = torch.empty(B, self.num_tokens, self.embed_dim, dtype=torch.float32, device=images.device)',
           [T + 'test_fast_path.py::test_residual_stream_in_half_precision'],
           'residual_dtype=fp16 is recorded, but the token buffer is allocated in fp32'),
    mutant('readme-figure-not-measured', 'README.md',
           '| C&C-Ti-25 | 0.92 | 92.6 |', '| C&C-Ti-25 | 0.92 | 96.2 |',
           [T + 'test_benchmark.py::test_readme_speed_table_is_the_committed_results'],
           "a figure in the README's speed table that the committed results do not hold"),
    # --- the benchmark's rows and their checks ----------------------------------------------------------------
    mutant('half-precision-rows-judged-as-fp32-on-cpu', 'benchmarks/formulations.py',
           "    if ctx.dtype is None and ctx.device.type != 'cuda':",
           "    if ctx.dtype is None or ctx.device.type != 'cuda':",
           [T + 'test_benchmark.py::test_rows_checked_in_half_precision_on_cpu_take_the_eager_models_rounding_error_as_'
            'their_scale'],
           "a bf16 run on a CPU checks its rows with fp32's tolerance (the eager model's own rounding taken as 0)"),
    mutant('check-batch-ignores-the-seed', 'benchmarks/formulations.py',
           '        g = torch.Generator().manual_seed(self.seed)', '        g = torch.Generator().manual_seed(0)',
           [T + 'test_benchmark.py::test_rows_checked_in_half_precision_on_cpu_take_the_eager_models_rounding_error_as_'
            'their_scale'],
           "the rows' logits are checked on the same images whatever --seed says"),
    mutant('ours-compiled-times-the-dense-model', 'benchmarks/formulations.py',
           "'ours, compiled', _compiled(use_dense=False)", "'ours, compiled', _compiled(use_dense=True)",
           [T + 'test_benchmark.py::test_compiled_rows_compile_the_model_of_their_row'],
           "the 'ours, compiled' rows compile and time timm's dense model instead of the pruned one"),
    mutant('counter-gflops-of-the-dense-model', 'benchmarks/model_zoo.py',
           "'counter_gflops': counted['timm'] if m['dense'] else counted[rate_tag(rate)]}",
           "'counter_gflops': counted['timm']}",
           [T + 'test_benchmark.py::test_quick_run_times_the_fast_path_rows_and_checks_every_row_against_eager_fp32'],
           "every row's torch-counter GFLOPs (the formula's cross-check) is the dense model's"),
    mutant('speedup-vs-twin-inverted', 'benchmarks/model_zoo.py',
           "as_fields('speedup_vs_twin', timings.ratio(key, twin))",
           "as_fields('speedup_vs_twin', timings.ratio(twin, key))",
           [T + 'test_benchmark.py::test_quick_run_times_the_fast_path_rows_and_checks_every_row_against_eager_fp32'],
           "a pruned row's speed-up against its own dense build is pruned time / dense time"),
    mutant('warm-up-passes-timed', 'benchmarks/model_zoo.py',
           '    return time_interleaved(runs, batch, device, args.repeats, args.warmup, dtype, shape=shape)',
           '    return time_interleaved(runs, batch, device, args.warmup + args.repeats, 0, dtype, shape=shape)',
           [T + 'test_benchmark.py::test_each_section_times_its_rows_at_its_own_batch_with_warm_up_passes_untimed'],
           "the main table's warm-up passes are timed and counted with the timed ones"),
    mutant('summary-section-times-the-main-batch', 'benchmarks/model_zoo.py',
           '    t = time_interleaved(rebuilt.runs, batch, device, rounds,',
           "    t = time_interleaved(rebuilt.runs, res['batch_size'], device, rounds,",
           [T + 'test_benchmark.py::test_each_section_times_its_rows_at_its_own_batch_with_warm_up_passes_untimed'],
           'a summary section times its rows at the main batch size while its entry names its own'),
    mutant('rate-sweep-boolean-on-the-dense-model', 'benchmarks/model_zoo.py',
           "            runs[f'boolean_{rate}'] = REGISTRY['boolean'].build(ours, dense, ctx)",
           "            runs[f'boolean_{rate}'] = REGISTRY['boolean'].build(cc, dense, ctx)",
           [T + 'test_benchmark.py::test_sweeps_time_the_pruned_models_and_divide_the_right_pass_times'],
           "the rate sweep's boolean rows run with every mask True: the dense model, not the rate's"),
    mutant('batch-sweep-vs-boolean-inverted', 'benchmarks/model_zoo.py',
           "vs_boolean=t.ratio(names['ours'], names['boolean'])['median']",
           "vs_boolean=t.ratio(names['boolean'], names['ours'])['median']",
           [T + 'test_benchmark.py::test_sweeps_time_the_pruned_models_and_divide_the_right_pass_times'],
           "the batch sweep's speed-up over the boolean formulation is ours / boolean time"),
    mutant('masks-png-greys-the-kept-patches', 'demo/draw_masks.py',
           '            clip = (~kept[layer]).view(gh, gw).numpy()',
           '            clip = (kept[layer]).view(gh, gw).numpy()',
           [T + 'test_demo.py::test_each_panel_greys_the_patches_its_block_clips_and_boxes_those_that_come_back'],
           "masks.png greys the patches each block keeps instead of those it clips"),
    mutant('masks-png-boxes-transposed', 'demo/draw_masks.py',
           '                y, x = divmod(p, gw)', '                x, y = divmod(p, gw)',
           [T + 'test_demo.py::test_each_panel_greys_the_patches_its_block_clips_and_boxes_those_that_come_back'],
           "masks.png boxes a returning patch at (row, column) swapped"),
    mutant('breakdown-prices-the-pruned-model-as-dense', 'benchmarks/model_zoo.py',
           "ms[f'ours_{rate_tag(r)}'], dense_macs,\n" + ' ' * 52 + 'family_macs(m))',
           "ms[f'ours_{rate_tag(r)}'], dense_macs,\n" + ' ' * 52 + 'family_macs(cc))',
           [T + 'test_benchmark.py::test_breakdown_of_the_fast_path_moves_its_patch_embedding_and_compares_pruned_with_'
            'dense'],
           'the time breakdown of ours against timm sets it against a FLOPs ratio of 1 (the dense FLOPs for both)'),
    mutant('scoring-cost-ratio-inverted', 'benchmarks/model_zoo.py',
           "    ratio = paired([a / b for a, b in zip(times['scoring'], times['train_step'])])",
           "    ratio = paired([b / a for a, b in zip(times['scoring'], times['train_step'])])",
           [T + 'test_benchmark.py::test_scoring_and_routing_costs_divide_the_right_pass_times'],
           'the scoring cost is given as training step over scoring'),
    mutant('routing-entry-beside-the-dense-forward', 'benchmarks/model_zoo.py',
           "statistics.median(timings.seconds[REGISTRY['ours'].key(rate)])",
           "statistics.median(timings.seconds['timm'])",
           [T + 'test_benchmark.py::test_each_section_times_its_rows_at_its_own_batch_with_warm_up_passes_untimed'],
           "the routing entry's forward pass of ours is timm's dense forward"),
    mutant('linear-shapes-fc-transposed', 'benchmarks/linear_shapes.py',
           "'fc1': (width, hidden), 'fc2': (hidden, width)}", "'fc1': (hidden, width), 'fc2': (width, hidden)}",
           [T + 'test_benchmark.py::test_linear_shapes_times_the_models_own_products_and_divides_dense_by_pruned'],
           "linear_shapes.py times the MLP's two products with their in and out features swapped"),
    mutant('linear-shapes-speedup-inverted', 'benchmarks/linear_shapes.py',
           "'speedup': {r: statistics.median(d / q for d, q in", "'speedup': {r: statistics.median(q / d for d, q in",
           [T + 'test_benchmark.py::test_linear_shapes_times_the_models_own_products_and_divides_dense_by_pruned'],
           "linear_shapes.py's end-to-end speed-up is pruned time over dense time"),
    mutant('benchmark-masks-ignore-the-seed', 'benchmarks/model_zoo.py',
           '    return cc, dense, pruned_models(cc, scores, args.rates, args.seed), scoring_s',
           '    return cc, dense, pruned_models(cc, scores, args.rates, 0), scoring_s',
           [T + 'test_benchmark.py::test_quick_run_times_the_fast_path_rows_and_checks_every_row_against_eager_fp32'],
           "the main table's random masks are drawn with seed 0 whatever --seed says"),
    mutant('vs-boolean-against-the-first-rate', 'benchmarks/model_zoo.py',
           '            base = REGISTRY[baseline].key(rate if REGISTRY[baseline].pruned else None)',
           "            base = REGISTRY[baseline].key(next(m['rate'] for m in built.meta.values() if not m['dense'])\n"
           '                                          if REGISTRY[baseline].pruned else None)',
           [T + 'test_benchmark.py::test_rows_of_two_rates_compare_each_with_the_rows_of_its_own_rate'],
           "every pruned row's speed-up over the boolean formulation is against the first rate's boolean row"),
    mutant('study-table-verdicts-swapped', 'demo/study.py',
           "    verdicts = {'taylor': 'Taylor wins', 'random': 'random wins', 'undecided': 'cannot tell'}",
           "    verdicts = {'taylor': 'random wins', 'random': 'Taylor wins', 'undecided': 'cannot tell'}",
           [T + 'test_study.py::test_markdown_tables_against_the_runs'],
           "the study's paired table names the loser of each decided comparison as the winner"),
    mutant('demo-images-per-s-of-the-dense-model', 'demo/run_demo.py',
           "                   'throughput': speed[tag]['pruned_throughput']}",
           "                   'throughput': speed[tag]['dense_throughput']}",
           [T + 'test_demo.py::test_run_demo_rows_and_verdicts_carry_the_figures_of_their_own_stage'],
           "the demo's pruned rows show the dense model's images/s"),
    mutant('demo-verdict-taylor-random-swapped', 'demo/run_demo.py',
           '        print(verdict_line(label, res[taylor], res[rand]))',
           '        print(verdict_line(label, res[rand], res[taylor]))',
           [T + 'test_demo.py::test_run_demo_rows_and_verdicts_carry_the_figures_of_their_own_stage'],
           "the demo's verdict lines give random's accuracy as Taylor's and the reverse"),
    # --- the benchmark carried on (--resume) ------------------------------------------------------------------
    mutant('resume-keeps-unfinished-sections', 'benchmarks/model_zoo.py',
           "        if old.get('status') == 'done' and old.get('section') == record['section']:",
           "        if old.get('section') == record['section']:",
           [T + 'test_benchmark.py::test_resume_runs_only_the_sections_left_out_and_keeps_the_earlier_ones'],
           'a resumed run keeps the sections the earlier one left out or failed instead of running them'),
    mutant('resume-without-the-mask-check', 'benchmarks/model_zoo.py',
           '            if kept != row[\'kept_tokens\']:', '            if False:',
           [T + 'test_benchmark.py::test_resume_runs_only_the_sections_left_out_and_keeps_the_earlier_ones'],
           "a resumed summary times a model made again without checking it keeps the earlier run's token counts"),
    mutant('resume-ignores-settings', 'benchmarks/model_zoo.py',
           '    differ = [k for k in flags if now.get(k) != then.get(k)]', '    differ = []',
           [T + 'test_benchmark.py::test_resume_refuses_other_settings_another_machine_and_other_files'],
           'a run with other settings carries on an earlier one, mixing their sections in one report'),
    mutant('unused-flags-unsaid', 'finetune.py',
           '    notes += unused_flag_notes(args, get_args_parser(), said=no_effect)\n', '',
           [T + 'test_recipe.py::test_unused_flags_given_are_noted_one_line_per_reason'],
           'a flag the run does not use is dropped without a word'),
    mutant('used-flag-said-unused', 'finetune.py',
           "    (lambda a: a.prune, OPTIMIZATION + MIXING + ERASING + ('drop', 'drop_path'),",
           "    (lambda a: a.prune, OPTIMIZATION + MIXING + ERASING + ('drop', 'drop_path', 'smoothing'),",
           [T + 'test_recipe.py::test_flags_said_to_have_no_effect_are_not_read_by_the_run'],
           '--prune says --smoothing has no effect, while its scoring loss uses it'),
    mutant('wrong-row-wins', 'benchmarks/report.py',
           "    ok_p, ok_d = [k for k in pruned if k not in excluded], [k for k in dense if k not in excluded]",
           "    ok_p, ok_d = pruned, dense",
           [T + 'test_benchmark.py::test_a_row_that_fails_its_logit_check_takes_no_part_in_the_speed_verdicts'],
           'a fast row whose logits are off wins the speed verdict'),
    mutant('unmeasured-targets-vanish', 'benchmarks/report.py',
           "        b = entry['speedup_by_batch'].get(str(bs))\n",
           "        b = entry['speedup_by_batch'].get(str(bs))\n        if b is None:\n            continue\n",
           [T + 'test_benchmark.py::test_a_run_cut_short_has_every_planned_entry_and_target_and_counts_what_it_could_'
            'not_measure'],
           'a batch-1/32 target the run could not measure is left out instead of said'),
    mutant('yes-against-an-incomplete-baseline', 'benchmarks/report.py',
           '    if met and not_compared:', '    if False:',
           [T + 'test_benchmark.py::test_a_dense_mode_left_out_leaves_a_target_it_would_decide_not_measured'],
           'a target reads "yes" when the dense mode left out of its comparison might be the fastest'),
    mutant('too-few-rounds-decide', 'benchmarks/report.py',
           "    elif paired:\n        out['decided'] = False\n", '',
           [T + 'test_benchmark.py::test_too_few_rounds_give_no_interval_and_no_decided_verdict'],
           'a median of a few rounds, without a 95% interval, gives a decided verdict'),
    mutant('nan-pass-times-measure', 'benchmarks/stats.py',
           '        if not s or bad:', '        if False:',
           [T + 'test_benchmark.py::test_pass_times_that_are_no_measurement_never_give_a_yes_or_a_figure',
            T + 'test_benchmark.py::test_a_ratio_with_a_pass_time_that_is_no_measurement_is_none_and_its_target_not_'
            'measured'],
           'a NaN, infinite or zero pass time is taken for a measurement and its ratio for a verdict'),
    mutant('interval-end-on-threshold-decides', 'benchmarks/report.py',
           "        out['decided'] = meets(ci[0]) == meets(ci[1]) and",
           "        out['decided'] = not (ci[0] < threshold < ci[1]) and",
           [T + 'test_benchmark.py::test_an_interval_that_ends_on_the_threshold_contains_it'],
           'an interval ending on the threshold counts as lying on one side of it'),
    mutant('second-speed-table-left-stale', 'benchmarks/report.py',
           '    if len(starts) > 1:', '    if False:',
           [T + 'test_benchmark.py::test_readme_table_writer_refuses_in_one_line_and_writes_nothing'],
           'a README with two speed tables has the first replaced and the second left stale'),
    mutant('fast-path-takes-a-ragged-image', 'models/fast_path.py',
           '    if img_size is None or any(s % p for s, p in zip(img_size, patch)):', '    if False:',
           [T + 'test_fast_path.py::test_unsupported_models_are_refused_at_build_time'],
           'an image size that is not a multiple of the patch size builds, and fails at the first call'),
    mutant('fast-path-runs-on-stale-masks', 'models/fast_path.py',
           '        if self._plan_version is not None and self._model.token_plan_version != self._plan_version:',
           '        if False:',
           [T + 'test_fast_path.py::test_a_path_built_from_the_models_masks_refuses_to_run_after_they_change'],
           'a fast path built before the masks changed runs on with the old ones'),
    mutant('fast-path-ids-unsorted', 'models/fast_path.py',
           'ids = torch.as_tensor(ids).detach().cpu().to(torch.int64).flatten().sort().values',
           'ids = torch.as_tensor(ids).detach().cpu().to(torch.int64).flatten()',
           [T + 'test_fast_path.py::test_kept_ids_in_any_order_are_checked_and_held_sorted'],
           'kept ids held in concat order: a duplicate or an out-of-range id inside the list goes unchecked'),
    mutant('fast-path-skips-norm-pre', 'models/fast_path.py',
           '        if self.norm_pre is not None:\n            buf =', '        if False:\n            buf =',
           [T + 'test_fast_path.py::test_a_norm_before_the_blocks_is_applied'],
           "a pre_norm=True ViT's norm before the blocks left out of the fast path"),
    mutant('fast-path-tanh-gelu', 'models/fast_path.py',
           'F.gelu(F.linear(y, blk.fc1_w, blk.fc1_b))', "F.gelu(F.linear(y, blk.fc1_w, blk.fc1_b), approximate='tanh')",
           [T + 'test_fast_path.py::test_the_mlp_applies_the_models_exact_gelu'],
           "the torch path's MLP applies the tanh approximation of GELU, not the model's exact one"),
    mutant('graph-replays-a-replaced-head', 'models/fast_path.py',
           "            if getattr(self._model, 'head', None) is not self._built_head:", '            if False:',
           [T + 'test_fast_path.py::test_a_captured_graph_refuses_a_replaced_head'],
           'a CUDA graph replays the head it captured after reset_classifier replaced it'),
    mutant('masks-changed-in-place-ignored', 'models/clip_concat.py',
           "        if torch.compiler.is_compiling() or getattr(self, '_is_replica', False):",
           '        if True:',
           [T + 'test_model.py::test_masks_changed_in_place_are_taken_up_by_the_next_forward'],
           'a mask changed in place (by hand, by an EMA) is reported by kept_token_counts but not computed'),
    mutant('teacher-normalisation-unchecked', 'finetune.py',
           '    if (tuple(t.mean), tuple(t.std)) != (tuple(s.mean), tuple(s.std)):',
           '    if False:',
           [T + 'test_errors.py::test_teacher_trained_on_another_normalisation_is_refused'],
           "a teacher trained on another normalisation distils from images normalised for the student"),
    mutant('digits-at-any-size', 'finetune.py',
           "    if args.data_set == 'DIGITS' and reads_data:", '    if False:',
           [T + 'test_errors.py::test_digits_at_another_image_size_is_refused_before_any_work'],
           'digits with a 224-pixel model start the run and fail at the first batch'),
    mutant('diverged-weights-saved', 'engine.py',
           "        if not math.isfinite(test_stats['loss']):", '        if False:',
           [T + 'test_errors.py::test_weights_broken_by_an_epochs_last_step_are_a_divergence_and_nothing_is_saved'],
           "an epoch whose last updates broke the weights is saved as checkpoint.pth and best.pth"),
    mutant('checksums-unchecked', 'utils/checkpoint_io.py',
           '    if not mmap:\n        _check_crcs(path)', '    pass',
           [T + 'test_errors.py::test_checkpoint_whose_weights_changed_after_writing'],
           "a checkpoint whose bytes changed after it was written loads, with wrong weights"),
    mutant('data-set-switch-continued', 'finetune.py',
           "        elif dest in CLASSES_OF_THE_RUN and names_other_classes(dest, value, args):",
           "        elif False:",
           [T + 'test_recipe.py::test_a_continued_run_keeps_its_data_set'],
           "a continued run trains on another data set, its labels naming other classes"),
    mutant('checkpoints-saved-on-the-gpu', 'utils/checkpoint_io.py',
           '    obj = on_cpu(obj)\n', '',
           [T + 'test_resume.py::test_save_atomic_writes_gpu_tensors_as_cpu_ones'],
           "a file written on a GPU holds CUDA tensors, which plain torch.load cannot read without one"),
    mutant('non-finite-weights-loaded', 'models/checkpoint.py',
           '    if broken:  # (evaluated,', '    if False:  # (evaluated,',
           [T + 'test_errors.py::test_checkpoint_with_non_finite_weights'],
           "NaN weights evaluated to an accuracy of 0% without a word"),
    mutant('inaturalist-image-annotated-twice', 'datasets.py',
           "        if labels.setdefault(a['image_id'], value) != value:",
           "        labels[a['image_id']] = value\n        if False:",
           [T + 'test_losses_data.py::test_inaturalist_annotation_problems_name_their_file_and_entry'],
           "an iNaturalist image annotated with two classes takes the last, silently"),
    mutant('fast-path-after-a-cast', 'models/fast_path.py',
           '        if first.dtype != self._head_dtype or first.device != self.device:',
           '        if False:',
           [T + 'test_fast_path.py::test_a_model_cast_after_the_path_was_built_is_refused'],
           "a fast path whose model was cast afterwards fails with a raw dtype error"),
    mutant('fast-path-in-training-mode', 'models/fast_path.py',
           "        if self._model.training:  # the head is the model's own",
           "        if False:  # the head is the model's own",
           [T + 'test_fast_path.py::test_a_model_put_back_in_training_mode_is_refused'],
           "a fast path run after model.train() applies the head's dropout to its logits"),
    mutant('fast-path-takes-layer-norm-act', 'models/fast_path.py',
           '    return (isinstance(m, nn.LayerNorm) and type(m).forward in _LAYER_NORM_FORWARDS',
           '    return (isinstance(m, nn.LayerNorm)',
           [T + 'test_fast_path.py::test_unsupported_models_are_refused_at_build_time'],
           "a LayerNorm followed by an activation taken for a plain LayerNorm, the activation dropped"),
    mutant('deit3-layer-scale-names-unread', 'models/checkpoint.py',
           "    return {re.sub(r'^(blocks\\.\\d+)\\.gamma_([12])$', r'\\1.ls\\2.gamma', k): v for k, v in sd.items()}",
           '    return sd',
           [T + 'test_families.py::test_deit3_file_of_the_deit_repository_loads_as_timms_model'],
           "DeiT III's released files refused (their LayerScale named gamma_1, gamma_2)"),
    mutant('teacher-patches-unchecked', 'finetune.py',
           '        if size % ph or size % pw:\n            raise UserError(f\'--teacher-model',
           '        if False:\n            raise UserError(f\'--teacher-model',
           [T + 'test_errors.py::test_a_teacher_whose_patches_do_not_divide_the_input_size_is_refused'],
           "a teacher whose patches do not divide the input drops the rest of every image, silently"),
    mutant('ema-read-raw', 'finetune.py',
           "        models.load_entry(training.model_ema.module, checkpoint, 'model_ema', args.resume,",
           "        models.load_weights(training.model_ema.module, checkpoint['model_ema'], args.resume,",
           [T + 'test_resume.py::test_resume_reads_the_ema_weights_as_it_reads_the_model_weights'],
           "a checkpoint's EMA read without the model weights' key cleanup and finiteness check"),
    mutant('lr-noise-unreached-accepted', 'finetune.py',
           '    if first <= epochs - 2 and (len(bounds) == 1 or first < bounds[1]):',
           '    if True:',
           [T + 'test_recipe.py::test_an_lr_noise_that_no_trained_epoch_reaches_is_one_line'],
           "an --lr-noise that no trained epoch reaches accepted, adding no noise"),
    mutant('single-class-finetuned', 'datasets.py',
           '    if trains and nb_classes < 2:', '    if False:',
           [T + 'test_errors.py::test_finetuning_on_a_single_class_is_refused'],
           'a training set of one class finetuned on: a one-class head, loss 0, checkpoints at 100% accuracy'),
    mutant('eval-model-after-data', 'finetune.py',
           '    dataset_val, nb_classes = build_data(args, train=False)\n    check_same_classes(args, dataset_val)\n',
           '    dataset_val, nb_classes = build_data(args, train=False)\n    check_same_classes(args, dataset_val)\n'
           '    model, checkpoint = load_model(args, args.resume, args.model, checkpoint=resumed)\n',
           [T + 'test_errors.py::test_weights_that_do_not_fit_the_model_are_refused_before_the_data_is_listed'],
           'weights that do not fit --model found by --eval only after the data set was listed',
           ('    model, checkpoint = load_model(args, args.resume, args.model, checkpoint=resumed)\n'
            '    dataset_val, nb_classes', '    dataset_val, nb_classes')),
    mutant('evaluated-in-training-mode', 'engine.py',
           '    model.eval()\n    logger = MetricLogger(printer=printer)\n    correct1',
           '    logger = MetricLogger(printer=printer)\n    correct1',
           [T + 'test_training.py::test_each_epoch_trains_in_training_mode_and_evaluates_in_eval_mode'],
           'validation runs with dropout and drop-path on'),
    mutant('trained-in-eval-mode', 'engine.py',
           '    model.train()\n    logger = MetricLogger(printer=printer)\n    logger.add_meter',
           '    logger = MetricLogger(printer=printer)\n    logger.add_meter',
           [T + 'test_training.py::test_each_epoch_trains_in_training_mode_and_evaluates_in_eval_mode'],
           'every epoch after an evaluation trains in eval mode'),
    mutant('train-loss-per-batch', 'engine.py',
           'logger.update(loss=loss_value, n=samples.shape[0])', 'logger.update(loss=loss_value)',
           [T + 'test_training.py::test_the_epoch_loss_is_the_mean_over_its_images'],
           "the epoch's training loss weighs a batch of 1 image as one of 64"),
    mutant('teacher-with-autograd', 'losses.py',
           '        with torch.no_grad():\n            teacher_outputs',
           '        if True:\n            teacher_outputs',
           [T + 'test_losses_data.py::test_the_teacher_gets_no_gradient_and_builds_no_graph'],
           "the teacher's forward builds a graph and its weights get gradients"),
    mutant('mapped-read-not-weights-only', 'utils/checkpoint_io.py',
           "weights_only=True, mmap=True)", "weights_only=False, mmap=True)",
           [T + 'test_errors.py::test_a_checkpoint_that_would_run_code_is_refused_also_when_only_mapped'],
           'a file read with mmap (--resume, best.pth, a teacher, first look) runs the code it holds'),
    mutant('channels-disagreement-unsaid', 'models/checkpoint.py',
           '    if stored is not None and stored != actual:',
           '    if stored is not None and stored != actual and not holds_masks(sd):',
           [T + 'test_model.py::test_released_channels_as_tensors_are_checked_against_the_masks'],
           'a file whose channels disagree with its masks loads without a word'),
    mutant('tensor-channels-kept', 'models/checkpoint.py',
           '        return [int(c) for c in stored]', '        return list(stored)',
           [T + 'test_model.py::test_released_channels_as_tensors_are_checked_against_the_masks'],
           "a released file's 0-dim tensor channels kept as tensors (the warning reads tensor(65))"),
    mutant('eta-from-the-first-step', 'utils/progress.py',
           'eta = iter_time.global_avg * (total - i - 1)', 'eta = iter_time.deque[0] * (total - i - 1)',
           [T + 'test_training.py::test_progress_lines_show_the_eta_of_the_mean_step_and_the_last_step'],
           "the ETA reckons every step left at the first step's time"),
    mutant('last-step-unprinted', 'utils/progress.py',
           'if i % print_freq == 0 or i == total - 1:', 'if i % print_freq == 0:',
           [T + 'test_training.py::test_progress_lines_show_the_eta_of_the_mean_step_and_the_last_step'],
           "an epoch's last step is not printed unless print_freq divides it"),
    mutant('every-rank-prints', 'utils/progress.py',
           '    if is_main_process():\n        print_line', '    if True:\n        print_line',
           [T + 'test_training.py::test_only_the_first_process_prints_and_writes_tensorboard'],
           'every process prints the progress and result lines'),
    mutant('every-rank-writes-tensorboard', 'utils/progress.py',
           '        if log_dir and is_main_process():', '        if log_dir:',
           [T + 'test_training.py::test_only_the_first_process_prints_and_writes_tensorboard'],
           'every process writes TensorBoard events into the output folder'),
    mutant('create-model-takes-another-models-file', 'models/checkpoint.py',
           "        check_recorded_name(checkpoint, checkpoint_path, name, 'the model name')\n", '',
           [T + 'test_model.py::test_models_create_model_refuses_a_file_of_another_model_of_the_same_shapes'],
           "models.create_model loads a ViT-Ti file as DeiT-Ti (same shapes, another normalisation)"),
    mutant('dense-copy-in-place', 'models/checkpoint.py',
           "    dense = copy.deepcopy(getattr(model, 'module', model))", "    dense = getattr(model, 'module', model)",
           [T + 'test_model.py::test_dense_copy_is_the_dense_model_and_leaves_the_pruned_one_as_it_is'],
           'dense_copy makes the pruned model itself dense'),
    mutant('legacy-format-called-corrupt', 'utils/checkpoint_io.py',
           '    if not zipfile.is_zipfile(path):\n        return\n    try:\n'
           '        with zipfile.ZipFile(path) as archive:\n            bad',
           '    try:\n        with zipfile.ZipFile(path) as archive:\n            bad',
           [T + 'test_errors.py::test_a_checkpoint_in_torchs_legacy_format_loads'],
           "a checkpoint in torch's legacy (non-zip) format refused as a corrupt zip archive"),
    mutant('loss-scaler-not-restored', 'finetune.py',
           "            training.scaler.load_state_dict(checkpoint['scaler'])\n", '            pass\n',
           [T + 'test_resume.py::test_resume_restores_the_loss_scaler'],
           "a resumed run's loss scaler starts afresh (mixed precision's scale and growth count lost)"),
    mutant('restarted-workers-draw-anew', 'datasets.py',
           '            torch.set_rng_state(rng_state)\n', '',
           [T + 'test_seeding.py::test_a_worker_that_hangs_at_its_start_is_killed_and_the_epoch_is_the_one_it_would_'
            'have_been'],
           'workers started again after a hung start draw other seeds than the first start (the epoch changes)'),
    mutant('taylor-prune-lists-val-first', 'finetune.py',
           "    if args.prune_mode == 'attn':  # scored on the training set: a missing one is said before val/ is "
           "listed\n        check_split(True, args)\n", '',
           [T + 'test_errors.py::test_missing_training_split_is_said_before_val_is_listed'],
           'a --prune whose train/ is missing lists val/ before it says so'),
    mutant('study-ignores-folders-where-it-writes-files', 'demo/study.py',
           '    return folders, [os.path.join(a.out, name) for name in OUTPUT_FILES.values()]',
           '    return folders, []',
           [T + 'test_study.py::test_a_path_in_the_way_of_an_output_is_refused_before_any_work'],
           'a folder where the study writes results.json or study.png is found only after every run'),
    mutant('a-model-of-any-input-size', 'finetune.py',
           '    if limit and size * size > limit:\n', '    if False:\n',
           [T + 'test_demo.py::test_draw_masks_refuses_bad_arguments_before_any_work',
            T + 'test_errors.py::test_bad_flags'],
           "an --input-size past Pillow's limit for one image builds a model of that size before it is refused"),
    mutant('safetensors-read-as-a-pickle', 'utils/checkpoint_io.py',
           '    if _is_safetensors(path):\n        return _load_safetensors(path)\n', '',
           [T + 'test_errors.py::test_timm_weights_in_safetensors_are_read_as_the_bare_state_dict_they_hold'],
           "timm's model.safetensors (the Hugging Face hub's format) refused as an unreadable PyTorch checkpoint"),
    mutant('draw-masks-reads-the-checkpoint-before-the-folder', 'demo/draw_masks.py',
           '        check_image_folder(args.data_path)\n', '        pass\n',
           [T + 'test_demo.py::test_draw_masks_refuses_bad_arguments_before_any_work'],
           'a --data-path that is no folder is refused only after the checkpoint is read and its model built'),    mutant('a-web-page-called-a-corrupt-checkpoint', 'utils/checkpoint_io.py',
           "    if re.match(rb'\\s*(<!doctype html|<html)', head.lower()):",
           "    if re.match(rb'(<!doctype html|<html)', head):",
           [T + 'test_errors.py::test_a_file_in_no_format_of_torch_is_named_for_what_it_is'],
           'an HTML page a download saved (leading blank lines, upper-case DOCTYPE) is called an unreadable pickle'),
]


# ----------------------------------------------------------------------------------------------------------

def repository_files(root: str) -> List[str]:
    """Tracked files and untracked ones git does not ignore (new tests before their commit)."""
    out = subprocess.run(['git', 'ls-files', '--cached', '--others', '--exclude-standard', '-z'], cwd=root,
                         capture_output=True, check=True).stdout
    return [p for p in out.decode().split('\0') if p and os.path.isfile(os.path.join(root, p))]


def copy_repository(root: str, dest: str) -> None:
    for rel in repository_files(root):
        target = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(root, rel), target)


def stale_edits(m: Mutant, root: str) -> List[str]:
    path = os.path.join(root, m.file)
    if not os.path.isfile(path):
        return [f'{m.file} does not exist']
    with open(path) as f:
        text = f.read()
    return [f'{m.file}: snippet found {text.count(old)} times, not once: {old.strip()[:70]!r}'
            for old, _ in m.edits if text.count(old) != 1]


def child_env() -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT', 'LOCAL_WORLD_SIZE')}
    env['PYTHONDONTWRITEBYTECODE'] = '1'
    return env


def run_pytest(root: str, tests: Sequence[str], timeout: float) -> Tuple[Optional[int], str]:
    cmd = [sys.executable, '-m', 'pytest', '-x', '-q', '-p', 'no:cacheprovider', *tests]
    try:
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout, env=child_env())
    except subprocess.TimeoutExpired:
        return None, f'timed out after {timeout:.0f} s'
    return proc.returncode, (proc.stdout + proc.stderr)[-1500:]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('names', nargs='*', help='run only these mutants (default: all)')
    p.add_argument('--list', action='store_true', help='list the mutants and exit')
    p.add_argument('--timeout', type=float, default=600, help='seconds for one pytest run')
    args = p.parse_args(argv)
    if args.list:
        for m in MUTANTS:
            print(f'{m.name:32s} {m.file:24s} {m.what}')
        return 0
    unknown = set(args.names) - {m.name for m in MUTANTS}
    if unknown:
        print(f'error: unknown mutants {", ".join(sorted(unknown))} (see --list)', file=sys.stderr)
        return 2
    chosen = [m for m in MUTANTS if not args.names or m.name in args.names]
    started = time.time()
    with tempfile.TemporaryDirectory(prefix='cc-vit-mutants-') as scratch:
        copy_repository(ROOT, scratch)
        stale = {m.name: stale_edits(m, scratch) for m in chosen}
        stale = {name: problems for name, problems in stale.items() if problems}
        for name, problems in stale.items():
            for problem in problems:
                print(f'STALE     {name}: {problem}')
        chosen = [m for m in chosen if m.name not in stale]
        tests = sorted({t for m in chosen for t in m.tests})
        print(f'Baseline: {len(tests)} test ids unmutated ...', flush=True)
        code, tail = run_pytest(scratch, tests, args.timeout * 2)
        if code != 0:
            print(f'error: the tests fail without any mutant, so the check means nothing:\n{tail}')
            return 1
        results = []
        for m in chosen:
            path = os.path.join(scratch, m.file)
            with open(path) as f:
                original = f.read()
            mutated = original
            for old, new in m.edits:
                mutated = mutated.replace(old, new)
            with open(path, 'w') as f:
                f.write(mutated)
            t0 = time.time()
            try:
                code, tail = run_pytest(scratch, m.tests, args.timeout)
            finally:
                with open(path, 'w') as f:
                    f.write(original)
            verdict = 'caught' if code == 1 else 'SURVIVED' if code == 0 else 'ERROR'
            results.append((m, verdict, time.time() - t0))
            print(f'{verdict:9s} {m.name:32s} {time.time() - t0:6.1f} s  {m.what}', flush=True)
            if verdict == 'ERROR':
                print('    ' + tail.strip().replace('\n', '\n    '))
    survived = [m.name for m, v, _ in results if v == 'SURVIVED']
    errors = [m.name for m, v, _ in results if v == 'ERROR']
    caught = sum(v == 'caught' for _, v, _ in results)
    print(f'{caught} of {len(results) + len(stale)} mutants caught; survived: {", ".join(survived) or "none"}; '
          f'stale: {", ".join(stale) or "none"}; errors: {", ".join(errors) or "none"} '
          f'({time.time() - started:.0f} s)')
    return 1 if survived or stale or errors else 0


if __name__ == '__main__':
    sys.exit(main())
