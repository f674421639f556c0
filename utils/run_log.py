"""A finetuning run's ``log.txt`` (one JSON record per finished epoch) and its TensorBoard scalars, read back
and repaired when a run continues after a kill."""
import json
import os
from typing import Callable, Dict, List, Optional, Set

from .checkpoint_io import write_text_atomic
from .errors import UserError
from .progress import TensorBoard


def read_log(log_path: str) -> Dict[int, dict]:
    """The records of a run's ``log.txt`` by epoch ({} without the file): one JSON object per line, each with its
    ``epoch`` (a later line of the same epoch wins).  Blank lines and a record cut by a kill (an object that does
    not decode) are passed over; any other line is a user error: the file is not a run's log, and the rewrite of a
    continued run would lose it."""
    records = _records(log_path, 'epoch', lambda epoch: isinstance(epoch, int) and not isinstance(epoch, bool),
                       'a run', 'the run rewrites its log when it continues')
    return {record['epoch']: record for record in records}


def check_prune_log(log_path: str) -> None:
    """``prune_log.txt``, which each ``--prune`` appends its record to (a JSON object with its ``prune_mode``), is,
    if it is there already, the log of earlier prunes, by :func:`read_log`'s rule: any other file (notes, another
    tool's output) is a user error, not a file to append to."""
    _records(log_path, 'prune_mode', lambda mode: isinstance(mode, str), '--prune',
             '--prune appends its results to it')


def _records(log_path: str, key: str, valid: Callable[[object], bool], whose: str, why: str) -> List[dict]:
    """The records of a results file of one JSON object per line, each with its ``key`` (``valid``), in order ([]
    without the file); blank lines and a record cut by a kill are passed over.  Any other line, or a file that is
    not text, is a user error saying the file is not the log of ``whose`` and, ``why``, to move it away."""
    if not os.path.isfile(log_path):
        return []
    try:
        with open(log_path, encoding='utf-8') as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError:
        raise UserError(f'{log_path} is not a text file, not the log of {whose} (move it away)') from None
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            record = None
        except RecursionError:  # (nested thousands deep: no record, and not one cut by a kill)
            record = False
        if record is None and (not line.strip() or line.startswith('{')):
            continue  # blank, or a record cut by a kill
        if not (isinstance(record, dict) and valid(record.get(key))):
            raise UserError(f'{log_path} line {number} is not a record of {whose} (a JSON object with its {key}): '
                            f'{line[:60]!r}; {why}, so move the file away')
        records.append(record)
    return records


def reconcile_log(log_path: str, last_epoch: int, last_stats: Optional[dict]) -> bool:
    """Make ``log.txt`` hold each finished epoch (0..last_epoch) exactly once after a resume; returns whether the
    last epoch's line was missing (the run was stopped between its checkpoint and its log line) and was restored
    from ``last_stats``."""
    entries = {epoch: json.dumps(record) for epoch, record in read_log(log_path).items() if epoch <= last_epoch}
    restored = last_stats is not None and last_epoch not in entries
    if restored:
        entries[last_epoch] = json.dumps(last_stats)
    write_text_atomic(log_path, ''.join(entries[e] + '\n' for e in sorted(entries)))
    return restored


def epoch_tags(log_stats: dict) -> Dict[str, float]:
    """An epoch's ``log.txt`` record as TensorBoard scalars: train_<k> as train/<k>, test_<k> as test/<k>."""
    return {f'{prefix}/{k[len(prefix) + 1:]}': v for prefix in ('train', 'test') for k, v in log_stats.items()
            if k.startswith(prefix + '_') and isinstance(v, (int, float))}


def epoch_scalars(tb: TensorBoard, log_stats: dict, epoch: int, written: Set[str] = frozenset()) -> None:
    """An epoch's :func:`epoch_tags` to TensorBoard at step ``epoch``, but for the tags in ``written`` (there
    already)."""
    tb.scalars({tag: v for tag, v in epoch_tags(log_stats).items() if tag not in written}, epoch)


def events_files(directory: str) -> List[str]:
    """The names of the TensorBoard events files in ``directory`` (not in its subfolders), sorted; [] without the
    folder."""
    if not os.path.isdir(directory):
        return []
    return sorted(name for name in os.listdir(directory)
                  if name.startswith('events.out.tfevents') and os.path.isfile(os.path.join(directory, name)))


def scalars_at(directory: str, step: int) -> Set[str]:
    """The scalar tags that the TensorBoard events files of ``directory`` (not of its subfolders) hold at ``step``;
    a record cut by a kill ends its file's reading."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    tags: Set[str] = set()
    for name in events_files(directory):
        for event in EventFileLoader(os.path.join(directory, name)).Load():
            if event.step == step and event.HasField('summary'):
                tags.update(value.tag for value in event.summary.value)
    return tags
