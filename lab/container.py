"""Build and run the CPU image (deploy/docker/Dockerfile.cpu) with podman on a machine with no container registry.

Why each piece exists (all of it is about this development machine, none of it about the product):
- No registry is reachable, so `python:3.11-slim` cannot be pulled. `build_base` makes a stand-in from the Debian
  mirror instead: a debootstrap'd bookworm with python3 in a venv that comes first on PATH, which is what the
  Dockerfile relies on (`python3.11`/`python3` and pip, installing into the image's one Python). The product
  image takes it through the Dockerfile's `BASE` build argument (whose default stays python:3.11-slim).
- crun cannot start containers under this host's hybrid cgroups, and runc refuses podman's default ulimits.
  `podman_env` writes a containers.conf (runc, capped ulimits) and returns the environment that selects it.
- The CPU torch wheel lies in local wheel dirs that the host's pip finds through its configuration (spread over
  /etc/pip.conf, /etc/xdg/pip, ~/.config/pip and PIP_* variables); PyPI's own Linux torch is the multi-GB CUDA
  build. `pip_mounts` merges that configuration into one pip.conf and bind-mounts it, the wheel dirs and the
  constraints file into every build step (their contents stay out of the image; buildah leaves only empty mount
  points for the pip.conf and the wheel dirs), and the build passes an empty TORCH_INDEX_URL so scripts/setup.sh
  uses pip's configuration instead of the PyTorch index.

    python -m lab.container [--tag TAG] build [--rebuild-base]   # base (once) + product image, with timings
    python -m lab.container [--tag TAG] run [-- GUARD ARGS...]    # default: `guard --help`, `guard config show`

Work files (containers.conf, pip.conf, logs) go to $SG_CONTAINER_WORK or <tmp>/sg-container; the debootstrap
root file system is removed once imported. Images stay in podman's storage, so a rebuild reuses cached layers.
"""

from __future__ import annotations

import argparse
import ast
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = "deploy/docker/Dockerfile.cpu"
ROOTFS_TAG = "localhost/sg-debootstrap:bookworm"
BASE_TAG = "localhost/sg-base:bookworm"
IMAGE_TAG = "localhost/safety-guard:cpu"
SUITE = "bookworm"
FALLBACK_MIRROR = "http://deb.debian.org/debian"
HOST_CA_DIR = Path("/usr/local/share/ca-certificates")
# The bundle update-ca-certificates writes inside the base image; pip in the build is pointed at it.
IMAGE_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
# crun fails under hybrid cgroups; runc rejects podman's default (unlimited) nofile/nproc, so they are capped.
CONTAINERS_CONF = """\
[engine]
runtime = "runc"

[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
"""
# The Dockerfile COPYs whole source dirs: bytecode caches would change the copied content (and with it every
# later layer's cache key) whenever tests ran on the host. The rest keeps the build context small.
CONTAINERIGNORE = """\
**/__pycache__
**/*.pyc
.git
.venv
build
runs
*.egg-info
"""
# What python:3.11-slim provides and the Dockerfile relies on: python3.11/python3 and pip first on PATH, a
# UTF-8 locale, TLS trust (here including the host's egress CA, without which PyPI is unreachable).
BASE_CONTAINERFILE = """\
FROM {rootfs}
ENV LANG=C.UTF-8 PATH=/opt/py/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN apt-get update \\
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \\
    && rm -rf /var/lib/apt/lists/*
COPY certs/ /usr/local/share/ca-certificates/
RUN update-ca-certificates
# python:3.11-slim ships a current pip; Debian's ensurepip one (23.0) is upgraded to match.
RUN /usr/bin/python3 -m venv /opt/py && /opt/py/bin/pip install --no-cache-dir -q --upgrade pip
CMD ["python3"]
"""


def default_work_dir() -> Path:
    """Where work files go: outside the repo (the build context) and outside podman's storage."""
    return Path(os.environ.get("SG_CONTAINER_WORK") or Path(tempfile.gettempdir()) / "sg-container")


class Stages:
    """Wall time of each named stage, printed as it ends and kept for a summary (builds take minutes; where
    the minutes go is the first question when one gets slower)."""

    def __init__(self, echo: bool = True) -> None:
        self.echo = echo
        self.times: list[tuple[str, float]] = []

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.echo:
            print(f"[container] {name} ...", flush=True)
        t0 = time.monotonic()
        try:
            yield
        finally:
            dt = time.monotonic() - t0
            self.times.append((name, dt))
            if self.echo:
                print(f"[container] {name}: {dt:.1f} s", flush=True)

    def summary(self) -> str:
        """One line per stage plus the total."""
        lines = [f"  {name:<40} {dt:8.1f} s" for name, dt in self.times]
        lines.append(f"  {'total':<40} {sum(dt for _, dt in self.times):8.1f} s")
        return "\n".join(lines)


def podman_env(work: Path) -> dict[str, str]:
    """Write containers.conf (runc, capped ulimits) into `work`; return os.environ plus CONTAINERS_CONF for it.

    Every podman call here must use this environment: a build that works with runc would fail with crun."""
    work.mkdir(parents=True, exist_ok=True)
    conf = work / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


def _run(cmd: Sequence[str], env: dict[str, str], log: Path | None = None, echo: bool = True,
         stdin: int | None = None) -> None:
    """Run `cmd`, sending its output to `log` (and to stdout when `echo`); on failure raise with the log's tail,
    so an error in a multi-minute build is readable without the whole log."""
    if echo:
        print("[container] $ " + shlex.join(cmd), flush=True)
    sink = log.open("a") if log else None
    try:
        proc = subprocess.Popen(cmd, env=env, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace")
        tail: list[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            if sink:
                sink.write(line)
            if echo:
                sys.stdout.write(line)
            tail = (tail + [line])[-40:]
        rc = proc.wait()
    finally:
        if sink:
            sink.close()
    if rc:
        where = f" (log: {log})" if log else ""
        raise RuntimeError(f"{cmd[0]} failed with exit code {rc}{where}:\n" + "".join(tail))


def image_exists(tag: str, env: dict[str, str]) -> bool:
    """True when `tag` is in local storage (nothing can be pulled, so local is all there is)."""
    return subprocess.run(["podman", "image", "exists", tag], env=env, check=False).returncode == 0


def image_size(tag: str, env: dict[str, str]) -> int:
    """The image's size in bytes as podman reports it (all layers, uncompressed)."""
    out = subprocess.run(["podman", "image", "inspect", "--format", "{{.Size}}", tag], env=env,
                         capture_output=True, text=True, check=True).stdout
    return int(out.strip())


def debian_mirror(apt_dir: Path = Path("/etc/apt")) -> str:
    """The Debian archive URI the host's apt uses for the main suite (one-line and deb822 sources).

    The host's mirror is the one known to be reachable from here; security and update suites live elsewhere
    and are skipped. Falls back to deb.debian.org."""
    files = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*.list")),
             *sorted((apt_dir / "sources.list.d").glob("*.sources"))]
    for f in files:
        if not f.is_file():
            continue
        text = f.read_text(errors="replace")
        if f.suffix == ".sources":
            for stanza in text.split("\n\n"):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.strip() and not line.startswith(("#", " ", "\t")) and ":" in line:
                        k, v = line.split(":", 1)
                        fields[k.strip().lower()] = v.strip()
                if "deb" in fields.get("types", "").split() and SUITE in fields.get("suites", "").split():
                    return fields.get("uris", "").split()[0].rstrip("/")
        else:
            for line in text.splitlines():
                words = [w for w in line.split() if not w.startswith("[")]  # drop [arch=...] options
                if len(words) >= 3 and words[0] == "deb" and words[2] == SUITE:
                    return words[1].rstrip("/")
    return FALLBACK_MIRROR


def host_pip_config(python: str = sys.executable) -> dict[str, dict[str, str]]:
    """The host's effective pip settings by section, PIP_* variables overriding the config files.

    Read through `pip config list` rather than one file: on this host they are split over three files and the
    environment, and only their merge finds the local torch wheel."""
    out = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True).stdout
    files: dict[str, dict[str, str]] = {}
    env: dict[str, str] = {}
    for line in out.splitlines():
        name, sep, raw = line.partition("=")
        if not sep or "." not in name:
            continue
        section, key = name.rsplit(".", 1)
        value = str(ast.literal_eval(raw))
        if section == ":env:":
            env[key] = value
        else:
            files.setdefault(section, {})[key] = value
    files.setdefault("global", {}).update(env)
    return files


def _local_path(entry: str) -> Path | None:
    """A local path from a pip location (plain path or file:// URL); None for remote URLs."""
    if entry.startswith("file://"):
        return Path(urlparse(entry).path)
    if "://" in entry:
        return None
    return Path(entry)


def pip_mounts(work: Path, config: dict[str, dict[str, str]] | None = None) -> list[str]:
    """Write the host's merged pip configuration to `work`/pip.conf; return podman `--volume` arguments that
    mount it as the build's /etc/pip.conf, plus every local wheel dir, index dir and constraints file it names
    (read-only, at the same paths, so the configuration holds unchanged inside).

    `cert` is pointed at the image's own CA bundle (which includes the host's CA certs, see build_base): the
    host's bundle path means nothing inside."""
    config = host_pip_config() if config is None else config
    volumes: set[Path] = set()
    lines: list[str] = []
    for section, settings in config.items():
        lines.append(f"[{section}]")
        for key, value in settings.items():
            if key == "cert":
                value = IMAGE_CA_BUNDLE
            elif key in ("find-links", "index-url", "extra-index-url"):
                for entry in value.split():
                    p = _local_path(entry)
                    if p is None:
                        continue
                    # A file:// simple index links to its files relatively (../../files/x.whl): mount its parent.
                    volumes.add(p.parent if key != "find-links" and p.name == "simple" else p)
            elif key in ("constraint", "requirement"):
                volumes.update(Path(v) for v in value.split())
            lines.append(f"{key} = {value}")
    conf = work / "pip.conf"
    conf.write_text("\n".join(lines) + "\n")
    args = ["--volume", f"{conf}:/etc/pip.conf:ro"]
    for v in sorted(volumes):
        if v.exists():
            args += ["--volume", f"{v}:{v}:ro"]
    return args


def _slim_rootfs(rootfs: Path) -> None:
    """Trim the debootstrap tree the way Debian's own container images are trimmed, so that the base and every
    apt layer on top stay small: no package lists or apt caches in the base layer (an `apt-get update` layer
    that later removes them cannot shrink the layer below), apt told not to write its caches, and no copies of
    the host's resolv.conf/hostname (podman provides both at run time)."""
    for pattern in ("var/lib/apt/lists/*", "var/cache/apt/*.bin", "var/cache/apt/archives/*.deb"):
        for f in rootfs.glob(pattern):
            if f.is_file():
                f.unlink()
    (rootfs / "etc/apt/apt.conf.d/90sg-container").write_text(
        'Dir::Cache::pkgcache "";\nDir::Cache::srcpkgcache "";\nAPT::Keep-Downloaded-Packages "false";\n')
    for name in ("etc/resolv.conf", "etc/hostname"):
        (rootfs / name).unlink(missing_ok=True)


def build_base(env: dict[str, str], work: Path, tag: str = BASE_TAG, mirror: str | None = None,
               rebuild: bool = False, stages: Stages | None = None, echo: bool = True) -> str:
    """Build the python:3.11-slim stand-in `tag` unless it exists (or `rebuild`): debootstrap minbase bookworm
    from the host's Debian mirror, import it as ROOTFS_TAG, then add python3 + venv + the host's CA certs.

    The debootstrap tree is deleted once imported; the imported image is kept so a base rebuild skips it."""
    stages = stages or Stages(echo)
    if image_exists(tag, env) and not rebuild:
        if echo:
            print(f"[container] base {tag} exists; reused", flush=True)
        return tag
    work.mkdir(parents=True, exist_ok=True)
    log = work / "base.log"
    log.write_text("")
    if rebuild or not image_exists(ROOTFS_TAG, env):
        rootfs = work / "rootfs"
        shutil.rmtree(rootfs, ignore_errors=True)
        mirror = mirror or debian_mirror()
        try:
            with stages(f"debootstrap {SUITE} ({mirror})"):
                _run(["debootstrap", "--variant=minbase", SUITE, str(rootfs), mirror], env, log, echo=False)
            _slim_rootfs(rootfs)
            with stages(f"import {ROOTFS_TAG}"):
                tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
                assert tar.stdout is not None
                try:
                    _run(["podman", "import", "-", ROOTFS_TAG], env, log, echo=echo, stdin=tar.stdout.fileno())
                finally:
                    tar.stdout.close()
                    if tar.wait():
                        raise RuntimeError(f"tar of {rootfs} failed")
        finally:
            shutil.rmtree(rootfs, ignore_errors=True)
    ctx = work / "base"
    shutil.rmtree(ctx, ignore_errors=True)
    (ctx / "certs").mkdir(parents=True)
    for crt in sorted(HOST_CA_DIR.glob("*.crt")):
        shutil.copy2(crt, ctx / "certs" / crt.name)
    (ctx / "Containerfile").write_text(BASE_CONTAINERFILE.format(rootfs=ROOTFS_TAG))
    with stages(f"build {tag}"):
        _run(["podman", "build", "--pull=never", "-t", tag, *pip_mounts(work), "-f", str(ctx / "Containerfile"),
              str(ctx)], env, log, echo=echo)
    return tag


def build_image(env: dict[str, str], work: Path, tag: str = IMAGE_TAG, base: str = BASE_TAG,
                stages: Stages | None = None, echo: bool = True) -> str:
    """Build the product image `tag` from the repo root with Dockerfile.cpu on `base`, torch from pip's
    (mounted) configuration. Cached layers are reused, so an unchanged tree rebuilds in seconds."""
    stages = stages or Stages(echo)
    work.mkdir(parents=True, exist_ok=True)
    ignore = work / "containerignore"
    ignore.write_text(CONTAINERIGNORE)
    log = work / "image.log"
    log.write_text("")
    with stages(f"build {tag}"):
        _run(["podman", "build", "--pull=never", "-f", DOCKERFILE, "--ignorefile", str(ignore),
              "--build-arg", f"BASE={base}", "--build-arg", "TORCH_INDEX_URL=", *pip_mounts(work),
              "-t", tag, str(REPO)], env, log, echo=echo)
    return tag


def run_in_image(env: dict[str, str], args: Sequence[str], tag: str = IMAGE_TAG, entrypoint: str = "guard",
                 timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """`podman run --rm` `entrypoint args` in `tag` (bypassing the serving entry point); output captured."""
    cmd = ["podman", "run", "--rm", "--pull=never", "--entrypoint", entrypoint, tag, *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: `build` the base and product images, `run` guard commands in the product image; timings at the end."""
    ap = argparse.ArgumentParser(prog="python -m lab.container", description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=default_work_dir(), help="work dir (default: %(default)s)")
    ap.add_argument("--tag", default=IMAGE_TAG, help="product image tag (default: %(default)s)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the base (unless present) and the product image")
    b.add_argument("--rebuild-base", action="store_true", help="debootstrap and build the base again")
    b.add_argument("--mirror", help="Debian mirror (default: the host apt's)")
    r = sub.add_parser("run", help="run guard in the image (default: `--help`, then `config show`)")
    r.add_argument("args", nargs=argparse.REMAINDER, help="arguments for guard, after --")
    a = ap.parse_args(argv)

    env = podman_env(a.work)
    stages = Stages()
    if a.cmd == "build":
        build_base(env, a.work, mirror=a.mirror, rebuild=a.rebuild_base, stages=stages)
        build_image(env, a.work, tag=a.tag, stages=stages)
        print(f"[container] {a.tag}: {image_size(a.tag, env) / 1e9:.2f} GB")
    else:
        args = a.args[1:] if a.args[:1] == ["--"] else a.args
        runs = [args] if args else [["--help"], ["config", "show"]]
        for cmd in runs:
            with stages("run guard " + shlex.join(cmd)):
                res = run_in_image(env, cmd, tag=a.tag)
            sys.stdout.write(res.stdout)
            sys.stderr.write(res.stderr)
            if res.returncode:
                print(f"[container] guard {shlex.join(cmd)} exited {res.returncode}", file=sys.stderr)
                return res.returncode
    print("[container] stage timings:\n" + stages.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
