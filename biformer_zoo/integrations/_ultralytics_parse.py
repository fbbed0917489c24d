"""The ``parse_model`` wrapper behind ``biformer_zoo.integrations.ultralytics``: how YAML rows of modules Ultralytics
does not know are built with Ultralytics' own channel and depth rules (see that module's docstring)."""
import contextlib
import importlib
import inspect
import logging
import re
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Type

from torch import nn
from ultralytics.nn.modules import Conv

__all__ = ['RowSpec', 'parse_model_with', 'conv2ds']


@dataclass(frozen=True)
class RowSpec:
    """How parse_model should treat a YAML name: its module, whether ``c2`` scales, whether repeats go inside."""
    cls: Type[nn.Module]
    scales_width: bool  # args start with c2, scaled like Conv/C2f; else output channels = input channels
    repeats_inside: bool  # the repeats column is the module's `n` (C2f-like); else the row is stacked n times
    min_hidden: int = 0  # the least hidden width int(c2 * expansion) the module takes

    @property
    def option_names(self) -> List[str]:
        skip = 1 + self.scales_width + self.repeats_inside  # c1[, c2][, n]
        return list(inspect.signature(self.cls).parameters)[skip:]


def _row_error(index: int, name: str, scale: Optional[str], problem: str) -> ValueError:
    where = f"scale '{scale}'" if scale else 'the YAML depth/width multiples'
    return ValueError(f'model YAML layer {index} ({name}) at {where}: {problem}')


def _yaml_scale(d: Mapping) -> Optional[str]:
    """The scale parse_model builds: the one set on the dict, else the first listed (Ultralytics' fallback)."""
    scales = d.get('scales')
    if not scales:
        return None
    return d.get('scale') or next(iter(scales))


def _split_options(spec: RowSpec, name: str, index: int, scale: Optional[str], args: Sequence) -> Dict[str, Any]:
    """The row's options by name: positional YAML args in signature order, then an optional trailing mapping."""
    names = spec.option_names
    args = list(args)
    named = dict(args.pop()) if args and isinstance(args[-1], Mapping) else {}
    if len(args) > len(names):
        raise _row_error(index, name, scale, f'takes at most {len(names)} options {names} after its channels, '
                                             f'got {args}; drop the extra ones')
    options = dict(zip(names, args))
    unknown = sorted(set(named) - set(names))
    twice = sorted(set(named) & set(options))
    if unknown or twice:
        raise _row_error(index, name, scale, f'unknown options {unknown} or options given twice {twice}; '
                                             f'the options are {names}')
    options.update(named)
    return options


def _heads_hint(width: int) -> str:
    return f'num_heads dividing {width}: {[h for h in range(1, min(width, 32) + 1) if width % h == 0]}'


def _check_options(name: str, spec: RowSpec, c2: int, options: Dict[str, Any]) -> Optional[str]:
    """The problem with a row's options at its scaled width, with the fix; None if they are fine."""
    defaults = {k: p.default for k, p in inspect.signature(spec.cls).parameters.items()}
    heads = options.get('num_heads', defaults.get('num_heads'))
    if heads is None:
        return None
    if not isinstance(heads, int) or heads < 1:
        return f'num_heads must be a positive integer, got {heads!r}'
    width = c2 if not spec.repeats_inside else int(c2 * options.get('expansion', defaults['expansion']))
    what = 'input width' if not spec.scales_width else f'hidden width int(c2 * expansion) (c2 = {c2} after scaling)'
    if width < spec.min_hidden:
        return f'the {what} is {width}, below the {spec.min_hidden} {spec.cls.__name__} needs; raise c2 or expansion'
    if width % heads:
        return (f'num_heads={heads} does not divide the {what} {width}; use {_heads_hint(width)} '
                f'(a value that divides the width at every scale you build), or change c2 / the width multiple')
    return None


@contextlib.contextmanager
def _held_records(logger: logging.Logger) -> Iterator[List[logging.LogRecord]]:
    """Hold back this thread's records of ``logger`` (not its children's) while inside; they are returned."""
    held: List[logging.LogRecord] = []
    thread = threading.get_ident()

    def hold(record: logging.LogRecord) -> bool:
        if record.thread == thread:
            held.append(record)
            return False
        return True

    logger.addFilter(hold)
    try:
        yield held
    finally:
        logger.removeFilter(hold)


@contextlib.contextmanager
def _default_act(act: Optional[nn.Module]) -> Iterator[None]:
    """Build Ultralytics ``Conv`` units with ``act`` (the YAML's ``activation``, as parse_model does)."""
    saved = Conv.default_act
    if act is not None:
        Conv.default_act = act
    try:
        yield
    finally:
        Conv.default_act = saved


def _table_line(module: nn.Module, n: int, args: List) -> str:
    # the columns of parse_model's table: index, from, repeats, params, module, arguments
    return f'{module.i:>3}{module.f!s:>20}{n:>3}{module.np:10.0f}  {module.type:<45}{args!s:<30}'


def parse_model_with(row_specs: Mapping[str, RowSpec], original: Callable, d: Dict, ch: int, verbose: bool = True):
    """``ultralytics.nn.tasks.parse_model`` (``original``) that also builds the rows named in ``row_specs``.

    Our rows are replaced by stand-ins Ultralytics knows (a ``Conv`` that scales like C2f, or an identity), with a
    probe row per identity that reads its input width; ``original`` builds that YAML, and each stand-in is then
    replaced by the real module at the widths and depth Ultralytics worked out.
    """
    backbone, head = list(d.get('backbone') or []), list(d.get('head') or [])
    rows = backbone + head
    ours = {i: row for i, row in enumerate(rows) if isinstance(row[2], str) and row[2] in row_specs}
    if not ours:
        return original(d, ch, verbose)
    scale = _yaml_scale(d)
    stand_ins, probes, plans = _stand_in_rows(row_specs, rows, ours, scale)
    proxied = {**d, 'backbone': stand_ins[:len(backbone)], 'head': stand_ins[len(backbone):] + probes}

    logger = importlib.import_module('ultralytics.nn.tasks').LOGGER
    table = {}
    with contextlib.ExitStack() as stack:
        held = stack.enter_context(_held_records(logger)) if verbose else []
        try:
            layers, save = original(proxied, ch, verbose)
            probe_layers = list(layers[len(rows):])
            layers = layers[:len(rows)]
            for probe in probes:
                save.remove(probe[0])  # each probe added its source once
            inputs = iter(conv2ds(p)[0].in_channels for p in probe_layers)
            for i, (spec, name, options) in plans.items():
                layers[i], table[i] = _build_row(i, spec, name, options, layers[i], inputs, scale)
        finally:
            stack.close()  # release the held records before printing them
            if verbose:
                _print_table(logger, held, table, len(rows))
    return layers, save


def _stand_in_rows(row_specs: Mapping[str, RowSpec], rows: List, ours: Dict[int, List], scale: Optional[str]
                   ) -> Tuple[List, List, Dict[int, Tuple[RowSpec, str, Dict[str, Any]]]]:
    """The YAML rows with ours replaced by stand-ins, the probe rows to append, and each of our rows' plan
    (spec, name, options), checking what can be checked before anything is built."""
    stand_ins, probes, plans = list(rows), [], {}
    for i, (f, n, name, args) in ours.items():
        spec = row_specs[name]
        if not isinstance(f, int):
            raise _row_error(i, name, scale, f'takes one input, got from={f}; concatenate first with a Concat row')
        if not isinstance(args, (list, tuple)):
            raise _row_error(i, name, scale, f'args must be a list, got {args!r}')
        if spec.scales_width:
            if not args or not isinstance(args[0], int) or args[0] < 1:
                raise _row_error(i, name, scale, f'the first arg must be the output channels c2, got {args}')
            if not spec.repeats_inside and n != 1:
                raise _row_error(i, name, scale, f'repeats must be 1 (it changes the width), got {n}; stack rows')
            stand_ins[i] = [f, n, 'Conv', [args[0], 1]]  # scaled, capped and rounded like C2f's c2; n like C2f's
            plans[i] = (spec, name, _split_options(spec, name, i, scale, args[1:]))
        else:
            stand_ins[i] = [f, n, 'nn.Identity', []]  # keeps the channels for the rows after it
            source = f if f >= 0 else i + f
            probes.append([source, 1, 'Conv', [8, 1]])  # appended after the last row: reads ch[source]
            plans[i] = (spec, name, _split_options(spec, name, i, scale, args))
    return stand_ins, probes, plans


def _build_row(i: int, spec: RowSpec, name: str, options: Dict[str, Any], stand_in: nn.Module, inputs: Iterator[int],
               scale: Optional[str]) -> Tuple[nn.Module, str]:
    """Our module for row ``i`` at the stand-in's widths and depth (an identity's input width from ``inputs``), with
    the attributes Ultralytics sets, and its line of the model table."""
    if spec.scales_width:
        convs = conv2ds(stand_in)
        c1, c2, n = convs[0].in_channels, convs[0].out_channels, len(convs)
        act = next((getattr(m, 'act', None) for m in stand_in.modules() if isinstance(m, Conv)), None)
    else:
        c1 = c2 = next(inputs)
        n = len(stand_in) if isinstance(stand_in, nn.Sequential) else 1
        act = None
    problem = _check_options(name, spec, c2, options)
    if problem:
        raise _row_error(i, name, scale, problem)
    args = [c1, c2, n] if spec.repeats_inside else [c1, c2] if spec.scales_width else [c1]
    try:
        with _default_act(act):
            if spec.repeats_inside or n == 1:
                module = spec.cls(*args, **options)
            else:
                module = nn.Sequential(*(spec.cls(*args, **options) for _ in range(n)))
    except (ValueError, TypeError) as e:
        raise _row_error(i, name, scale, str(e)) from e
    module.i, module.f, module.type = i, stand_in.f, f'{spec.cls.__module__}.{spec.cls.__qualname__}'
    module.np = sum(p.numel() for p in module.parameters())
    return module, _table_line(module, n, args + list(options.values()))


def conv2ds(module: nn.Module) -> List[nn.Conv2d]:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)]


def _print_table(logger: logging.Logger, held: List[logging.LogRecord], table: Dict[int, str], num_rows: int) -> None:
    """Log the held records, with the stand-ins' table lines replaced by the real modules' and the probes' dropped."""
    for record in held:
        match = re.match(r'\s*(\d+)\s', record.getMessage())
        index = int(match.group(1)) if match else None
        if index is not None and index >= num_rows:
            continue  # a probe row
        if index in table:
            record.msg, record.args = table.pop(index), ()
        logger.handle(record)
    for line in table.values():  # the table format changed: still show the modules
        logger.info(line)
