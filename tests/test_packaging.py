"""Release-ready: ``python -m build`` gives an sdist and a wheel that hold the data files the package reads at run time,
with the version from its one place (``biformer_zoo/_version.py``). Built without network or install (the build
backend of the test environment, ``--no-isolation``)."""
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import biformer_zoo
from biformer_zoo.dense import PRESET_DIR
from biformer_zoo.integrations import __file__ as integrations_init

pytest.importorskip('build')

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_FILES = sorted(
    ['biformer_zoo/weights_manifest.json']
    + [f'biformer_zoo/dense/preset_files/{p.name}' for p in PRESET_DIR.glob('*.yaml')]
    + [f'biformer_zoo/integrations/ultralytics_cfg/{p.name}'
       for p in (Path(integrations_init).parent / 'ultralytics_cfg').glob('*.yaml')])


@pytest.fixture(scope='module')
def dist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp('dist')
    subprocess.run([sys.executable, '-m', 'build', '--no-isolation', '--outdir', str(out), str(REPO_ROOT)],
                   check=True, capture_output=True, timeout=300)
    return out


def test_the_data_files_are_found():
    folders = {name.rsplit('/', 1)[0] for name in DATA_FILES}
    assert folders == {'biformer_zoo', 'biformer_zoo/dense/preset_files', 'biformer_zoo/integrations/ultralytics_cfg'}


def test_wheel_holds_the_data_files_and_the_version(dist):
    wheel = dist / f'biformer_zoo-{biformer_zoo.__version__}-py3-none-any.whl'
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        manifest = archive.read('biformer_zoo/weights_manifest.json')
    assert set(DATA_FILES) <= names
    assert manifest == (REPO_ROOT / 'weights_manifest.json').read_bytes()  # a copy, not the link


def test_sdist_holds_the_data_files(dist):
    root = f'biformer_zoo-{biformer_zoo.__version__}'
    with tarfile.open(dist / f'{root}.tar.gz') as archive:
        members = {m.name: m for m in archive.getmembers()}
        manifest = archive.extractfile(members[f'{root}/biformer_zoo/weights_manifest.json']).read()
    assert {f'{root}/{name}' for name in DATA_FILES} <= set(members)
    assert manifest == (REPO_ROOT / 'weights_manifest.json').read_bytes()
