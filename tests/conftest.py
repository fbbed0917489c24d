"""Suite-wide settings (at most two intra-op threads: CI has two cores; more threads only contend) and the
converted BiFormer-T weights that the weights and convert tests share."""
import argparse
import contextlib
import io
import os
import pathlib
from pathlib import Path

import pytest
import torch

from biformer_zoo import cli
from official_layouts import TINY, synth_official_state_dict

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope='module')
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A synthetic official BiFormer-T checkpoint saved the way training saves it (args as a Namespace)."""
    path = tmp_path_factory.mktemp('official') / 'biformer_tiny_in1k.pth'
    args = argparse.Namespace(model=TINY, lr=5e-4, output_dir=pathlib.PosixPath('outputs/cls'))
    torch.save({'model': synth_official_state_dict(TINY), 'args': args, 'epoch': 299}, path)
    return path


@pytest.fixture(scope='module')
def tiny_converted(tiny_checkpoint, tmp_path_factory):
    """`biformer-zoo convert` on the BiFormer-T checkpoint: (output folder, what the command printed)."""
    out = tmp_path_factory.mktemp('converted') / 'biformer_tiny.in1k'
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = cli.main(['convert', '--model', TINY, '--checkpoint', str(tiny_checkpoint), '--out', str(out)])
    assert code == 0
    return out, stdout.getvalue()


@pytest.fixture(scope='session')
def yolo_config_dir(tmp_path_factory) -> Path:
    """Ultralytics' environment for the whole session, set before any test imports it (it reads it once, at import):
    offline, no auto-install, settings in a temporary folder. Its dataset check downloads Arial.ttf into that folder
    when it is missing (even with plots=False and YOLO_OFFLINE=true): a local font there keeps it offline."""
    import shutil
    import matplotlib
    config_dir = tmp_path_factory.mktemp('yolo_config')
    (config_dir / 'Ultralytics').mkdir()
    shutil.copy(Path(matplotlib.get_data_path()) / 'fonts' / 'ttf' / 'DejaVuSans.ttf',
                config_dir / 'Ultralytics' / 'Arial.ttf')
    os.environ.update(YOLO_OFFLINE='true', YOLO_AUTOINSTALL='False', YOLO_CONFIG_DIR=str(config_dir))
    return config_dir
