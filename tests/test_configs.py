"""Every YAML config loads: ImageNet recipes use only timm train.py options, dense presets only known settings."""
import inspect
from pathlib import Path
from typing import Any, Dict

import pytest
import timm
import yaml

import biformer_zoo
from biformer_zoo.dense import EXTRA_BLOCKS, PRESET_DIR, list_presets, load_preset
from biformer_zoo.models.biformer import BiFormer
from biformer_zoo.models.crossformer import CrossFormer

REPO = Path(__file__).resolve().parents[1]
IMAGENET_CONFIGS = sorted((REPO / 'configs' / 'imagenet').glob('*.yaml'))
PRESETS = sorted(PRESET_DIR.glob('*.yaml'))
TRAIN_OPTIONS = {
    line.strip() for line in (Path(__file__).parent / 'data' / 'timm_train_options.txt').read_text().splitlines()
    if line.strip() and not line.startswith('#')}
PRESET_KEYS = {'task', 'model', 'num_classes', 'backbone', 'model_kwargs', 'head', 'recipe', 'official'}
BACKBONE_KEYS = {'out_indices', 'fpn_channels', 'extra_blocks', 'frozen_stages', 'norm_eval', 'extra_norm'}


def _load(path: Path) -> Dict[str, Any]:
    with open(path) as f:
        return yaml.safe_load(f)


def test_every_zoo_model_has_an_imagenet_recipe():
    assert sorted(p.stem for p in IMAGENET_CONFIGS) == biformer_zoo.list_zoo_models()


@pytest.mark.parametrize('path', IMAGENET_CONFIGS, ids=lambda p: p.stem)
def test_imagenet_recipe_keys_are_timm_train_options(path: Path):
    unknown = sorted(set(_load(path)) - TRAIN_OPTIONS)
    assert unknown == [], f'{path.name}: not timm train.py options: {unknown}'


@pytest.mark.parametrize('path', IMAGENET_CONFIGS, ids=lambda p: p.stem)
def test_imagenet_recipe_names_its_registered_model(path: Path):
    config = _load(path)
    assert config['model'] == path.stem and timm.is_model(config['model'])


@pytest.mark.parametrize('path', IMAGENET_CONFIGS, ids=lambda p: p.stem)
def test_imagenet_recipe_values_are_plausible(path: Path):
    c = _load(path)
    assert (c['epochs'] == 300 and c['opt'] == 'adamw' and 0 < c['lr'] < 0.01 and 0 <= c['drop_path'] < 1
            and c['min_lr'] < c['lr'] and c['warmup_lr'] < c['lr'] and c['batch_size'] > 0), c


@pytest.mark.parametrize('path', IMAGENET_CONFIGS, ids=lambda p: p.stem)
def test_imagenet_recipe_runs_in_stock_train_py(path: Path):
    """train.py imports `device_modules` first (the zoo registers its models), amp is bf16 (train.py asserts
    float16/bfloat16; bf16 needs no loss scaler and runs on CPUs), and the one-process command of the header turns
    off repeated augmentation, which timm's loader refuses outside torchrun."""
    c = _load(path)
    header = [line for line in path.read_text().splitlines() if line.startswith('#')]
    commands = [line.strip('# ') for line in header if 'train.py --config' in line]
    torchrun, single = commands
    assert 'biformer_zoo' in c['device_modules']
    assert c['amp'] is True and c['amp_dtype'] == 'bfloat16'
    assert torchrun.startswith('torchrun ') and f'configs/imagenet/{path.name}' in torchrun
    assert single.startswith('python train.py ') and f'configs/imagenet/{path.name}' in single
    assert ('--aug-repeats 0' in single) == bool(c.get('aug_repeats')), single


def test_presets_are_listed_by_task():
    detection, segmentation = list_presets('detection'), list_presets('segmentation')
    assert sorted(detection + segmentation) == list_presets() == sorted(p.stem for p in PRESETS)


@pytest.mark.parametrize('path', PRESETS, ids=lambda p: p.stem)
def test_preset_has_only_known_settings(path: Path):
    preset = load_preset(path.stem)
    problems = sorted(set(preset) - PRESET_KEYS) + sorted(set(preset['backbone']) - BACKBONE_KEYS)
    if preset['task'] not in ('detection', 'segmentation'):
        problems.append(f"task {preset['task']!r}")
    if preset['backbone'].get('extra_blocks', 'maxpool') not in EXTRA_BLOCKS:
        problems.append(f"extra_blocks {preset['backbone']['extra_blocks']!r}")
    assert problems == [], f'{path.name}: {problems}'


@pytest.mark.parametrize('path', PRESETS, ids=lambda p: p.stem)
def test_preset_model_takes_its_model_kwargs(path: Path):
    preset = load_preset(path.stem)
    architecture = timm.models.split_model_name_tag(preset['model'])[0]
    model_class = BiFormer if architecture.startswith('biformer') else CrossFormer
    accepted = set(inspect.signature(model_class.__init__).parameters)
    unknown = sorted(set(preset['model_kwargs']) - accepted)
    assert timm.is_model(architecture) and unknown == [], f'{path.name}: {unknown}'


@pytest.mark.parametrize('path', PRESETS, ids=lambda p: p.stem)
def test_preset_name_starts_with_its_model(path: Path):
    preset = load_preset(path.stem)
    assert path.stem.split('.')[0] == timm.models.split_model_name_tag(preset['model'])[0]


def test_imagenet_recipe_randaugment_at_its_largest_magnitude():
    """The recipes' RandAugment at the largest magnitude its noise reaches (timm clips at 10): PosterizeIncreasing
    then keeps 0 bits. Pillow < 13 returns a black image; Pillow 13 refuses, and README says to install pillow<13."""
    from PIL import Image
    from timm.data.auto_augment import rand_augment_transform
    policies = {_load(path)['aa'] for path in IMAGENET_CONFIGS}
    assert policies == {'rand-m9-mstd0.5-inc1'}
    ops = {op.name: op for op in rand_augment_transform(policies.pop(), {}).ops}
    posterize = ops['PosterizeIncreasing']
    bits = posterize.level_fn(posterize.magnitude_max or 10, posterize.hparams)[0]
    image = Image.new('RGB', (4, 4), (200, 100, 50))
    try:
        out = posterize.aug_fn(image, bits)
    except ValueError as e:
        assert bits == 0 and 'bits must be' in str(e)
        assert 'Install `"pillow<13"`' in (REPO / 'README.md').read_text()
        assert all('pillow<13' in path.read_text() for path in IMAGENET_CONFIGS)
    else:
        black = ((0, 0),) * 3
        assert (out.getextrema() == black) == (bits == 0)
