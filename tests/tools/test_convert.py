"""``biformer-zoo convert``: official checkpoints to safetensors weights, config.json, model card and manifest entry."""
import functools
import hashlib
import json
import re
import shutil
import threading
import types
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

from biformer_zoo import cli, weights
from biformer_zoo.models import checkpoint_filter_for
from biformer_zoo.tools import convert, out_folder, push
from biformer_zoo.tools.push import CONVERTED_FILES
from official_layouts import (
    OFFICIAL_LAYOUTS, TINY, RunsCodeWhenUnpickled, save_official_checkpoint, synth_official_state_dict)

TINY_REPO = 'biformer-zoo/biformer_tiny.in1k'


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _missing(message: str, *parts: str) -> list:
    """The parts a user-facing message should name but does not."""
    return [p for p in parts if p not in message]


def test_convert_prints_the_sha256_of_the_written_weights(tiny_converted):
    out, printed = tiny_converted
    assert re.search(r'sha256 ([0-9a-f]{64})', printed).group(1) == _sha256(out / weights.WEIGHTS_FILE)


def test_convert_writes_timm_config(tiny_converted):
    config = json.loads((tiny_converted[0] / 'config.json').read_text())
    assert (config['architecture'], config['pretrained_cfg']['tag'], config['num_classes']) == (TINY, 'in1k', 1000)


def test_model_card_has_provenance_license_citation_and_measured_numbers(tiny_converted, tiny_checkpoint):
    card = (tiny_converted[0] / 'README.md').read_text()
    with torch.device('meta'):
        params = sum(p.numel() for p in timm.create_model(TINY).parameters())
    entry = weights.find_manifest_entry(TINY, 'in1k')
    assert _missing(card, _sha256(tiny_checkpoint), entry['sources'][0]['url'], 'license: mit',
                    '@Article{zhu2023biformer', f'{params:,}',
                    'GFLOPs at 224x224 (fvcore on the converted model, 1 multiply-add = 1 flop): 2.') == []


def test_convert_is_reproducible_and_updates_the_manifest(tiny_converted, tiny_checkpoint, tmp_path):
    manifest = tmp_path / 'weights_manifest.json'
    manifest.write_bytes(weights.MANIFEST_PATH.read_bytes())
    convert.convert_checkpoint(TINY, tiny_checkpoint, tmp_path / 'again', update_manifest=True, manifest_path=manifest,
                               measure_flops=False, progress=False)
    entry = [e for e in json.loads(manifest.read_text())['weights'] if e['hf_hub_id'] == TINY_REPO][0]
    converted = tiny_converted[0] / weights.WEIGHTS_FILE
    assert {k: entry[k] for k in ('sha256', 'size', 'source_sha256', 'status')} == dict(
        sha256=_sha256(converted), size=converted.stat().st_size, source_sha256=_sha256(tiny_checkpoint),
        status='converted')


@pytest.mark.parametrize('matches', [True, False])
def test_convert_keeps_a_published_entry_published(tiny_converted, tiny_checkpoint, tmp_path, monkeypatch, matches):
    """--update-manifest without --push: a published entry describes the file on the Hub. The same file keeps it
    published; a different one is refused and the manifest is left as it is."""
    manifest = json.loads(weights.MANIFEST_PATH.read_text())
    entry = [e for e in manifest['weights'] if e['hf_hub_id'] == TINY_REPO][0]
    published = _sha256(tiny_converted[0] / weights.WEIGHTS_FILE) if matches else '1' * 64
    entry.update(sha256=published, size=1, status='published')
    path = tmp_path / 'weights_manifest.json'
    path.write_text(json.dumps(manifest))
    monkeypatch.setattr(weights.manifest, 'MANIFEST_PATH', path)
    weights.load_manifest.cache_clear()
    try:
        run = functools.partial(convert.convert_checkpoint, TINY, tiny_checkpoint, tmp_path / 'out',
                                    update_manifest=True, manifest_path=path, measure_flops=False, progress=False)
        if matches:
            run()
        else:
            with pytest.raises(ValueError, match=f'published with sha256 {published}.*left as it is'):
                run()
        after = [e for e in json.loads(path.read_text())['weights'] if e['hf_hub_id'] == TINY_REPO][0]
    finally:
        weights.load_manifest.cache_clear()
    assert (after['status'], after['sha256']) == ('published', published)


def test_convert_accepts_a_tagged_name_and_checks_the_output_folder_first(tiny_checkpoint, tmp_path):
    result = convert.convert_checkpoint(f'{TINY}.in1k', tiny_checkpoint, tmp_path / 'out', measure_flops=False,
                                    progress=False)
    assert result.model == f'{TINY}.in1k'
    (tmp_path / 'a_file').write_text('')
    with pytest.raises(ValueError, match='is a file'):
        convert.convert_checkpoint(TINY, tiny_checkpoint, tmp_path / 'a_file', measure_flops=False, progress=False)


@pytest.mark.parametrize('present,match', [
    (['notes.txt', 'README.md'], r'is not empty \(it holds README\.md, notes\.txt\); .* or --overwrite'),
    (['README.md', 'config.json', 'model.safetensors'], r'already holds a conversion .*; pass --overwrite to replace'),
])
def test_convert_refuses_a_folder_that_holds_files(tmp_path, present, match):
    """Before any work: stray files would sit beside the conversion (and were uploaded with it), and a previous
    conversion would be replaced silently."""
    for name in present:
        (tmp_path / name).write_text('')
    with pytest.raises(ValueError, match=match):
        convert.convert_checkpoint(TINY, tmp_path / 'no_checkpoint_needed.pth', tmp_path, progress=False)


class RecordingHfApi:
    """Stands in for ``huggingface_hub.HfApi``: records what would be uploaded, uploads nothing."""
    uploaded: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, exist_ok=False):
        return repo_id

    def create_commit(self, repo_id, operations, commit_message):
        RecordingHfApi.uploaded = sorted(op.path_in_repo for op in operations)
        return types.SimpleNamespace(commit_url=f'https://huggingface.co/{repo_id}/commit/0')


def test_overwrite_replaces_a_conversion_and_push_uploads_only_its_files(tiny_converted, tiny_checkpoint, tmp_path,
                                                                       monkeypatch, capsys):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, 'HfApi', RecordingHfApi)
    monkeypatch.setenv('HF_TOKEN', 'hf_not_a_real_token')
    out = tmp_path / 'biformer_tiny.in1k'
    shutil.copytree(tiny_converted[0], out)
    (out / 'notes.txt').write_text('not for the Hub')
    code = cli.main(['convert', '--model', TINY, '--checkpoint', str(tiny_checkpoint), '--out', str(out),
                     '--overwrite', '--push', 'test-org/upload', '--no-flops', '--quiet'])
    assert (code, RecordingHfApi.uploaded) == (0, sorted(CONVERTED_FILES)), capsys.readouterr().err


@pytest.mark.parametrize('checkpoint', ['none.pth', 'empty.pth', 'page.pth'])
def test_convert_checks_the_checkpoint_before_it_makes_the_output_folder(tmp_path, checkpoint):
    (tmp_path / 'empty.pth').write_bytes(b'')
    (tmp_path / 'page.pth').write_text('<!DOCTYPE html><html>sign in</html>')
    with pytest.raises(ValueError, match=rf'{checkpoint} (does not exist|is empty|is not a checkpoint)'):
        convert.convert_checkpoint(TINY, tmp_path / checkpoint, tmp_path / 'out', measure_flops=False, progress=False)
    assert not (tmp_path / 'out').exists()


def test_push_without_a_token_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, 'get_token', lambda: None)
    code = cli.main(['convert', '--model', TINY, '--checkpoint', str(tmp_path / 'none.pth'), '--out',
                     str(tmp_path / 'out'), '--push', 'test-org/upload'])
    err = capsys.readouterr().err
    assert (code, err.count('\n'), 'HF_TOKEN' in err, (tmp_path / 'out').exists()) == (2, 1, True, False), err


def test_push_refuses_a_folder_without_the_converted_files(tmp_path):
    (tmp_path / 'config.json').write_text('{}')
    with pytest.raises(ValueError, match=r'has no model\.safetensors, README\.md; push a folder written by'):
        push.push_to_hub(tmp_path, 'test-org/upload', token='hf_not_a_real_token')


def _differs_from_mapped_official(weights_file: Path, official: dict, name: str, tag: str) -> list:
    """Keys whose tensor in the converted file is not the official tensor mapped by the family's filter."""
    with torch.device('meta'):
        model = timm.create_model(f'{name}.{tag}')
    expected = checkpoint_filter_for(model)(official, model)  # the family's filter, found the way convert does
    converted = safetensors.torch.load_file(str(weights_file))
    def keys(state: dict) -> set:
        return {k for k in state if not k.endswith('num_batches_tracked')}  # BatchNorm's counter is not a weight
    return sorted(keys(expected) ^ keys(converted)) + \
        [k for k, v in expected.items() if k in converted and not torch.equal(converted[k], v)]


def test_convert_biformer_layout_holds_the_official_tensors(tiny_converted):
    official = synth_official_state_dict(TINY)  # what tiny_checkpoint holds
    assert _differs_from_mapped_official(tiny_converted[0] / weights.WEIGHTS_FILE, official, TINY, 'in1k') == []


@pytest.fixture(scope='module')
def convert_layout(tmp_path_factory):
    """``convert(name, tag, layout) -> (official state dict, ConversionResult)``, each conversion done once."""
    done = {}

    def convert_once(name: str, tag: str, layout: str):
        if layout not in done:
            folder = tmp_path_factory.mktemp(layout)
            official = save_official_checkpoint(layout, folder / f'{layout}.pth')
            done[layout] = official, convert.convert_checkpoint(
                name, folder / f'{layout}.pth', folder / f'{name}.{tag}', tag=tag, measure_flops=False,
                progress=False)
        return done[layout]
    return convert_once


@pytest.mark.parametrize('name,tag,layout', OFFICIAL_LAYOUTS)
def test_convert_official_layout_holds_the_official_tensors(name, tag, layout, convert_layout):
    official, result = convert_layout(name, tag, layout)
    assert _differs_from_mapped_official(result.weights_file, official, name, tag) == []


def test_converted_folder_rebuilds_the_tags_model(convert_layout):
    """config.json rebuilds the model of the tag, as `hf-hub:biformer-zoo/<model>.<tag>` names do; in1k_nchw is
    the tag whose model differs from the architecture's default."""
    name, tag, layout = OFFICIAL_LAYOUTS[1]
    result = convert_layout(name, tag, layout)[1]
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    from_tag = timm.create_model(f'{name}.{tag}', pretrained=True,
                                 pretrained_cfg_overlay=dict(file=str(result.weights_file))).eval()
    from_folder = timm.create_model(f'local-dir:{result.out_dir}', pretrained=True).eval()
    with torch.no_grad():
        same = torch.equal(from_folder(images), from_tag(images))
    assert same, f"local-dir:{result.out_dir} builds another model than '{name}.{tag}' (its config.json misses a "\
                 f"model argument the tag implies)"


def test_convert_refuses_a_checkpoint_that_needs_code(tmp_path):
    path = tmp_path / 'evil.pth'
    torch.save({'model': synth_official_state_dict(TINY), 'hook': RunsCodeWhenUnpickled(tmp_path / 'ran')}, path)
    with pytest.raises(ValueError, match=r'needs code to unpickle \(.*leave_marker.*weights_only=True'):
        convert.convert_checkpoint(TINY, path, tmp_path / 'out', measure_flops=False, progress=False)
    assert not (tmp_path / 'ran').exists()


def test_convert_names_the_model_a_checkpoint_belongs_to(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match=r'does not fit biformer_small\.in1k: .* It matches biformer_tiny\.in1k'):
        convert.convert_checkpoint('biformer_small', tiny_checkpoint, tmp_path / 'out', measure_flops=False,
                               progress=False)




# ---------------------------------------------------------------------------------------------------------------
# all or nothing: the lock, the staging folder, the swap of --overwrite, the record that push checks


def _listing(folder: Path) -> dict:
    """Every path below ``folder`` with the sha256 of each file (None for a folder)."""
    return {str(p.relative_to(folder)): (_sha256(p) if p.is_file() else None) for p in sorted(folder.rglob('*'))}


def _convert_argv(checkpoint: Path, out: Path, *extra: str) -> list:
    return ['convert', '--model', TINY, '--checkpoint', str(checkpoint), '--out', str(out), '--no-flops', '--quiet',
            *extra]


def test_convert_into_a_locked_out_is_refused_in_one_line(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / 'out'
    with out_folder.conversion_lock(out):
        code = cli.main(_convert_argv(tiny_checkpoint, out))
    err = capsys.readouterr().err
    assert (code, err.count('\n'), 'another `biformer-zoo convert` is writing' in err, _listing(tmp_path)) == \
        (2, 1, True, {}), err


def test_two_converts_into_one_out_at_once_give_one_whole_conversion(tiny_checkpoint, tmp_path):
    """Started together in two threads: one converts, the other is refused (by the lock, or, if it comes second, by
    the finished conversion); the folder holds exactly what its record says and nothing is left beside it."""
    out = tmp_path / 'out'
    start = threading.Barrier(2)
    outcomes = []

    def run():
        start.wait()
        try:
            convert.convert_checkpoint(TINY, tiny_checkpoint, out, measure_flops=False, progress=False)
            outcomes.append('converted')
        except ValueError as e:
            outcomes.append('refused' if re.search('another `biformer-zoo convert`|already holds a conversion',
                                                   str(e)) else str(e))
    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    push.check_recorded_files(out)  # raises unless every file is what the record says
    assert (sorted(outcomes), sorted(p.name for p in tmp_path.iterdir())) == (['converted', 'refused'], ['out'])


def test_an_overwrite_interrupted_while_writing_leaves_the_old_conversion_whole(
        tiny_converted, tiny_checkpoint, tmp_path, monkeypatch):
    """SIGTERM while model.safetensors is half written (the CLI turns SIGTERM into SystemExit): the old folder is
    untouched, and the temporary folder and the lock are gone."""
    out = tmp_path / 'out'
    shutil.copytree(tiny_converted[0], out)
    (out / 'notes.txt').write_text('mine')
    before = _listing(tmp_path)

    def killed_while_writing(tensors, path, metadata):
        Path(path).write_bytes(b'\x00' * 4096)
        raise SystemExit(143)
    monkeypatch.setattr(convert, 'save_safetensors_reproducibly', killed_while_writing)
    with pytest.raises(SystemExit):
        cli.main(_convert_argv(tiny_checkpoint, out, '--overwrite'))
    assert _listing(tmp_path) == before


def test_overwrite_keeps_the_users_other_files(tiny_converted, tiny_checkpoint, tmp_path):
    out = tmp_path / 'out'
    shutil.copytree(tiny_converted[0], out)
    (out / 'notes.txt').write_text('mine')
    (out / WEIGHTS_FILE).write_bytes(b'an old conversion')
    convert.convert_checkpoint(TINY, tiny_checkpoint, out, measure_flops=False, progress=False, overwrite=True)
    assert ((out / 'notes.txt').read_text(), _sha256(out / WEIGHTS_FILE)) == \
        ('mine', _sha256(tiny_converted[0] / WEIGHTS_FILE))


def test_a_failed_convert_leaves_no_folder_it_created(tmp_path):
    path = tmp_path / 'evil.pth'
    torch.save({'model': synth_official_state_dict(TINY), 'hook': RunsCodeWhenUnpickled(tmp_path / 'ran')}, path)
    with pytest.raises(ValueError, match='needs code to unpickle'):
        convert.convert_checkpoint(TINY, path, tmp_path / 'new' / 'out', measure_flops=False, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['evil.pth']


WEIGHTS_FILE = weights.WEIGHTS_FILE


@pytest.mark.parametrize('name,tamper', [
    (WEIGHTS_FILE, lambda path: path.write_bytes(path.read_bytes()[:4 << 20])),  # cut short: the header promises more
    ('README.md', lambda path: path.write_text(path.read_text().replace('mit', 'apache-2.0'))),
])
def test_push_refuses_a_file_changed_since_convert_before_any_upload(tiny_converted, tmp_path, monkeypatch, name,
                                                                      tamper):
    import huggingface_hub
    calls = []
    monkeypatch.setattr(huggingface_hub, 'HfApi', lambda *args, **kwargs: calls.append(kwargs))
    folder = tmp_path / 'converted'
    shutil.copytree(tiny_converted[0], folder)
    tamper(folder / name)
    with pytest.raises(ValueError, match=rf'not what convert wrote: {re.escape(name)} \(.* recorded .*Nothing was '
                                         rf'uploaded'):
        push.push_to_hub(folder, 'test-org/upload', token='hf_not_a_real_token')
    assert calls == []


def test_push_refuses_a_folder_without_the_record(tiny_converted, tmp_path):
    folder = tmp_path / 'converted'
    shutil.copytree(tiny_converted[0], folder)
    (folder / push.RECORD_FILE).unlink()
    with pytest.raises(ValueError, match=r'has no readable conversion\.json .* convert again'):
        push.push_to_hub(folder, 'test-org/upload', token='hf_not_a_real_token')


def test_push_with_the_hub_unreachable_is_one_line_exit_2(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """A real connection refused (huggingface_hub's httpx client raises ConnectError, which is not an OSError)."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, 'ENDPOINT', 'http://127.0.0.1:9')  # nothing listens on the discard port
    monkeypatch.setenv('HF_TOKEN', 'hf_not_a_real_token')
    monkeypatch.delenv('BIFORMER_ZOO_DEBUG', raising=False)
    code = cli.main(_convert_argv(tiny_checkpoint, tmp_path / 'out', '--push', 'test-org/upload'))
    err = capsys.readouterr().err
    assert (code, err.count('\n'), re.search(r"uploading .* failed \(ConnectError: .*the converted folder is kept",
                                             err) is not None) == (2, 1, True), err


@pytest.mark.parametrize('no_ema', [False, True], ids=['ema', 'no-ema'])
def test_convert_follows_the_ema_rule_of_every_load_path(tmp_path, no_ema):
    """A checkpoint holding ``model`` and ``model_ema``: convert writes the EMA weights, as ``file=`` loads them;
    ``--no-ema`` writes ``model``. The model card says which."""
    official = synth_official_state_dict(TINY)
    ema = dict(official, **{'head.bias': official['head.bias'] + 1})
    path = tmp_path / 'with_ema.pth'
    torch.save({'model': official, 'model_ema': ema}, path)
    out = tmp_path / 'out'
    code = cli.main(['convert', '--model', TINY, '--checkpoint', str(path), '--out', str(out), '--no-flops',
                     '--quiet', *(['--no-ema'] if no_ema else [])])
    converted = safetensors.torch.load_file(str(out / weights.WEIGHTS_FILE))
    chosen = official if no_ema else ema
    assert (code, torch.equal(converted['head.fc.bias'], chosen['head.bias'])) == (0, True)
    assert ('--no-ema' in (out / 'README.md').read_text()) == no_ema
