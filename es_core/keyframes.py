"""The keyframe rule of `store.keep_centre_every` K, as arithmetic on generations: which centres stay
on disk whatever the ledger says (artifacts/retention.py adds the ledger's protections and applies
it; es_core/preflight.py counts what it keeps). A centre's generation is the number of updates in it."""

from __future__ import annotations


def keeps_every_centre(keep_every: int) -> bool:
    """0 or 1: every centre stays on disk (the default, and every run before the setting)."""
    return keep_every <= 1


def is_keyframe(centre_generation: int, keep_every: int) -> bool:
    return keeps_every_centre(keep_every) or centre_generation % keep_every == 0
