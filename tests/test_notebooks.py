"""The notebooks are committed without outputs and run from start to end in a fresh kernel."""
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip('nbformat')

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / 'notebooks'
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob('*.ipynb'))
EXPECTED = ['01_quickstart.ipynb', '02_detection_features.ipynb', '03_flops_and_speed.ipynb', '04_visualize.ipynb']
CELL_TIMEOUT_S = 300


def test_the_notebooks_are_there():
    assert [p.name for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path: Path):
    notebook = nbformat.read(path, as_version=4)
    with_outputs = [i for i, cell in enumerate(notebook.cells)
                    if cell.cell_type == 'code' and (cell.outputs or cell.execution_count is not None)]
    assert with_outputs == [], f'{path.name}: cells {with_outputs} have outputs; clear them before committing'


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    nbclient = pytest.importorskip('nbclient')
    pytest.importorskip('ipykernel')
    pytest.importorskip('matplotlib')
    notebook = nbformat.read(path, as_version=4)
    # one torch thread in the kernel: predictable run time on a shared 2-core CI machine
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    # the kernel imports this checkout's package, whichever checkout an editable install points at
    monkeypatch.setenv('PYTHONPATH', os.pathsep.join([str(NOTEBOOK_DIR.parent), os.environ.get('PYTHONPATH', '')]))
    # the kernel runs in a scratch directory, so a notebook cannot depend on (or write into) the repository
    client = nbclient.NotebookClient(
        notebook, timeout=CELL_TIMEOUT_S, kernel_name='python3', resources={'metadata': {'path': str(tmp_path)}})
    client.execute()
    errors = [output for cell in notebook.cells if cell.cell_type == 'code'
              for output in cell.outputs if output.output_type == 'error']
    assert errors == []
