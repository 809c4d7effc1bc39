"""A bound on how many fields a request message holds, checked on its bytes before protobuf parses them.

Parsing builds an object per embedded message, so a message of many tiny ones costs far more memory and time
than its bytes: 2,000,000 empty `inputs` of a ModelInferRequest are 4 MB on the wire and about 180 MB parsed,
and the handlers then looked at each (measured: a 4 MB request held the event loop, every other call with it,
for 5.5 s and took 1.2 GB). No request this server answers needs more than a few dozen fields in one message,
so the fields of every message that holds repeated embedded messages (a ModelInferRequest, each of its inputs
and outputs) are counted first, all of them against one budget, and past MAX_FIELDS in all the request is
refused (the message where the count passed it named). Only those messages are walked: the others (a tensor's
contents, whose repeated numbers are cheap to parse) are stepped over whole, so the walk costs at most
MAX_FIELDS steps however the bytes are made (a budget per message let 1,000 inputs of 1,000 fields each through,
a million steps). Messages without repeated embedded
messages (every aevae.v1 request) have no walk at all, and small requests are not walked: below WALK_FROM_BYTES
no arrangement of fields costs much to parse.
"""

from __future__ import annotations

from typing import Any, Callable

from google.protobuf.descriptor import Descriptor

from aevae.v1.tensors import TensorError, entries

MAX_FIELDS = 1024  # in all; a ModelInferRequest has one input, an output or two, a few parameters: a few dozen
WALK_FROM_BYTES = 64 << 10  # below it even 32,000 empty messages parse in a few milliseconds
_LEN = 2  # wire type of embedded messages

Check = Callable[[bytes], "str | None"]


def _walked(descriptor: Descriptor, seen: frozenset[str] = frozenset()) -> dict[int, Descriptor] | None:
    """The message-typed fields of `descriptor` worth walking into ({number: type}, {} for none), or None
    when the message has no repeated embedded messages anywhere below it: nothing to bound."""
    if descriptor.full_name in seen:  # a recursive type: bounded where it is first walked
        return None
    own = any(f.is_repeated and f.message_type is not None for f in descriptor.fields)
    inner = {f.number: f.message_type for f in descriptor.fields if f.message_type is not None
             and _walked(f.message_type, seen | {descriptor.full_name}) is not None}
    return inner if own or inner else None


def check_for(message_class: Any) -> Check | None:
    """The check of `message_class`'s request bytes: None when they fit (or do not read as protobuf, which the
    parser then says), else what is wrong. None when the class needs none."""
    root = message_class.DESCRIPTOR
    if _walked(root) is None:
        return None
    plans: dict[str, dict[int, Descriptor]] = {}

    def plan(descriptor: Descriptor) -> dict[int, Descriptor]:
        if descriptor.full_name not in plans:
            plans[descriptor.full_name] = _walked(descriptor) or {}
        return plans[descriptor.full_name]

    def walk(buf: memoryview, descriptor: Descriptor, path: str, budget: list[int]) -> str | None:
        inner = plan(descriptor)
        occurrences: dict[int, int] = {}
        for number, wire, value, _, _ in entries(buf):
            budget[0] -= 1
            if budget[0] < 0:
                return (f"{path} holds more than {MAX_FIELDS:,} fields, and no request this server answers needs "
                        f"that many (a ModelInferRequest has one input, an output or two and a few parameters); "
                        "send one request per batch")
            if number in inner and wire == _LEN:
                index = occurrences[number] = occurrences.get(number, -1) + 1
                field = descriptor.fields_by_number[number]
                problem = walk(value, inner[number], f"{path}.{field.name}[{index}]", budget)
                if problem:
                    return problem
        return None

    def check(data: bytes) -> str | None:
        if len(data) < WALK_FROM_BYTES:
            return None
        try:
            return walk(memoryview(data), root, root.name, [MAX_FIELDS])
        except (TensorError, IndexError):  # not protobuf: protobuf's parse says what is wrong
            return None

    return check
