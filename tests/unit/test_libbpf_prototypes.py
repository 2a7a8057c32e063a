"""Every libbpf function the project calls is declared with restype and argtypes (a missing
or misspelt declaration silently passes wrong types through ctypes)."""

import ast
import ctypes
from pathlib import Path

from chadthrottle import libbpf

SRC = Path(__file__).resolve().parents[2] / "daemon" / "chadthrottle"


def _is_libbpf_handle(node: ast.AST) -> bool:
    """`libbpf.lib().x`, `lib().x`, or a local alias `lb.x` of that handle."""
    if isinstance(node, ast.Call):
        f = node.func
        return (isinstance(f, ast.Attribute) and f.attr == "lib") or \
            (isinstance(f, ast.Name) and f.id == "lib")
    return isinstance(node, ast.Name) and node.id in ("lb", "_lib")


def called_libbpf_functions() -> set[str]:
    names = set()
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and _is_libbpf_handle(node.value):
                names.add(node.attr)
    return names


def test_every_called_function_is_declared():
    assert len(called_libbpf_functions()) >= 10  # the scan finds the calls
    missing = called_libbpf_functions() - set(libbpf.PROTOTYPES)
    assert not missing, f"called but not declared in PROTOTYPES: {sorted(missing)}"


def test_declarations_are_applied_to_the_library():
    lib = libbpf.lib()
    for name, (restype, argtypes) in libbpf.PROTOTYPES.items():
        fn = getattr(lib, name)
        assert fn.restype is restype, name
        assert fn.argtypes is not None and list(fn.argtypes) == list(argtypes), name


def test_pointer_returns_are_not_int():
    # a pointer declared as c_int would be truncated to 32 bits on 64-bit machines
    for name, (restype, _) in libbpf.PROTOTYPES.items():
        if name.startswith(("bpf_object__open", "bpf_object__find", "bpf_program__attach")):
            assert restype is ctypes.c_void_p, name


def test_errno_convention():
    import errno

    import pytest

    with pytest.raises(OSError) as e:
        libbpf.check(-errno.EPERM, "x")
    assert e.value.errno == errno.EPERM
    assert libbpf.check(3, "x") == 3
