"""``%%burst`` and ``%burst``: thin adapters. The cell magic's options, and the ``%config BurstMagics`` traits
that default them, are made from options.py's table; its line becomes a JobSpec handed to the Session. The line
magic routes ``%burst COMMAND`` through commands.py, the table ``burst COMMAND`` uses too.

Defaults come, lowest first, from built-ins, the user config file, ``[tool.burst]`` in the project's
pyproject.toml, ``%config BurstMagics.<name> = ...``, and the options of the cell. Every failure of the user's
input becomes one ``UsageError`` line; a remote exception shows its remote traceback and fails the cell.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments
from traitlets import Bool, Float, Int, TraitType, Unicode, Union
from traitlets import List as ListTrait

from .commands import help_text
from .errors import BurstError, ConfigError, RemoteError
from .options import JOB_OPTIONS, Option, for_line

if TYPE_CHECKING:
    from IPython.core.interactiveshell import InteractiveShell

    from .job import Job
    from .session import Session
    from .spec import JobSpec

__all__ = ["BurstMagics"]

_F = TypeVar("_F", bound=Callable[..., Any])

#: Each kind of job option as a ``%config BurstMagics`` trait (money and sizes as numbers or text, read as a cell's).
_TRAITS: dict[str, Callable[[], TraitType[Any, Any]]] = {
    "text": lambda: Unicode(None, allow_none=True),
    "int": lambda: Int(None, allow_none=True),
    "float": lambda: Float(None, allow_none=True),
    "money": lambda: Union([Int(), Float(), Unicode()], default_value=None, allow_none=True),
    "size": lambda: Union([Int(), Unicode()], default_value=None, allow_none=True),
    "flag": lambda: Bool(None, allow_none=True),
    "names": lambda: ListTrait(Unicode(), default_value=None, allow_none=True),
}


def _trait(option: Option, spelling: str) -> TraitType[Any, Any]:
    trait = _TRAITS[option.kind]()
    trait.help = option.default_help if spelling == option.name else f"The older spelling of BurstMagics.{option.name}."
    return trait.tag(config=True)


def _documented(text: str) -> Callable[[_F], _F]:
    """Give a function a docstring written from data (``%burst?`` lists the command table)."""

    def document(func: _F) -> _F:
        func.__doc__ = text
        return func

    return document


def _job_arguments(func: Any) -> Any:
    """``%%burst``'s options, from the table (IPython applies ``argument`` decorators last first)."""
    for option in reversed(for_line("cell")):
        flags, kwargs = option.argument()
        func = argument(*flags, **kwargs)(func)
    return func


def _split_line(line: str) -> list[str]:
    """The words of a magic's line, as a shell splits them: quotes group and are removed (IPython's own split
    keeps them, so ``--offer "runpod:NVIDIA GeForce RTX 4090"`` arrived quoted). Backslashes stay literal, as in
    Windows paths."""
    lexer = shlex.shlex(line, posix=True)
    lexer.whitespace_split, lexer.escape, lexer.commenters = True, "", ""
    try:
        return list(lexer)
    except ValueError as exc:  # an unclosed quote
        raise UsageError(f"%%burst: {exc}") from None


@magics_class
class BurstMagics(Magics):
    """Run a cell on a rented GPU (or your own boxes) for a known, capped price."""

    # A trait per spelling of each option a notebook may default (``%config BurstMagics.max_cost = 5``).
    locals().update({name: _trait(o, name) for o in JOB_OPTIONS if o.trait for name in o.spellings})

    def __init__(self, shell: Any, session_factory: Any = None) -> None:
        super().__init__(shell)
        self._session_factory = session_factory

    @property
    def ip(self) -> InteractiveShell:
        assert self.shell is not None  # registered magics always have their shell
        return self.shell

    @property
    def session(self) -> Session:
        from .session import Session

        return self._session_factory() if self._session_factory else Session.current()

    # -- %%burst --------------------------------------------------------------------------------------------

    @magic_arguments()
    @_job_arguments
    @cell_magic
    def burst(self, line: str, cell: str) -> Any:
        """Run this cell on a rented GPU or your own machine, for a known, capped price.

        The cell's stdout and stderr stream into the notebook; a remote exception fails the cell with its
        traceback; ``burst.progress(pct)`` inside the cell drives the progress bar. Nothing is rented before
        every option has been checked, and the instance is always terminated at the end.

        Example::

            %%burst --max-cost 1 --mount ./data:data:ro --mount ./out:out:rw --push lr --pull loss
            loss = train(lr)
        """
        args = self.burst.parser.parse_args(_split_line(line))
        from .reconcile import announce  # not at %load_ext: it brings the agent's and asyncio's imports

        announce()  # what reconciliation at load or while jobs ran did since the last command, said once
        try:
            spec = self._spec(args, self.ip.transform_cell(cell))
            if args.dry_run:
                return self.session.dry_run(spec)
            job = self.session.submit(spec, namespace=self.ip.user_ns)
        except BurstError as exc:
            raise UsageError(str(exc)) from None
        return self._show(job, background=args.background)

    def _spec(self, args: Any, cell: str) -> JobSpec:
        from .options import FLAGS, job_fields
        from .spec import JobSpec  # pydantic loads on the first cell, not at %load_ext

        return JobSpec.build(FLAGS, cell=cell, **job_fields(args, "cell", self._defaults()))

    def _defaults(self) -> dict[str, tuple[Any, str]]:
        """Each option's ``%config`` default and its name there; both spellings of one are refused, as in a file."""
        found: dict[str, tuple[Any, str]] = {}
        for option in JOB_OPTIONS:
            given = [(getattr(self, name), f"BurstMagics.{name}") for name in option.spellings
                     if option.trait and getattr(self, name) is not None]
            if len(given) > 1:
                raise ConfigError(f"{given[1][1]} and {given[0][1]} are the same setting; keep one")
            found.update({option.name: given[0]} if given else {})
        return found

    def _show(self, job: Job, *, background: bool) -> Any:
        from .display import CellDisplay
        from .variables import NO_RESULT

        try:
            display = CellDisplay(job, self.shell)
            if background:
                display.follow_in_background()
                return job  # shown as its view (Job._ipython_display_), so the cell's Out follows the job
            display.show()
        except BaseException:
            # The job is already submitted: never leave it running without a view or a handle.
            job.cancel()
            job.wait()
            raise
        result = display.run_blocking()
        self.ip.user_ns.update(result.values)  # on the main thread, after the run (even a failed one)
        if isinstance(result.error, RemoteError):
            raise result.error
        if result.error is not None:
            raise UsageError(f"job {job.id}: {result.error}")
        return None if result.result is NO_RESULT else result.result

    # -- %burst ---------------------------------------------------------------------------------------------

    @line_magic("burst")  # type: ignore[arg-type]  # IPython's stub cannot type a named line magic
    @_documented(help_text("%burst") + "\n  help       this text\n")
    def burst_line(self, line: str) -> Any:
        words = shlex.split(line)
        from .commands import dispatch
        from .reconcile import announce  # not at %load_ext: it brings the agent's and asyncio's imports

        announce()  # what reconciliation at load or while jobs ran did since the last command, said once
        if not words or words[0] in ("help", "-h", "--help"):
            print(self.burst_line.__doc__)
            return None
        try:
            return dispatch(words)
        except BurstError as exc:
            raise UsageError(str(exc)) from None
