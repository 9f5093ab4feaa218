"""Container images for the e2e cluster, built on this machine without any registry.

Each image is an OCI image-layout archive (oci-layout, index.json, blobs/sha256/...) that `ctr images import`
loads straight into a node's containerd; the index carries the image's name (io.containerd.image.name), and
every pod pulls nothing (imagePullPolicy Never / IfNotPresent with the image present).

  driver      Debian rootfs by mmdebstrap from the host's apt sources (Debian 12 here, where the Dockerfile's base
              is Debian 13: the venv's wheels are built by the host's Python 3.11, which Debian 12's python3 matches)
              with python3, python3-venv and the packages of deploy/packages.txt (the Dockerfile's list), and the
              driver in /opt/lvm-iscsi-csi, a venv made inside that rootfs from wheels: the dependencies at the
              versions requirements.lock pins, hash-checked (the Dockerfile's `pip install --require-hashes`).
              Three layers: the Debian rootfs (rebuilt when packages.txt changes), the dependencies' venv (when the
              lock does), the package itself (when the code does). The last release's image (tests/e2e/k8s/
              release.py) is built the same way from that release's tree: its code and its lock's pins, on
              today's Debian layer (not byte for byte the image that release shipped).
  sidecars    one static Go binary each, at /<name> (scripts/build-k8s builds them), on an empty rootfs.
  pause       Kubernetes' own build/pause/linux/pause.c from the k8s.io/kubernetes module, linked static.
  busybox     Debian's busybox-static (apt-get download, unpacked, never installed on the host), for test pods.

Archives are cached under <CSI_CACHE>/images with a stamp of their inputs; a rebuild happens only when an
input changes. Each archive is checked and built under a lock of its own (<CSI_CACHE>/images/<archive>.lock):
scripts/test builds them all in the background (`python -m tests.e2e.k8s.images`) while the Kubernetes tier's
fixtures ask for the same ones, and whichever comes second waits, then finds the stamp fresh.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import unquote

PROJECT = Path(__file__).resolve().parents[3]
CACHE = Path(os.environ.get("CSI_CACHE", "/var/cache/lvm-iscsi-csi"))
BIN = CACHE / "bin"
IMAGES = CACHE / "images"
REGISTRY = "e2e.local"
K8S_VERSION = "v1.35.4"
PAUSE_TAG = "3.10"
BUSYBOX_PACKAGE = "busybox-static"
CHROOT = "/usr/sbin/chroot"

# name in the cluster -> (binary in <cache>/bin, tag); the tags are the chart's sidecar versions
SIDECARS = {
    "csi-provisioner": ("csi-provisioner", "v6.4.0"),
    "csi-attacher": ("csi-attacher", "v4.13.0"),
    "csi-resizer": ("csi-resizer", "v2.3.0"),
    "csi-snapshotter": ("csi-snapshotter", "v8.7.0"),
    "snapshot-controller": ("snapshot-controller", "v8.7.0"),
    "livenessprobe": ("livenessprobe", "v2.19.0"),
    "csi-node-driver-registrar": ("csi-node-driver-registrar", "v2.17.0"),
}


class ImageError(RuntimeError):
    pass


@dataclass(frozen=True)
class Image:
    ref: str            # e2e.local/<name>:<tag>
    archive: Path

    @property
    def repository(self) -> str:
        return self.ref.rsplit(":", 1)[0]

    @property
    def tag(self) -> str:
        return self.ref.rsplit(":", 1)[1]


def run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, **kw)
    if done.returncode != 0:
        raise ImageError(f"{argv} failed with {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return done


# ------------------------------------------------------------------------------------------ OCI layout

def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Layer:
    path: Path      # gzip-compressed tar
    digest: str     # sha256 of path
    diff_id: str    # sha256 of the uncompressed tar
    size: int


def layer_from_tar(tar: Path, out: Path) -> Layer:
    """Compresses an uncompressed layer tar into out (gzip) and describes it."""
    diff_id = _sha256_file(tar)
    with open(tar, "rb") as src, gzip.open(out, "wb", compresslevel=3) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    return Layer(out, _sha256_file(out), diff_id, out.stat().st_size)


def layer_from_dir(root: Path, out: Path, members: list[str] | None = None,
                   exclude: tuple[str, ...] = (), recursive: bool = True) -> Layer:
    """A layer of the files under root (or only of `members`, paths relative to root, each directory with
    everything under it unless not `recursive`), owners numeric."""
    raw = out.with_suffix(".tar.tmp")
    argv = ["tar", "--numeric-owner", "--xattrs", "--sort=name", "-C", str(root), "-cf", str(raw)]
    argv += [] if recursive else ["--no-recursion"]
    argv += [f"--exclude={e}" for e in exclude]
    argv += members or ["."]
    run(argv)
    try:
        return layer_from_tar(raw, out)
    finally:
        raw.unlink(missing_ok=True)


def write_oci_archive(out: Path, ref: str, layers: list[Layer], entrypoint: list[str],
                      cmd: list[str] | None = None, env: list[str] | None = None, user: str = "",
                      workdir: str = "/") -> Image:
    config = {
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": entrypoint, "Cmd": cmd or [], "User": user, "WorkingDir": workdir,
                   "Env": env or ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{layer.diff_id}" for layer in layers]},
        "history": [{"created_by": "tests/e2e/k8s/images.py"} for _ in layers],
    }
    config_blob = json.dumps(config, sort_keys=True).encode()
    manifest = {
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": "sha256:" + hashlib.sha256(config_blob).hexdigest(), "size": len(config_blob)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": f"sha256:{layer.digest}", "size": layer.size} for layer in layers],
    }
    manifest_blob = json.dumps(manifest, sort_keys=True).encode()
    index = {
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": "sha256:" + hashlib.sha256(manifest_blob).hexdigest(),
                       "size": len(manifest_blob),
                       "annotations": {"io.containerd.image.name": ref,
                                       "org.opencontainers.image.ref.name": ref.rsplit(":", 1)[1]}}],
    }
    tmp = out.with_suffix(".tmp")
    with tarfile.open(tmp, "w") as tar:
        def add_bytes(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        add_bytes("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        add_bytes("index.json", json.dumps(index, sort_keys=True).encode())
        add_bytes(f"blobs/sha256/{hashlib.sha256(config_blob).hexdigest()}", config_blob)
        add_bytes(f"blobs/sha256/{hashlib.sha256(manifest_blob).hexdigest()}", manifest_blob)
        for layer in layers:
            tar.add(layer.path, arcname=f"blobs/sha256/{layer.digest}")
    tmp.replace(out)
    return Image(ref, out)


# ------------------------------------------------------------------------------------------ cache

@contextlib.contextmanager
def building(archive: Path):
    """Holds the lock of one archive (see the module's docstring) while its stamp is checked and it is built."""
    IMAGES.mkdir(parents=True, exist_ok=True)
    with open(IMAGES / f"{archive.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _stamp_ok(archive: Path, stamp: str) -> bool:
    return archive.exists() and archive.with_suffix(".stamp").exists() and \
        archive.with_suffix(".stamp").read_text() == stamp


def _set_stamp(archive: Path, stamp: str) -> None:
    archive.with_suffix(".stamp").write_text(stamp)


def _cached_layer(out: Path, build: Callable[[Path], Layer]) -> Layer:
    """A layer kept at `out` with its description beside it (.json): built by build(out) once, under out's lock,
    and read back from the cache after."""
    meta = out.with_suffix(".json")
    with building(out):
        if out.exists() and meta.exists():
            return Layer(out, **json.loads(meta.read_text()))
        layer = build(out)
        meta.write_text(json.dumps({"digest": layer.digest, "diff_id": layer.diff_id, "size": layer.size}))
        return layer


def _hash_paths(paths: list[Path], extra: str = "", root: Path = PROJECT) -> str:
    h = hashlib.sha256(extra.encode())
    for p in paths:
        files = sorted(f for f in p.rglob("*") if f.is_file() and "__pycache__" not in f.parts) \
            if p.is_dir() else [p]
        for f in files:
            h.update(str(f.relative_to(root) if f.is_relative_to(root) else f).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------ images

def runtime_packages() -> list[str]:
    lines = (PROJECT / "deploy" / "packages.txt").read_text().splitlines()
    return [w for line in lines for w in line.split("#", 1)[0].split()]


def driver_base(log=print) -> Layer:
    """The Debian layer of the driver image: mmdebstrap's minbase + python3 + deploy/packages.txt."""
    packages = ["python3", "python3-venv", *runtime_packages()]
    stamp = hashlib.sha256(" ".join(packages).encode()).hexdigest()[:16]

    def build(out: Path) -> Layer:
        log(f"images: Debian rootfs for the driver image ({' '.join(packages)})")
        with tempfile.TemporaryDirectory(dir=IMAGES) as tmp:
            root = Path(tmp) / "rootfs"
            # force-unsafe-io: dpkg does not fsync each file it unpacks; this rootfs is tarred, then thrown away
            # (mmdebstrap took 37-38 s with it, 41-48 s without, on 2026-12-02). Docker's Debian images set it too.
            run(["mmdebstrap", "--mode=root", "--variant=minbase", "--include=" + ",".join(packages),
                 "--dpkgopt=force-unsafe-io",
                 "--dpkgopt=path-exclude=/usr/share/man/*", "--dpkgopt=path-exclude=/usr/share/doc/*",
                 "--dpkgopt=path-include=/usr/share/doc/*/copyright", "--dpkgopt=path-exclude=/usr/share/locale/*",
                 "--dpkgopt=path-exclude=/usr/share/info/*",
                 "bookworm", str(root), *_host_apt_sources()], timeout=1800)
            # As the Dockerfile: every node uses the host's initiator name, never one baked into the image;
            # the controller runs as this unprivileged user.
            (root / "etc/iscsi/initiatorname.iscsi").unlink(missing_ok=True)
            run([CHROOT, str(root), "useradd", "--system", "--uid", "65532", "--user-group", "--no-create-home",
                 "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", "lvm-iscsi-csi"])
            for d in ("var/cache/apt/archives", "var/lib/apt/lists"):
                shutil.rmtree(root / d, ignore_errors=True)
                (root / d).mkdir(parents=True)
            return layer_from_dir(root, out, exclude=("./dev/*", "./proc/*", "./sys/*", "./run/*", "./tmp/*"))

    return _cached_layer(IMAGES / f"driver-base-{stamp}.tar.gz", build)


def _host_apt_sources() -> list[str]:
    """The host's apt sources, which mmdebstrap pastes into the new rootfs (same mirrors, same suites)."""
    sources = sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    listfile = Path("/etc/apt/sources.list")
    found = [str(p) for p in sources if "debian" in p.read_text()]
    if listfile.exists() and listfile.read_text().strip():
        found.append(str(listfile))
    if not found:
        raise ImageError("no Debian apt sources on this host for mmdebstrap")
    return found


VENV = "/opt/lvm-iscsi-csi"


def driver_deps(base: Layer, lock: Path, log=print) -> Layer:
    """The venv layer of the driver image: /opt/lvm-iscsi-csi with the dependencies exactly as `lock` pins them,
    hash-checked, wheels only (the Dockerfile's `pip install --require-hashes`). Shared by every build of the
    driver's code on the same lock, the last release's included."""
    stamp = hashlib.sha256(base.digest.encode() + lock.read_bytes()).hexdigest()[:16]

    def build(out: Path) -> Layer:
        log("images: driver dependencies layer")
        with tempfile.TemporaryDirectory(dir=IMAGES) as tmp:
            tmp = Path(tmp)
            wheels = tmp / "rootfs/tmp/wheels"
            run([sys.executable, "-m", "pip", "wheel", "-q", "--require-hashes", "--only-binary=:all:",
                 "--wheel-dir", str(wheels), "-r", str(lock)], timeout=900)
            root = tmp / "rootfs"
            run(["tar", "--numeric-owner", "-xzf", str(base.path), "-C", str(root)])
            run([CHROOT, str(root), "python3", "-m", "venv", VENV])
            run([CHROOT, str(root), f"{VENV}/bin/pip", "install", "-q", "--no-index", "--no-compile",
                 "--find-links", "/tmp/wheels", *[f"/tmp/wheels/{w.name}" for w in sorted(wheels.glob("*.whl"))]],
                env={"PATH": "/usr/bin:/bin", "HOME": "/tmp"}, timeout=900)
            return layer_from_dir(root, out, members=[f".{VENV}"])

    return _cached_layer(IMAGES / f"driver-deps-{stamp}.tar.gz", build)


def driver_image(source: Path = PROJECT, tag: str = "", log=print) -> Image:
    """The driver's image built from a source tree (pyproject.toml, requirements.lock, csi/): the working tree,
    or the last release's (tests/e2e/k8s/release.py). Three layers: Debian, the dependencies, the package.
    Tagged with `tag`, or a hash of the code and the layers under it."""
    base = driver_base(log)
    deps = driver_deps(base, source / "requirements.lock", log)
    code = _hash_paths([source / "pyproject.toml", source / "csi"], extra=deps.digest, root=source)
    ref = f"{REGISTRY}/lvm-iscsi-csi:{tag or code}"
    archive = IMAGES / f"lvm-iscsi-csi-{tag}.oci.tar" if tag else IMAGES / "lvm-iscsi-csi.oci.tar"
    with building(archive):
        if _stamp_ok(archive, f"{ref} {code}"):
            return Image(ref, archive)
        log(f"images: driver package layer ({ref})")
        with tempfile.TemporaryDirectory(dir=IMAGES) as tmp:
            tmp = Path(tmp)
            src = tmp / "src"
            src.mkdir()
            shutil.copy2(source / "pyproject.toml", src)
            shutil.copytree(source / "csi", src / "csi", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            root = tmp / "rootfs"
            wheels = root / "tmp/wheels"
            run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--wheel-dir", str(wheels), str(src)],
                timeout=900)
            for layer in (base, deps):
                run(["tar", "--numeric-owner", "-xzf", str(layer.path), "-C", str(root)])
            before = _tree(root / VENV.lstrip("/"))
            run([CHROOT, str(root), f"{VENV}/bin/pip", "install", "-q", "--no-index", "--no-compile", "--no-deps",
                 *[f"/tmp/wheels/{w.name}" for w in wheels.glob("*.whl")]],
                env={"PATH": "/usr/bin:/bin", "HOME": "/tmp"}, timeout=900)
            run([CHROOT, str(root), f"{VENV}/bin/lvm-iscsi-csi", "--help"],
                env={"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"})
            after = _tree(root / VENV.lstrip("/"))
            added = sorted(f".{VENV}/{p}" for p, stat in after.items() if before.get(p) != stat)
            app = layer_from_dir(root, tmp / "app.tar.gz", members=added, recursive=False)
            image = write_oci_archive(
                archive, ref, [base, deps, app], entrypoint=[f"{VENV}/bin/lvm-iscsi-csi"], cmd=["--help"],
                env=[f"PATH={VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                     "PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1"],
                user="65532:65532")
        _set_stamp(archive, f"{ref} {code}")
        return image


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under root -> (size, mtime in ns) for files and links, (0, 0) for directories: what a pip
    install into it added or changed (a directory counts only when new)."""
    return {str(p.relative_to(root)): (0, 0) if p.is_dir() and not p.is_symlink() else
            (p.lstat().st_size, p.lstat().st_mtime_ns) for p in root.rglob("*")}


def binary_image(name: str, binary: Path, tag: str) -> Image:
    """An image holding one static binary at /<name>, as the upstream sidecar images do."""
    ref = f"{REGISTRY}/sig-storage/{name}:{tag}"
    archive = IMAGES / f"{name}.oci.tar"
    stamp = f"{ref} {_sha256_file(binary)}"
    with building(archive):
        if _stamp_ok(archive, stamp):
            return Image(ref, archive)
        with tempfile.TemporaryDirectory(dir=IMAGES) as tmp:
            root = Path(tmp) / "rootfs"
            (root / "tmp").mkdir(parents=True)
            os.chmod(root / "tmp", 0o1777)
            shutil.copy2(binary, root / name)
            layer = layer_from_dir(root, Path(tmp) / "layer.tar.gz")
            image = write_oci_archive(archive, ref, [layer], entrypoint=[f"/{name}"])
        _set_stamp(archive, stamp)
        return image


def sidecar_images() -> dict[str, Image]:
    images = {}
    for name, (binary, tag) in SIDECARS.items():
        path = BIN / binary
        if not path.exists():
            raise ImageError(f"{path} is missing: run scripts/build-k8s")
        images[name] = binary_image(name, path, tag)
    return images


def pause_image() -> Image:
    source = CACHE / "go/pkg/mod" / f"k8s.io/kubernetes@{K8S_VERSION}" / "build/pause/linux/pause.c"
    if not source.exists():
        raise ImageError(f"{source} is missing: run scripts/build-k8s")
    ref = f"{REGISTRY}/pause:{PAUSE_TAG}"
    archive = IMAGES / "pause.oci.tar"
    stamp = f"{ref} {_sha256_file(source)}"
    with building(archive):
        if _stamp_ok(archive, stamp):
            return Image(ref, archive)
        with tempfile.TemporaryDirectory(dir=IMAGES) as tmp:
            root = Path(tmp) / "rootfs"
            root.mkdir()
            run(["cc", "-Os", "-static", "-Wall", "-Werror", f"-DVERSION=v{PAUSE_TAG}-e2e", "-o", str(root / "pause"),
                 str(source)])
            run(["strip", str(root / "pause")])
            layer = layer_from_dir(root, Path(tmp) / "layer.tar.gz")
            image = write_oci_archive(archive, ref, [layer], entrypoint=["/pause"])
        _set_stamp(archive, stamp)
        return image


def busybox_image() -> Image:
    archive = IMAGES / "busybox.oci.tar"
    with building(archive):
        debs = IMAGES / "debs"
        debs.mkdir(exist_ok=True)
        found = sorted(debs.glob(f"{BUSYBOX_PACKAGE}_*.deb"))
        if not found:
            run(["apt-get", "download", BUSYBOX_PACKAGE], cwd=debs, timeout=300)
            found = sorted(debs.glob(f"{BUSYBOX_PACKAGE}_*.deb"))
        deb = found[-1]
        version = unquote(deb.name.split("_")[1]).split(":")[-1].split("-")[0]   # 1%3a1.35.0-4 -> 1.35.0
        ref = f"{REGISTRY}/busybox:{version}"
        stamp = f"{ref} {_sha256_file(deb)}"
        if _stamp_ok(archive, stamp):
            return Image(ref, archive)
        with tempfile.TemporaryDirectory(dir=IMAGES) as tmp:
            extracted = Path(tmp) / "deb"
            run(["dpkg-deb", "-x", str(deb), str(extracted)])
            root = Path(tmp) / "rootfs"
            for d in ("bin", "tmp", "etc", "data"):
                (root / d).mkdir(parents=True)
            os.chmod(root / "tmp", 0o1777)
            busybox = root / "bin/busybox"
            shutil.copy2(extracted / "bin/busybox", busybox)
            applets = run([str(busybox), "--list"]).stdout.split()
            for applet in applets:
                if applet != "busybox":
                    (root / "bin" / applet).symlink_to("busybox")
            (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n")
            (root / "etc/group").write_text("root:x:0:\nnogroup:x:65534:\n")
            layer = layer_from_dir(root, Path(tmp) / "layer.tar.gz")
            image = write_oci_archive(archive, ref, [layer], entrypoint=[], cmd=["sh"],
                                      env=["PATH=/bin"])
        _set_stamp(archive, stamp)
        return image


def all_images(log=print) -> dict[str, Image]:
    """Every image the e2e cluster needs, by role name: driver, pause, busybox and each sidecar."""
    images = {"pause": pause_image(), "busybox": busybox_image(), **sidecar_images()}
    images["driver"] = driver_image(log=log)
    from tests.e2e.k8s.release import release_image
    images["driver-release"] = release_image(log=log)
    return images


if __name__ == "__main__":   # scripts/test runs this in the background, after scripts/build-k8s
    t0 = time.monotonic()
    for role, image in all_images().items():
        print(f"{role:28} {image.ref:60} {image.archive.stat().st_size >> 20:5} MiB  {image.archive}")
    print(f"images: done in {time.monotonic() - t0:.0f} s")
