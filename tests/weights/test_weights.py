"""Weights: the manifest, official checkpoints, and `pretrained=True` through the real huggingface_hub code with no network.

Loading runs in subprocesses (huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE / HF_ENDPOINT at import): one
against a fake Hub cache with HF_HUB_OFFLINE=1, one against a loopback HTTP server as HF_ENDPOINT.
"""
import argparse
import hashlib
import json
import pathlib

import pytest
import safetensors.torch
import timm
import torch

import biformer_zoo  # importing the package registers the models
from biformer_zoo import weights
from biformer_zoo.tools import convert
from biformer_zoo.models import checkpoint_filter_for, list_zoo_models
from hub_utils import REPO_ROOT, add_to_hub_cache, run_python, serve_hub
from official_layouts import OFFICIAL_LAYOUTS, TINY, save_official_checkpoint, synth_official_state_dict


TINY_REPO = 'biformer-zoo/biformer_tiny.in1k'
UNPUBLISHED_REPO = 'biformer-zoo/biformer_small.in1k'  # status 'convertible': not on the Hub yet


def _missing(message: str, *parts: str) -> list:
    """The parts a user-facing message should name but does not."""
    return [p for p in parts if p not in message]


# ----------------------------------------------------------------------------------------------------------------------
# Manifest

def test_manifest_covers_every_registered_pretrained_tag():
    manifest_tags = {f"{e['architecture']}.{e['tag']}" for e in weights.manifest_entries()}
    assert manifest_tags == set(list_zoo_models(pretrained=True))


@pytest.mark.parametrize('entry', weights.manifest_entries(), ids=lambda e: f"{e['architecture']}.{e['tag']}")
def test_registered_pretrained_cfg_agrees_with_manifest(entry):
    expected = weights.manifest_pretrained_cfg(entry['architecture'], entry['tag'])
    registered = timm.get_pretrained_cfg(f"{entry['architecture']}.{entry['tag']}").to_dict()
    assert {k: registered.get(k) for k in expected} == expected


def test_manifest_entries_are_complete():
    required = {'architecture', 'tag', 'family', 'hf_hub_id', 'file', 'sha256', 'size', 'source_sha256', 'status',
                'sources', 'reported', 'license', 'preprocessing', 'dataset', 'num_classes'}
    problems = []
    for e in weights.manifest_entries():
        name = f"{e['architecture']}.{e['tag']}"
        if required - set(e):
            problems.append(f'{name}: missing {sorted(required - set(e))}')
        elif e['status'] not in weights.STATUSES:
            problems.append(f"{name}: unknown status {e['status']}")
        elif (e['sha256'] is None) != (e['status'] == 'convertible') or (e['size'] is None) != (e['sha256'] is None):
            problems.append(f"{name}: sha256/size must be null exactly while the status is 'convertible'")
        elif not e['sources'] or not all(s.get('url') for s in e['sources']):
            problems.append(f'{name}: every official source needs a URL')
        elif e['family'] not in weights.load_manifest()['families']:
            problems.append(f"{name}: unknown family {e['family']}")
    assert problems == []


def test_packaged_manifest_is_the_repository_manifest():
    assert weights.MANIFEST_PATH.read_bytes() == (REPO_ROOT / 'weights_manifest.json').read_bytes()


@pytest.mark.parametrize('name,data,match', [
    ('random.pth', bytes(range(256)) * 20, r"is not a checkpoint: it begins with b'\\x00"),
    ('text.pth', b'hello', r"is not a checkpoint: it begins with b'hello' \(text\)"),
    ('cut.safetensors', None, 'not a readable checkpoint .*truncated'),
    ('folder.pth', 'dir', 'is a directory'),
    ('missing.pth', 'none', 'does not exist'),
])
def test_damaged_or_missing_checkpoints_are_reported(tmp_path, tiny_converted, name, data, match):
    """convert and pretrained_cfg_overlay=dict(file=...) name the problem instead of raising from deep inside."""
    path = tmp_path / name
    if data == 'dir':
        path.mkdir()
    elif data is None:
        whole = (tiny_converted[0] / weights.WEIGHTS_FILE).read_bytes()
        path.write_bytes(whole[:len(whole) // 2])
    elif data != 'none':
        path.write_bytes(data)
    with pytest.raises(ValueError, match=match):
        convert.convert_checkpoint(TINY, path, tmp_path / 'out', measure_flops=False, progress=False)
    overlay_match = 'corrupt or truncated' if name.endswith('.safetensors') else match
    with pytest.raises(weights.PretrainedWeightsError, match=f'biformer_tiny.*{overlay_match}'):
        timm.create_model(TINY, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_training_checkpoint_loads_through_overlay_file_like_convert(tiny_checkpoint, tmp_path):
    """A .pth given as pretrained_cfg_overlay file goes through the same safe loader as convert (Namespace and
    PosixPath args allowed), EMA weights first as timm's loader does; the model does not keep the state dict."""
    official = weights.load_official_checkpoint(tiny_checkpoint)
    model = timm.create_model(TINY, pretrained=True, pretrained_cfg_overlay=dict(file=str(tiny_checkpoint)))
    expected = timm.create_model(TINY)
    expected.load_state_dict(checkpoint_filter_for(expected)(dict(official), expected))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), expected.state_dict().values()))
    assert model.pretrained_cfg.get('state_dict') is None
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in official.items()}
    path = tmp_path / 'with_ema.pth'
    torch.save({'model': official, 'model_ema': ema, 'args': argparse.Namespace(p=pathlib.PosixPath('x'))}, path)
    with_ema = timm.create_model(TINY, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(with_ema.state_dict()['head.fc.bias'], ema['head.bias'])


@pytest.mark.parametrize('name,tag,layout', [(TINY, 'in1k', TINY)] + OFFICIAL_LAYOUTS)
def test_official_checkpoint_loads_through_checkpoint_path_and_load_checkpoint(tmp_path, name, tag, layout):
    """``biformer_zoo.create_model(checkpoint_path=...)`` and timm's ``load_checkpoint`` with the family's filter take
    an official checkpoint as the pretrained path does."""
    path = tmp_path / f'{layout}.pth'
    save_official_checkpoint(layout, path)
    expected = timm.create_model(f'{name}.{tag}', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    from_path = biformer_zoo.create_model(f'{name}.{tag}', checkpoint_path=str(path))
    through_timm = timm.create_model(f'{name}.{tag}')
    timm.models.load_checkpoint(through_timm, str(path), filter_fn=checkpoint_filter_for(through_timm))
    reference = expected.state_dict()
    for model in (from_path, through_timm):
        loaded = model.state_dict()
        assert loaded.keys() == reference.keys() and all(torch.equal(loaded[k], v) for k, v in reference.items())


@pytest.mark.parametrize('layout', [TINY, 'crossformer_tiny'])
def test_load_state_dict_names_an_official_layout_and_the_ways_to_load_it(layout):
    """``load_state_dict`` takes the model's own layout only, as timm's models do; an official one is named."""
    name = 'crossformer_tiny' if layout.startswith('crossformer') else TINY
    with pytest.raises(weights.PretrainedWeightsError, match=r"official checkpoint's layout: .*checkpoint_path="):
        timm.create_model(name).load_state_dict(synth_official_state_dict(layout))


def test_features_only_model_takes_a_checkpoint_path(tmp_path):
    model = timm.create_model(TINY)
    path = tmp_path / 'trained.pth'
    torch.save({'model': model.state_dict()}, path)
    features = biformer_zoo.create_model(TINY, features_only=True, out_indices=(1, 2), checkpoint_path=str(path))
    assert torch.equal(features.model.stages[2].blocks[0].attn.qkv.weight, model.stages[2].blocks[0].attn.qkv.weight)


def test_own_partial_state_dict_is_not_taken_for_an_official_one():
    model = timm.create_model(TINY, depths=(1, 1, 1, 1))
    head = {'head.fc.weight': torch.ones_like(model.head.fc.weight),
            'head.fc.bias': torch.ones_like(model.head.fc.bias)}
    result = model.load_state_dict(head, strict=False)
    assert result.unexpected_keys == [] and torch.equal(model.head.fc.weight, head['head.fc.weight'])


def test_safetensors_metadata_must_be_strings(tmp_path):
    path = tmp_path / 'odd.safetensors'
    header = json.dumps({'__metadata__': 'biformer_tiny'}).encode()
    path.write_bytes(len(header).to_bytes(8, 'little') + header)
    with pytest.raises(ValueError, match='__metadata__ must map strings to strings'):
        weights.read_safetensors_header(path)


# ----------------------------------------------------------------------------------------------------------------------
# pretrained=True through huggingface_hub, offline against a fake Hub cache and online against a loopback endpoint

LOAD_SCENARIOS = r'''
import json, sys
import safetensors.torch, timm, torch
import biformer_zoo
from biformer_zoo import weights
from biformer_zoo.tools import catalog, push

args = json.loads(sys.argv[1])
weights.manifest.MANIFEST_PATH = args['manifest']
weights.load_manifest.cache_clear()
expected = safetensors.torch.load_file(args['weights'])
images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
results = {}


def record(name, fn):
    try:
        results[name] = fn()
    except Exception as e:
        results[name] = f'{type(e).__name__}: {e}'


def create(name='biformer_tiny.in1k', **kwargs):
    return timm.create_model(name, pretrained=True, **kwargs).eval()


def equals_file(model):
    state = model.state_dict()
    return sorted(state) == sorted(expected) and all(torch.equal(state[k], expected[k]) for k in expected)


def features_match():
    reference = create().forward_intermediates(images, intermediates_only=True)
    features = create(features_only=True)(images)
    return len(features) == 4 and all(torch.equal(f, r) for f, r in zip(features, reference))


def adapted():
    state = create(in_chans=1, num_classes=10).state_dict()
    return dict(
        stem=torch.equal(state['stem.0.weight'], expected['stem.0.weight'].float().sum(dim=1, keepdim=True)),
        head=list(state['head.fc.weight'].shape),
        rest=all(torch.equal(state[k], v) for k, v in expected.items() if not k.startswith(('stem.0.w', 'head.'))))


def hub_row(model):
    return [r['cached'] for r in catalog.pretrained_table() if r['model'] == model][0]


for name in args['scenarios']:
    kind, _, repo = name.partition(':')
    if kind == 'bit_exact':
        record(name, lambda: equals_file(create()))
    elif kind == 'hf_hub_prefix':
        record(name, lambda: equals_file(timm.create_model('hf-hub:biformer-zoo/biformer_tiny.in1k', pretrained=True)))
    elif kind == 'features_only':
        record(name, features_match)
    elif kind == 'adapted':
        record(name, adapted)
    elif kind == 'unpublished':
        record(name, lambda: create('biformer_small.in1k'))
    elif kind == 'repo':
        record(name, lambda: create('biformer_tiny', pretrained_cfg_overlay=dict(hf_hub_id=repo)))
    elif kind == 'file':
        record(name, lambda: create('biformer_tiny', pretrained_cfg_overlay=dict(file=repo)))
    elif kind in ('cached', 'cached_before'):
        record(name, lambda: hub_row(repo))
    elif kind == 'push':
        record(name, lambda: push.push_to_hub(args['folder'], 'test-org/upload'))
print(json.dumps(results))
'''


def _small_safetensors(architecture: str = TINY) -> bytes:
    """A small, well-formed safetensors file claiming to hold ``architecture`` weights."""
    return safetensors.torch.save({'w': torch.arange(256.)}, metadata=dict(format='pt', architecture=architecture,
                                                                           tag='in1k'))


@pytest.fixture(scope='module')
def hub_setup(tiny_converted, tmp_path_factory):
    """Files of the fake Hub and a manifest that publishes biformer_tiny.in1k and two broken test repos."""
    root = tmp_path_factory.mktemp('hub')
    folder = tiny_converted[0]
    good = (folder / weights.WEIGHTS_FILE).read_bytes()
    small = _small_safetensors()
    broken = {
        'test-org/bad-sha': small,  # the manifest expects another sha256
        'test-org/truncated': small[:len(small) // 2],  # the manifest knows the full size
        'test-org/corrupt': b'\x00\x01\x00\x00\x00\x00\x00\x00' + small[8:],  # header length field destroyed
        'test-org/wrong-arch': _small_safetensors('crossformer_tiny'),
    }
    manifest = json.loads(weights.MANIFEST_PATH.read_text())
    tiny_entry = [e for e in manifest['weights'] if e['hf_hub_id'] == TINY_REPO][0]
    tiny_entry.update(sha256=hashlib.sha256(good).hexdigest(), size=len(good), status='published')
    for repo, sha256 in (('test-org/bad-sha', '0' * 64), ('test-org/truncated', hashlib.sha256(small).hexdigest())):
        manifest['weights'].append(dict(tiny_entry, hf_hub_id=repo, sha256=sha256, size=len(small)))
    # good weights in a repo the manifest records without a checksum (not published), and a revision-pinned entry
    broken['test-org/unverified'] = good
    manifest['weights'].append(dict(tiny_entry, hf_hub_id='test-org/unverified', sha256=None, size=None,
                                    status='convertible'))
    broken['test-org/pinned'] = small
    manifest['weights'].append(dict(tiny_entry, hf_hub_id='test-org/pinned@main', sha256='0' * 64, size=len(small)))
    (root / 'manifest.json').write_text(json.dumps(manifest))
    tiny_files = {weights.WEIGHTS_FILE: good, 'config.json': (folder / 'config.json').read_bytes()}
    return dict(root=root, folder=folder, tiny_files=tiny_files, broken=broken,
                args=dict(manifest=str(root / 'manifest.json'), weights=str(folder / weights.WEIGHTS_FILE),
                          folder=str(folder)))


OFFLINE = ['bit_exact', 'hf_hub_prefix', 'features_only', 'adapted', 'unpublished', 'repo:test-org/bad-sha',
           'repo:test-org/truncated', 'repo:test-org/corrupt', 'repo:test-org/wrong-arch', 'repo:test-org/unverified',
           'repo:test-org/pinned@main', 'push']


@pytest.fixture(scope='module')
def offline(hub_setup):
    """Every offline scenario, run in one subprocess with HF_HUB_OFFLINE=1 and a fake Hub cache."""
    cache = hub_setup['root'] / 'offline' / 'hub'
    add_to_hub_cache(cache, TINY_REPO, hub_setup['tiny_files'])
    for repo, data in hub_setup['broken'].items():
        add_to_hub_cache(cache, repo, {weights.WEIGHTS_FILE: data})
    corrupt_file = hub_setup['root'] / 'corrupt.safetensors'
    corrupt_file.write_bytes(hub_setup['broken']['test-org/corrupt'])
    scenarios = OFFLINE + [f'file:{corrupt_file}']
    results = run_python(LOAD_SCENARIOS, cache, offline=True,
                         argv=[json.dumps(dict(hub_setup['args'], scenarios=scenarios))])
    return dict(results, cache=str(cache), corrupt_file=str(corrupt_file))


def test_pretrained_load_equals_converted_weights_bit_for_bit(offline):
    assert offline['bit_exact'] is True


def test_hf_hub_prefixed_name_loads_the_checked_weights(offline):
    assert offline['hf_hub_prefix'] is True


def test_pretrained_features_only_matches_the_classifier_intermediates(offline):
    assert offline['features_only'] is True


def test_pretrained_in_chans_and_num_classes_are_adapted(offline):
    assert offline['adapted'] == dict(stem=True, head=[10, 512], rest=True)


def test_offline_and_not_cached_says_how_to_get_the_weights(offline):
    message = offline['unpublished']
    assert _missing(message, 'PretrainedWeightsError', 'biformer_small.in1k', UNPUBLISHED_REPO, 'HF_HUB_OFFLINE',
                    offline['cache'], 'not published', 'biformer-zoo convert --model biformer_small',
                    "pretrained_cfg_overlay=dict(file='biformer_small.in1k/model.safetensors')") == []


def test_checksum_mismatch_says_which_file_to_delete(offline):
    message = offline['repo:test-org/bad-sha']
    assert _missing(message, 'biformer_tiny', 'test-org/bad-sha', 'sha256', '0' * 64, 'Delete',
                    f"{offline['cache']}/models--test-org--bad-sha/blobs/") == []


def test_truncated_download_is_reported(offline):
    message = offline['repo:test-org/truncated']
    assert _missing(message, 'biformer_tiny', 'test-org/truncated', 'truncated or incomplete', 'Delete') == []


def test_corrupt_file_is_reported(offline):
    message = offline['repo:test-org/corrupt']
    assert _missing(message, 'biformer_tiny', 'test-org/corrupt', 'corrupt or truncated', 'header', 'Delete') == []


def test_corrupt_local_file_is_reported(offline):
    message = offline[f"file:{offline['corrupt_file']}"]
    assert _missing(message, 'biformer_tiny', offline['corrupt_file'], 'corrupt or truncated',
                    'biformer-zoo convert --model biformer_tiny') == []


def test_wrong_architecture_in_file_is_reported(offline):
    message = offline['repo:test-org/wrong-arch']
    assert _missing(message, 'biformer_tiny', 'test-org/wrong-arch', "for 'crossformer_tiny'",
                    "timm.create_model('crossformer_tiny'") == []


def test_weights_without_a_manifest_checksum_are_not_loaded(offline):
    """A file found at a repo the manifest lists as not published (no sha256) cannot be verified: refused."""
    message = offline['repo:test-org/unverified']
    assert _missing(message, 'PretrainedWeightsError', 'test-org/unverified', 'records no sha256', 'not loaded',
                    'biformer-zoo convert --model biformer_tiny', 'pretrained_cfg_overlay=dict(file=...)') == []


def test_revision_pinned_manifest_entry_is_still_checked(offline):
    message = offline['repo:test-org/pinned@main']
    assert _missing(message, 'test-org/pinned', 'sha256', '0' * 64) == []


def test_push_without_token_is_a_clear_error(offline):
    assert _missing(offline['push'], 'test-org/upload', 'token', 'HF_TOKEN') == []


@pytest.fixture(scope='module')
def online(hub_setup):
    """Downloads from a loopback HF_ENDPOINT into an empty cache, in one subprocess."""
    served = hub_setup['root'] / 'served'
    for name, data in hub_setup['tiny_files'].items():
        (served / TINY_REPO).mkdir(parents=True, exist_ok=True)
        (served / TINY_REPO / name).write_bytes(data)
    (served / 'test-org' / 'no-weights').mkdir(parents=True)
    (served / 'test-org' / 'no-weights' / 'config.json').write_bytes(hub_setup['tiny_files']['config.json'])
    scenarios = [f'cached_before:{TINY}.in1k', 'bit_exact', f'cached:{TINY}.in1k', 'unpublished',
                 'repo:test-org/no-weights']
    cache = hub_setup['root'] / 'online' / 'hub'
    with serve_hub(served) as endpoint:
        return run_python(LOAD_SCENARIOS, cache, offline=False, endpoint=endpoint,
                          argv=[json.dumps(dict(hub_setup['args'], scenarios=scenarios))])


def test_download_from_endpoint_equals_converted_weights(online):
    assert online['bit_exact'] is True


def test_list_pretrained_sees_the_downloaded_file_in_the_cache(online):
    assert [online[f'cached_before:{TINY}.in1k'], online[f'cached:{TINY}.in1k']] == [False, True]


def test_repo_missing_says_not_published_and_how_to_convert(online):
    message = online['unpublished']
    assert _missing(message, 'biformer_small.in1k', UNPUBLISHED_REPO, 'does not exist', 'not published',
                    'biformer_small_in1k.pth', 'biformer-zoo convert --model biformer_small') == []


def test_file_missing_in_repo_is_reported(online):
    message = online['repo:test-org/no-weights']
    assert _missing(message, 'biformer_tiny', 'test-org/no-weights', 'has no file model.safetensors',
                    'pretrained_cfg_overlay=dict(file=...)') == []
