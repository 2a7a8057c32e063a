"""The ctypes mirror (abi.py) matches bpf/throttle.h: sizes and field order."""

import ctypes
import re
from pathlib import Path

import pytest

from chadthrottle import abi

HEADER = Path(__file__).resolve().parents[2] / "bpf" / "throttle.h"


def header_text() -> str:
    return HEADER.read_text()


def static_sizes() -> dict[str, int]:
    return {m[0]: int(m[1]) for m in
            re.findall(r"_Static_assert\(sizeof\(struct (\w+)\) == (\d+)", header_text())}


def header_fields() -> dict[str, list[str]]:
    text = re.sub(r"/\*.*?\*/", "", header_text(), flags=re.S)
    out = {}
    for name, body in re.findall(r"struct (\w+) \{(.*?)\n\};", text, flags=re.S):
        fields: list[str] = []
        for line in body.splitlines():
            line = line.strip()
            if not line.endswith(";") or line.startswith("#"):
                continue
            ident = re.findall(r"(\w+)\s*(?:\[[^\]]*\])?\s*;", line)[0]
            if ident not in fields:  # the lock has two spellings under #ifdef
                fields.append(ident)
        out[name] = fields
    return out


def test_every_header_struct_is_mirrored():
    assert set(static_sizes()) == set(abi.STRUCTS)
    assert set(header_fields()) == set(abi.STRUCTS)


@pytest.mark.parametrize("name", sorted(abi.STRUCTS))
def test_size_matches_static_assert(name):
    assert ctypes.sizeof(abi.STRUCTS[name]) == static_sizes()[name]


@pytest.mark.parametrize("name", sorted(abi.STRUCTS))
def test_field_order_matches_header(name):
    assert [f[0] for f in abi.STRUCTS[name]._fields_] == header_fields()[name]


def header_constants() -> dict[str, int]:
    out = {}
    pattern = r"#define (CT_\w+) (0x[0-9a-fA-F]+|\d+)(?:ULL|UL|U)?\b"
    for name, value in re.findall(pattern, header_text()):
        out[name] = int(value, 0)
    return out


def test_constants_match_header():
    defined = header_constants()
    for name, value in abi.CONSTANTS.items():
        assert defined.get(name) == value, name
    assert abi.KERNEL_BID == 1 << 62 and "(1ULL << 62)" in header_text()
    assert abi.COUNTED == 1 << 63 and "(1ULL << 63)" in header_text()
