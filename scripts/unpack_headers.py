"""Unpack only ``torch/include/`` from a torch wheel: the C++ headers of that release.

    python scripts/unpack_headers.py TORCH_WHEEL DEST

`make test` uses it for the C++17 guard (tests/test_cxx17.py), which parses the sources
against the oldest supported torch's headers without installing that torch.
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path


def main(argv: list[str]) -> int:
    wheel, dest = Path(argv[0]), Path(argv[1])
    with zipfile.ZipFile(wheel) as z:
        members = [m for m in z.namelist() if m.startswith("torch/include/")]
        if not members:
            print(f"{wheel}: no torch/include/ in it", file=sys.stderr)
            return 1
        z.extractall(dest, members)
    print(f"unpacked {len(members)} headers of {wheel.name} into {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
