"""The ``biformer-zoo`` command line as a whole: the listings, help, and how errors end (one line, exit 2, or the
traceback on request). Each subcommand's own behaviour is tested beside its library function (test_report,
test_bench, test_convert, test_viz)."""
import json

import pytest

from biformer_zoo import weights
from biformer_zoo.cli import main
from biformer_zoo.models import list_zoo_models


def test_list_json_has_every_zoo_model_with_its_parameters(capsys):
    assert main(['list', '--format', 'json']) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r['model'] for r in rows] == list_zoo_models() and all(r['params'] > 1_000_000 for r in rows)


def test_list_table_names_every_model(capsys):
    assert main(['list']) == 0
    out = capsys.readouterr().out
    assert [name for name in list_zoo_models() if name not in out] == []


def test_list_pretrained_shows_every_tag_with_status(capsys):
    main(['list', '--pretrained', '--format', 'json'])
    rows = json.loads(capsys.readouterr().out)
    assert [(r['model'], r['status']) for r in rows] == [
        (f"{e['architecture']}.{e['tag']}", e['status']) for e in weights.manifest_entries()]


def test_help_lists_every_subcommand(capsys):
    assert main(['--help']) == 0
    out = capsys.readouterr().out
    assert [name for name in ('list', 'report', 'bench', 'convert', 'viz') if name not in out] == []


def test_a_usage_error_is_one_line_and_exit_2(capsys):
    assert main(['report', '--format', 'xml']) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize('command', ['report', 'bench'])
def test_cli_unknown_model_exits_non_zero_with_message(command, capsys):
    code = main([command, 'no_such_model'])
    assert (code, "unknown model 'no_such_model'" in capsys.readouterr().err) == (2, True)


@pytest.mark.parametrize('how', ['--traceback', 'BIFORMER_ZOO_DEBUG=1'])
def test_cli_traceback_escape_hatch_raises_the_error(how, monkeypatch):
    if how.startswith('BIFORMER_ZOO_DEBUG'):
        monkeypatch.setenv('BIFORMER_ZOO_DEBUG', '1')
    with pytest.raises(ValueError, match="unknown model 'no_such_model'"):
        main(['report', 'no_such_model', *([how] if how.startswith('--') else [])])


def test_cli_keeps_the_traceback_of_a_bug(monkeypatch):
    """Only the package's user-facing errors become one line; an unexpected exception type is a bug to report."""
    def broken(patterns):
        raise TypeError('a bug')
    monkeypatch.setattr('biformer_zoo.tools.arguments.resolve_model_names', broken)
    with pytest.raises(TypeError, match='a bug'):
        main(['report', 'biformer_tiny'])
