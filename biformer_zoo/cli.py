"""The ``biformer-zoo`` command line: one subcommand per task, each a thin wrapper over a library function."""
import argparse
import json
import sys
from typing import Dict, List, Optional

import torch
import timm

from .models import list_zoo_models


def model_table(names: Optional[List[str]] = None) -> List[Dict]:
    """One row per registered model: name, parameter count and default input size.

    Models are built on the meta device, so no memory is allocated and nothing is initialised.
    """
    rows = []
    for name in names or list_zoo_models():
        with torch.device('meta'):
            model = timm.create_model(name)
        rows.append(dict(
            model=name,
            params=sum(p.numel() for p in model.parameters()),
            input_size=list(model.pretrained_cfg['input_size']),
            pretrained_tags=[n.split('.', 1)[1] for n in timm.list_pretrained(f'{name}.*')],
        ))
    return rows


def _print_table(title: str, columns: List[str], rows: List[List[str]]) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify='right' if col.startswith(('params', 'GFLOPs')) else 'left')
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def cmd_list(args: argparse.Namespace) -> int:
    rows = model_table()
    if args.format == 'json':
        print(json.dumps(rows, indent=2))
        return 0
    _print_table(
        'biformer-zoo models', ['model', 'params', 'params (M)', 'input', 'pretrained tags'],
        [[r['model'], f"{r['params']:,}", f"{r['params'] / 1e6:.2f}", 'x'.join(map(str, r['input_size'][1:])),
          ', '.join(r['pretrained_tags'])] for r in rows])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='biformer-zoo', description=__doc__)
    sub = parser.add_subparsers(dest='command', required=True)

    p = sub.add_parser('list', help='list every registered model with its parameter count')
    p.add_argument('--format', choices=('table', 'json'), default='table')
    p.set_defaults(func=cmd_list)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
