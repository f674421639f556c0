"""Shared fixtures: the repository on sys.path, tiny image folders and official-format checkpoints."""
import io
import os
import signal
import sys

import numpy as np
import pytest
import torch

# --- fast path (tests/test_fast_path.py): without a GPU, run its Triton kernels in Triton's CPU interpreter.
# Triton reads this when @triton.jit decorates a kernel (at import of models.fast_kernels), so it is set here,
# before any test module imports it; on a CUDA machine the real kernels run.
if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')
# --- end fast path

# --- `make test` runs the files in parallel (pytest-xdist, a worker per core): unless OMP_NUM_THREADS says otherwise,
# each worker, and the CLI runs its tests start, computes on one thread, so that the workers share the cores
# instead of oversubscribing them.
if os.environ.get('PYTEST_XDIST_WORKER') and 'OMP_NUM_THREADS' not in os.environ:
    os.environ['OMP_NUM_THREADS'] = '1'
    torch.set_num_threads(1)

# --- Ctrl-C as a terminal sends it: a shell without job control starts a background command (`make test &` in a
# script, nohup) with SIGINT ignored, and a process inherits that through exec, so the tests that send SIGINT to a
# run would find it ignored, as a run started that way rightly does.  Python's own handler here (the workers and the
# runs the tests start then begin with SIGINT at its default, as under a terminal).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import models  # noqa: E402  (also registers cc_deit_* with timm)
import timm.layers.attention  # noqa: E402


# --- fast path: the bounds of every interpreted kernel's loads and stores

def _extents(tensors) -> tuple:
    """(first bytes, ends) as sorted uint64 arrays: of each tensor's elements as its sizes and strides reach them
    (a view: only its own)."""
    out = []
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel():
            span = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
            out.append((t.data_ptr(), t.data_ptr() + span * t.element_size()))
    out.sort()
    return np.array([a for a, _ in out], dtype=np.uint64), np.array([b for _, b in out], dtype=np.uint64)


def _outside(extents, addresses, itemsize: int):
    """The addresses (numpy uint64) whose ``itemsize`` bytes do not lie inside one of ``extents`` (:func:`_extents`)."""
    starts, ends = extents
    if not len(starts):
        return addresses
    i = np.searchsorted(starts, addresses, side='right').astype(np.int64) - 1
    inside = (i >= 0) & (addresses + np.uint64(itemsize) <= ends[np.maximum(i, 0)])
    return addresses[~inside]


@pytest.fixture(autouse=True)
def kernels_stay_inside_their_tensors(monkeypatch):
    """Under Triton's interpreter, every load and store a kernel makes (the lanes its mask lets through) must fall
    inside the elements of a tensor it was given, as that tensor's sizes and strides reach them.  On a GPU an
    access past them reads or overwrites another tensor, or faults (an illegal address ends the process, and
    with it a benchmark's remaining rows); the interpreter reads and writes host memory and would not notice.
    Yields a list a test appends the tensors to that a kernel may reach without being given them (the images a
    patch embedding reads at an address held in memory)."""
    also = []
    from models import fast_kernels as K
    if not K.INTERPRETER:
        yield also
        return
    from triton.runtime import interpreter as interp
    given = [_extents([])]  # the launch's (:func:`_extents`), set as it starts
    init = interp.GridExecutor._init_args_hst

    def init_args(self, args_dev, kwargs):
        args_hst, kwargs_hst = init(self, args_dev, kwargs)
        given[0] = _extents([*args_hst, *kwargs_hst.values(), *also])
        return args_hst, kwargs_hst

    def checked(access, what):
        def run(self, ptrs, *rest):  # load(ptrs, mask, other, ...), store(ptrs, value, mask, ...)
            mask = rest[0] if what == 'load' else rest[1]
            value_size = (interp._get_np_dtype(ptrs.get_element_ty()).itemsize if what == 'load'
                          else rest[0].data.dtype.itemsize)
            addresses = np.asarray(ptrs.data)[np.broadcast_to(mask.data, np.shape(ptrs.data))]
            stray = _outside(given[0], addresses.astype(np.uint64).ravel(), value_size)
            assert not stray.size, (f'a kernel {what}s {stray.size} element(s) outside the tensors it was given '
                                    f'(first at {int(stray[0]):#x}; the tensors: {[hex(int(a)) for a in given[0][0]]})')
            return access(self, ptrs, *rest)
        return run
    monkeypatch.setattr(interp.GridExecutor, '_init_args_hst', init_args)
    monkeypatch.setattr(interp.InterpreterBuilder, 'create_masked_load',
                        checked(interp.InterpreterBuilder.create_masked_load, 'load'))
    monkeypatch.setattr(interp.InterpreterBuilder, 'create_masked_store',
                        checked(interp.InterpreterBuilder.create_masked_store, 'store'))
    yield also


def make_image_folder(root, classes=('a', 'b', 'c'), per_class=(4, 2), size=(40, 48), seed=0):
    """IMNET layout: root/train/<class>/*.png and root/val/<class>/*.png with random RGB images."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split, n in zip(('train', 'val'), per_class):
        for c in classes:
            d = os.path.join(root, split, c)
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(os.path.join(d, f'{i}.png'))
    return str(root)


def official_checkpoint(path, model_name='cc_deit_tiny_patch16_224', seed=0, **kwargs):
    """An official-DeiT-format file: {"model": state_dict} with timm's keys and no masks."""
    import timm
    torch.manual_seed(seed)
    model = timm.create_model(model_name, **kwargs)
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith('attn.token_index')}
    torch.save({'model': sd}, path)
    return str(path)


def teacher_checkpoint(path, model, lr, seed, epochs, epoch, weights_of=None):
    """A teacher's checkpoint.pth as finetune.py writes it for the demo and the study, reduced to what they read
    before reusing it: the weights of ``weights_of`` (a registered cc_ name, ``model`` if None; seeded random),
    ``args`` (the demo passes --unscale-lr, so ``lr`` is the one given) and the last ``epoch``."""
    torch.manual_seed(seed)
    state = models.build_model(weights_of or model, 10).state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({'model': state, 'epoch': epoch, 'args': {'model': model, 'final_finetune': epochs, 'lr': lr,
                                                          'seed': seed, 'unscale_lr': True}}, path)
    return str(path)


def digits_world(base):
    """The small world of the CLI tests: four-class 32x32 image folders (8 training and 4 validation images per
    class) and an official-format checkpoint of the digits model, under ``base``."""
    data = make_image_folder(base / 'data', classes=tuple('abcd'), per_class=(8, 4), size=(32, 32))
    dense = official_checkpoint(base / 'dense.pth', 'cc_deit_digits_patch4_32')
    return {'base': base, 'data': data, 'dense': dense}


def run_demo_script(script, out, timeout):
    """``python demo/<script> --quick --device cpu --out <out>`` as a user runs it; returns its stdout."""
    import subprocess
    env = dict(os.environ, OMP_WAIT_POLICY='PASSIVE', PYTHONUNBUFFERED='1')
    proc = subprocess.run([sys.executable, os.path.join('demo', script), '--quick', '--device', 'cpu',
                           '--out', str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def pruned_model(name, rate, seed=0):
    """timm model ``name`` (a registered cc_ name) with a seeded random init and random masks at ``rate``."""
    import timm
    import pruning
    torch.manual_seed(seed)
    model = timm.create_model(name).eval()
    if rate:
        depth, num_patches = len(model.blocks), model.num_tokens - model.num_prefix_tokens
        pruning.apply_masks(model, pruning.random_masks(depth, num_patches, rate,
                                                        generator=torch.Generator().manual_seed(seed)))
    return model


def launched(monkeypatch, **variables):
    """The environment torchrun gives one of its processes (rendezvous at a local port), with ``variables`` set
    over it (a value None: that variable unset)."""
    env = dict(RANK='0', WORLD_SIZE='2', LOCAL_RANK='0', MASTER_ADDR='127.0.0.1', MASTER_PORT='29500')
    for name, value in {**env, **variables}.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)


def formula_macs(model, kept_counts):
    """The method's multiply-accumulates written out from the model's shapes, the reference for models.count_macs:
    the patch embedding (a product of kernel area x input channels by C per patch), then per block with n kept
    tokens qkv 3nC², attention 2n²C, projection nC² and MLP 8nC² (an MLP 4C wide), then the head."""
    C, proj = model.embed_dim, model.patch_embed.proj
    assert model.blocks[0].mlp.fc1.out_features == 4 * C
    embed = model.patch_embed.num_patches * proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1] * C
    blocks = sum(3 * n * C * C + 2 * n * n * C + n * C * C + 8 * n * C * C for n in kept_counts)
    return embed + blocks + C * model.head.out_features


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / 'data')


# --- for the CLI runs of test_errors.py, test_resume.py and test_distributed.py -----------------------------

# The small registered model on 32x32 image folders, no augmentation that needs many images.
DIGITS_ARGS = ['--model', 'deit_digits_patch4_32', '--device', 'cpu', '--num_workers', '0', '--batch-size', '8',
               '--mixup', '0', '--cutmix', '0', '--aa', 'none', '--reprob', '0', '--print-freq', '100']

# torch's message for a CUDA allocation that failed (c10's caching allocator, torch 2.11), shortened at the end,
# and the figures of it that the command line's one error line quotes
OUT_OF_MEMORY = ('CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 7.63 GiB of which '
                 '1.06 GiB is free. Including non-PyTorch memory, this process has 6.56 GiB memory in use. Of the '
                 'allocated memory 6.20 GiB is allocated by PyTorch, and 120.00 MiB is reserved by PyTorch but '
                 'unallocated. If reserved but unallocated memory is large try setting '
                 'PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.')
OUT_OF_MEMORY_FIGURES = 'Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 7.63 GiB of which 1.06 GiB is free'


def free_port():
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _process_tree(pid):
    """``pid`` and every process it started, and they started, that is still running (Linux: read from /proc)."""
    children = {}
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                with open(f'/proc/{entry}/stat') as f:
                    ppid = int(f.read().rsplit(')', 1)[1].split()[1])  # the name, in parentheses, may hold blanks
            except (OSError, ValueError, IndexError):
                continue  # ended meanwhile
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def run_process_tree(cmd, timeout, **kwargs):
    """``subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)`` for a command that starts
    processes of its own (a distributed launcher and its workers, DataLoader workers): past ``timeout`` every
    process it started is killed, not only the first (subprocess.run's kill leaves the workers running, holding
    their ports and the cores of the tests after it, and torch's launcher starts each worker in a session of its
    own, out of reach of a kill of the command's group), and the test fails with the command's last output, which
    says where it stood, instead of a bare TimeoutExpired."""
    import signal
    import subprocess
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in _process_tree(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            stdout, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # a process started after the tree was read still holds the pipes
            stdout = stderr = '(not read: the pipes were still open 30 s after the kill)'
        pytest.fail(f'timed out after {timeout} s: {" ".join(map(str, cmd))}\n--- its last output:\n'
                    f'{stdout[-3000:]}\n--- stderr:\n{stderr[-3000:]}', pytrace=False)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def subprocess_env():
    """The environment for a CLI subprocess: no launcher variables leaking in from the test process."""
    env = {k: v for k, v in os.environ.items()
           if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT', 'LOCAL_WORLD_SIZE')}
    env['PYTHONPATH'] = ROOT
    env['PYTHONUNBUFFERED'] = '1'  # as torchrun's `python -u` workers: output must come in whole lines anyway
    env.setdefault('OMP_NUM_THREADS', '1')  # as torchrun does: no thread oversubscription on a shared machine
    return env


@pytest.fixture
def one_thread():
    """Run in-process CLI work on one thread: on a busy 2-core machine, two threads spin against other jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# the demo scripts' command lines (tests/test_demo.py, tests/test_study.py)

def exit_code(main, argv):
    """``main(argv)``'s exit code, whether returned or raised as SystemExit."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


class FullAfter(io.StringIO):
    """Standard output that takes ``lines`` writes, then fails as a full disk does (`> /dev/full`)."""

    def __init__(self, lines: int = 0):
        super().__init__()
        self.left = lines

    def write(self, text):
        if self.left <= 0:
            raise OSError(28, os.strerror(28))
        self.left -= 1
        return super().write(text)


def assert_one_error_line(err, flag):
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and flag in lines[0], err
    assert 'Traceback' not in err


def assert_ctrl_c_ends_the_script(main, script, tmp_path, monkeypatch, capsys, fresh=False, sigterm=False):
    """Ctrl-C (``sigterm``: SIGTERM, raised as Terminated) in a stage of the demo or the study (``script``: 'demo',
    'study'; ``main`` its entry point) ends it as finetune.py ends: one line saying what running it again does,
    exit code 130 (143), no traceback, the line naming the stage under way (the teacher's).  A run of --fresh is to
    be run again without it: --fresh would retrain the teacher it kept."""
    import finetune

    def interrupted(args):
        raise finetune.Terminated if sigterm else KeyboardInterrupt
    monkeypatch.setattr(finetune, 'run', interrupted)
    fresh_flag = ['--fresh'] if fresh else []
    assert main(['--quick', '--device', 'cpu', '--out', str(tmp_path / 'out')] + fresh_flag) == (143 if sigterm
                                                                                                else 130)
    again = 'again without --fresh' if fresh else 'again'
    said = 'terminated (SIGTERM)' if sigterm else 'interrupted'
    during = {'demo': 'stage 1 (teacher)', 'study': 'the teacher stage'}[script]
    assert capsys.readouterr().err == (f'{said} during {during}; run the {script} {again} to go on (a teacher in '
                                       f'{tmp_path / "out" / "teacher"}, trained wholly or in part, is reused; every '
                                       f'other stage is redone)\n')


def flags_not_saying_their_default(parser):
    """The flags of ``parser`` that have a value by default which their --help does not give ('default X'): what a
    run does unasked (lists are left out: their help writes them out, 0.40 for 0.4)."""
    import argparse
    formatter = parser._get_formatter()
    return [action.option_strings for action in parser._actions
            if action.default not in (None, False, argparse.SUPPRESS) and not isinstance(action.default, list)
            and f'default {action.default}' not in formatter._expand_help(action)]


def no_work(*_args, **_kwargs):
    raise AssertionError('work started despite a bad command line')


@pytest.fixture(autouse=True, scope='session')
def subprocess_tmpdir(tmp_path_factory):
    """The processes the tests start keep their temporary files in this session's pytest folder, which pytest
    removes with its old sessions: torch's launchers leave a torchelastic_* folder behind in the temporary folder
    after every job, and a run the tests kill leaves Python's pymp-* folders, so without this each `make test` added
    several folders to /tmp for good.  torch.compile's cache stays where it was (it lives in the temporary folder by
    default), so the compiles of one run are reused by the next.  The test process itself keeps the folder it has
    (tempfile read TMPDIR when pytest made its own folder)."""
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir  # torch's own rule (private: may move)
    except ImportError:
        pass  # then the subprocesses compile into this session's folder: slower, the same results
    else:
        os.environ['TORCHINDUCTOR_CACHE_DIR'] = cache_dir()  # before TMPDIR moves: cache_dir() follows it
    with pytest.MonkeyPatch.context() as mp:  # (the session's monkeypatch: TMPDIR as it was afterwards)
        mp.setenv('TMPDIR', str(tmp_path_factory.mktemp('tmp')))
        yield os.environ['TMPDIR']


CUDA_ONLY_REASON = 'needs a CUDA GPU'


def pytest_collection_modifyitems(config, items):
    """On a machine with a GPU the CUDA-only tests run first: a GPU session is short, and if its time limit cuts
    the run, what is lost should be the tests that also run on CPU.  (Elsewhere they are skipped; order kept.)"""
    if torch.cuda.is_available():
        items.sort(key=lambda item: not any(m.name == 'skipif' and m.kwargs.get('reason') == CUDA_ONLY_REASON
                                            for m in item.iter_markers()))


class NarrowAttention(timm.layers.attention.Attention):
    """timm's attention with heads of 16 channels whatever the width: qkv maps C to 3*H*16 and proj H*16 to C."""

    def __init__(self, dim, **kwargs):
        super().__init__(dim, attn_head_dim=16, **kwargs)
