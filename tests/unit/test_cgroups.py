"""Stable-parent choice and the attached set, on a fake tree (pure logic)."""

import pytest

from chadthrottle import cgroups
from chadthrottle.errors import Unsupported

TMUX = "user.slice/user-1000.slice/user@1000.service/tmux-spawn-1.scope"

HYBRID = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
UNIFIED = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"


def test_mount_hybrid_and_unified():
    assert str(cgroups.cgroup2_mount(HYBRID)) == "/sys/fs/cgroup/unified"
    assert str(cgroups.cgroup2_mount(UNIFIED)) == "/sys/fs/cgroup"


def test_no_cgroup2_is_unsupported():
    with pytest.raises(Unsupported, match="cgroup2"):
        cgroups.cgroup2_mount("31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n")


def test_old_kernel_with_net_cls_is_unsupported(tmp_path):
    btf = tmp_path / "vmlinux"
    btf.write_text("")
    v1 = HYBRID + "50 31 0:40 / /sys/fs/cgroup/net_cls,net_prio rw - cgroup cgroup rw,net_cls\n"
    with pytest.raises(Unsupported, match="net_cls"):
        cgroups.check_kernel(v1, "5.10.0", btf)
    cgroups.check_kernel(v1, "6.1.0", btf)  # fixed in 5.15
    cgroups.check_kernel(HYBRID, "5.10.0", btf)


def test_missing_btf_is_unsupported(tmp_path):
    with pytest.raises(Unsupported, match="BTF"):
        cgroups.check_kernel(HYBRID, "6.1.0", tmp_path / "nope")


@pytest.mark.parametrize("path,parent", [
    (TMUX, "user.slice/user-1000.slice/user@1000.service"),
    ("user.slice/user-1000.slice/user@1000.service/app.slice/app-firefox-1.scope",
     "user.slice/user-1000.slice/user@1000.service/app.slice"),
    ("user.slice/user-1000.slice/session-2.scope", "user.slice/user-1000.slice"),
    ("system.slice/nginx.service", "system.slice/nginx.service"),
    ("init.scope", ""),
    ("", ""),
    ("/", ""),
    ("a.scope/b.scope", ""),
])
def test_stable_parent(path, parent):
    assert cgroups.stable_parent(path) == parent


def test_plan_attach_first_time():
    assert cgroups.plan_attach(set(), "a.slice/b.service") == ("a.slice/b.service", [])


def test_plan_attach_covered_by_ancestor_or_self():
    assert cgroups.plan_attach({"a.slice"}, "a.slice/b.service") == (None, [])
    assert cgroups.plan_attach({"a.slice/b.service"}, "a.slice/b.service") == (None, [])
    assert cgroups.plan_attach({""}, "x.slice") == (None, [])


def test_plan_attach_ancestor_replaces_descendants():
    target, detach = cgroups.plan_attach({"a.slice/b.service", "a.slice/c.service", "z.slice"},
                                         "a.slice")
    assert target == "a.slice"
    assert sorted(detach) == ["a.slice/b.service", "a.slice/c.service"]


def test_plan_attach_sibling_prefix_is_not_ancestor():
    assert cgroups.plan_attach({"a.slice/b"}, "a.slice/bb") == ("a.slice/bb", [])


def test_never_ancestor_and_descendant():
    attached: set[str] = set()
    for p in ["a/b/c.service", "a/b", "a/b/d.service", "x.slice", "a", "x.slice/y.service"]:
        target, detach = cgroups.plan_attach(attached, p)
        attached -= set(detach)
        if target is not None:
            attached.add(target)
        for one in attached:
            for other in attached:
                assert one == other or not cgroups.is_ancestor_or_self(one, other)
    assert attached == {"a", "x.slice"}


def test_level():
    assert cgroups.level("") == 0
    assert cgroups.level("a") == 1
    assert cgroups.level("/a/b/") == 2


def test_resolve_never_escapes(tmp_path):
    (tmp_path / "a.slice" / "foo.service").mkdir(parents=True)
    cg = cgroups.Cgroups(tmp_path)
    assert cg.resolve("foo.service") == "a.slice/foo.service"
    assert cg.resolve("a.slice/foo.service") == "a.slice/foo.service"
    assert cg.resolve("/a.slice") == "a.slice"
    from chadthrottle.errors import NoSuchUnit
    for bad in ["../etc", "a.slice/../../etc", "..", ".", "", "nope.service", "x\0y",
                "a.slice/nope"]:
        with pytest.raises(NoSuchUnit):
            cg.resolve(bad)


@pytest.mark.parametrize("size", [40_000, 80_000, 160_000])
@pytest.mark.parametrize("shape", ["a/", "x", "../", "a/../", "./"])
def test_issue7_huge_unit_names_are_refused_in_linear_time(tmp_path, shape, size):
    """Names longer than PATH_MAX (or with a component longer than NAME_MAX) are NoSuchUnit
    at once: no quadratic path walk, no OSError (ENAMETOOLONG) turning into Failed."""
    import time

    from chadthrottle.errors import NoSuchUnit
    cg = cgroups.Cgroups(tmp_path)
    name = (shape * (size // len(shape)))[:size]
    t = time.monotonic()
    with pytest.raises(NoSuchUnit) as e:
        cg.resolve(name)
    assert time.monotonic() - t < 0.1
    assert len(str(e.value)) < 400  # the message does not echo the whole name


def test_issue7_huge_unit_names_bounds(tmp_path):
    from chadthrottle.errors import NoSuchUnit
    (tmp_path / ("n" * 255)).mkdir()
    cg = cgroups.Cgroups(tmp_path)
    assert cg.resolve("n" * 255) == "n" * 255
    for bad in ["n" * 256, "a/" + "n" * 256, "é" * 128 + "/x",  # 256 bytes in one component
                "a/" * 2048, "x" * 5000]:
        with pytest.raises(NoSuchUnit):
            cgroups.check_unit_name(bad)
        with pytest.raises(NoSuchUnit):
            cg.resolve(bad)
    # below the bounds, many components and '..' resolve lexically, linearly
    deep = "/".join(["d"] * 1000)
    with pytest.raises(NoSuchUnit):
        cg.resolve(deep)
    assert cg.resolve("a/.." + "/." * 1000 + "/" + "n" * 255) == "n" * 255
