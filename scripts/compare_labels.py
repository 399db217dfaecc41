"""Compare two folders of predicted label maps voxel for voxel (e.g. before and after a change).

    python scripts/compare_labels.py RUN_A/test_predictions RUN_B/test_predictions

Prints one line per case (differing voxels, affine equal) and a total; exit status 0 when every
case of A has a bit-identical twin in B (same name, same labels, same affine), 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from segshare.data.io import list_nifti, read_label_map


def compare(folder_a: Path, folder_b: Path) -> int:
    """Print the comparison; return the number of cases that differ or are missing in B."""
    differ = 0
    files = list_nifti(folder_a)
    for path in files:
        twin = Path(folder_b) / path.name
        if not twin.is_file():
            print(f"{path.name}: missing in {folder_b}")
            differ += 1
            continue
        (a, img_a), (b, img_b) = read_label_map(path), read_label_map(twin)
        same_affine = bool(np.array_equal(img_a.affine, img_b.affine))
        voxels = int(np.count_nonzero(a != b)) if a.shape == b.shape else a.size
        print(f"{path.name}: {voxels} of {a.size} voxels differ, affine equal: {same_affine}")
        differ += int(voxels > 0 or not same_affine)
    print(f"{len(files) - differ} of {len(files)} cases bit-identical")
    return differ


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder_a", type=Path)
    parser.add_argument("folder_b", type=Path)
    args = parser.parse_args()
    sys.exit(1 if compare(args.folder_a, args.folder_b) else 0)


if __name__ == "__main__":
    main()
