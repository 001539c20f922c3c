"""Fetch BigEarthNet's 6 example S1/S2 patch pairs from the `bigearthnet-common` wheel on PyPI (3 MB) and extract
them to DEST (default data/bigearthnet-example). The data are BigEarthNet's (CDLA-Permissive-1.0, Copernicus data
terms); only the two example archives are extracted, the package is not installed."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "bigearthnet-common==2.8.0"


def main(dest: Path) -> None:
    if (dest / "BigEarthNet-S1-Example").is_dir() and (dest / "BigEarthNet-S2-Example").is_dir():
        print(f"already there: {dest}")
        return
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, WHEEL], check=True)
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as zf:
            for name in zf.namelist():
                if name.endswith("-Example.tar.bz2"):
                    with zf.open(name) as fh, tarfile.open(fileobj=fh, mode="r:bz2") as tar:
                        tar.extractall(dest, filter="data")
    print(f"BigEarthNet example pairs extracted to {dest}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("data/bigearthnet-example"))
