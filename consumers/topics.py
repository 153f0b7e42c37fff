"""AMQP topic matching: does an event type match a subscription's pattern (``*`` one word, ``#`` any)?"""

from __future__ import annotations

from functools import lru_cache

__all__ = ["topic_matches"]


@lru_cache(maxsize=65536)
def topic_matches(pattern: str, routing_key: str) -> bool:
    """True when ``routing_key`` matches ``pattern`` with RabbitMQ's topic-exchange rules."""
    return _match(tuple(pattern.split(".")), tuple(routing_key.split(".")))


def _match(pattern: tuple[str, ...], words: tuple[str, ...]) -> bool:
    # Words are few (a type has a handful), so plain backtracking is cheap, and results are cached above.
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_match(rest, words[i:]) for i in range(len(words) + 1))
    if not words:
        return False
    return (head == "*" or head == words[0]) and _match(rest, words[1:])
