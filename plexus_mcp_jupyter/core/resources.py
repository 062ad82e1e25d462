"""Resources: what one task needs and what an executor can give (docs/tasks.md, "Resources").

A resource set is a plain mapping of names to whole amounts: `slots` (worker slots), `memory_mb`, and any
named resource a deployment declares (`gpu`, `license`...). A task type declares the needs of one task,
an executor its capacity; the scheduler starts a task only when its needs fit in what is free, so nothing
is ever overcommitted. A resource the executor does not declare has a capacity of zero, except `slots`
and `memory_mb`, which every executor has.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping

from .errors import InvalidArgument

Resources = dict[str, int]

DEFAULT_NEEDS: Mapping[str, int] = {"slots": 1}
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


def parse_assignments(text: str, setting: str) -> dict[str, str]:
    """`name=value,name=value` (a setting's text) to a mapping; InvalidArgument naming the setting otherwise."""
    out: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, value = part.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name or not value:
            raise InvalidArgument(f'{setting}: {part!r} is not name=value (example: {setting}="a=1,b=2")')
        out[name] = value
    return out


def parse_positive_numbers(text: str, setting: str) -> dict[str, float]:
    """`name=number,...` (weights, seconds) to a mapping of numbers > 0; InvalidArgument naming the setting."""
    out: dict[str, float] = {}
    for name, value in parse_assignments(text, setting).items():
        try:
            out[name] = float(value)
        except ValueError:
            out[name] = 0.0
        if not out[name] > 0:
            raise InvalidArgument(f"{setting}: {name}={value!r} must be a number > 0")
    return out


def parse_resources(text: str, setting: str = "executor_resources") -> Resources:
    """`slots=4,memory_mb=8000,gpu=1` (or `evaluation=2`: counts by name) to whole, non-negative amounts."""
    out: Resources = {}
    for name, value in parse_assignments(text, setting).items():
        out[name] = check_amount(name, value, setting)
    return out


def check_amount(name: str, value: object, where: str) -> int:
    """One resource amount: a lower-case name and a whole number >= 0."""
    if not _NAME.match(name):
        raise InvalidArgument(
            f"{where}: the name {name!r} must be lower-case letters, digits and _ "
            "(such as slots, memory_mb, gpu, or a task type)"
        )
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgument(f"{where}: {name} must be a whole number >= 0, not {value!r}")
    return value


def machine_capacity() -> Resources:
    """What this machine offers: its cores as slots and its physical memory (MB); best effort. Read once per
    process (the scheduler asks at every dispatch and pass); a copy, so the caller may change it."""
    return dict(_machine_capacity())


@functools.cache
def _machine_capacity() -> Resources:
    capacity: Resources = {"slots": os.cpu_count() or 1}
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        capacity["memory_mb"] = int(pages * page_size // (1024 * 1024))
    except (AttributeError, ValueError, OSError):
        pass
    return capacity


def fits(needs: Mapping[str, int], free: Mapping[str, int]) -> bool:
    """True when every need is covered by what is free (an undeclared resource has none free)."""
    return all(amount <= free.get(name, 0) for name, amount in needs.items() if amount)


def shortfall(needs: Mapping[str, int], available: Mapping[str, int]) -> dict[str, tuple[int, int]]:
    """The resources `needs` exceed: name -> (needed, available)."""
    return {name: (amount, available.get(name, 0)) for name, amount in needs.items() if amount > available.get(name, 0)}


def take(free: Resources, needs: Mapping[str, int]) -> None:
    """Subtract `needs` from `free` in place (amounts may go below zero: a reservation)."""
    for name, amount in needs.items():
        free[name] = free.get(name, 0) - amount


def describe(resources: Mapping[str, int]) -> str:
    """`slots=2, memory_mb=512` in a stable order: slots, memory_mb, then the others by name."""
    order = sorted(resources, key=lambda n: (n != "slots", n != "memory_mb", n))
    return ", ".join(f"{name}={resources[name]}" for name in order) or "nothing"
