"""biformer_zoo.integrations.ultralytics against the real ultralytics package (the `yolo` extra).

Ultralytics runs offline here: YOLO_OFFLINE=true, YOLO_AUTOINSTALL=False and a temporary YOLO_CONFIG_DIR are set before
it is first imported (the `yolo` fixture), and every socket connection or DNS lookup, in this process and in the
subprocesses, is refused and recorded, so a download attempt (a font, an asset) fails the test that made it.
"""
import copy
import importlib
import importlib.util
import json
import logging
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import biformer_zoo

needs_ultralytics = pytest.mark.skipif(
    importlib.util.find_spec('ultralytics') is None, reason='needs the yolo extra: pip install "biformer-zoo[yolo]"')

REPO_ROOT = Path(biformer_zoo.__file__).resolve().parents[1]
SHIPPED = ('yolov8-bra.yaml', 'yolo11-bra.yaml', 'yolov8-lsda.yaml')
OURS = ('BRA', 'C2fBRA', 'C2fLSDA', 'CSM')
IMGSZ = 64
TRAIN_ARGS = dict(imgsz=IMGSZ, batch=2, workers=0, plots=False, device='cpu', amp=False, verbose=False)

# refuses and reports network use; the first lines of every subprocess script
NETWORK_GUARD = textwrap.dedent('''
    import socket, sys
    def _refuse(*args, **kwargs):
        sys.stderr.write(f"NETWORK-ATTEMPT {args[1:2]}\\n")
        raise OSError("network access in an offline test")
    socket.socket.connect = socket.create_connection = socket.getaddrinfo = _refuse
''')


def scaled(name: str, scale: str) -> str:
    """'yolov8-bra.yaml', 's' -> 'yolov8s-bra.yaml' (Ultralytics' scale-in-file-name form)."""
    return re.sub(r'^(yolo(?:v)?\d+)', rf'\g<1>{scale}', name)


@pytest.fixture(scope='module')
def yolo(yolo_config_dir):
    """Ultralytics, offline, configured in a temporary folder; the integration registered. Network use is recorded."""
    config_dir = yolo_config_dir
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[1:2])
        raise OSError('network access in an offline test')

    with pytest.MonkeyPatch.context() as mp:
        for name in ('connect', 'connect_ex'):
            mp.setattr(socket.socket, name, refuse)
        mp.setattr(socket, 'create_connection', refuse)
        mp.setattr(socket, 'getaddrinfo', refuse)
        ultralytics = pytest.importorskip('ultralytics')
        integration = importlib.import_module('biformer_zoo.integrations.ultralytics')
        from ultralytics.nn import tasks
        yield SimpleNamespace(
            ultralytics=ultralytics, integration=integration, tasks=tasks, config_dir=config_dir, attempts=attempts,
            env={**os.environ, 'PYTHONPATH': os.pathsep.join([str(REPO_ROOT), os.environ.get('PYTHONPATH', '')])})
    assert not attempts, f'network access attempted: {attempts}'


def build(yolo, cfg, verbose: bool = False):
    return yolo.tasks.DetectionModel(cfg, verbose=verbose)


def rows_of(model, name: str):
    return [m for m in model.model if m.type.endswith(f'.{name}')]


def yaml_dict(yolo, name: str, scale: str) -> dict:
    return yolo.tasks.yaml_model_load(yolo.integration.model_cfg(scaled(name, scale)))


def run_script(yolo, script: str, *args, cwd, extra_env=None, timeout=600) -> subprocess.CompletedProcess:
    env = {**yolo.env, **(extra_env or {})}
    proc = subprocess.run(
        [sys.executable, '-c', NETWORK_GUARD + textwrap.dedent(script), *map(str, args)],
        capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert 'NETWORK-ATTEMPT' not in output, output[-6000:]
    return proc


# ---------------------------------------------------------------------------------------------------------------------
# import boundaries and registration


def test_import_biformer_zoo_never_imports_ultralytics():
    code = ('import sys, biformer_zoo, biformer_zoo.layers, biformer_zoo.integrations; '
            'assert "ultralytics" not in sys.modules, sorted(m for m in sys.modules if "ultralytics" in m)')
    env = {**os.environ, 'PYTHONPATH': str(REPO_ROOT)}
    subprocess.run([sys.executable, '-c', code], check=True, env=env, timeout=300)


@needs_ultralytics
def test_register_is_idempotent_and_wraps_once(yolo):
    wrapped = yolo.tasks.parse_model
    yolo.integration.register()
    yolo.integration.register()
    assert yolo.tasks.parse_model is wrapped and wrapped._biformer_zoo
    assert not getattr(wrapped.__wrapped__, '_biformer_zoo', False)  # the wrapper wraps Ultralytics' function
    assert set(yolo.integration.SAFE_GLOBALS) <= set(torch.serialization.get_safe_globals())


@needs_ultralytics
def test_unsupported_version_is_refused_with_the_range(yolo, monkeypatch):
    monkeypatch.setattr(yolo.ultralytics, '__version__', '8.5.0')
    monkeypatch.delenv(yolo.integration.ANY_VERSION_ENV, raising=False)
    refused = yolo.integration.UnsupportedUltralyticsError
    with pytest.raises(refused, match=r'ultralytics>=8\.4\.0,<8\.5.*found 8\.5\.0'):
        yolo.integration._check_version()
    monkeypatch.setenv(yolo.integration.ANY_VERSION_ENV, '1')
    yolo.integration._check_version()


@needs_ultralytics
def test_changed_channel_rules_are_detected(yolo):
    def unscaled(d, ch, verbose=True):  # a parse_model that ignores the width multiple
        return yolo.tasks.parse_model.__wrapped__({**d, 'scales': {'t': [1.0, 1.0, 1024]}}, ch, verbose)

    yolo.integration._check_behaviour(yolo.tasks.parse_model.__wrapped__)
    with pytest.raises(yolo.integration.UnsupportedUltralyticsError, match='builds model YAML rows differently'):
        yolo.integration._check_behaviour(unscaled)


# ---------------------------------------------------------------------------------------------------------------------
# building the shipped models


@needs_ultralytics
@pytest.mark.parametrize('scale', ['n', 's'])
@pytest.mark.parametrize('name', SHIPPED)
def test_shipped_model_forward_at_sizes_off_the_region_grid(yolo, name, scale):
    model = build(yolo, yolo.integration.model_cfg(scaled(name, scale))).eval()
    assert model.yaml['scale'] == scale
    ours = [m for m in model.model if m.type.rpartition('.')[2] in OURS]
    assert len(ours) >= 2 and all(m.type.startswith('biformer_zoo.integrations.ultralytics.') for m in ours)
    # 320x256 (P5 10x8) and 288x224 (P5 9x7): neither P5 side of the first is a multiple of 7 regions / groups
    for height, width in ((256, 320), (224, 288)):
        with torch.no_grad():
            boxes = model(torch.rand(1, 3, height, width))[0]
        anchors = sum((height // s) * (width // s) for s in (8, 16, 32))
        assert boxes.shape == (1, 4 + 80, anchors) and torch.isfinite(boxes).all()


@needs_ultralytics
@pytest.mark.parametrize('name', SHIPPED)
def test_every_scale_builds_with_c2f_widths_and_depths(yolo, name):
    """At every scale our rows get the widths and repeats Ultralytics gives C2f / Conv rows at the same place."""
    for scale in 'nsmlx':
        d = yaml_dict(yolo, name, scale)
        layers, _ = yolo.tasks.parse_model(copy.deepcopy(d), ch=3, verbose=False)
        # the same YAML with C2f in place of our C2f rows and Conv in place of CSM: Ultralytics' own numbers
        reference = copy.deepcopy(d)
        for row in reference['backbone'] + reference['head']:
            if row[2] in ('C2fBRA', 'C2fLSDA'):
                row[2], row[3] = 'C2f', row[3][:1]
            elif row[2] == 'CSM':
                row[2], row[3] = 'Conv', [row[3][0], 3, 2]
            elif row[2] == 'BRA':
                row[2], row[3] = 'nn.Identity', []
        ref_layers, _ = yolo.tasks.parse_model.__wrapped__(reference, 3, False)
        for ours, ref in zip(layers, ref_layers):
            kind = ours.type.rpartition('.')[2]
            if kind in ('C2fBRA', 'C2fLSDA'):
                assert ours.split_conv.conv.in_channels == ref.cv1.conv.in_channels
                assert ours.fuse_conv.conv.out_channels == ref.cv2.conv.out_channels
                assert len(ours.blocks) == len(ref.m)
            elif kind == 'CSM':
                assert ours.norm.normalized_shape[0] == ref.conv.in_channels
                assert sum(r.out_channels for r in ours.reductions) == ref.conv.out_channels
            elif kind == 'BRA':
                assert ours.dim == yolo.integration.conv2ds(ref_layers[ours.i - 1])[-1].out_channels  # SPPF's
        assert len(layers) == len(ref_layers)


@needs_ultralytics
def test_layer_table_shows_real_modules_and_parameters(yolo):
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = yolo.tasks.LOGGER
    logger.addHandler(handler)
    try:
        model = build(yolo, yolo.integration.model_cfg('yolov8n-bra.yaml'), verbose=True)
    finally:
        logger.removeHandler(handler)
    rows = {int(m.group(1)): line for line in lines if (m := re.match(r'\s*(\d+)\s', line))}
    assert sorted(rows) == list(range(len(model.model)))  # one line per layer, none for the hidden probe rows
    assert not any('Identity' in line for line in lines)
    for index, kind, args in ((10, 'BRA', '[256, 8, 7, 4]'), (22, 'C2fBRA', '[384, 256, 1, 4, 7, 4]')):
        layer = model.model[index]
        assert layer.type == f'biformer_zoo.integrations.ultralytics.{kind}'
        assert re.search(rf'\s{sum(p.numel() for p in layer.parameters())}\s+{re.escape(layer.type)}\s*'
                         rf'{re.escape(args)}', rows[index]), rows[index]


# ---------------------------------------------------------------------------------------------------------------------
# YAML rows: options, activation, errors

TINY = {
    'nc': 2, 'scales': {'n': [0.33, 0.25, 1024], 's': [0.33, 0.5, 1024]},
    'backbone': [[-1, 1, 'Conv', [64, 3, 2]], [-1, 1, 'Conv', [128, 3, 2]], [-1, 1, 'Conv', [256, 3, 2]],
                 [-1, 1, 'Conv', [512, 3, 2]], [-1, 1, 'Conv', [1024, 3, 2]]],
    'head': [[-1, 1, 'BRA', [8, 7, 4]], [[2, 3, 5], 1, 'Detect', ['nc']]],
}


def tiny(rows=None, **changes) -> dict:
    d = copy.deepcopy({**TINY, **changes})
    if rows is not None:
        d['head'] = copy.deepcopy(rows) + [[[2, 3, 5], 1, 'Detect', ['nc']]]
    return d


@needs_ultralytics
def test_keyword_options_in_a_trailing_mapping(yolo):
    model = build(yolo, tiny([[-1, 1, 'BRA', [4, {'topk': 8, 'num_regions': 4}]]], scale='s'))
    bra = model.model[5]
    assert (bra.num_heads, bra.num_regions, bra.topk, bra.dim) == (4, 4, 8, 512)
    model = build(yolo, tiny([[-1, 9, 'C2fLSDA', [1024, {'interval': 4}]]], scale='s'))  # 9 * 0.33 -> 3 blocks
    block = model.model[5]
    assert [b.attn.long_distance for b in block.blocks] == [False, True, False]
    assert block.blocks[0].attn.interval == 4 and block.blocks[0].attn.group_size == 7


@needs_ultralytics
def test_repeated_bra_rows_are_stacked(yolo):
    model = build(yolo, tiny([[-1, 6, 'BRA', [8]]], scale='n'))  # 6 * 0.33 -> 2 layers
    assert isinstance(model.model[5], torch.nn.Sequential) and len(model.model[5]) == 2


@needs_ultralytics
def test_yaml_activation_reaches_our_conv_units(yolo):
    model = build(yolo, tiny([[-1, 1, 'C2fBRA', [1024]]], scale='n', activation='nn.ReLU()'))
    assert isinstance(model.model[5].fuse_conv.act, torch.nn.ReLU)
    assert isinstance(model.model[5].blocks[0].conv[0].act, torch.nn.ReLU)


@needs_ultralytics
@pytest.mark.parametrize('rows,scale,match', [
    ([[-1, 1, 'BRA', [7]]], 'n', r"layer 5 \(BRA\) at scale 'n': num_heads=7 does not divide the input width 256; "
                                 r"use num_heads dividing 256: \[1, 2, 4, 8, 16, 32\]"),
    ([[-1, 1, 'C2fBRA', [1024, 3]]], 's', r"layer 5 \(C2fBRA\) at scale 's': num_heads=3 does not divide the hidden "
                                         r"width .*c2 = 512.* 256"),
    ([[-1, 1, 'BRA', [8, 2, 5]]], 'n', r"layer 5 \(BRA\) at scale 'n': topk must be between 1 and num_regions\*\*2"),
    ([[-1, 1, 'C2fLSDA', [48]]], 'n', r'layer 5 \(C2fLSDA\).*hidden width .* is 8, below the 16'),
    ([[-1, 1, 'BRA', [8, {'top_k': 2}]]], 'n', r"unknown options \['top_k'\].*\['num_heads', 'num_regions'"),
    ([[-1, 1, 'BRA', [8, 7, 4, 5, 1]]], 'n', r'takes at most 4 options'),
    ([[[-1, 3], 1, 'BRA', [8]]], 'n', r'takes one input, got from=\[-1, 3\]'),
    ([[-1, 2, 'CSM', [1024]]], 'n', r'repeats must be 1'),
])
def test_bad_rows_raise_value_error_with_layer_scale_and_fix(yolo, rows, scale, match):
    with pytest.raises(ValueError, match=match):
        build(yolo, tiny(rows, scale=scale))


@needs_ultralytics
def test_model_cfg_names(yolo):
    integration = yolo.integration
    assert integration.list_model_cfgs() == sorted(SHIPPED)
    path = integration.model_cfg('yolo11x-bra.yaml')
    assert Path(path).parent == integration.CFG_DIR and not Path(path).exists()
    d = yolo.tasks.yaml_model_load(path)
    assert d['scale'] == 'x' and d['head'][-2][2] == 'C2fBRA'
    assert integration.model_cfg('yolov8-lsda') == str(integration.CFG_DIR / 'yolov8-lsda.yaml')
    with pytest.raises(ValueError, match='no shipped model YAML .*yolov8-bra.yaml'):
        integration.model_cfg('yolov9n-bra.yaml')


# ---------------------------------------------------------------------------------------------------------------------
# training, checkpoints in a fresh process, export


def make_dataset(root: Path) -> Path:
    """Four training and two validation images (128x96, one coloured box each) in the YOLO layout."""
    import cv2

    rng = np.random.default_rng(0)
    for split, count in (('train', 4), ('val', 2)):
        (root / 'images' / split).mkdir(parents=True)
        (root / 'labels' / split).mkdir(parents=True)
        for k in range(count):
            image = np.full((96, 128, 3), 40, np.uint8)
            x, y, w, h = rng.integers(4, 60), rng.integers(4, 40), rng.integers(20, 60), rng.integers(20, 50)
            image[y:y + h, x:x + w] = rng.integers(120, 255, 3)
            cv2.imwrite(str(root / 'images' / split / f'{k}.png'), image)
            (root / 'labels' / split / f'{k}.txt').write_text(
                f'0 {(x + w / 2) / 128:.5f} {(y + h / 2) / 96:.5f} {w / 128:.5f} {h / 96:.5f}\n')
    data = root / 'data.yaml'
    data.write_text(f'path: {root}\ntrain: images/train\nval: images/val\nnames:\n  0: box\n')
    return data


@pytest.fixture(scope='module')
def trained(yolo, tmp_path_factory):
    """One epoch of yolov8n-bra and of yolov8n-lsda on the synthetic set: {'data', 'root', name: best.pt}."""
    from ultralytics import YOLO

    root = tmp_path_factory.mktemp('yolo_train')
    out = {'data': make_dataset(root / 'data'), 'root': root}
    for name in ('yolov8n-bra', 'yolov8n-lsda'):
        model = YOLO(yolo.integration.model_cfg(f'{name}.yaml'))
        model.train(data=str(out['data']), epochs=1, project=str(root / 'runs'), name=name, exist_ok=True,
                    val=name.endswith('bra'), **TRAIN_ARGS)
        out[name] = root / 'runs' / name / 'weights' / 'best.pt'
        assert out[name].is_file()
    return out


FRESH_PROCESS = '''
    import json, sys
    from ultralytics import YOLO

    root, weights, data = sys.argv[1:4]
    assert not [m for m in sys.modules if m.startswith("biformer_zoo")]
    model = YOLO(weights)  # unpickling imports the integration, which registers the YAML names
    assert "biformer_zoo.integrations.ultralytics" in sys.modules
    boxes = model.predict(f"{root}/data/images/val/0.png", imgsz=64, verbose=False)[0].boxes
    metrics = model.val(data=data, imgsz=64, batch=2, workers=0, plots=False, device="cpu", project=f"{root}/runs",
                        name="fresh_val", verbose=False)
    onnx_file = YOLO(weights).export(format="onnx", imgsz=64, simplify=False)
    YOLO(weights).train(data=data, epochs=1, imgsz=64, batch=2, workers=0, plots=False, device="cpu", amp=False,
                        project=f"{root}/runs", name="fresh_finetune", exist_ok=True, verbose=False)
    print(json.dumps({"boxes": list(boxes.data.shape), "map50": float(metrics.box.map50), "onnx": onnx_file}))
'''


@needs_ultralytics
def test_best_pt_in_a_fresh_process_predicts_validates_exports_and_fine_tunes(yolo, trained):
    root = trained['root']
    proc = run_script(yolo, FRESH_PROCESS, root, trained['yolov8n-bra'], trained['data'], cwd=root)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result['boxes'][1] == 6 and 0.0 <= result['map50'] <= 1.0 and Path(result['onnx']).is_file()
    # the trainer rebuilt the model from the stored YAML and took every tensor of the checkpoint
    transferred = re.search(r'Transferred (\d+)/(\d+) items from pretrained weights', proc.stdout + proc.stderr)
    assert transferred and transferred.group(1) == transferred.group(2), (proc.stdout + proc.stderr)[-3000:]
    assert (root / 'runs' / 'fresh_finetune' / 'weights' / 'best.pt').is_file()


SAFE_LOAD = '''
    import sys
    import biformer_zoo.integrations.ultralytics  # restricted loading imports nothing a file names: register first
    from ultralytics import YOLO

    root, weights = sys.argv[1:3]
    model = YOLO(weights)
    print(len(model.predict(f"{root}/data/images/val/0.png", imgsz=64, verbose=False)[0].boxes))
'''


@needs_ultralytics
@pytest.mark.parametrize('name', ['yolov8n-bra', 'yolov8n-lsda'])
def test_safe_load_with_registered_globals(yolo, trained, name):
    registered = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()  # list what the checkpoint needs, not what this process allows
    try:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(str(trained[name]))
    finally:
        torch.serialization.add_safe_globals(registered)
    ours = {f'{c.__module__}.{c.__qualname__}' for c in yolo.integration.SAFE_GLOBALS}
    outside = [g for g in needed if g.startswith(('biformer_zoo.', 'timm.'))]  # Ultralytics allows torch's, its own
    assert set(outside) <= ours, set(outside) - ours
    assert {'biformer_zoo.integrations.ultralytics.' + ('C2fBRA' if 'bra' in name else 'C2fLSDA')} <= set(outside)
    run_script(yolo, SAFE_LOAD, trained['root'], trained[name], cwd=trained['root'],
               extra_env={'ULTRALYTICS_SAFE_LOAD': '1'})


@needs_ultralytics
@pytest.mark.parametrize('name', ['yolov8n-bra', 'yolov8n-lsda'])
def test_onnx_and_torchscript_export_match_pytorch(yolo, trained, name, tmp_path):
    import onnxruntime as ort
    from ultralytics import YOLO

    weights = tmp_path / 'best.pt'
    weights.write_bytes(trained[name].read_bytes())  # exports land next to the weights
    model = YOLO(str(weights))
    size = (96, 128)  # P5 3x4: padded to 7x7 regions (BRA) / one 4x4 group (LSDA)
    x = torch.rand(1, 3, *size)
    reference = YOLO(str(weights)).model.float().eval()
    with torch.no_grad():
        expected = reference(x)[0]

    onnx_file = model.export(format='onnx', imgsz=size, simplify=False)
    session = ort.InferenceSession(onnx_file, providers=['CPUExecutionProvider'])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)

    script = torch.jit.load(model.export(format='torchscript', imgsz=size))
    with torch.no_grad():
        torch.testing.assert_close(script(x)[0] if isinstance(script(x), (list, tuple)) else script(x), expected,
                                   rtol=1e-4, atol=1e-3)


@needs_ultralytics
def test_cli_resolves_shipped_names_and_trains(yolo, trained, tmp_path):
    from biformer_zoo.integrations.ultralytics_cli import resolve_model_args

    data = str(trained['data'])
    assert resolve_model_args(['train', 'model=yolo11s-bra.yaml', f'data={data}']) == [
        'train', f"model={yolo.integration.model_cfg('yolo11s-bra.yaml')}", f'data={data}']
    assert resolve_model_args(['model=yolo11n.yaml', f'model={data}']) == ['model=yolo11n.yaml', f'model={data}']
    run_script(yolo, 'from biformer_zoo.integrations.ultralytics_cli import main; main()',
               'train', 'model=yolov8n-lsda.yaml', f'data={data}', 'epochs=1', f'imgsz={IMGSZ}', 'batch=2', 'workers=0',
               'plots=False', 'device=cpu', 'amp=False', 'val=False', f'project={tmp_path}', 'name=cli', cwd=tmp_path)
    assert (tmp_path / 'cli' / 'weights' / 'best.pt').is_file()
