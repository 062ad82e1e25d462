"""Rewriting a Parquet body's page headers and footer, to craft bodies no writer makes (tests of the page walk).

A type-preserving Thrift compact protocol codec: a struct is a list of [field id, Thrift type, value] in the order
read, so a rewrite may repeat a field, give it another integer width or another id (ids are written in the long form
when they do not increase by 1..15). Lists and sets are ("L", element type, items); maps are not supported (Parquet's
page headers and footers have none).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

Struct = list[list[Any]]
I16, I32, I64, BINARY, LIST, STRUCT = 4, 5, 6, 8, 9, 12


class Reader:
    def __init__(self, data: bytes, position: int = 0) -> None:
        self.data, self.position = data, position

    def byte(self) -> int:
        self.position += 1
        return self.data[self.position - 1]

    def varint(self) -> int:
        value = shift = 0
        while True:
            byte = self.byte()
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7

    def zigzag(self) -> int:
        value = self.varint()
        return (value >> 1) ^ -(value & 1)

    def value(self, kind: int) -> Any:
        if kind in (1, 2):
            return kind == 1
        if kind == 3:
            return self.byte()
        if kind in (I16, I32, I64):
            return self.zigzag()
        if kind in (7, BINARY):
            size = 8 if kind == 7 else self.varint()
            self.position += size
            return bytes(self.data[self.position - size : self.position])
        if kind in (LIST, 10):
            header = self.byte()
            size, element = header >> 4, header & 0x0F
            if size == 15:
                size = self.varint()
            return ("L", element, [self.byte() == 1 if element in (1, 2) else self.value(element) for _ in range(size)])
        if kind == STRUCT:
            return self.struct()
        raise ValueError(f"Thrift type {kind} is not supported here")

    def struct(self) -> Struct:
        fields: Struct = []
        number = 0
        while True:
            header = self.byte()
            if header == 0:
                return fields
            kind, delta = header & 0x0F, header >> 4
            number = number + delta if delta else self.zigzag()
            fields.append([number, kind, self.value(kind)])


def varint(number: int) -> bytes:
    out = bytearray()
    while True:
        low, number = number & 0x7F, number >> 7
        if not number:
            return bytes(out + bytes([low]))
        out.append(low | 0x80)


def zigzag(number: int) -> bytes:
    return varint((number << 1) ^ (number >> 63))


def encode_value(kind: int, value: Any) -> bytes:
    if kind in (1, 2):
        return b""
    if kind == 3:
        return bytes([value])
    if kind in (I16, I32, I64):
        return zigzag(value)
    if kind == 7:
        return bytes(value)
    if kind == BINARY:
        return varint(len(value)) + value
    if kind in (LIST, 10):
        _, element, items = value
        size = bytes([len(items) << 4 | element]) if len(items) < 15 else bytes([0xF0 | element]) + varint(len(items))
        return size + b"".join(
            bytes([1 if item else 2]) if element in (1, 2) else encode_value(element, item) for item in items
        )
    if kind == STRUCT:
        return encode_struct(value)
    raise ValueError(f"Thrift type {kind} is not supported here")


def encode_struct(fields: Struct) -> bytes:
    out = bytearray()
    last = 0
    for number, kind, value in fields:
        kind = (1 if value else 2) if kind in (1, 2) else kind
        delta = number - last
        out += bytes([delta << 4 | kind]) if 0 < delta <= 15 else bytes([kind]) + zigzag(number)
        out += encode_value(kind, value)
        last = number
    return bytes(out + b"\x00")


def get(fields: Struct, number: int) -> list[Any]:
    """The (first) field `number` of a struct."""
    return next(f for f in fields if f[0] == number)


class Page:
    """A page: its header's fields and its (compressed) bytes."""

    def __init__(self, header: Struct, payload: bytes) -> None:
        self.header, self.payload = header, payload

    @property
    def kind(self) -> int:
        return int(get(self.header, 1)[2])

    def replace_payload(self, payload: bytes, uncompressed: int | None = None) -> None:
        self.payload = payload
        get(self.header, 2)[2] = len(payload) if uncompressed is None else uncompressed
        get(self.header, 3)[2] = len(payload)


def written(table: pa.Table, **options: Any) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **options)
    return bytes(sink.getvalue().to_pybytes())


def rewrite(
    body: bytes,
    pages: Callable[[int, list[Page]], None] | None = None,
    footer: Callable[[Struct], None] | None = None,
) -> bytes:
    """`body` with each column chunk's pages passed to `pages(chunk index, pages)` to edit in place, written again
    with the footer's offsets and sizes made to fit, and the footer passed to `footer` to edit last."""
    start = len(body) - 8 - int.from_bytes(body[-8:-4], "little")
    meta = Reader(body, start).struct()
    out = bytearray(b"PAR1")
    index = 0
    for group in get(meta, 4)[2][2]:
        for chunk in get(group, 1)[2][2]:
            chunk_meta = get(chunk, 3)[2]
            data_offset = get(chunk_meta, 9)[2]
            dictionary = next((f for f in chunk_meta if f[0] == 11), None)
            first = dictionary[2] if dictionary and 0 < dictionary[2] < data_offset else data_offset
            position, end = first, first + get(chunk_meta, 7)[2]
            found = []
            while position < end:
                reader = Reader(body, position)
                header = reader.struct()
                size = get(header, 3)[2]
                found.append(Page(header, body[reader.position : reader.position + size]))
                position = reader.position + size
            if pages is not None:
                pages(index, found)
            index += 1
            new_start, new_data = len(out), None
            for page in found:
                if new_data is None and page.kind in (0, 3):
                    new_data = len(out)
                out += encode_struct(page.header) + page.payload
            if dictionary and 0 < dictionary[2] < data_offset:
                dictionary[2] = new_start
            get(chunk_meta, 9)[2] = new_start if new_data is None else new_data
            get(chunk_meta, 7)[2] = len(out) - new_start
            offset = next((f for f in chunk if f[0] == 2), None)
            if offset is not None:
                offset[2] = new_start
    if footer is not None:
        footer(meta)
    encoded = encode_struct(meta)
    return bytes(out + encoded + len(encoded).to_bytes(4, "little") + b"PAR1")


def rle(count: int, value: int, width: int) -> bytes:
    """A run of `count` equal `value`s of `width` bits in Parquet's RLE/bit-packed hybrid encoding."""
    return varint(count << 1) + value.to_bytes((width + 7) // 8, "little")


def with_length(data: bytes) -> bytes:
    return len(data).to_bytes(4, "little") + data
