"""burst_jupyter.ignore: what gets uploaded, checked against real git where git has an opinion."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from burst_jupyter.errors import SyncError
from burst_jupyter.ignore import Entry, iter_entries, iter_files


class Link(str):
    """A tree value that makes a symlink pointing at this text instead of a file."""


Tree = dict[str, str]  # path -> file content; a path ending in "/" is an (empty) directory


def build(root: Path, tree: Tree) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for rel, content in tree.items():
        path = root / rel
        if rel.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Link):
            path.symlink_to(content)
        else:
            path.write_bytes(content.encode())
    return root


def git(root: Path, *args: str) -> str:
    home = root.parent / "home"
    home.mkdir(exist_ok=True)
    # Keep the machine's and the user's git config (a global excludesFile) out of the comparison.
    env = {
        **os.environ,
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
    }
    done = subprocess.run(["git", *args], cwd=root, env=env, check=True, capture_output=True)
    return done.stdout.decode("utf-8", errors="surrogateescape")


def git_files(root: Path) -> list[str]:
    out = git(root, "ls-files", "--others", "--cached", "--exclude-standard", "-z")
    return sorted(p for p in out.split("\0") if p)


def ours(root: Path) -> list[str]:
    return sorted(rel for rel, _ in iter_files(root))


# Each case: a tree with its .gitignore files. The expected answer is whatever git says.
GIT_CASES: dict[str, Tree] = {
    "basename-any-depth": {
        ".gitignore": "*.log\n",
        "a.log": "",
        "b.txt": "",
        "sub/c.log": "",
        "sub/deeper/d.log": "",
        "sub/e.txt": "",
    },
    "leading-slash-anchors": {".gitignore": "/build\n", "build/x": "", "sub/build/y": "", "build.txt": ""},
    "middle-slash-anchors": {
        ".gitignore": "doc/*.txt\n",
        "doc/a.txt": "",
        "doc/sub/b.txt": "",
        "sub/doc/c.txt": "",
        "doc/d.md": "",
    },
    "trailing-slash-dir-only": {".gitignore": "out/\n", "out/x": "", "sub/out/y": "", "other/out": ""},
    "anchored-dir-only": {".gitignore": "/a/b/\n", "a/b/x": "", "c/a/b/y": "", "a/c/b/z": "", "d/a/b": ""},
    "star-not-slash": {".gitignore": "a/*.c\n", "a/x.c": "", "a/b/y.c": "", "x.c": ""},
    "question-not-slash": {".gitignore": "x/a?b\nx/c[/]d\n", "x/a/b": "", "x/acb": "", "x/c/d": "", "x/cd": ""},
    "negation": {".gitignore": "*.log\n!keep.log\n", "a.log": "", "keep.log": "", "sub/keep.log": "", "sub/b.log": ""},
    "later-rule-wins": {".gitignore": "!keep.log\n*.log\n", "keep.log": "", "a.txt": ""},
    "no-reinclude-under-excluded-dir": {
        ".gitignore": "build/\n!build/keep.txt\n",
        "build/keep.txt": "",
        "build/junk": "",
        "src/a.py": "",
    },
    "reinclude-step-by-step": {
        ".gitignore": "/*\n!/foo\n/foo/*\n!/foo/bar\n",
        "foo/bar/x": "",
        "foo/baz/y": "",
        "foo/file": "",
        "top.txt": "",
        "other/z": "",
    },
    "whitelist-dirs": {".gitignore": "*\n!*/\n!*.py\n", "a.py": "", "b.txt": "", "sub/c.py": "", "sub/d.txt": ""},
    "leading-double-star": {
        ".gitignore": "**/cache\n",
        "cache/a": "",
        "x/cache/b": "",
        "x/y/cache": "",
        "x/cachet": "",
    },
    "leading-double-star-path": {
        ".gitignore": "**/foo/bar\n",
        "foo/bar": "",
        "a/foo/bar": "",
        "a/b/foo/bar/c": "",
        "foo/baz": "",
    },
    "trailing-double-star": {
        ".gitignore": "abc/**\n!abc/keep.txt\n",
        "abc/keep.txt": "",
        "abc/x": "",
        "abc/d/y": "",
        "abcd/z": "",
    },
    "middle-double-star": {
        ".gitignore": "a/**/b\n",
        "a/b": "",
        "a/x/b": "",
        "a/x/y/b": "",
        "a/x/bb": "",
        "c/a/b": "",
    },
    "double-star-alone": {".gitignore": "**\n!keep\n", "keep": "", "x": "", "sub/keep": ""},
    "double-star-not-bounded": {
        ".gitignore": "a**b\nfoo/**bar\n",
        "axyb": "",
        "x/a-b": "",
        "a/b": "",
        "foo/xbar": "",
        "foo/x/ybar": "",
    },
    "double-star-after-literal-prefix": {
        # git compares "foo" literally and wildmatches "**/bar" against the rest, so this matches "foox/y/bar".
        ".gitignore": "foo**/bar\n",
        "foox/y/bar": "",
        "foo/bar": "",
        "foo/z/bar": "",
        "fooq": "",
    },
    "nested-gitignore-reincludes": {
        ".gitignore": "*.txt\n",
        "a.txt": "",
        "important.txt": "",
        "sub/.gitignore": "!important.txt\n",
        "sub/important.txt": "",
        "sub/other.txt": "",
        "sub/deep/important.txt": "",
    },
    "nested-gitignore-anchors-to-its-folder": {
        "sub/.gitignore": "/only_here\ndeep/x\n",
        "sub/only_here": "",
        "sub/a/only_here": "",
        "sub/deep/x": "",
        "sub/a/deep/x": "",
        "deep/x": "",
        "only_here": "",
    },
    "deeper-file-wins": {".gitignore": "!*.dat\n", "sub/.gitignore": "*.dat\n", "a.dat": "", "sub/b.dat": ""},
    "ignored-gitignore-still-read": {
        ".gitignore": "logs/*\n",
        "logs/.gitignore": "!keep\n",
        "logs/keep": "",
        "logs/drop": "",
    },
    "question-and-classes": {
        ".gitignore": "file?.c\n[ab]*.py\n[!a]*.md\n[0-9].txt\n[^x]y\n",
        "file1.c": "",
        "file12.c": "",
        "a.py": "",
        "c.py": "",
        "a.md": "",
        "b.md": "",
        "5.txt": "",
        "x.txt": "",
        "ay": "",
        "xy": "",
    },
    "class-edge-cases": {
        ".gitignore": "[]]x\n[!]]y\n[a-]z\n[c-a]w\n[[:digit:]]d\n[[:upper:][:punct:]]p\n[[:bogus:]]q\n[a\n",
        "]x": "",
        "ax": "",
        "ay": "",
        "]y": "",
        "-z": "",
        "bz": "",
        "az": "",
        "cw": "",
        "bw": "",
        "1d": "",
        "ad": "",
        "Ap": "",
        "_p": "",
        "ap": "",
        "aq": "",
        "[a": "",
    },
    "escapes-and-comments": {
        ".gitignore": "\\#hash\n\\!bang\n# comment\n\n   \na\\*b\n",
        "#hash": "",
        "!bang": "",
        "# comment": "",
        "normal": "",
        "a*b": "",
        "axb": "",
    },
    "trailing-spaces": {".gitignore": "foo   \nbar\\ \nbaz\t\n", "foo": "", "bar ": "", "bar": "", "baz": ""},
    "crlf-and-bom": {".gitignore": "\ufeff*.tmp\r\nkeep\r\n", "a.tmp": "", "keep": "", "x": ""},
    "non-ascii-names": {".gitignore": "café/\n*.ü\n", "café/x": "", "cafe/y": "", "a.ü": ""},
    "symlinks-are-not-dirs": {
        ".gitignore": "linkdir/\nlinkfile\n",
        "realdir/f": "",
        "linkdir": Link("realdir"),
        "linkfile": Link("realdir/f"),
        "dangling": Link("nowhere"),
    },
    "symlinked-gitignore-not-followed": {"rules": "*.log\n", ".gitignore": Link("rules"), "a.log": ""},
}


@pytest.mark.parametrize("tree", GIT_CASES.values(), ids=GIT_CASES.keys())
def test_matches_git(tmp_path: Path, tree: Tree) -> None:
    root = build(tmp_path / "repo", tree)
    git(root, "init", "-q")
    assert ours(root) == git_files(root)


def test_info_exclude_applies_below_gitignore(tmp_path: Path) -> None:
    root = build(tmp_path / "repo", {".gitignore": "!keep.bin\n", "a.bin": "", "keep.bin": "", "x": ""})
    git(root, "init", "-q")
    (root / ".git" / "info").mkdir(exist_ok=True)
    (root / ".git" / "info" / "exclude").write_text("*.bin\n")
    assert ours(root) == git_files(root) == [".gitignore", "keep.bin", "x"]


def test_git_dir_never_uploaded(tmp_path: Path) -> None:
    root = build(tmp_path / "repo", {"a": "", "sub/.git": "gitdir: elsewhere\n", "sub/b": ""})
    git(root, "init", "-q")
    assert ours(root) == ["a", "sub/b"]


def test_burstignore_adds_rules(tmp_path: Path) -> None:
    root = build(tmp_path, {".gitignore": "*.log\n", ".burstignore": "data/\n", "data/big": "", "a.log": "", "a": ""})
    assert ours(root) == [".burstignore", ".gitignore", "a"]


def test_burstignore_reincludes_what_gitignore_excludes(tmp_path: Path) -> None:
    tree = {
        ".gitignore": "*.ckpt\nweights/\n",
        ".burstignore": "!best.ckpt\n!weights/\n",
        "best.ckpt": "",
        "last.ckpt": "",
        "weights/w.bin": "",
    }
    assert ours(build(tmp_path, tree)) == [".burstignore", ".gitignore", "best.ckpt", "weights/w.bin"]


def test_deeper_gitignore_beats_shallower_burstignore(tmp_path: Path) -> None:
    tree = {".burstignore": "!*.tmp\n", "sub/.gitignore": "*.tmp\n", "a.tmp": "", "sub/b.tmp": ""}
    assert ours(build(tmp_path, tree)) == [".burstignore", "a.tmp", "sub/.gitignore"]


def test_entries_include_empty_dirs_before_their_contents(tmp_path: Path) -> None:
    root = build(tmp_path, {".gitignore": "skip/\n", "empty/": "", "skip/": "", "b/z": "", "b/a/y": "", "a-b": ""})
    got = [(e.rel, e.is_dir) for e in iter_entries(root)]
    assert got == [
        (".gitignore", False),
        ("a-b", False),
        ("b", True),
        ("b/a", True),
        ("b/a/y", False),
        ("b/z", False),
        ("empty", True),
    ]


def test_entries_carry_absolute_paths_and_symlinks(tmp_path: Path) -> None:
    root = build(tmp_path, {"d/f": "x", "link": Link("d")})
    entries = list(iter_entries(root))
    assert entries == [
        Entry("d", tmp_path / "d", is_dir=True, is_symlink=False),
        Entry("d/f", tmp_path / "d" / "f", is_dir=False, is_symlink=False),
        Entry("link", tmp_path / "link", is_dir=False, is_symlink=True),
    ]
    assert list(iter_files(root)) == [("d/f", tmp_path / "d" / "f"), ("link", tmp_path / "link")]


_scanned: list[str] | None = None


def _record_scandir(event: str, args: tuple[object, ...]) -> None:
    if _scanned is not None and event == "os.scandir":
        _scanned.append(os.fsdecode(args[0]))  # type: ignore[arg-type]


sys.addaudithook(_record_scandir)


@pytest.fixture
def scanned() -> Iterator[list[str]]:
    """Every folder os.scandir opens while the test runs (an audit hook: nothing is patched)."""
    global _scanned
    _scanned = []
    try:
        yield _scanned
    finally:
        _scanned = None


def test_ignored_dirs_are_not_walked(tmp_path: Path, scanned: list[str]) -> None:
    tree = {".gitignore": "data/\n.venv\n", "data/a/b/c": "", ".venv/lib/x": "", "src/m.py": ""}
    root = build(tmp_path, tree)
    assert ours(root) == [".gitignore", "src/m.py"]
    assert sorted(scanned) == [str(tmp_path), str(tmp_path / "src")]


def test_symlinked_dirs_are_not_walked(tmp_path: Path, scanned: list[str]) -> None:
    root = build(tmp_path / "root", {"loop": Link(".")})
    assert ours(root) == ["loop"]
    assert scanned == [str(root)]


def test_unreadable_root_is_a_sync_error(tmp_path: Path) -> None:
    with pytest.raises(SyncError, match=r"cannot read folder .*missing"):
        list(iter_files(tmp_path / "missing"))
