"""Pretrained weights: the manifest, weight files and their checks, official checkpoints, and ``pretrained=True``.

Depends on ``layers``-level code only (timm, torch, huggingface_hub): it knows no model; each model family registers
its checkpoint filter here (``register_checkpoint_filter``).
"""
from .files import (
    PretrainedWeightsError, cache_paths_hint, check_weights_file, read_safetensors_header,
    save_safetensors_reproducibly, sha256_file)
from .manifest import (
    MANIFEST_PATH, STATUSES, WEIGHTS_FILE, PathLike, dump_manifest, find_manifest_entry, load_manifest,
    manifest_entries, manifest_pretrained_cfg, split_hub_id, update_manifest_entry)
from .official import (
    CheckpointFilter, check_checkpoint_file, checkpoint_filter_of, guess_architecture, layout_mismatch,
    load_official_checkpoint, register_checkpoint_filter)
from .pretrained import (
    cached_weights_path, check_pretrained_state_dict, convert_command, download_weights, prepare_pretrained,
    pretrained_table, release_loaded_state_dict)

__all__ = [
    'PretrainedWeightsError', 'cache_paths_hint', 'check_weights_file', 'read_safetensors_header',
    'save_safetensors_reproducibly', 'sha256_file', 'MANIFEST_PATH', 'STATUSES', 'WEIGHTS_FILE', 'PathLike',
    'dump_manifest', 'find_manifest_entry', 'load_manifest', 'manifest_entries', 'manifest_pretrained_cfg',
    'split_hub_id', 'update_manifest_entry', 'CheckpointFilter', 'check_checkpoint_file', 'checkpoint_filter_of',
    'guess_architecture', 'layout_mismatch', 'load_official_checkpoint', 'register_checkpoint_filter',
    'cached_weights_path', 'check_pretrained_state_dict', 'convert_command', 'download_weights', 'prepare_pretrained',
    'pretrained_table', 'release_loaded_state_dict',
]
