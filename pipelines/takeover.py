"""Removing a dead lock exactly once, on any store that can create a name only if it is absent: a folder
(``O_CREAT | O_EXCL``), S3 (``If-None-Match: *``), an MLflow registry (a registered model's unique name).
The build, run and translation locks (`pipelines.dataset.lock`) and the promotion lock
(`pipelines.registry.promote`) take over through it.

Contract: every contender that found the same dead lock races to create a marker named after that lock's
token; one wins, and only the winner deletes the lock, after checking that it is still that lock. So no
contender deletes a lock another has just taken.

A marker whose writer died is never deleted while the race lasts: two contenders that both saw it dead
would both delete it, and the later delete could remove the marker the earlier one had just made in its
place, letting both in. The race moves on to the next generation's marker instead (``<marker>.1``,
``.2``...), which again only one creates. Its winner removes every generation once the dead lock is known
to be gone, when no contender can race for it any more; until then (its look at the lock failed) it
removes only its own, which the next look races for again.
"""

from __future__ import annotations

from collections.abc import Callable


def take_over_once(
    marker: str,
    create: Callable[[str], bool],
    holder: Callable[[str], str | None],
    still_there: Callable[[], bool],
    delete_lock: Callable[[], None],
    delete_marker: Callable[[str], None],
) -> tuple[bool, str]:
    """(whether this contender deleted the dead lock, who else is taking it over: "" if nobody is now).

    ``marker``: the first generation's name. ``create(name)``: create it only if absent, True if this
    contender now holds it. ``holder(name)``: who holds a marker, "" if its writer is gone, None if there is
    none. ``still_there()``: whether the dead lock is still in place (the same token); it raises when it
    cannot tell. ``delete_lock()``, ``delete_marker(name)``: remove, a missing one being fine."""
    markers = [marker]  # one per generation
    while not create(markers[-1]):
        taker = holder(markers[-1])
        if taker is None:  # its winner is done and removed it: the next look finds its lock, or none
            return False, ""
        if taker:
            return False, taker
        markers.append(f"{marker}.{len(markers)}")  # its writer is gone: race for the next one
    gone = False  # the dead lock: once it is, no contender races for it any more
    try:
        if not still_there():
            gone = True
            return False, ""  # replaced meanwhile: the next look finds that lock, or none
        delete_lock()
        gone = True
        return True, ""
    finally:
        for name in reversed(markers if gone else markers[-1:]):
            delete_marker(name)
