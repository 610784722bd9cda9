"""Where a folder's files differ from the sha256 of each file recorded when it was written: one
comparison for the artifact store's manifests and the built model folders' file lists."""

from __future__ import annotations


def first_difference(expected: dict[str, str], actual: dict[str, str]) -> tuple[str, str] | None:
    """(relative path, what) of the first file, in path order, that is `missing`, `unexpected` or
    `changed` in `actual` against `expected` (path -> sha256); None when they agree."""
    for rel in sorted(set(expected) | set(actual)):
        if rel not in actual:
            return rel, "missing"
        if rel not in expected:
            return rel, "unexpected"
        if expected[rel] != actual[rel]:
            return rel, "changed"
    return None
