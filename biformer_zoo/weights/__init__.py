"""Pretrained weights: the manifest, weight files and their checks, checkpoint files, and the Hub download behind
``pretrained=True``. It knows no model class: the models hand it their state dicts to check and their pretrained cfgs
to resolve to a local file."""
from .checks import check_pretrained_state_dict, check_state_dict, model_tag_of
from .files import (
    PretrainedWeightsError, cache_paths_hint, check_weights_file, read_safetensors_header,
    save_safetensors_reproducibly, sha256_file)
from .manifest import (
    MANIFEST_PATH, STATUSES, WEIGHTS_FILE, PathLike, dump_manifest, find_manifest_entry, load_manifest,
    manifest_entries, manifest_pretrained_cfg, manifest_pretrained_cfgs, split_hub_id, update_manifest_entry)
from .official import EMA_KEYS, check_checkpoint_file, load_official_checkpoint, reading_checkpoints
from .pretrained import cached_weights_path, convert_command, download_weights, pretrained_weights_file

__all__ = [
    'check_pretrained_state_dict', 'check_state_dict', 'model_tag_of', 'PretrainedWeightsError', 'cache_paths_hint',
    'check_weights_file', 'read_safetensors_header', 'save_safetensors_reproducibly', 'sha256_file', 'MANIFEST_PATH',
    'STATUSES', 'WEIGHTS_FILE', 'PathLike', 'dump_manifest', 'find_manifest_entry', 'load_manifest',
    'manifest_entries', 'manifest_pretrained_cfg', 'manifest_pretrained_cfgs', 'split_hub_id', 'update_manifest_entry', 'EMA_KEYS',
    'check_checkpoint_file', 'load_official_checkpoint', 'reading_checkpoints', 'cached_weights_path',
    'convert_command', 'download_weights', 'pretrained_weights_file',
]
