"""Every link of the repository's Markdown files leads somewhere: a relative path names a file or folder of the
repository, and an anchor (``#...``) names a heading of the file it points into, made into an anchor as GitHub
makes them (lower case; characters other than letters, digits, blanks, '-' and '_' dropped; blanks as '-').
Links inside fenced code blocks are text, not links (STUDY.md's paragraph for the README is one)."""
import os
import re

import pytest

from conftest import ROOT

SKIPPED_FOLDERS = {'.git', '.venv', '.whl', 'runs', '.pytest_cache', '__pycache__'}
LINK = re.compile(r'\[[^\]]*\]\(([^)\s]+)\)')  # [text](target) and ![alt](target)


def markdown_files():
    for folder, folders, files in os.walk(ROOT):
        folders[:] = sorted(f for f in folders if f not in SKIPPED_FOLDERS)
        for name in sorted(files):
            if name.endswith('.md'):
                yield os.path.relpath(os.path.join(folder, name), ROOT)


def prose_lines(path):
    """The lines of a Markdown file outside its fenced code blocks."""
    fenced = False
    with open(os.path.join(ROOT, path), encoding='utf-8') as f:
        for line in f:
            if line.lstrip().startswith('```'):
                fenced = not fenced
            elif not fenced:
                yield line


def anchor(heading: str) -> str:
    return re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')


def anchors(path):
    return {anchor(line.lstrip('#')) for line in prose_lines(path) if re.match(r'#{1,6} ', line)}


def test_the_anchor_rule_on_headings_of_this_repository():
    """The rule against anchors GitHub gives these headings (seen on its rendering of such headings)."""
    assert anchor("Speed: measured here beside the paper's") == 'speed-measured-here-beside-the-papers'
    assert anchor('Fast inference on a GPU (`--fast-path`)') == 'fast-inference-on-a-gpu---fast-path'
    assert anchor('Clip & Concat on other ViTs') == 'clip--concat-on-other-vits'


@pytest.mark.parametrize('path', list(markdown_files()))
def test_every_link_leads_somewhere(path):
    broken = []
    for line in prose_lines(path):
        for target in LINK.findall(line):
            if re.match(r'[a-z]+:', target):  # https:, mailto:: not checked here (no network)
                continue
            file, _, fragment = target.partition('#')
            into = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
            if not os.path.exists(os.path.join(ROOT, into)):
                broken.append(f'{target}: no {into}')
            elif fragment and into.endswith('.md') and fragment not in anchors(into):
                broken.append(f'{target}: no heading of {into} makes #{fragment}')
    assert not broken, broken
