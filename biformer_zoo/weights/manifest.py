"""The weights manifest: ``weights_manifest.json`` (repository root, shipped inside the package) lists every
pretrained tag, with its Hub repo, the sha256 and size of the converted ``model.safetensors``, the official file it
comes from, what the authors report, what the official code measures, and the evaluation preprocessing. It is the one
source of these facts: the pretrained cfgs registered with timm and the report's paper columns are built from it.
"""
import functools
import json
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

__all__ = [
    'MANIFEST_PATH', 'WEIGHTS_FILE', 'STATUSES', 'PathLike', 'load_manifest', 'manifest_entries', 'find_manifest_entry',
    'manifest_pretrained_cfg', 'manifest_pretrained_cfgs', 'dump_manifest', 'update_manifest_entry', 'split_hub_id']

MANIFEST_PATH = Path(__file__).resolve().parent.parent / 'weights_manifest.json'
WEIGHTS_FILE = 'model.safetensors'
STATUSES = ('published', 'converted', 'convertible')

PathLike = Union[str, os.PathLike]


def split_hub_id(hf_hub_id: str) -> Tuple[str, Optional[str]]:
    """``'org/name@revision'`` -> ('org/name', 'revision'); the revision is None when absent."""
    repo_id, _, revision = hf_hub_id.partition('@')
    return repo_id, revision or None


@functools.lru_cache(maxsize=None)
def load_manifest(path: Optional[PathLike] = None) -> Dict[str, Any]:
    """The parsed weights manifest (cached; call ``load_manifest.cache_clear()`` after editing the file)."""
    with open(path or MANIFEST_PATH, encoding='utf-8') as f:
        return json.load(f)


def manifest_entries() -> List[Dict[str, Any]]:
    """One dict per pretrained tag, in manifest order."""
    return load_manifest()['weights']


def find_manifest_entry(
        architecture: Optional[str] = None,
        tag: Optional[str] = None,
        hf_hub_id: Optional[str] = None,
) -> Optional[Dict[str, Any]]:
    """The manifest entry matching every given field, or None; Hub ids match by repo, whatever their revision."""
    for entry in manifest_entries():
        if ((architecture is None or entry['architecture'] == architecture)
                and (tag is None or entry['tag'] == tag)
                and (hf_hub_id is None or split_hub_id(entry['hf_hub_id'])[0] == split_hub_id(hf_hub_id)[0])):
            return entry
    return None


def manifest_pretrained_cfg(architecture: str, tag: str) -> Dict[str, Any]:
    """The pretrained-cfg fields the manifest fixes for ``architecture.tag``, as timm's ``_cfg`` dicts spell them:
    the Hub repo, classes, license, evaluation preprocessing, the paper and the official file it is converted from."""
    entry = find_manifest_entry(architecture, tag)
    if entry is None:
        raise ValueError(f"'{architecture}.{tag}' is not in the weights manifest {MANIFEST_PATH}")
    family = load_manifest()['families'][entry['family']]
    prep = entry['preprocessing']
    source = entry['sources'][0]
    return dict(
        hf_hub_id=entry['hf_hub_id'], num_classes=entry['num_classes'], license=entry['license'],
        input_size=tuple(prep['input_size']), crop_pct=prep['crop_pct'], crop_mode=prep['crop_mode'],
        interpolation=prep['interpolation'], mean=tuple(prep['mean']), std=tuple(prep['std']),
        paper_ids=family['paper_url'].replace('https://arxiv.org/abs/', 'arXiv:'), paper_name=family['paper'],
        origin_url=family['code_url'],
        notes=(f"converted from the official release {source['file_name'] or architecture}, {source['url']}",),
    )


def manifest_pretrained_cfgs(families: Tuple[str, ...]) -> Dict[str, Dict[str, Any]]:
    """``manifest_pretrained_cfg`` of every manifest entry of ``families``, keyed ``'architecture.tag'`` in manifest
    order: what a model family passes to timm's ``generate_default_cfgs``."""
    return {f"{e['architecture']}.{e['tag']}": manifest_pretrained_cfg(e['architecture'], e['tag'])
            for e in manifest_entries() if e['family'] in families}


def dump_manifest(manifest: Dict[str, Any]) -> str:
    """JSON text of the manifest with short lists of numbers kept on one line."""
    text = json.dumps(manifest, indent=2, ensure_ascii=False)
    number_list = re.compile(r'\[\s*(-?[\d.]+(?:,\s*-?[\d.]+)*)\s*\]')
    return number_list.sub(lambda m: '[' + ', '.join(s.strip() for s in m.group(1).split(',')) + ']', text) + '\n'


def update_manifest_entry(architecture: str, tag: str, path: Optional[PathLike] = None, **fields: Any) -> None:
    """Set ``fields`` on the entry ``architecture.tag`` and rewrite the manifest file in place."""
    path = Path(path or MANIFEST_PATH).resolve()  # resolve: the packaged manifest may be a link to the root one
    manifest = json.loads(path.read_text(encoding='utf-8'))
    matches = [e for e in manifest['weights'] if e['architecture'] == architecture and e['tag'] == tag]
    if not matches:
        raise ValueError(f"'{architecture}.{tag}' is not in the weights manifest {path}; add an entry for it first")
    matches[0].update(fields)
    tmp = path.with_suffix('.json.tmp')
    tmp.write_text(dump_manifest(manifest), encoding='utf-8')
    tmp.replace(path)
    load_manifest.cache_clear()
