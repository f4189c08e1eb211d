"""Which files of a mounted folder get uploaded: git's ignore rules plus ``.burstignore``.

Rules, lowest to highest precedence (the last rule that matches a path decides, as in git):

1. ``.git/info/exclude`` when the mounted folder is a repository top;
2. for each directory from the mounted folder down to the path: its ``.gitignore``, then its ``.burstignore``
   (same syntax, so it can add patterns and ``!``-re-include what ``.gitignore`` excludes).

``.git`` (and burst's own scratch folder, ``.burst-tmp``) is never uploaded. Ignored directories are not
walked (a huge ignored ``data/`` or ``.venv/`` costs nothing), which is also why nothing inside an excluded
directory can be re-included, as in git. Symlinks are yielded as themselves, never followed. Files above the
mounted folder (a parent repository's ``.gitignore``) and the user's global ``core.excludesFile`` are not read:
the mount is the unit that is uploaded.

Patterns follow gitignore(5) and git's ``wildmatch``, checked against ``git ls-files --others
--exclude-standard`` in tests/test_ignore.py.

Example:
    >>> for rel, path in iter_files(Path("./configs")):  # doctest: +SKIP
    ...     print(rel)
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import SyncError

__all__ = ["NEVER_SYNCED", "Entry", "excluded", "iter_entries", "iter_files"]

# Per-directory rule files, in the order they apply (a later file wins).
_IGNORE_FILES = (".gitignore", ".burstignore")
_EXCLUDE = ".git/info/exclude"
#: Names never uploaded nor written back, wherever they are: git's own folder (hooks there run code) and the
#: scratch folder results are written through (sync_back.py). Lower case: a case-insensitive disk takes ``.GIT`` too.
NEVER_SYNCED = frozenset({".git", ".burst-tmp"})

# git's wildmatch takes these ASCII classes from its own ctype table, not the locale's.
_POSIX_CLASSES = {
    "alnum": "a-zA-Z0-9",
    "alpha": "a-zA-Z",
    "blank": " \\t",
    "cntrl": "\\x00-\\x1f\\x7f",
    "digit": "0-9",
    "graph": "!-~",
    "lower": "a-z",
    "print": " -~",
    "punct": re.escape("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"),
    "space": " \\t\\n\\r",
    "upper": "A-Z",
    "xdigit": "0-9A-Fa-f",
}
_NEVER = "(?!)"
_GLOB_SPECIAL = "*?[\\"


@dataclass(frozen=True, slots=True)
class Entry:
    """One uploadable thing: ``rel`` is the posix path below the root, ``path`` the absolute local path."""

    rel: str
    path: Path
    is_dir: bool
    is_symlink: bool


@dataclass(frozen=True, slots=True)
class _Rule:
    base: str  # directory of the ignore file, relative to the root, "" or ending in "/"
    regex: re.Pattern[str]
    negate: bool
    dir_only: bool
    anchored: bool  # matched against the path below ``base``, else against the name alone

    def matches(self, rel: str, name: str, is_dir: bool) -> bool:
        if self.dir_only and not is_dir:
            return False
        return self.regex.fullmatch(rel[len(self.base) :] if self.anchored else name) is not None


def iter_files(root: Path) -> Iterator[tuple[str, Path]]:
    """``(posix path below root, absolute path)`` of every regular file and symlink that is not ignored.

    Order: depth first, names sorted within each directory. Raises :class:`SyncError` if a folder or an
    ignore file cannot be read.
    """
    for entry in iter_entries(root):
        if not entry.is_dir:
            yield entry.rel, entry.path


def iter_entries(root: Path, *, rules_read: dict[str, str] | None = None) -> Iterator[Entry]:
    """Like :func:`iter_files` but directories too (each before its contents), so empty ones can be recreated.

    A symlink to a directory is an entry with ``is_symlink=True`` and ``is_dir=False``; it is not walked.
    ``rules_read``, when given, receives the text of every rule file read, by its path below ``root``: what
    :func:`excluded` needs to judge a path later exactly as this upload did.
    """
    root = Path(root).absolute()
    exclude = root / ".git" / "info" / "exclude"
    rules = _read_rules(exclude, base="", record=rules_read, rel=_EXCLUDE) if exclude.is_file() else ()
    yield from _walk(root, "", rules, rules_read)


def excluded(rules_read: dict[str, str], rel: str, *, is_dir: bool = False) -> bool:
    """Whether the upload that recorded ``rules_read`` (see :func:`iter_entries`) left ``rel`` out: a name in
    :data:`NEVER_SYNCED`, a path an ignore rule matches, or one inside an ignored folder. Judged by the rule
    files as they were then, so a results transfer cannot loosen them by writing a ``.gitignore`` first."""
    parts = rel.split("/")
    rules = _parse_text(rules_read[_EXCLUDE], base="") if _EXCLUDE in rules_read else ()
    for depth, name in enumerate(parts):
        if name.lower() in NEVER_SYNCED:
            return True
        base = "".join(f"{p}/" for p in parts[:depth])
        for rule_file in _IGNORE_FILES:
            text = rules_read.get(base + rule_file)
            if text is not None:
                rules += _parse_text(text, base=base)
        last = depth == len(parts) - 1
        if _ignored(rules, "/".join(parts[: depth + 1]), name, is_dir or not last):
            return True
    return False


def _walk(directory: Path, rel_dir: str, inherited: tuple[_Rule, ...],
          record: dict[str, str] | None) -> Iterator[Entry]:
    entries = _scan(directory)
    rules = inherited + _local_rules(directory, rel_dir, entries, record)
    for entry in entries:
        if entry.name.lower() in NEVER_SYNCED:
            continue
        is_link = entry.is_symlink()
        is_dir = not is_link and entry.is_dir(follow_symlinks=False)
        if not (is_dir or is_link or entry.is_file(follow_symlinks=False)):
            continue  # sockets, FIFOs, devices: git skips them and they cannot be copied
        rel = rel_dir + entry.name
        if _ignored(rules, rel, entry.name, is_dir):
            continue
        path = directory / entry.name
        yield Entry(rel, path, is_dir, is_link)
        if is_dir:
            yield from _walk(path, rel + "/", rules, record)


def _scan(directory: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(directory) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError as exc:
        raise SyncError(f"cannot read folder {directory}: {exc.strerror or exc}") from exc


def _local_rules(directory: Path, rel_dir: str, entries: list[os.DirEntry[str]],
                 record: dict[str, str] | None) -> tuple[_Rule, ...]:
    # Like git >= 2.32, an ignore file that is a symlink is not followed.
    present = {e.name for e in entries if e.name in _IGNORE_FILES and e.is_file(follow_symlinks=False)}
    rules: tuple[_Rule, ...] = ()
    for name in _IGNORE_FILES:
        if name in present:
            rules += _read_rules(directory / name, base=rel_dir, record=record, rel=rel_dir + name)
    return rules


def _ignored(rules: tuple[_Rule, ...], rel: str, name: str, is_dir: bool) -> bool:
    for rule in reversed(rules):
        if rule.matches(rel, name, is_dir):
            return not rule.negate
    return False


def _read_rules(path: Path, *, base: str, record: dict[str, str] | None = None, rel: str = "") -> tuple[_Rule, ...]:
    try:
        # surrogateescape: a pattern with undecodable bytes still matches the same bytes in a file name.
        text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    except OSError as exc:
        raise SyncError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if record is not None:
        record[rel] = text
    return _parse_text(text, base=base)


@functools.lru_cache(maxsize=256)  # excluded() asks again for every result, with the same few rule files
def _parse_text(text: str, *, base: str) -> tuple[_Rule, ...]:
    lines = text.removeprefix("\ufeff").split("\n")
    return tuple(rule for line in lines if (rule := _parse_rule(line.removesuffix("\r"), base=base)))


def _parse_rule(line: str, *, base: str) -> _Rule | None:
    """One gitignore line as a rule, or None for blanks and comments (``base``: the file's folder + "/")."""
    if not line or line.startswith("#"):
        return None
    pattern = _trim_trailing_spaces(line)
    negate = pattern.startswith("!")
    pattern = pattern.removeprefix("!")
    dir_only = pattern.endswith("/")
    pattern = pattern.removesuffix("/")
    if not pattern:
        return None
    anchored = "/" in pattern
    regex = _translate_anchored(pattern.removeprefix("/")) if anchored else _translate(pattern)
    return _Rule(base, re.compile(regex, re.DOTALL), negate, dir_only, anchored)


def _trim_trailing_spaces(line: str) -> str:
    """Drop trailing spaces (not tabs) unless backslash-escaped: a port of git's ``trim_trailing_spaces``."""
    last_space: int | None = None
    i = 0
    while i < len(line):
        if line[i] == " ":
            if last_space is None:
                last_space = i
        else:
            last_space = None
            if line[i] == "\\":
                i += 1
                if i == len(line):
                    return line  # git leaves a line ending in a lone backslash alone
        i += 1
    return line if last_space is None else line[:last_space]


def _translate_anchored(pattern: str) -> str:
    # git compares the wildcard-free prefix literally and runs wildmatch on the rest only, so a "**" right
    # after that prefix counts as leading ("foo**/bar" matches "foo/x/bar"). Mirror it to agree with git.
    prefix_len = next((i for i, c in enumerate(pattern) if c in _GLOB_SPECIAL), len(pattern))
    return re.escape(pattern[:prefix_len]) + _translate(pattern[prefix_len:])


def _translate(pattern: str) -> str:
    """A wildmatch pattern (with WM_PATHNAME) as a Python regex for ``fullmatch``."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            j = i
            while j < n and pattern[j] == "*":
                j += 1
            fragment, i = _stars(pattern, i, j)
            out.append(fragment)
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            fragment, i = _bracket(pattern, i)
            out.append(fragment)
        elif c == "\\":
            # A trailing lone backslash can never match (wildmatch compares it with the end of the text).
            out.append(re.escape(pattern[i + 1]) if i + 1 < n else _NEVER)
            i += 2
        else:
            out.append(re.escape(c))
            i += 1
    return "".join(out)


def _stars(pattern: str, start: int, end: int) -> tuple[str, int]:
    """The regex for the run of stars ``pattern[start:end]`` and the index after what it consumed."""
    double = end - start >= 2
    after_slash = start == 0 or pattern[start - 1] == "/"
    if double and after_slash:
        if end == len(pattern) or pattern.startswith("\\/", end):
            return ".*", end
        if pattern[end] == "/":
            return "(?:.*/)?", end + 1  # "**/" takes its slash: zero or more whole directories
    return "[^/]*", end  # one star, or "**" not bounded by slashes, which is an ordinary "*"


def _bracket(pattern: str, start: int) -> tuple[str, int]:
    """Translate the ``[...]`` class at ``start``; return the regex and the index after ``]``.

    A port of wildmatch's class loop: the first member may be ``]``, ``!`` or ``^`` negates, ``\\`` escapes,
    ``[:name:]`` is an ASCII class, and an unclosed class or unknown ``[:name:]`` makes the pattern match
    nothing. A class never matches ``/``.
    """
    n = len(pattern)
    i = start + 1
    negated = i < n and pattern[i] in "!^"
    if negated:
        i += 1
    members: list[str] = []
    prev: str | None = None  # last single character, the possible start of a range
    first = True
    while first or (i < n and pattern[i] != "]"):
        first = False
        if i >= n:
            return _NEVER, n
        c = pattern[i]
        if c == "\\":
            if i + 1 >= n:
                return _NEVER, n
            prev = pattern[i + 1]
            members.append(re.escape(prev))
            i += 2
        elif c == "-" and prev is not None and i + 1 < n and pattern[i + 1] != "]":
            hi, i = _range_end(pattern, i + 1)
            if hi is None:
                return _NEVER, n
            if prev <= hi:  # wildmatch's reversed range adds nothing; Python's would not compile
                members.append(f"{re.escape(prev)}-{re.escape(hi)}")
            prev = None
        elif c == "[" and pattern.startswith("[:", i):
            close = pattern.find("]", i + 2)
            if close < 0:
                return _NEVER, n
            if close - (i + 2) >= 1 and pattern[close - 1] == ":":
                name = pattern[i + 2 : close - 1]
                if name not in _POSIX_CLASSES:
                    return _NEVER, n
                members.append(_POSIX_CLASSES[name])
                prev = None
                i = close + 1
            else:  # no ":]": a plain "["
                prev = "["
                members.append(re.escape("["))
                i += 1
        else:
            prev = c
            members.append(re.escape(c))
            i += 1
    if i >= n:
        return _NEVER, n
    body = "".join(members)
    return ("(?!/)" + (f"[^{body}]" if negated else f"[{body}]")), i + 1


def _range_end(pattern: str, i: int) -> tuple[str | None, int]:
    if pattern[i] != "\\":
        return pattern[i], i + 1
    if i + 1 >= len(pattern):
        return None, len(pattern)
    return pattern[i + 1], i + 2
