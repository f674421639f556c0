"""The study of Taylor against random masks over seeds (demo/study.py): its statistics against scipy/numpy, and a
--quick run checked file by file (results.json, the masks in the checkpoints, the table, the sentences, the figure)."""
import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import stats

from conftest import (ROOT, FullAfter, assert_ctrl_c_ends_the_script, assert_one_error_line,
                      flags_not_saying_their_default, no_work, run_demo_script, teacher_checkpoint)

sys.path.insert(0, os.path.join(ROOT, 'demo'))
import study  # noqa: E402

RUN_TYPES = {'prune_rate': float, 'prune_mode': str, 'seed': int, 'finetuned': bool, 'acc1': float,
             'gflops': float, 'kept_tokens': list, 'masks_sha1': str, 'checkpoint': str}
NUMBER = r'([+-]\d+\.\d\d)'


def scipy_interval(taylor, random, confidence=0.95):
    """The paired t-interval by scipy (its zero-variance case, where scipy gives nan, is the point itself)."""
    taylor, random = np.asarray(taylor, float), np.asarray(random, float)
    diffs = taylor - random
    if np.allclose(diffs, diffs[0], rtol=0, atol=1e-9):
        return float(diffs[0]), float(diffs[0])
    ci = stats.ttest_rel(taylor, random).confidence_interval(confidence)
    return float(ci.low), float(ci.high)


def expected_verdict(low, high):
    return 'taylor' if low > 0 else ('random' if high < 0 else 'undecided')


def parse_sentence(text):
    """(verdict, mean, low, high) read back from a sentence of study.sentence()."""
    if ', Taylor beats random: ' in text:
        verdict = 'taylor'
    elif ', random beats Taylor: ' in text:
        verdict = 'random'
    else:
        assert ', the data cannot tell Taylor and random apart: ' in text, text
        verdict = 'undecided'
    mean = float(re.search(r'Taylor - random = ' + NUMBER + ' points', text).group(1))
    m = re.search(r'95% t-interval \[' + NUMBER + ', ' + NUMBER + r'\]', text)
    low, high = (float(m.group(1)), float(m.group(2))) if m else (None, None)
    if m:
        assert text.rstrip('.').endswith('excludes 0' if verdict != 'undecided' else 'includes 0'), text
    return verdict, mean, low, high


# ----------------------------------------------------------------------------------------------------------
# the statistics on their own (fast)

@pytest.mark.parametrize('taylor,random,verdict', [
    ([93.1, 92.5, 94.0], [83.9, 80.3, 85.0], 'taylor'),          # clearly above 0
    ([96.7, 96.1, 96.9], [97.5, 97.2, 97.8], 'random'),          # clearly below 0
    ([96.7, 97.2, 96.4], [97.5, 96.9, 96.1], 'undecided'),       # around 0
    ([90.0, 91.0, 89.0, 92.5, 90.5], [89.0, 90.8, 89.5, 91.0, 90.0], 'undecided'),
    ([90.0, 91.0, 89.0, 92.5, 90.5], [88.0, 89.8, 87.5, 91.0, 89.0], 'taylor'),
])
def test_paired_comparison_against_scipy(taylor, random, verdict):
    c = study.paired_comparison(taylor, random)
    low, high = scipy_interval(taylor, random)
    assert c['ci_low'] == pytest.approx(low, abs=1e-9) and c['ci_high'] == pytest.approx(high, abs=1e-9)
    assert c['mean'] == pytest.approx(np.mean(np.subtract(taylor, random)))
    assert c['std'] == pytest.approx(np.std(np.subtract(taylor, random), ddof=1))
    assert c['n'] == len(taylor) and c['df'] == len(taylor) - 1
    assert c['verdict'] == expected_verdict(low, high) == verdict
    text = study.sentence(0.4, False, 8, c)
    assert text.startswith('At prune rate 0.40 before finetuning, ')
    assert parse_sentence(text) == (verdict, round(c['mean'], 2), round(low, 2), round(high, 2))


def test_paired_comparison_edge_cases():
    one = study.paired_comparison([95.0], [90.0])
    assert one['verdict'] == 'undecided' and one['ci_low'] is None and one['mean'] == 5.0
    text = study.sentence(0.25, True, 1, one)
    assert 'after 1 epoch of distillation finetuning' in text and 'cannot tell' in text and 'no interval' in text
    # Every seed the same difference: the t-interval is that point; it excludes 0 and the sentence says why.
    same = study.paired_comparison([91.0, 92.0, 93.0], [90.0, 91.0, 92.0])
    assert (same['ci_low'], same['ci_high'], same['verdict']) == (pytest.approx(1.0), pytest.approx(1.0), 'taylor')
    assert 'zero width' in study.sentence(0.25, False, 8, same)
    # and README.md's paragraph, which lists the comparisons by verdict, says it too (only where it is so)
    same.update(prune_rate=0.25, finetuned=True)
    other = dict(study.paired_comparison([93.0, 92.0, 95.0], [90.0, 91.0, 92.0]), prune_rate=0.40, finetuned=True)
    assert study.verdict_summary([same, other], finetuned=True) == (
        'Taylor beats random at rate 0.25 (+1.00 points, [+1.00, +1.00], every seed gave the same difference); '
        f'the data cannot tell them apart at rate 0.40 (+2.33 points, [{other["ci_low"]:+.2f}, '
        f'{other["ci_high"]:+.2f}])')
    assert other['ci_low'] < 0 < other['ci_high']
    with pytest.raises(ValueError):
        study.paired_comparison([1.0, 2.0], [1.0])


def test_cell_stats_against_numpy():
    values = [96.67, 97.22, 96.11]
    s = study.cell_stats(values)
    assert s['n'] == 3 and s['mean'] == pytest.approx(np.mean(values))
    assert s['std'] == pytest.approx(np.std(values, ddof=1))
    assert study.cell_stats([50.0])['std'] is None


def test_summaries_against_numpy():
    rng = np.random.default_rng(0)
    runs = [{'prune_rate': rate, 'prune_mode': mode, 'seed': seed, 'finetuned': ft,
             'acc1': float(rng.uniform(50, 99)), 'gflops': 0.03}
            for rate in (0.25, 0.55) for mode in ('attn', 'random') for seed in (0, 1, 2) for ft in (False, True)]
    cells, paired = study.summarise(runs, [0, 1, 2], [0.25, 0.55], 8)
    acc = {(r['prune_rate'], r['prune_mode'], r['finetuned']): [] for r in runs}
    for r in runs:
        acc[(r['prune_rate'], r['prune_mode'], r['finetuned'])].append(r['acc1'])
    text = study.spread_summary(cells, False)
    expected = (f'mean acc@1 Taylor / random {np.mean(acc[(0.25, "attn", False)]):.1f} / '
                f'{np.mean(acc[(0.25, "random", False)]):.1f} at 0.25 and {np.mean(acc[(0.55, "attn", False)]):.1f} / '
                f'{np.mean(acc[(0.55, "random", False)]):.1f} at 0.55; standard deviation over seeds up to '
                f'{max(np.std(acc[(r, "attn", False)], ddof=1) for r in (0.25, 0.55)):.1f} points for Taylor and up '
                f'to {max(np.std(acc[(r, "random", False)], ddof=1) for r in (0.25, 0.55)):.1f} for random')
    assert text == expected
    assert [(c['prune_rate'], c['finetuned']) for c in paired] == [(0.25, False), (0.25, True), (0.55, False),
                                                                   (0.55, True)]
    for c in paired:
        low, high = scipy_interval(acc[(c['prune_rate'], 'attn', c['finetuned'])],
                                   acc[(c['prune_rate'], 'random', c['finetuned'])])
        assert c['ci_low'] == pytest.approx(low) and c['ci_high'] == pytest.approx(high)


def test_markdown_tables_against_the_runs():
    """study.markdown of scripted runs (Taylor clearly ahead at 0.25 before finetuning, behind at 0.55): each cell
    of the accuracy table from numpy over the seeds of its own (rate, masks, stage), and each line of the paired
    table (differences per seed, mean, interval, verdict) from scipy."""
    rng = np.random.default_rng(1)
    shift = {(0.25, False): 10.0, (0.25, True): 0.0, (0.55, False): -10.0, (0.55, True): 0.5}
    base = {(rate, seed, ft): float(rng.uniform(60, 80)) for rate in (0.25, 0.55) for seed in (0, 1, 2)
            for ft in (False, True)}  # random's accuracy; Taylor's: this + the shift + up to a point of noise
    runs = [{'prune_rate': rate, 'prune_mode': mode, 'seed': seed, 'finetuned': ft,
             'acc1': base[(rate, seed, ft)] + (shift[(rate, ft)] + float(rng.uniform(-1, 1)) if mode == 'attn' else 0),
             'gflops': 0.03 - 0.01 * rate + 0.001 * seed + (0.002 if mode == 'random' else 0)}
            for rate in (0.25, 0.55) for mode in ('attn', 'random') for seed in (0, 1, 2) for ft in (False, True)]
    cells, paired = study.summarise(runs, [0, 1, 2], [0.25, 0.55], 4)
    text = study.markdown({'gflops': 0.05, 'acc1': 90.0, 'seed': 0}, cells, paired, [0, 1, 2], 4)
    by = {(r['prune_rate'], r['prune_mode'], r['seed'], r['finetuned']): r for r in runs}
    lines = text.splitlines()
    for rate in (0.25, 0.55):
        for mode, shown in (('attn', 'Taylor'), ('random', 'random')):
            line, = [x for x in lines if x.startswith(f'| {rate:.2f} | {shown} |')]
            cols = [c.strip() for c in line.strip('|').split('|')]
            for column, ft in ((3, False), (4, True)):
                acc = np.array([by[(rate, mode, s, ft)]['acc1'] for s in (0, 1, 2)])
                assert cols[column] == f'{acc.mean():.2f} ± {acc.std(ddof=1):.2f}', (line, ft)
            assert cols[2] == f'{np.mean([by[(rate, mode, s, False)]["gflops"] for s in (0, 1, 2)]):.4f}'
        for ft in (False, True):
            line, = [x for x in lines if x.startswith(f'| {rate:.2f} | {study.stage_name(ft, 4)} |')]
            cols = [c.strip() for c in line.strip('|').split('|')]
            taylor = [by[(rate, 'attn', s, ft)]['acc1'] for s in (0, 1, 2)]
            random = [by[(rate, 'random', s, ft)]['acc1'] for s in (0, 1, 2)]
            diffs = np.subtract(taylor, random)
            low, high = scipy_interval(taylor, random)
            assert cols[2] == ', '.join(f'{d:+.2f}' for d in diffs) and cols[3] == f'{diffs.mean():+.2f}'
            assert cols[4] == f'[{low:+.2f}, {high:+.2f}]'
            words = {'taylor': 'Taylor wins', 'random': 'random wins', 'undecided': 'cannot tell'}
            assert cols[5] == words[expected_verdict(low, high)], line
    assert {c['verdict'] for c in paired} == {'taylor', 'random', 'undecided'}  # every verdict is shown

def test_remaining_time_estimate():
    done = {('prune', 'attn', 0.25): [2.0, 4.0], ('finetune', 'attn', 0.25): [60.0]}
    # Same (stage, mode, rate) where known; else the mean of that stage over everything finished.
    remaining = [('prune', 'attn', 0.25), ('finetune', 'attn', 0.25), ('prune', 'random', 0.40),
                 ('finetune', 'random', 0.40)]
    assert study.estimate_remaining(remaining, done) == pytest.approx(3.0 + 60.0 + 3.0 + 60.0)
    assert study.estimate_remaining([('finetune', 'attn', 0.25)], {('prune', 'attn', 0.25): [1.0]}) is None
    assert study.clock(None) == '?' and study.clock(750) == '12:30' and study.clock(3725) == '1:02:05'


def test_argument_errors(capsys):
    for argv in (['--seeds', '1', '1'], ['--rates', '0.25', '1.0'], ['--finetune-epochs', '0']):
        with pytest.raises(SystemExit) as e:
            study.main(argv + ['--out', os.devnull])
        assert e.value.code == 2
        assert 'error' in capsys.readouterr().err


@pytest.mark.parametrize('flag', ['--seeds', '--rates', '--out'])
def test_a_flag_given_as_equals_dash_dash_is_refused_before_any_work(flag, tmp_path, capsys, monkeypatch):
    """`--seeds=--`: argparse took the '--' away and left the flag an empty list (a study of no seed, or of no
    rate, was started); one `error:` line naming the flag, exit code 2, nothing written."""
    monkeypatch.setattr(study, 'run_study', lambda *a: pytest.fail('the study started'))
    argv = [f'{flag}=--'] + ([] if flag == '--out' else ['--out', str(tmp_path / 'out')])
    with pytest.raises(SystemExit) as e:
        study.main(argv)
    assert e.value.code == 2
    assert capsys.readouterr().err == f"error: argument {flag}: '--' is not a value (see --help)\n"
    assert os.listdir(tmp_path) == []


def test_an_output_folder_whose_name_is_too_long_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """--out with a name longer than the file system takes, or more folders to create than os.makedirs can (it
    recurses once per folder): one `error:` line, exit code 2, nothing written (it was an OSError or RecursionError
    traceback from creating the folder)."""
    monkeypatch.setattr(study, 'run_study', lambda *a: pytest.fail('the study started'))
    for out in ('a' * 300, os.path.join('new', 'a' * 300), os.path.join(*['d'] * 1200)):
        with pytest.raises(SystemExit) as e:
            study.main(['--out', str(tmp_path / out)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith('error: cannot write to --out ') and err.count('\n') == 1, err
        assert ('File name too long' in err or 'folders to create' in err) and os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------------------------
# a --quick run

@pytest.fixture(scope='module')
def quick_study(tmp_path_factory):
    out = tmp_path_factory.mktemp('study') / 'runs'
    stdout = run_demo_script('study.py', out, timeout=900)
    with open(out / 'results.json') as f:
        results = json.load(f)
    return out, stdout, results


def runs_by_key(results):
    return {(r['prune_rate'], r['prune_mode'], r['seed'], r['finetuned']): r for r in results['runs']}


def stored_masks(path):
    ckpt = torch.load(path, map_location='cpu', weights_only=False)
    sd = ckpt['model']
    masks = [sd[f'blocks.{i}.attn.token_index'] for i in range(len(ckpt['channels']))]
    return ckpt, torch.stack(masks)


@pytest.mark.slow
def test_results_json_schema(quick_study):
    out, _, results = quick_study
    cfg = results['config']
    assert cfg['seeds'] == [0, 1] and cfg['rates'] == [0.25, 0.40] and cfg['finetune_epochs'] == 1
    runs = results['runs']
    assert len(runs) == 2 * 2 * 2 * 2  # seeds x rates x modes x (before, after finetuning)
    for r in runs:
        assert list(r) == list(RUN_TYPES), r
        for k, t in RUN_TYPES.items():
            assert isinstance(r[k], t), (k, r[k])
        assert 0.0 <= r['acc1'] <= 100.0 and 0 < r['gflops'] < results['teacher']['gflops']
        assert os.path.isfile(out / r['checkpoint'])
    by = runs_by_key(results)
    assert set(by) == {(rate, mode, seed, ft) for rate in (0.25, 0.40) for mode in ('attn', 'random')
                       for seed in (0, 1) for ft in (False, True)}
    for (rate, mode, seed, ft), r in by.items():
        # Finetuning keeps the masks: same FLOPs, same plan; more clipping, fewer FLOPs.
        assert r['gflops'] == by[(rate, mode, seed, False)]['gflops']
        assert r['masks_sha1'] == by[(rate, mode, seed, False)]['masks_sha1']
        assert r['gflops'] < by[(0.25, mode, seed, ft)]['gflops'] or rate == 0.25
    teacher = results['teacher']
    assert teacher['seed'] == 0 and teacher['reused'] is False and os.path.isfile(out / teacher['checkpoint'])
    assert len(results['paired']) == 2 * 2 and results['sentences'] == [c['sentence'] for c in results['paired']]


@pytest.mark.slow
def test_each_accuracy_is_the_one_its_run_logged(quick_study):
    """Each run's acc@1 is what its own stage logged, read here from the files beside its checkpoint: the last
    epoch of the finetune (log.txt) or the evaluation by --prune (prune_log.txt); the teacher's, its last epoch."""
    out, _, results = quick_study
    logged = [(r, 'log.txt' if r['finetuned'] else 'prune_log.txt') for r in results['runs']]
    for r, name in logged + [(results['teacher'], 'log.txt')]:
        log = (out / r['checkpoint']).parent / name
        last = json.loads(log.read_text().strip().splitlines()[-1])
        assert r['acc1'] == pytest.approx(last['test_acc1'], abs=1e-9), (r, log)


@pytest.mark.slow
def test_seed_reaches_the_masks_and_the_runs(quick_study):
    out, _, results = quick_study
    by = runs_by_key(results)
    for rate in (0.25, 0.40):
        files = {}
        for mode in ('attn', 'random'):
            for seed in (0, 1):
                pruned = out / by[(rate, mode, seed, False)]['checkpoint']
                finetuned = out / by[(rate, mode, seed, True)]['checkpoint']
                ckpt, masks = stored_masks(pruned)
                stored = ckpt['args']
                assert (stored['seed'], stored['prune_mode'], stored['prune_rate']) == (seed, mode, rate)
                ft_ckpt, ft_masks = stored_masks(finetuned)
                assert ft_ckpt['args']['seed'] == seed and torch.equal(ft_masks, masks)
                digest = hashlib.sha1(masks.to(torch.uint8).numpy().tobytes()).hexdigest()
                assert by[(rate, mode, seed, False)]['masks_sha1'] == digest
                assert [int(m.sum()) for m in masks] == by[(rate, mode, seed, False)]['kept_tokens']
                files[(mode, seed)] = (pruned, ckpt, masks)
        # Random masks are drawn again for each seed.
        assert not torch.equal(files[('random', 0)][2], files[('random', 1)][2])
        # Each seed's Taylor masks are planned from its own scoring pass, saved in its own file.
        (p0, c0, _), (p1, c1, _) = files[('attn', 0)], files[('attn', 1)]
        assert not os.path.samefile(p0, p1)
        assert not torch.equal(c0['scores'], c1['scores'])
        # The same budget for both modes: the same number of clipped slots.
        assert int(files[('attn', 0)][2].sum()) == int(files[('random', 0)][2].sum())


@pytest.mark.slow
def test_table_against_results(quick_study):
    out, stdout, results = quick_study
    table = (out / 'results.md').read_text()
    assert table.strip() in stdout
    rows = [line for line in table.splitlines() if re.match(r'\| 0\.\d\d \| (Taylor|random) \|', line)]
    assert len(rows) == 2 * 2
    by = runs_by_key(results)
    for line in rows:
        cells = [c.strip() for c in line.strip('|').split('|')]
        rate, mode = float(cells[0]), {'Taylor': 'attn', 'random': 'random'}[cells[1]]
        for column, finetuned in ((3, False), (4, True)):
            acc = np.array([by[(rate, mode, s, finetuned)]['acc1'] for s in (0, 1)])
            assert cells[column] == f'{acc.mean():.2f} ± {acc.std(ddof=1):.2f}', (line, acc)
        flops = np.mean([by[(rate, mode, s, False)]['gflops'] for s in (0, 1)])
        assert cells[2] == f'{flops:.4f}'
        assert cells[5] == '2'
    teacher = [line for line in table.splitlines() if line.startswith('| 0 | dense teacher |')]
    assert len(teacher) == 1 and f'| {results["teacher"]["acc1"]:.2f} |' in teacher[0]


@pytest.mark.slow
def test_sentences_against_the_numbers(quick_study):
    out, stdout, results = quick_study
    by = runs_by_key(results)
    table = (out / 'results.md').read_text()
    report = (out / 'STUDY.md').read_text()
    for c in results['paired']:
        rate, ft = c['prune_rate'], c['finetuned']
        taylor = [by[(rate, 'attn', s, ft)]['acc1'] for s in (0, 1)]
        random = [by[(rate, 'random', s, ft)]['acc1'] for s in (0, 1)]
        low, high = scipy_interval(taylor, random)
        mean = float(np.mean(np.subtract(taylor, random)))
        verdict, s_mean, s_low, s_high = parse_sentence(c['sentence'])
        assert c['sentence'].startswith(f'At prune rate {rate:.2f} ' +
                                        ('after 1 epoch of distillation finetuning' if ft else 'before finetuning'))
        assert (s_mean, s_low, s_high) == (round(mean, 2), round(low, 2), round(high, 2)), c['sentence']
        assert verdict == c['verdict'] == expected_verdict(low, high)
        assert c['ci_low'] == pytest.approx(low, abs=1e-9) and c['ci_high'] == pytest.approx(high, abs=1e-9)
        for text in (stdout, table, report):
            assert c['sentence'] in text


@pytest.mark.slow
def test_progress_figure_and_report(quick_study):
    out, stdout, _ = quick_study
    steps = re.findall(r'^\[(\d+)/16\] (prune|finetune) (Taylor|random) (0\.\d\d) seed (\d) \.\.\. '
                       r'elapsed \d+:\d\d, eta (\?|\d+:\d\d)$', stdout, flags=re.M)
    assert [int(s[0]) for s in steps] == list(range(1, 17))
    assert [s[1] for s in steps] == ['prune', 'finetune'] * 8
    assert all(s[5] != '?' for s in steps[2:])  # known once a prune and a finetune have finished
    from PIL import Image
    with Image.open(out / 'study.png') as img:
        assert img.format == 'PNG' and img.size[0] > 1.5 * img.size[1] > 600  # two panels side by side
    report = (out / 'STUDY.md').read_text()
    assert '![accuracy against GFLOPs](study.png)' in report
    assert '`python demo/study.py --quick --device cpu --out ' in report
    assert report.index('## Results') < report.index('## For README.md')
    readme_part = report.split('## For README.md', 1)[1]
    assert 'demo/study.png' in readme_part and 'demo/STUDY.md' in readme_part


@pytest.mark.slow
def test_second_run_reuses_the_teacher_and_clears_old_runs(quick_study, tmp_path):
    import shutil
    out, _, first = quick_study
    shutil.copytree(out / 'teacher', tmp_path / 'teacher')
    (tmp_path / 'seed7' / 'prune_attn_0.25').mkdir(parents=True)  # left over from a study with other seeds
    env = dict(os.environ, OMP_WAIT_POLICY='PASSIVE', PYTHONUNBUFFERED='1')
    proc = subprocess.run([sys.executable, os.path.join('demo', 'study.py'), '--quick', '--device', 'cpu',
                           '--seeds', '0', '--rates', '0.25', '--out', str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert 'reusing the teacher already trained in' in proc.stdout
    results = json.loads((tmp_path / 'results.json').read_text())
    assert results['teacher']['reused'] is True and results['teacher']['acc1'] == first['teacher']['acc1']
    assert not (tmp_path / 'seed7').exists()
    assert {(r['seed'], r['prune_rate']) for r in results['runs']} == {(0, 0.25)}
    # One seed: no interval, and the sentences say so.
    assert results['paired'] and all(c['ci_low'] is None and 'no interval' in c['sentence'] for c in results['paired'])
    # The same teacher and seed give the same runs as the first study's seed 0 (random masks included).
    before = {(r['prune_mode'], r['finetuned']): r for r in first['runs'] if (r['seed'], r['prune_rate']) == (0, 0.25)}
    for r in results['runs']:
        assert (r['masks_sha1'], r['acc1']) == (before[(r['prune_mode'], r['finetuned'])]['masks_sha1'],
                                                before[(r['prune_mode'], r['finetuned'])]['acc1'])
    assert 'reused from an earlier run' in (tmp_path / 'STUDY.md').read_text()


# ----------------------------------------------------------------------------------------------------------
# bad command lines and the teacher's reuse (fast: nothing is trained)

@pytest.mark.parametrize('argv,flag', [
    (['--seeds', '-1'], '--seeds'),
    (['--seeds', '0', str(2 ** 32)], '--seeds'),
    (['--seeds', '1', '1'], '--seeds'),
    (['--rates', '1.5'], '--rates'),
    (['--rates', '0'], '--rates'),
    (['--rates', '0.25', 'nan'], '--rates'),
    (['--rates', '0.25', '0.25'], '--rates'),
    (['--teacher-epochs', '0'], '--teacher-epochs'),
    (['--finetune-epochs', '0'], '--finetune-epochs'),
    (['--quick', '--finetune-epochs', '0'], '--finetune-epochs'),
    (['--teacher-lr', '-1'], '--teacher-lr'),
    (['--finetune-lr', 'nan'], '--finetune-lr'),
    (['--prune-batches', '0'], '--prune-batches'),
    (['--device', 'gpu'], '--device'),
    (['--out', 'FILE'], '--out'),
    (['--out', ''], '--out'),
    (['--out', 'FILE/sub'], '--out'),
    (['--seeds', 'x'], '--seeds'),
    (['--rates', '0.251', '0.254'], '--rates'),  # both would write seed<s>/prune_<mode>_0.25/
    (['--quick', '--rates', '0.40', '0.404'], '--rates'),
    (['--rates', '0.25', '0.0001'], '--rates'),  # clips no slot: failed after the teacher was trained
])
def test_bad_arguments_are_one_error_line_before_any_work(argv, flag, tmp_path, monkeypatch, capsys):
    """Each bad flag of study.py: exit code 2 and one line starting `error: ` that names it (no usage, no
    traceback), before anything is trained or written (neither --out nor the default runs/study is created)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'FILE').write_text('not a directory')
    monkeypatch.setattr(study, 'run_all', no_work)
    argv = [str(tmp_path / a) if a.startswith('FILE') else a for a in argv]
    if '--out' not in argv:
        argv += ['--out', str(tmp_path / 'out')]
    with pytest.raises(SystemExit) as e:
        study.main(argv)
    assert e.value.code == 2
    assert_one_error_line(capsys.readouterr().err, flag)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['FILE']


@pytest.mark.parametrize('quick', [False, True])
@pytest.mark.parametrize('path,kind', [('study.png', 'folder'), ('results.json', 'folder'), ('STUDY.md', 'folder'),
                                       ('teacher', 'file'), ('seed1', 'file'), ('seed1/finetune_random_0.25', 'file'),
                                       ('teacher/stdout.txt', 'folder'), ('teacher/eval.txt', 'folder')])
def test_a_path_in_the_way_of_an_output_is_refused_before_any_work(path, kind, quick, tmp_path, monkeypatch,
                                                                   capsys):
    """A folder where the study writes a file (results.json, study.png, ...) or a file where it writes a folder (the
    teacher's, a seed's, a stage's): the study trained everything, then failed at that write.  Refused before any
    work, as the demo refuses it, naming the path (among the runs --quick adds: seed 1, rate 0.25); nothing moved."""
    out = tmp_path / 'out'
    (out / os.path.dirname(path)).mkdir(parents=True, exist_ok=True)
    if kind == 'folder':
        (out / path).mkdir()
    else:
        (out / path).write_text('in the way')
    monkeypatch.setattr(study, 'run_all', no_work)
    argv = ['--quick'] if quick else ['--seeds', '0', '1', '--rates', '0.25']
    with pytest.raises(SystemExit) as e:
        study.main(argv + ['--out', str(out)])
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert_one_error_line(captured.err, f'--out {out}: {out / path} is in the way')
    assert captured.out == ''
    assert (out / path).is_dir() if kind == 'folder' else (out / path).read_text() == 'in the way'


def test_parser_names_its_script():
    """The sentence describing study.py is its description, not its prog (which starts the usage line)."""
    p = study.get_args_parser()
    assert p.prog == 'demo/study.py' and p.description
    assert p.format_usage().startswith('usage: demo/study.py ')


@pytest.mark.parametrize('stored_lr,stored_seed,reused', [(1e-3, study.TEACHER_SEED, True),
                                                          (2e-3, study.TEACHER_SEED, False),
                                                          (1e-3, study.TEACHER_SEED + 1, False)])
def test_teacher_reused_only_with_the_same_lr_and_seed(stored_lr, stored_seed, reused, tmp_path, monkeypatch):
    """run_all reports the teacher as reused only when the stored one has the study's --teacher-lr and its
    TEACHER_SEED, and trains the teacher with TEACHER_SEED (finetune.py's commands and the runs themselves are
    stubbed out: no seeds)."""
    import finetune
    teacher = tmp_path / 'teacher' / 'checkpoint.pth'
    teacher_checkpoint(teacher, finetune.cc_model_name(study.demo.MODEL), stored_lr, stored_seed, epochs=3, epoch=2)
    seen, train = {}, study.demo.train_teacher

    def train_teacher(teacher_dir, epochs, lr, common, *args, **kwargs):
        seen['seed'] = study.demo.seed_of(common)
        return train(teacher_dir, epochs, lr, common, *args, **kwargs)
    monkeypatch.setattr(study.demo, 'train_teacher', train_teacher)
    monkeypatch.setattr(study.demo, 'cli', lambda argv, *args, **kwargs: {'acc1': 90.0})
    monkeypatch.setattr(study, 'teacher_gflops', lambda: 0.05)
    a = study.get_args_parser().parse_args(['--teacher-epochs', '3', '--teacher-lr', '1e-3', '--seeds', '0',
                                            '--out', str(tmp_path)])
    a.seeds = []  # the teacher only
    row, runs, _ = study.run_all(a, str(tmp_path))
    assert row['reused'] is reused and runs == [] and seen['seed'] == study.TEACHER_SEED


def test_rates_need_folders_of_their_own_and_a_slot_to_clip():
    """Two rates with the same two decimals name the same folders; a rate must clip at least one of the model's
    (layer, patch) slots, counted as the prune stage counts them (from 1/slots on)."""
    import timm
    model = timm.create_model('cc_deit_digits_patch4_32')
    slots = len(model.blocks) * (model.num_tokens - model.num_prefix_tokens)
    assert study.model_slots() == (len(model.blocks), slots // len(model.blocks))
    with pytest.raises(study.UserError, match=r'--rates: 0\.251 and 0\.254 both round to 0\.25, the name of their '
                                              r'folders \(prune_<mode>_0\.25/\)'):
        study.check_rates([0.1, 0.251, 0.254])
    study.check_rates([0.25, 0.26, 0.005, 0.994])  # the smallest clips int(slots x 0.005) = 1 slot
    assert int(slots * 0.005) == 1
    for rate, named, what in ((1.0001 / slots, '0.00', 'nothing'), (0.996, '1.00', 'everything')):
        with pytest.raises(study.UserError, match=rf'--rates {rate:g} would be named {named} in its folders and '
                                                  rf'tables, as if {what} were pruned'):
            study.check_rates([0.25, rate])
    with pytest.raises(study.UserError, match=rf'--rates 0\.0001 clips int\({slots} x 0\.0001\) = 0 of the {slots} '
                                              r'\(layer, patch\) slots .*nothing would be pruned'):
        study.check_rates([0.25, 0.0001])
    with pytest.raises(study.UserError, match='nothing would be pruned'):
        study.check_rates([0.9999 / slots])


@pytest.mark.parametrize('extra,expected,said', [
    ([], {'seeds': [0, 1], 'rates': [0.25, 0.40], 'teacher_epochs': 2, 'finetune_epochs': 1, 'prune_batches': 4},
     '--quick set: --seeds 0 1, --rates 0.25 0.4, --teacher-epochs 2, --finetune-epochs 1, --prune-batches 4'),
    (['--seeds', '3', '4', '5', '--rates', '0.1', '0.2', '0.3'],
     {'seeds': [3, 4, 5], 'rates': [0.1, 0.2, 0.3], 'teacher_epochs': 2, 'finetune_epochs': 1, 'prune_batches': 4},
     '--quick set: --teacher-epochs 2, --finetune-epochs 1, --prune-batches 4'),
    (['--teacher-epochs', '10', '--finetune-epochs', '3', '--prune-batches', '7', '--seeds', '0', '1', '--rates',
      '0.25', '0.40'],
     {'seeds': [0, 1], 'rates': [0.25, 0.40], 'teacher_epochs': 10, 'finetune_epochs': 3, 'prune_batches': 7}, None),
])
def test_quick_sets_only_what_is_not_given(extra, expected, said, tmp_path, capsys, monkeypatch):
    """--quick shortens the flags left out and says which; a value given on the command line wins (it used to be
    cut: --seeds 3 4 5 ran seeds 3 and 4, --teacher-epochs 10 ran 2)."""
    p = study.get_args_parser()
    a = p.parse_args(['--quick', '--out', str(tmp_path / 'out')] + extra)
    study.check_args(p, a)  # (which creates nothing)
    assert {k: getattr(a, k) for k in expected} == expected
    assert not (tmp_path / 'out').exists()
    seen = {}
    monkeypatch.setattr(study, 'run_study', lambda a, argv, t0: seen.update(vars(a)) or 0)
    capsys.readouterr()
    assert study.main(['--quick', '--out', str(tmp_path / 'out')] + extra) == 0
    assert {k: seen[k] for k in expected} == expected
    lines = capsys.readouterr().out.splitlines()
    assert lines[:-1] == ([f'{said} (every other value as given or its default)'] if said else [])
    assert lines[-1].startswith('Taylor against random masks: ')
    quick = next(action for action in p._actions if action.dest == 'quick')
    assert study.demo.flags_text(study.QUICK) in quick.help  # --help says what it sets


def test_an_out_whose_name_is_not_utf8_text_is_refused_before_any_run(tmp_path, capsys):
    """TensorBoard writes only to folders named in UTF-8 text: an --out named otherwise (any name beyond ASCII under
    LC_ALL=C without UTF-8 mode) made the study's folder and stopped at its first stage; refused before, as the
    demo refuses it."""
    out = str(tmp_path / os.fsdecode(b'out\xff'))
    with pytest.raises(SystemExit) as e:
        study.main(['--quick', '--out', out])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r'error: cannot write to --out .*out\\udcff: TensorBoard writes only to a folder whose name '
                        r'is UTF-8 text[^\n]*\n', err), err
    assert os.listdir(tmp_path) == []


def test_standard_output_that_cannot_be_written_is_one_line_before_any_run(tmp_path, capsys, monkeypatch):
    """`study.py > /dev/full` (or `| head` whose reader has gone): an OSError traceback with exit code 1 at its
    first line; now one error line, exit 2, and no teacher trained."""
    monkeypatch.setattr(sys, 'stdout', FullAfter(0))
    assert study.main(['--quick', '--out', str(tmp_path / 'out')]) == 2
    assert_one_error_line(capsys.readouterr().err, f'cannot write to standard output: {os.strerror(28)}')
    assert os.listdir(tmp_path / 'out') == []


def fake_stages(monkeypatch, tmp_path, fail_at=None, stop=None):
    """run_all's stages stubbed out: each writes its directory as the real one does (emptied first, a checkpoint
    inside); the ``fail_at``-th finetuning stops the study as a diverged stage does (or raises ``stop``)."""
    teacher = tmp_path / 'teacher' / 'checkpoint.pth'
    calls = []

    def stage(path_name, where):
        def run(*args, **kwargs):
            out_dir = args[where]  # prune(teacher, mode, rate, out_dir, ...), distill(pruned, teacher, out_dir, ...)
            calls.append(out_dir)
            if fail_at is not None and len(calls) == fail_at:
                raise (stop or study.demo.StageDiverged('stage diverged'))
            import shutil
            shutil.rmtree(out_dir, ignore_errors=True)
            os.makedirs(out_dir)
            path = os.path.join(out_dir, path_name)
            open(path, 'w').close()
            return {'path': path, 'acc1': 50.0, 'gflops': 0.03, 'channels': [65] * 6}
        return run
    monkeypatch.setattr(study.demo, 'train_teacher', lambda *a, **k: (str(teacher), 90.0, False))
    monkeypatch.setattr(study.demo, 'prune', stage('pruned.pth', 3))
    monkeypatch.setattr(study.demo, 'distill', stage('checkpoint.pth', 2))
    monkeypatch.setattr(study, 'teacher_gflops', lambda: 0.05)
    monkeypatch.setattr(study, 'masks_sha1', lambda path: 'sha1')


@pytest.mark.parametrize('kind,code,said', [('user', 2, 'error: stage teacher: cannot write '),
                                            ('nan', 3, 'error: stage teacher diverged: loss is nan')])
def test_a_stage_that_stops_ends_the_study_as_finetune_py_would(kind, code, said, tmp_path, monkeypatch, capsys):
    """A stage's finetune.py run stopped by a user error found midway (a full disk) or a diverged loss: one
    `error:` line naming the stage, and finetune.py's exit code (2, 3), not a bare line and exit code 1."""
    import finetune

    def stops(args):
        if kind == 'user':
            raise study.UserError('cannot write x/checkpoint.pth: No space left on device')
        raise finetune.NonFiniteLossError('loss is nan at epoch 0, step 0; stopped')
    monkeypatch.setattr(finetune, 'run', stops)
    assert study.main(['--quick', '--device', 'cpu', '--out', str(tmp_path / 'out')]) == code
    err = capsys.readouterr().err
    assert_one_error_line(err, said)
    assert err.startswith(said) and '(full output: ' in err, err


def test_study_help_gives_each_default():
    """Every flag with a value by default says it in --help (the learning rates said nothing, the epochs 'as the
    demo' and not how many)."""
    assert flags_not_saying_their_default(study.get_args_parser()) == []


def test_study_trains_as_the_demo_unless_told_otherwise():
    """The budget flags the study shares with the demo (epochs, learning rates, scoring batches) default to the
    demo's: a teacher the demo trained is then the study's to reuse (teacher_check compares epochs, lr and seed)."""
    ours, demos = study.get_args_parser().parse_args([]), study.demo.get_args_parser().parse_args([])
    shared = ('teacher_epochs', 'teacher_lr', 'finetune_epochs', 'finetune_lr', 'prune_batches')
    assert {k: getattr(ours, k) for k in shared} == {k: getattr(demos, k) for k in shared}


@pytest.mark.parametrize('fresh', [False, True])
def test_ctrl_c_ends_the_study_with_one_line_and_exit_130(fresh, tmp_path, monkeypatch, capsys):
    assert_ctrl_c_ends_the_script(study.main, 'study', tmp_path, monkeypatch, capsys, fresh)


@pytest.mark.parametrize('fresh', [False, True])
def test_sigterm_ends_the_study_as_ctrl_c_does_with_exit_143(fresh, tmp_path, monkeypatch, capsys):
    assert_ctrl_c_ends_the_script(study.main, 'study', tmp_path, monkeypatch, capsys, fresh, sigterm=True)


@pytest.mark.parametrize('sigterm', [False, True])
def test_a_stop_in_a_later_step_names_that_step(sigterm, tmp_path, monkeypatch, capsys):
    """The one line of a Ctrl-C (SIGTERM) names the step under way as its header numbers it, not the teacher's."""
    from utils.signals import Terminated
    fake_stages(monkeypatch, tmp_path, fail_at=2, stop=Terminated if sigterm else KeyboardInterrupt)
    out = tmp_path / 'out'
    assert study.main(['--quick', '--device', 'cpu', '--out', str(out)]) == (143 if sigterm else 130)
    captured = capsys.readouterr()
    header = next(line for line in captured.out.splitlines() if line.startswith('[2/'))
    total, step = re.fullmatch(r'\[2/(\d+)\] (.*) \.\.\. elapsed .*', header).groups()
    said = 'terminated (SIGTERM)' if sigterm else 'interrupted'
    assert captured.err.startswith(f'{said} during step 2/{total} ({step}); run the study again to go on ') and \
        captured.err.count('\n') == 1, captured.err
    assert not (out / 'results.json').exists()


def test_earlier_runs_are_removed_only_once_the_study_has_finished(tmp_path, monkeypatch):
    """An earlier study's runs (another seed, another rate) stay while this one runs: a study that stops midway
    leaves them; one that finishes removes them and keeps its own."""
    earlier = ['seed7/prune_attn_0.25/pruned.pth', 'seed0/prune_attn_0.55/pruned.pth', 'seed0/stray.txt']
    for name in earlier:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text('earlier')
    a = study.get_args_parser().parse_args(['--seeds', '0', '--rates', '0.25', '--out', str(tmp_path)])
    fake_stages(monkeypatch, tmp_path, fail_at=2)  # the first finetuning stops it
    with pytest.raises(study.demo.StageDiverged):
        study.run_all(a, str(tmp_path))
    assert all((tmp_path / name).read_text() == 'earlier' for name in earlier)
    fake_stages(monkeypatch, tmp_path)
    _, runs, _ = study.run_all(a, str(tmp_path))
    assert len(runs) == 4
    left = sorted(os.path.relpath(os.path.join(d, f), tmp_path) for d, _, fs in os.walk(tmp_path) for f in fs)
    assert left == ['seed0/finetune_attn_0.25/checkpoint.pth', 'seed0/finetune_random_0.25/checkpoint.pth',
                    'seed0/prune_attn_0.25/pruned.pth', 'seed0/prune_random_0.25/pruned.pth']


def test_an_earlier_seed_folder_that_is_a_link_is_removed_as_a_link(tmp_path, monkeypatch):
    """<out>/seed7, a symbolic link to a folder elsewhere: the study emptied the folder it names (deleting files
    outside --out), then ended in a NotADirectoryError traceback, exit code 1, without its results.  The link is
    removed, what it names left as it was."""
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    (elsewhere / 'precious.txt').write_text('keep')
    out = tmp_path / 'out'
    out.mkdir()
    os.symlink(elsewhere, out / 'seed7')
    a = study.get_args_parser().parse_args(['--seeds', '0', '--rates', '0.25', '--out', str(out)])
    fake_stages(monkeypatch, out)
    assert len(study.run_all(a, str(out))[1]) == 4
    assert not os.path.lexists(out / 'seed7') and sorted(os.listdir(out)) == ['seed0']
    assert (elsewhere / 'precious.txt').read_text() == 'keep'


def test_failed_figure_write_keeps_the_previous_files(tmp_path, monkeypatch, capsys):
    """A disk that fills while study.png is written: one error line, exit code 2, the previous figure intact (no
    truncated one, no temporary file) and the previous results.json not replaced by one without its figure."""
    import errno
    import matplotlib.figure
    fake_stages(monkeypatch, tmp_path)
    (tmp_path / 'study.png').write_bytes(b'previous figure')
    (tmp_path / 'results.json').write_text('previous results')

    def full_disk(fig, f, **kwargs):
        f.write(b'\x89PNG partial')
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(matplotlib.figure.Figure, 'savefig', full_disk)
    code = study.main(['--seeds', '0', '1', '--rates', '0.25', '--device', 'cpu', '--out', str(tmp_path)])
    assert code == 2
    assert_one_error_line(capsys.readouterr().err, 'No space left on device')
    assert (tmp_path / 'study.png').read_bytes() == b'previous figure'
    assert (tmp_path / 'results.json').read_text() == 'previous results'
    assert not [f for f in os.listdir(tmp_path) if '.tmp-' in f]


def test_rates_given_out_of_order_are_reported_in_ascending_order_everywhere(tmp_path, monkeypatch, capsys):
    """--rates 0.55 0.25: the cells table was sorted but the paired table, the sentences and the README verdicts
    kept the given order, so one paragraph listed 0.55, 0.25 and the next 0.25, 0.55; all go by rate now."""
    fake_stages(monkeypatch, tmp_path)
    assert study.main(['--seeds', '0', '1', '--rates', '0.55', '0.25', '--device', 'cpu', '--out', str(tmp_path)]) == 0
    results = json.loads((tmp_path / 'results.json').read_text())
    assert [c['prune_rate'] for c in results['paired']] == [0.25, 0.25, 0.55, 0.55]
    assert [c['prune_rate'] for c in results['cells']] == [0.25] * 4 + [0.55] * 4
    table = (tmp_path / 'STUDY.md').read_text()
    rows = [line.split(' | ')[0] for line in table.splitlines() if line.startswith(('| 0.25 |', '| 0.55 |'))]
    assert rows == ['| 0.25'] * 2 + ['| 0.55'] * 2 + ['| 0.25'] * 2 + ['| 0.55'] * 2  # cells, then paired


@pytest.mark.parametrize('seeds', [['0'], ['0', '1'], ['0', '1', '2']])
def test_report_note_on_the_interval_matches_the_number_of_seeds(seeds, tmp_path, monkeypatch, capsys):
    """STUDY.md's note under the tables describes the interval the comparisons have: with one seed there is none
    (the sentences say 'no interval'), so the note must not describe a t-interval with 0 degrees of freedom."""
    fake_stages(monkeypatch, tmp_path)
    assert study.main(['--seeds', *seeds, '--rates', '0.25', '--device', 'cpu', '--out', str(tmp_path)]) == 0
    report = ' '.join((tmp_path / 'STUDY.md').read_text().split())
    results = json.loads((tmp_path / 'results.json').read_text())
    n = len(seeds)
    if n == 1:
        assert all(c['ci_low'] is None for c in results['paired'])
        assert 't-interval of the mean' not in report and 'degrees of freedom' not in report
        assert 'With one seed there is one paired difference (Taylor minus random) and no interval' in report
        assert f'one seed ({seeds[0]}): no standard deviation' in report and 'standard deviation (n - 1)' not in report
    else:
        assert f'mean ± standard deviation (n - 1) over seeds {", ".join(seeds)}' in report
        assert all(c['ci_low'] is not None and c['df'] == n - 1 for c in results['paired'])
        assert (f'95% Student t-interval of the mean of the {n} paired differences (Taylor minus random, same seed), '
                f'with {n - 1} degree{"s" if n != 2 else ""} of freedom') in report
