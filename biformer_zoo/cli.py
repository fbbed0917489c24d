"""The ``biformer-zoo`` command line: one subcommand per task, each a thin wrapper over a library function.

Errors: a mistake in what the user asked for is one line on stderr, ``biformer-zoo <command>: error: <message>``,
and exit status 2, as argparse's own usage errors. ``main`` turns the errors the package raises for bad input into
that line, at one place: ``ValueError``, ``OSError`` and ``RuntimeError`` (``PretrainedWeightsError`` is one; so
are torch's out-of-memory errors). Any other exception (``TypeError``, ``KeyError``, ...) is a bug and keeps its
traceback. ``--traceback`` (or ``BIFORMER_ZOO_DEBUG=1``) shows the full traceback of any error.
"""
import argparse
import contextlib
import json
import os
import signal
import sys
import threading
from typing import Any, Iterator, List, Optional

from .tools.bench import AMP_DTYPES, BENCH_FORMATS, DEFAULT_BASELINE, MODES
from .tools.report import REPORT_FORMATS
from .tools.tables import print_rich_tables
from .weights import PretrainedWeightsError


def cmd_list(args: argparse.Namespace) -> int:
    from .tools.catalog import catalog_table, model_table, pretrained_table
    rows = pretrained_table() if args.pretrained else model_table()
    if args.format == 'json':
        print(json.dumps(rows, indent=2))
    else:
        print_rich_tables([catalog_table(rows, pretrained=args.pretrained)])
    return 0


@contextlib.contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """Inside, SIGTERM raises ``SystemExit(143)`` (in the main thread), so that a killed run still unwinds: convert
    then removes its temporary folder and its lock."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    def terminate(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def cmd_convert(args: argparse.Namespace) -> int:
    from .tools.convert import convert_checkpoint
    with _terminate_as_exit():
        result = convert_checkpoint(
            args.model, args.checkpoint, args.out, tag=args.tag, push=args.push,
            update_manifest=args.update_manifest, measure_flops=not args.no_flops, progress=not args.quiet,
            overwrite=args.overwrite, use_ema=not args.no_ema)
    gflops = f'{result.gflops:.3f}' if result.gflops is not None else 'not measured'
    print(f'{result.model}: wrote {result.out_dir} (model.safetensors, config.json, README.md, conversion.json)\n'
          f'params {result.params:,}, GFLOPs {gflops}\n'
          f'sha256 {result.sha256}  {result.weights_file} ({result.size:,} bytes)')
    if result.pushed_to:
        print(f'uploaded: {result.pushed_to}')
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .tools.arguments import parse_model_args, resolve_model_names
    from .tools.report import profile_many, render_report, report_tables
    profiles = profile_many(resolve_model_names(args.models), args.img_size, batch_size=args.batch_size,
                            features_only=args.features_only, model_kwargs=parse_model_args(args.model_arg),
                            show_progress=True)
    if args.format == 'table':
        print_rich_tables(report_tables(profiles))
    else:
        print(render_report(profiles, args.format), end='')
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .tools.arguments import parse_model_args, resolve_model_names
    from .tools.bench import bench_tables, benchmark, render_bench
    if args.json and args.format not in ('table', 'json'):
        raise ValueError(f'--json means --format json; it conflicts with --format {args.format}: give one of them')
    baseline = None if args.baseline.lower() == 'none' else resolve_model_names([args.baseline])[0]
    report = benchmark(
        resolve_model_names(args.models), img_size=args.img_size, batch_size=args.batch_size, mode=args.mode,
        rounds=args.rounds, warmup=args.warmup, threads=args.threads, device=args.device, amp=args.amp,
        baseline=baseline, model_kwargs=parse_model_args(args.model_arg), show_progress=True)
    fmt = 'json' if args.json else args.format
    if fmt == 'table':
        print_rich_tables(bench_tables(report))
    else:
        print(render_bench(report, fmt), end='')
    return 0


def cmd_viz(args: argparse.Namespace) -> int:
    from .models import create_model
    from .viz import load_image, visualize
    try:
        row, col = (int(v) for v in args.query.split(','))
    except ValueError:
        raise ValueError(f'--query must be ROW,COL in pixels of the model input, e.g. 112,112; got {args.query!r}') \
            from None
    image = load_image(args.image)  # a missing or unreadable image is reported before the model is built
    if args.checkpoint:  # an official .pth or a converted file, loaded and checked as pretrained weights are
        model = create_model(args.model, pretrained=True, pretrained_cfg_overlay=dict(file=args.checkpoint))
    else:  # a pretrained tag names the weights; without one the model is random
        model = create_model(args.model, pretrained='.' in args.model)
    visualize(model.eval(), image, (row, col), layer=args.layer).savefig(args.out, dpi=args.dpi)
    random = '' if args.checkpoint or '.' in args.model else ' (random weights: no pretrained tag, no --checkpoint)'
    print(f'wrote {args.out}{random}')
    return 0


TRACEBACK_HELP = 'on an error, show the full traceback, not one line (also: BIFORMER_ZOO_DEBUG=1)'


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, with usage errors on one line (the usage itself is one ``--help`` away)."""

    def error(self, message: str) -> None:
        self.exit(2, f'{self.prog}: error: {message} (see {self.prog} --help)\n')


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog='biformer-zoo', description=__doc__.split('\n\n')[0])
    # --traceback before or after the command; SUPPRESS keeps the command's parser from resetting it to False
    parser.add_argument('--traceback', action='store_true', help=TRACEBACK_HELP)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument('--traceback', action='store_true', default=argparse.SUPPRESS, help=TRACEBACK_HELP)
    sub = parser.add_subparsers(dest='command', required=True)

    p = sub.add_parser('list', parents=[common], help='list every registered model with its parameter count')
    p.add_argument('--format', choices=('table', 'json'), default='table')
    p.add_argument('--pretrained', action='store_true',
                   help='list every pretrained tag of the weights manifest: status, Hub repo, in the local cache')
    p.set_defaults(func=cmd_list)

    p = sub.add_parser('convert', parents=[common], help='convert an official checkpoint into a Hub-ready folder '
                                                          '(model.safetensors, config.json, README.md)')
    p.add_argument('--model', required=True, help='zoo model name, e.g. biformer_small')
    p.add_argument('--checkpoint', required=True, help='the official .pth file (loaded with weights_only=True)')
    p.add_argument('--out', required=True,
                   help='folder to write: new or empty, unless --overwrite (written beside it, then renamed into '
                        'place; one convert at a time per folder)')
    p.add_argument('--overwrite', action='store_true',
                   help='replace --out although it holds files, in one rename (a previous conversion is replaced; '
                        'other files are kept and never uploaded)')
    p.add_argument('--tag', default='in1k', help='pretrained tag in the weights manifest (default: in1k)')
    p.add_argument('--push', metavar='REPO',
                   help='upload the converted files (only those, checked against conversion.json) to this Hub repo '
                        '(token from HF_TOKEN)')
    p.add_argument('--update-manifest', action='store_true',
                   help='record sha256, size and status in weights_manifest.json')
    p.add_argument('--no-flops', action='store_true', help='skip counting FLOPs for the model card')
    p.add_argument('--no-ema', action='store_true',
                   help="take the checkpoint's 'model' weights even where it holds EMA weights (model_ema, "
                        "state_dict_ema), which are taken by default, as on every load path")
    p.add_argument('--quiet', action='store_true', help='no progress output')
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser('report', parents=[common], help='params, fvcore GFLOPs and activations per model, stage and '
                                                         'operator, with the papers\' numbers')
    p.add_argument('models', nargs='*', metavar='PATTERN',
                   help='model names or wildcard patterns, zoo or any timm model (default: every zoo model)')
    p.add_argument('--img-size', nargs='+', default=['224'], metavar='SIZE',
                   help='one or more input sizes: 224 or HxW, height first (1280x800 as mmdet get_flops --shape)')
    p.add_argument('--features-only', action='store_true',
                   help='profile the features_only backbone (no final norm/head), as detectors use it')
    p.add_argument('--batch-size', type=int, default=1, help='images per traced batch; FLOPs are for the batch')
    p.add_argument('--model-arg', action='append', default=[], metavar='KEY=VALUE',
                   help='extra timm.create_model argument, repeatable (e.g. n_win=16 for BiFormer\'s detection '
                        'backbone)')
    p.add_argument('--format', choices=REPORT_FORMATS, default='table')
    p.set_defaults(func=cmd_report)

    p = sub.add_parser('bench', parents=[common],
                       help='latency, throughput and peak memory, measured round-robin against a baseline')
    p.add_argument('models', nargs='*', metavar='PATTERN',
                   help='model names or wildcard patterns, zoo or any timm model (default: every zoo model)')
    p.add_argument('--img-size', default='224', metavar='SIZE', help='224 or HxW, height first')
    p.add_argument('--batch-size', type=int, default=1)
    p.add_argument('--mode', choices=MODES, default='infer',
                   help='infer: forward under inference_mode; train: forward + backward + SGD step')
    p.add_argument('--rounds', type=int, default=10, help='timed round-robin rounds (one step per model each)')
    p.add_argument('--warmup', type=int, default=2, help='untimed steps per model before the rounds')
    p.add_argument('--threads', type=int, default=None, help='torch intra-op threads (default: torch\'s choice)')
    p.add_argument('--device', choices=('cpu', 'cuda'), default='cpu')
    p.add_argument('--amp', choices=tuple(AMP_DTYPES), default=None, help='autocast dtype (default: float32)')
    p.add_argument('--baseline', default=DEFAULT_BASELINE,
                   help='model the ratios are computed against, added to the run if missing; "none" for no ratios')
    p.add_argument('--model-arg', action='append', default=[], metavar='KEY=VALUE',
                   help='extra timm.create_model argument for the models (not the baseline), repeatable')
    p.add_argument('--format', choices=BENCH_FORMATS, default='table')
    p.add_argument('--json', action='store_true', help='same as --format json')
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser('viz', parents=[common], help='draw the routed regions and the attention map of one query '
                                                      'point of an image')
    p.add_argument('model', help='model name, with a pretrained tag for its weights (biformer_small.in1k)')
    p.add_argument('image', help='image file; preprocessed with the model\'s data config (resize, centre crop)')
    p.add_argument('--query', required=True, metavar='ROW,COL',
                   help='the query point in pixels of the model input (224x224 for most models), row first')
    p.add_argument('--layer', help='module name of the attention layer (default: the last routed one, else the last '
                                   'attention layer); a wrong name lists the valid ones')
    p.add_argument('--checkpoint', help='an official .pth or a converted model.safetensors to load')
    p.add_argument('--out', required=True, help='the figure to write (.png, .pdf, .svg)')
    p.add_argument('--dpi', type=int, default=100)
    p.set_defaults(func=cmd_viz)
    return parser


def _one_line(error: BaseException) -> str:
    """The error's message on one line, led by its type where the type says something the message may not."""
    message = ' '.join(line.strip() for line in str(error).splitlines() if line.strip())
    if isinstance(error, (ValueError, PretrainedWeightsError)):
        return message or type(error).__name__
    return f'{type(error).__name__}: {message}' if message else type(error).__name__


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit status (0, or 2 for any error in what was asked for).

    It never raises ``SystemExit``: argparse's usage errors and ``--help`` come back as the status too.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed its one line (or the help)
        return 0 if e.code is None else e.code if isinstance(e.code, int) else 2
    try:
        return args.func(args)
    except (ValueError, OSError, RuntimeError) as e:
        if args.traceback or os.environ.get('BIFORMER_ZOO_DEBUG', '') not in ('', '0'):
            raise
        print(f'{parser.prog} {args.command}: error: {_one_line(e)}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
