"""The applet as a desktop installs it: a valid .desktop file whose Exec is the entry point
and whose Icon is the shipped SVG (named after the application id), and ``make install``
putting the three in place, the entry point on the system interpreter."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import tomllib

import pytest

from chadthrottle.gui import APP_ID, PROGRAM_NAME

from .desktop import ROOT, SYSTEM_PYTHON

DESKTOP = ROOT / "packaging" / f"{APP_ID}.desktop"
ICON = ROOT / "packaging" / f"{APP_ID}.svg"


def desktop_entry() -> configparser.SectionProxy:
    cp = configparser.ConfigParser(interpolation=None)
    cp.optionxform = str  # keys are case-sensitive
    cp.read(DESKTOP)
    return cp["Desktop Entry"]


def test_desktop_file_is_valid_and_names_the_entry_point_and_icon():
    if shutil.which("desktop-file-validate") is None:
        pytest.fail("desktop-file-validate is missing: run `make deps` (desktop-file-utils)")
    p = subprocess.run(["desktop-file-validate", str(DESKTOP)], capture_output=True, text=True)
    assert p.returncode == 0 and not p.stdout.strip(), p.stdout + p.stderr
    entry = desktop_entry()
    assert entry["Exec"] == PROGRAM_NAME and entry["Icon"] == APP_ID
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts[PROGRAM_NAME] == "chadthrottle.gui.launcher:main"


def test_the_icon_renders():
    code = ("import gi, sys; gi.require_version('GdkPixbuf', '2.0'); "
            "from gi.repository import GdkPixbuf; "
            "pb = GdkPixbuf.Pixbuf.new_from_file_at_size(sys.argv[1], 128, 128); "
            "print(pb.get_width(), pb.get_height(), pb.get_has_alpha())")
    p = subprocess.run([SYSTEM_PYTHON, "-c", code, str(ICON)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["128", "128", "True"]


@pytest.mark.skipif(os.geteuid() != 0, reason="make install runs the system pip")
def test_make_install_puts_the_applet_in_place(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    build_dir = ROOT / "build"  # pip builds in the tree: leave it as it was found
    had_build_dir = build_dir.exists()
    try:
        p = subprocess.run(["make", "-C", str(ROOT), "install", f"DESTDIR={tmp_path}",
                            "PREFIX=/usr/local"], capture_output=True, text=True, env=env,
                           timeout=300)
    finally:
        if not had_build_dir:
            shutil.rmtree(build_dir, ignore_errors=True)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    share = tmp_path / "usr/local/share"
    assert (share / "applications" / f"{APP_ID}.desktop").read_bytes() == DESKTOP.read_bytes()
    icon = share / "icons/hicolor/scalable/apps" / f"{APP_ID}.svg"
    assert icon.read_bytes() == ICON.read_bytes()
    script = tmp_path / "usr/local/bin" / PROGRAM_NAME
    assert script.read_text().splitlines()[0] == f"#!{SYSTEM_PYTHON}"
    site = [d for d in tmp_path.glob("usr/local/lib/python3*/*-packages")
            if (d / "chadthrottle" / "gui" / "app.py").exists()]
    assert site, sorted(str(x) for x in tmp_path.rglob("app.py"))
    run_env = {k: v for k, v in env.items() if k != "DISPLAY"}
    run_env["PYTHONPATH"] = str(site[0])
    p = subprocess.run([SYSTEM_PYTHON, str(script), "--help"], capture_output=True, text=True,
                       env=run_env, timeout=60)
    assert p.returncode == 0 and "Usage:" in p.stdout, p.stdout + p.stderr
