"""README.md's model table agrees with weights_manifest.json, the one source of the official numbers and tags."""
import re
from collections import defaultdict
from pathlib import Path

import pytest

from biformer_zoo.tools.report import PAPER_NUMBERS
from biformer_zoo.weights import manifest_entries

README = Path(__file__).resolve().parents[1] / 'README.md'
STATUS_WORDS = {'published': 'Hub', 'converted': 'convert', 'convertible': 'convert'}  # converted: not uploaded yet
FVCORE_TOLERANCE = 0.005  # the README: equal for BiFormer/CrossFormer, 0.18-0.43% lower for CrossFormer++


def readme_model_rows():
    """The rows of README's "## Models" table as {model: {column: cell}}."""
    section = README.read_text().split('\n## Models\n', 1)[1].split('\n## ', 1)[0]
    lines = [line for line in section.splitlines() if line.startswith('|')]
    header = [cell.strip() for cell in lines[0].strip('|').split('|')]
    rows = {}
    for line in lines[2:]:
        cells = dict(zip(header, (cell.strip() for cell in line.strip('|').split('|'))))
        rows[cells['model'].strip('`')] = cells
    return rows


def manifest_by_architecture():
    entries = defaultdict(list)
    for entry in manifest_entries():
        entries[entry['architecture']].append(entry)
    return entries


def test_readme_lists_every_manifest_architecture():
    assert sorted(readme_model_rows()) == sorted(manifest_by_architecture())


@pytest.mark.parametrize('name', sorted(manifest_by_architecture()))
def test_readme_row_agrees_with_the_manifest(name):
    row, entries, paper = readme_model_rows()[name], manifest_by_architecture()[name], PAPER_NUMBERS[name]
    assert float(row['params (M)']) == round(paper.params_exact / 1e6, 2)
    assert float(row['GFLOPs']) == pytest.approx(paper.fvcore_gflops, rel=FVCORE_TOLERANCE)
    assert float(row['official top-1']) == paper.top1
    assert re.findall(r'`([^`]+)`', row['pretrained tags']) == [e['tag'] for e in entries]
    assert row['weights'] == ', '.join(dict.fromkeys(STATUS_WORDS[e['status']] for e in entries))
