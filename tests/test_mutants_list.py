"""tests/mutants.py (``make mutants``, not part of ``make test``) stays usable: every mutant's snippet is found
exactly once in its file (code edited since leaves the mutant planting nothing: 'stale'), and every test it names
is defined in the test file it names, so a run of ``make mutants`` checks what its list says."""
import os
import re
import sys

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, 'tests'))
import mutants  # noqa: E402


def test_every_mutant_plants_its_edits_and_names_tests_that_exist():
    problems = []
    for m in mutants.MUTANTS:
        problems += [f'{m.name}: {p}' for p in mutants.stale_edits(m, ROOT)]
        for test_id in m.tests:
            path, _, name = test_id.partition('::')
            name = name.split('[')[0].split('::')[-1]  # (a parametrised id, a test in a class)
            text = open(os.path.join(ROOT, path)).read() if os.path.isfile(os.path.join(ROOT, path)) else ''
            if not re.search(rf'^\s*def {re.escape(name)}\(', text, re.M):
                problems.append(f'{m.name}: no test {test_id}')
    names = [m.name for m in mutants.MUTANTS]
    problems += [f'{n}: named twice' for n in sorted(set(n for n in names if names.count(n) > 1))]
    assert not problems, problems
