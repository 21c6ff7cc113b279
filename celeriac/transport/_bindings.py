"""Exchange routing for brokers without native exchanges (memory, sqlite, redis).

A binding says "messages published to ``exchange`` whose routing key matches
``binding_key`` go to ``queue``". Matching follows AMQP 0-9-1:

* ``direct``: the routing key equals the binding key.
* ``topic``: both keys are dot-separated words; ``*`` matches exactly one word and
  ``#`` zero or more words (so ``a.#`` matches ``a``, ``a.b`` and ``a.b.c``).
* ``fanout``: every bound queue, whatever the routing key.

The default exchange ``""`` is not stored: it routes to the queue named by the routing
key, so it always works without a declare.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

from .base import QueueSpec

__all__ = ["EXCHANGE_TYPES", "Binding", "binding_of", "match", "resolve"]

EXCHANGE_TYPES = ("direct", "topic", "fanout")


@dataclass(frozen=True, slots=True)
class Binding:
    """One row of a broker's binding table."""

    exchange: str
    exchange_type: str
    binding_key: str
    queue: str


def binding_of(spec: QueueSpec) -> Binding | None:
    """The binding a declared queue adds; ``None`` when it only uses the default exchange."""
    if not spec.exchange:
        return None
    if spec.exchange_type not in EXCHANGE_TYPES:
        raise ValueError(
            f"queue {spec.name!r}: exchange type {spec.exchange_type!r} is not one of "
            f"{', '.join(EXCHANGE_TYPES)}"
        )
    return Binding(spec.exchange, spec.exchange_type, spec.routing_key, spec.name)


def match(exchange_type: str, binding_key: str, routing_key: str) -> bool:
    """True if a message with ``routing_key`` goes through a binding with ``binding_key``."""
    if exchange_type == "fanout":
        return True
    if exchange_type == "direct":
        return binding_key == routing_key
    if exchange_type == "topic":
        return _topic(binding_key, routing_key)
    raise ValueError(f"unknown exchange type {exchange_type!r}")


@lru_cache(maxsize=4096)
def _topic(binding_key: str, routing_key: str) -> bool:
    return _words(tuple(binding_key.split(".")), tuple(routing_key.split(".")))


def _words(pattern: tuple[str, ...], words: tuple[str, ...]) -> bool:
    # Iterative over the fixed part, recursive only at '#', which is rare in real keys.
    i = 0
    while i < len(pattern):
        head = pattern[i]
        if head == "#":
            rest = pattern[i + 1 :]
            if not rest:
                return True
            return any(_words(rest, words[j:]) for j in range(len(words) + 1))
        if not words or (head != "*" and head != words[0]):
            return False
        words = words[1:]
        i += 1
    return not words


def resolve(bindings: Iterable[Binding], exchange: str, routing_key: str) -> list[str]:
    """Queue names a message goes to, each once, in binding order.

    Exchange ``""`` is the default exchange and needs no binding. An empty list means
    the message is unroutable; the caller decides what that means (we raise).
    """
    if not exchange:
        return [routing_key]
    out: list[str] = []
    for b in bindings:
        if (
            b.exchange == exchange
            and b.queue not in out
            and match(b.exchange_type, b.binding_key, routing_key)
        ):
            out.append(b.queue)
    return out
