"""``biformer-zoo convert``: an official checkpoint into a Hub-ready folder (``model.safetensors``, timm's
``config.json``, a model card), optionally recorded in the manifest and uploaded to the Hub.

A conversion is all or nothing. It is written into a temporary folder beside ``--out`` and moved into place by one
rename once every file is written and checked; a run that fails leaves no folder it created. A lock file beside
``--out`` (``.<name>.convert.lock``, created exclusively) refuses a second run into the same ``--out`` while one is
running. ``overwrite=True`` swaps the new folder for the old one in one rename (``renameat2(RENAME_EXCHANGE)`` on
Linux; elsewhere the old folder is moved aside first), so an interruption leaves the old conversion whole; files of
the user's beside the old conversion are carried over into the new folder.

What was written is recorded in ``conversion.json`` (each file's size and sha256; it stays in the folder and is
not uploaded). ``tools.push.push_to_hub`` uploads only a folder whose files still match that record; the folder's
checks, lock, staging and renames are ``tools.out_folder``.
"""
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import timm
import torch

from .._version import __version__
from .flops import flop_analysis
from ..weights import (
    WEIGHTS_FILE, PathLike, check_checkpoint_file, find_manifest_entry, load_manifest,
    load_official_checkpoint, manifest_entries, read_safetensors_header, save_safetensors_reproducibly, sha256_file,
    update_manifest_entry)
from ..weights._progress import step
from ..models import checkpoint_filter_for
from .layouts import guess_architecture, layout_mismatch
from .out_folder import check_out_dir, move_into_place, staging_folder
from .push import CONVERTED_FILES, RECORD_FILE, hub_token, push_to_hub, record_files

__all__ = ['ConversionResult', 'convert_checkpoint']



@dataclass
class ConversionResult:
    """What ``convert_checkpoint`` wrote and measured."""
    model: str
    out_dir: Path
    weights_file: Path
    sha256: str
    size: int
    source_sha256: str
    params: int
    gflops: Optional[float]
    use_ema: bool = True
    pushed_to: Optional[str] = None


def _model_card(entry: Dict[str, Any], family: Dict[str, Any], result: ConversionResult, source_name: str) -> str:
    """README.md for the Hub repo: usage, provenance, measured and reported numbers, license and citation."""
    ema_rule = ('the EMA weights where the checkpoint holds them (`state_dict_ema`, `model_ema`), else `model`, '
                "as biformer-zoo and timm load checkpoints" if result.use_ema else
                '`model` (or `state_dict`), not the EMA weights (`--no-ema`)')
    arch, tag = entry['architecture'], entry['tag']
    prep, reported = entry['preprocessing'], entry['reported']
    size = 'x'.join(str(s) for s in prep['input_size'][1:])
    sources = '\n'.join(
        f"  - {s['host']}: {s['url']}" + (f" (password {s['password']})" if s.get('password') else '')
        for s in entry['sources'])
    flops = f"{result.gflops:.3f}" if result.gflops is not None else 'not measured'
    card = f"""---
license: {entry['license']}
library_name: timm
pipeline_tag: image-classification
tags:
- image-classification
- timm
- biformer-zoo
datasets:
- {entry['dataset']}
---
# {arch}.{tag}

Image classifier from *{family['paper']}*, trained on {entry['dataset']} by the authors and converted from
their official checkpoint to the biformer-zoo timm layout. {entry.get('notes', '')}

## Usage
```python
import timm
import biformer_zoo  # registers the models with timm

model = timm.create_model('{arch}.{tag}', pretrained=True).eval()
transform = timm.data.create_transform(**timm.data.resolve_data_config({{}}, model=model))
```

## Model details
- Parameters (measured on the converted model): {result.params / 1e6:.2f} M ({result.params:,})
- GFLOPs at {size} (fvcore on the converted model, 1 multiply-add = 1 flop): {flops}
- Reported by the authors: top-1 {reported['top1']} % on ImageNet-1k val, {reported['params_M']} M parameters,
  {reported['gflops']} GFLOPs
- Preprocessing: {size} input, center crop {prep['crop_pct']}, {prep['interpolation']} interpolation,
  mean {tuple(prep['mean'])}, std {tuple(prep['std'])}
- Paper: {family['paper_url']}; official code: {family['code_url']}

## Provenance
- Converted from the official checkpoint `{source_name}` (sha256 `{result.source_sha256}`), released at:
{sources}
- Converted with biformer-zoo {__version__}:
  `biformer-zoo convert --model {arch} --tag {tag} --checkpoint {source_name}{'' if result.use_ema else ' --no-ema'}`
  (keys mapped by the model's checkpoint_filter_fn, loaded strictly, forward checked)
- Weights: {ema_rule}
- `{WEIGHTS_FILE}` sha256 `{result.sha256}`, {result.size:,} bytes

## License
The official weights are released by the authors under the {entry['license'].upper()} license
({family['license_url']}, which carries the copyright notice); this conversion keeps that license.

## Citation
```bibtex
{family['citation']}
```
"""
    return card


def _resolve_entry(model_name: str, tag: str, push: Optional[str], update_manifest: bool
                   ) -> Tuple[str, str, Dict[str, Any]]:
    """The architecture, tag and manifest entry of ``model_name`` (which may carry the tag), with the fix when the
    name, the tag or ``push`` with ``update_manifest`` does not fit the manifest."""
    if '.' in model_name:  # 'biformer_small.in1k': the tag may come with the name
        model_name, name_tag = model_name.split('.', 1)
        if tag not in ('in1k', name_tag):
            raise ValueError(f"the model name's tag '{name_tag}' and --tag '{tag}' disagree; give the tag once")
        tag = name_tag
    if not timm.is_model(model_name):
        raise ValueError(f"unknown model '{model_name}'; `biformer-zoo list` shows the registered models")
    entry = find_manifest_entry(model_name, tag)
    if entry is None:
        tags = [e['tag'] for e in manifest_entries() if e['architecture'] == model_name]
        raise ValueError(f"'{model_name}.{tag}' is not in the weights manifest; known tags of {model_name}: "
                         f"{tags or 'none'}. Pass --tag with one of them")
    if push and update_manifest and push != entry['hf_hub_id']:
        raise ValueError(f"--update-manifest with --push {push}: the manifest's repo for {model_name}.{tag} is "
                         f"{entry['hf_hub_id']}; push there, or leave out --update-manifest")
    return model_name, tag, entry


def _load_converted_model(
        checkpoint: Path, model_tag: str, entry: Dict[str, Any], use_ema: bool, progress: bool) -> torch.nn.Module:
    """``model_tag`` holding the official ``checkpoint`` (its EMA weights first unless ``use_ema=False``), mapped by
    the family's filter and loaded strictly."""
    with step(f'loading {checkpoint.name} (weights_only=True)', progress):
        official = load_official_checkpoint(checkpoint, use_ema=use_ema)

    with step(f'mapping onto {model_tag} and loading strictly', progress):
        model = timm.create_model(model_tag).eval()
        try:
            mapped = checkpoint_filter_for(model)(official, model)
        except (RuntimeError, KeyError, ValueError) as e:
            raise ValueError(f'{checkpoint} cannot be mapped onto {model_tag}: {e}') from None
        problems = layout_mismatch(mapped, model)
        if problems:
            family = type(model).__module__.rsplit('.', 1)[-1]
            guesses = guess_architecture(official, timm.list_models(module=family, pretrained=True))
            official_file = entry['sources'][0].get('file_name') or 'listed in the manifest'
            hint = (f'It matches {", ".join(guesses)}; pass --model/--tag accordingly.' if guesses else
                    f'The official file for {model_tag} is {official_file}.')
            raise ValueError(f"{checkpoint} does not fit {model_tag}: {'; '.join(problems)}. {hint}")
        model.load_state_dict(mapped, strict=True)
    return model


@torch.no_grad()
def _check_forward(model: torch.nn.Module, model_tag: str, progress: bool) -> None:
    """One forward pass at the pretrained input size: logits of the right shape, all finite."""
    with step('checking a forward pass', progress):
        input_size = tuple(model.pretrained_cfg['input_size'])
        images = torch.randn(1, *input_size, generator=torch.Generator().manual_seed(0))
        logits = model(images)
        if logits.shape != (1, model.num_classes) or not torch.isfinite(logits).all():
            raise ValueError(f'{model_tag} with the converted weights gives logits of shape {tuple(logits.shape)} '
                             f'with non-finite values; the checkpoint or its mapping is broken')


@torch.no_grad()
def _count_gflops(model: torch.nn.Module, progress: bool) -> float:
    input_size = tuple(model.pretrained_cfg['input_size'])
    with step(f'counting FLOPs at {input_size[1]}x{input_size[2]} (fvcore)', progress):
        with warnings.catch_warnings():  # fvcore traces with torch.jit, which warns that it is deprecated
            warnings.simplefilter('ignore')
            return flop_analysis(model, torch.zeros(1, *input_size)).total() / 1e9


def _write_weights(model: torch.nn.Module, folder: Path, metadata: Dict[str, str], progress: bool) -> Path:
    """``model.safetensors`` and timm's ``config.json`` in ``folder``; the weights file read back whole, with every
    tensor of the model."""
    from timm.models._hub import save_config_for_hf
    weights_file = folder / WEIGHTS_FILE
    with step(f'writing {WEIGHTS_FILE}', progress):
        tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_safetensors_reproducibly(tensors, weights_file, metadata)
        save_config_for_hf(model, folder / 'config.json')
    try:
        written = set(read_safetensors_header(weights_file)[0])
    except ValueError as e:
        raise ValueError(f'{weights_file} was not written whole ({e}); check the free space and run again') from None
    if written != set(tensors):
        raise ValueError(f'{weights_file} holds {len(written)} tensors after writing, the model {len(tensors)}; '
                         f'run again')
    return weights_file


def _write_record(folder: Path, model_tag: str) -> None:
    """``conversion.json``: the size and sha256 of each converted file, which ``push_to_hub`` checks."""
    record = dict(model=model_tag, files=record_files(folder, CONVERTED_FILES))
    (folder / RECORD_FILE).write_text(json.dumps(record, indent=2) + '\n', encoding='utf-8')


def _check_published(entry: Dict[str, Any], result: 'ConversionResult') -> None:
    """``--update-manifest`` without ``--push`` over a published entry: the conversion must give the published file."""
    if entry['sha256'] != result.sha256:
        raise ValueError(
            f"{result.model} is published with sha256 {entry['sha256']}, but this conversion gives {result.sha256}; "
            f"the manifest describes the file on the Hub, so it is left as it is (and nothing is written). Convert "
            f"the official file the manifest names (source sha256 {entry.get('source_sha256')}), or --push the new "
            f"file")


def convert_checkpoint(
        model_name: str,
        checkpoint: PathLike,
        out_dir: PathLike,
        tag: str = 'in1k',
        push: Optional[str] = None,
        update_manifest: bool = False,
        manifest_path: Optional[PathLike] = None,
        measure_flops: bool = True,
        progress: bool = True,
        overwrite: bool = False,
        use_ema: bool = True,
) -> ConversionResult:
    """Convert an official checkpoint of ``model_name.tag`` into a Hub-ready folder (``model_name`` may carry the
    tag, as in ``'biformer_small.in1k'``).

    Loads ``checkpoint`` with ``weights_only=True``, maps it with the family's ``checkpoint_filter_fn``, loads it
    strictly, checks a forward pass, and writes ``model.safetensors`` (architecture, tag and source sha256 in its
    metadata), timm's ``config.json``, a model card ``README.md`` and ``conversion.json`` (their sizes and sha256)
    into ``out_dir``, all at once (see the module docstring). Optionally records sha256/size in the manifest and
    uploads the three converted files (nothing else in ``out_dir``) to ``push`` (a Hub repo id).

    ``out_dir`` must be new or empty; ``overwrite=True`` replaces a folder that holds files (a previous conversion
    is replaced; other files are kept and not uploaded). A training checkpoint holding EMA weights gives those, as
    every load path does (``weights.official``); ``use_ema=False`` takes ``model``.
    """
    model_name, tag, entry = _resolve_entry(model_name, tag, push, update_manifest)
    keep_published = update_manifest and not push and entry['status'] == 'published'
    out_dir = Path(out_dir)
    if push:
        hub_token(out_dir, push)  # before any work is done
    check_out_dir(out_dir, overwrite)
    checkpoint = Path(checkpoint)
    check_checkpoint_file(checkpoint)  # before the lock: a missing or wrong checkpoint leaves nothing behind
    model_tag = f'{model_name}.{tag}'
    target = Path(os.path.realpath(out_dir))  # a link to a folder: the lock and the new folder go beside the folder
    with staging_folder(target) as staging:
        check_out_dir(target, overwrite)  # again, now that no other convert can write it
        source_sha256 = sha256_file(checkpoint, progress=progress)
        model = _load_converted_model(checkpoint, model_tag, entry, use_ema, progress)
        _check_forward(model, model_tag, progress)
        gflops = _count_gflops(model, progress) if measure_flops else None
        metadata = dict(format='pt', architecture=model_name, tag=tag, source_sha256=source_sha256)
        weights_file = _write_weights(model, staging, metadata, progress)
        result = ConversionResult(
            model=model_tag, out_dir=out_dir, weights_file=out_dir / WEIGHTS_FILE,
            sha256=sha256_file(weights_file, progress), size=weights_file.stat().st_size, source_sha256=source_sha256,
            params=sum(p.numel() for p in model.parameters()), gflops=gflops, use_ema=use_ema)
        family = load_manifest()['families'][entry['family']]
        (staging / 'README.md').write_text(_model_card(entry, family, result, checkpoint.name), encoding='utf-8')
        _write_record(staging, model_tag)
        if keep_published:
            _check_published(entry, result)
        move_into_place(staging, target)
    if push:
        result.pushed_to = push_to_hub(out_dir, push)
    if update_manifest:
        update_manifest_entry(
            model_name, tag, manifest_path, sha256=result.sha256, size=result.size, source_sha256=source_sha256,
            status='published' if push or keep_published else 'converted')
    return result
