"""``biformer-zoo convert``: an official checkpoint into a Hub-ready folder (``model.safetensors``, timm's
``config.json``, a model card), optionally recorded in the manifest and uploaded to the Hub."""
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import timm
import torch

from .._version import __version__
from .flops import flop_analysis
from ..weights import (
    WEIGHTS_FILE, PathLike, PretrainedWeightsError, check_checkpoint_file, find_manifest_entry, load_manifest,
    load_official_checkpoint, manifest_entries,
    save_safetensors_reproducibly, sha256_file, update_manifest_entry)
from ..weights._progress import step
from ..models import checkpoint_filter_for
from .layouts import guess_architecture, layout_mismatch

__all__ = ['CONVERTED_FILES', 'ConversionResult', 'convert_checkpoint', 'push_to_hub']

CONVERTED_FILES = (WEIGHTS_FILE, 'config.json', 'README.md')  # what convert writes, and all that push uploads


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
    pushed_to: Optional[str] = None


def _model_card(entry: Dict[str, Any], family: Dict[str, Any], result: ConversionResult, source_name: str) -> str:
    """README.md for the Hub repo: usage, provenance, measured and reported numbers, license and citation."""
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
  `biformer-zoo convert --model {arch} --tag {tag} --checkpoint {source_name}`
  (keys mapped by the model's checkpoint_filter_fn, loaded strictly, forward checked)
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


def _hub_token(folder: PathLike, repo_id: str, token: Optional[str] = None) -> str:
    """``token``, else the one in the environment or from ``hf auth login``; an error that says how to set one."""
    from huggingface_hub import get_token
    token = token or get_token()
    if not token:
        raise PretrainedWeightsError(
            f"uploading {folder} to the Hub repo '{repo_id}' needs a Hugging Face token with write access; none is "
            f"set. Set HF_TOKEN=hf_... in the environment (or run `hf auth login`) and run again.")
    return token


def push_to_hub(folder: PathLike, repo_id: str, token: Optional[str] = None,
                files: Sequence[str] = CONVERTED_FILES) -> str:
    """Upload ``files`` of a converted folder (by default what ``convert_checkpoint`` writes, and nothing else that
    lies in it) to the Hub repo ``repo_id`` (created if needed), in one commit; returns the commit URL.

    The token comes from ``token``, else the environment (``HF_TOKEN``) or ``hf auth login``.
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError
    folder = Path(folder)
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"{folder} has no {', '.join(missing)}; push a folder written by `biformer-zoo convert`")
    api = HfApi(token=_hub_token(folder, repo_id, token))
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in files]
    try:
        api.create_repo(repo_id, exist_ok=True)
        commit = api.create_commit(repo_id, operations,
                                   commit_message=f'Add {folder.name} converted with biformer-zoo')
    except HfHubHTTPError as e:
        raise PretrainedWeightsError(
            f"uploading {folder} to the Hub repo '{repo_id}' failed: {e}. Check that HF_TOKEN has write access to "
            f"that repo (or its organisation).") from e
    return str(commit.commit_url)


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse a file and a folder that holds files (unless ``overwrite``), with the fix; before any work is done."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f'--out {out_dir} is a file; pass a folder to write the converted weights into')
    present = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    if present and not overwrite:
        if set(present) <= set(CONVERTED_FILES):
            raise ValueError(f"--out {out_dir} already holds a conversion ({', '.join(present)}); pass --overwrite "
                             f"to replace it, or another folder")
        shown = ', '.join(present[:5]) + (f' and {len(present) - 5} more' if len(present) > 5 else '')
        raise ValueError(f'--out {out_dir} is not empty (it holds {shown}); pass a new or empty folder, or '
                         f'--overwrite to write into it anyway (its other files are kept and never uploaded)')


def _make_out_dir(out_dir: Path) -> None:
    """Create ``out_dir``, refusing one that cannot be written, with the fix."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):  # the folder may exist and still refuse files
            pass
    except OSError as e:
        raise ValueError(f'--out {out_dir} cannot be written ({e.strerror or e}: {e.filename or out_dir}); pass a '
                         f'folder you can write to') from None


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
) -> ConversionResult:
    """Convert an official checkpoint of ``model_name.tag`` into a Hub-ready folder (``model_name`` may carry the
    tag, as in ``'biformer_small.in1k'``).

    Loads ``checkpoint`` with ``weights_only=True``, maps it with the family's ``checkpoint_filter_fn``, loads it
    strictly, checks a forward pass, and writes ``model.safetensors`` (architecture, tag and source sha256 in its
    metadata), timm's ``config.json`` and a model card ``README.md`` into ``out_dir``. Optionally records sha256/size
    in the manifest and uploads those three files (nothing else in ``out_dir``) to ``push`` (a Hub repo id).

    ``out_dir`` must be new or empty; ``overwrite=True`` writes into a folder that holds files anyway (a previous
    conversion is replaced; other files are kept and not uploaded).
    """
    from timm.models._hub import save_config_for_hf

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
    if update_manifest and not push and entry['status'] == 'published':
        published_sha256 = entry['sha256']
    else:
        published_sha256 = None
    out_dir = Path(out_dir)
    if push:
        _hub_token(out_dir, push)  # before any work is done
    _check_out_dir(out_dir, overwrite)
    checkpoint = Path(checkpoint)
    check_checkpoint_file(checkpoint)
    _make_out_dir(out_dir)  # only now: a missing or wrong checkpoint leaves no folder behind
    family = load_manifest()['families'][entry['family']]
    model_tag = f'{model_name}.{tag}'

    source_sha256 = sha256_file(checkpoint, progress=progress)
    with step(f'loading {checkpoint.name} (weights_only=True)', progress):
        official = load_official_checkpoint(checkpoint)

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

    with step('checking a forward pass', progress), torch.no_grad():
        input_size = tuple(model.pretrained_cfg['input_size'])
        images = torch.randn(1, *input_size, generator=torch.Generator().manual_seed(0))
        logits = model(images)
        if logits.shape != (1, model.num_classes) or not torch.isfinite(logits).all():
            raise ValueError(f'{model_tag} with the converted weights gives logits of shape {tuple(logits.shape)} '
                             f'with non-finite values; the checkpoint or its mapping is broken')

    params = sum(p.numel() for p in model.parameters())
    gflops = None
    if measure_flops:
        with step(f'counting FLOPs at {input_size[1]}x{input_size[2]} (fvcore)', progress), torch.no_grad():
            with warnings.catch_warnings():  # fvcore traces with torch.jit, which warns that it is deprecated
                warnings.simplefilter('ignore')
                gflops = flop_analysis(model, torch.zeros(1, *input_size)).total() / 1e9

    weights_file = out_dir / WEIGHTS_FILE
    with step(f'writing {weights_file}', progress):
        tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        metadata = dict(format='pt', architecture=model_name, tag=tag, source_sha256=source_sha256)
        save_safetensors_reproducibly(tensors, weights_file, metadata)
        save_config_for_hf(model, out_dir / 'config.json')
    result = ConversionResult(
        model=model_tag, out_dir=out_dir, weights_file=weights_file, sha256=sha256_file(weights_file, progress),
        size=weights_file.stat().st_size, source_sha256=source_sha256, params=params, gflops=gflops)
    (out_dir / 'README.md').write_text(_model_card(entry, family, result, checkpoint.name), encoding='utf-8')

    if published_sha256 is not None and published_sha256 != result.sha256:
        raise ValueError(
            f"{model_tag} is published with sha256 {published_sha256}, but this conversion wrote {result.sha256} "
            f"({weights_file}); the manifest describes the file on the Hub, so it is left as it is. Convert the "
            f"official file the manifest names (source sha256 {entry.get('source_sha256')}), or --push the new file")
    if push:
        result.pushed_to = push_to_hub(out_dir, push)
    if update_manifest:
        update_manifest_entry(
            model_name, tag, manifest_path, sha256=result.sha256, size=result.size, source_sha256=source_sha256,
            status='published' if push or published_sha256 is not None else 'converted')
    return result
