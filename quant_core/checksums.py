"""SHA256SUMS, the checkpoint's integrity list: one writer, one reader (torch-free).

The format is coreutils' ``sha256sum``: ``<64 hex>  <relative posix path>`` per line, so
``sha256sum -c SHA256SUMS`` verifies a downloaded checkpoint with no tool of ours. The export writes it
last; the runtime and the artifact store read it here. (The torch-free ``spinquant-client`` distribution
reads the same format with its own few lines, by design: it installs alone; tests/client checks that it
agrees with this writer.)
"""

from __future__ import annotations

import hashlib
from pathlib import Path

SUMS = "SHA256SUMS"
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks (checkpoint shards are gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


class MalformedSums(ValueError):
    """A SHA256SUMS line that is not ``<sha256>  <name>``; ``line_no`` counts from 1."""

    def __init__(self, line_no: int, line: str) -> None:
        super().__init__(f"{SUMS} line {line_no} is malformed: {line[:80]!r}; accepted: '<64 hex>  <relative path>'")
        self.line_no, self.line = line_no, line


def format_sums(digests: dict[str, str]) -> str:
    """The file text for ``name -> sha256`` (sorted by name, one trailing newline)."""
    return "".join(f"{digests[name]}  {name}\n" for name in sorted(digests))


def parse_sums(text: str) -> dict[str, str]:
    """``name -> sha256`` of a SHA256SUMS text; MalformedSums for a bad line (blank lines are skipped)."""
    listed: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or not name or any(c not in "0123456789abcdefABCDEF" for c in digest):
            raise MalformedSums(n, line)
        listed[name.lstrip("*")] = digest.lower()  # '*name' is sha256sum's binary-mode marker
    return listed


def folder_digests(folder: Path) -> dict[str, str]:
    """``relative path -> sha256`` of every file under ``folder`` except SHA256SUMS itself."""
    return {p.relative_to(folder).as_posix(): sha256_file(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != SUMS}


def write_sums(folder: Path) -> None:
    """Write ``folder/SHA256SUMS`` covering every other file under it (call it last)."""
    (folder / SUMS).write_text(format_sums(folder_digests(folder)))


def sums_problems(folder: Path) -> list[str]:
    """What does not match ``folder/SHA256SUMS`` (empty = verified): missing, changed and unlisted files."""
    sums = folder / SUMS
    if not sums.is_file():
        return [f"{folder} has no {SUMS}"]
    try:
        listed = parse_sums(sums.read_text(errors="replace"))
    except MalformedSums as exc:
        return [str(exc)]
    problems = []
    for name, digest in listed.items():
        f = folder / name
        if not f.is_file():
            problems.append(f"{name} is listed in {SUMS} but missing (truncated checkpoint?)")
        elif sha256_file(f) != digest:
            problems.append(f"{name} does not match its {SUMS} entry (corrupted or modified)")
    extra = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                   if p.is_file() and p.name != SUMS and p.relative_to(folder).as_posix() not in listed)
    if extra:
        problems.append(f"files not covered by {SUMS}: {', '.join(extra[:5])}")
    return problems
