"""Tables in one neutral form (``TextTable``), rendered as markdown or rich tables, and the rich progress bar the
report and the benchmark show on a terminal."""
from dataclasses import dataclass, field
from typing import Any, List, Sequence

__all__ = ['TextTable', 'tables_to_markdown', 'print_rich_tables', 'progress_bar']


@dataclass
class TextTable:
    """A titled table of already formatted cells, with notes printed under it.

    The first ``label_columns`` columns are labels (left-aligned); the others are numbers (right-aligned).
    """
    title: str
    columns: List[str]
    rows: List[List[str]]
    notes: List[str] = field(default_factory=list)
    label_columns: int = 2


def _markdown_cell(text: str) -> str:
    return text.replace('|', '\\|')


def tables_to_markdown(tables: Sequence[TextTable]) -> str:
    """GitHub markdown: a bold title, the table, then the notes as a list."""
    parts = []
    for table in tables:
        lines = [f'**{table.title}**', '', '| ' + ' | '.join(map(_markdown_cell, table.columns)) + ' |',
                 '|' + '|'.join('---' if i < table.label_columns else '---:' for i in range(len(table.columns))) + '|']
        lines += ['| ' + ' | '.join(map(_markdown_cell, row)) + ' |' for row in table.rows]
        if table.notes:
            lines += [''] + [f'- {note}' for note in table.notes]
        parts.append('\n'.join(lines))
    return '\n\n'.join(parts) + '\n'


def print_rich_tables(tables: Sequence[TextTable], console: Any = None) -> None:
    """Print the tables with rich (numbers right-aligned), each followed by its notes."""
    from rich.console import Console
    from rich.table import Table
    console = console or Console()
    for table in tables:
        rich_table = Table(title=table.title, title_justify='left')
        for i, column in enumerate(table.columns):
            rich_table.add_column(column, justify='left' if i < table.label_columns else 'right', overflow='fold')
        for row in table.rows:
            rich_table.add_row(*row)
        console.print(rich_table)
        for note in table.notes:
            console.print(f'[dim]- {note}[/dim]')


def progress_bar(enabled: bool) -> Any:
    """A rich progress bar on stderr; silent when disabled or when stderr is not a terminal."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    console = Console(stderr=True)
    return Progress(TextColumn('{task.description}'), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True, disable=not (enabled and console.is_terminal))
