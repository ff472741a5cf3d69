"""The working resolution shared by the network's maps and the refinement.

The network's soft maps are resized to it, and the clean-up, the background model and GrabCut run at it, so
the map and the image line up pixel for pixel; only the final guided-filter edge is applied at full
resolution (``refine``).
"""

from __future__ import annotations

import cv2
import numpy as np

# Working resolution (longest side) of the network's input/output and of GrabCut.
_GC_SIDE = 512


def _resize_max(arr: np.ndarray, side: int, interp=cv2.INTER_AREA) -> np.ndarray:
    h, w = arr.shape[:2]
    s = side / max(h, w)
    if s >= 1.0:
        return arr
    return cv2.resize(arr, (max(1, round(w * s)), max(1, round(h * s))), interpolation=interp)


def _work_size(rgb: np.ndarray) -> tuple[int, int]:
    """(height, width) of ``rgb`` at the working resolution (aspect kept; never enlarged)."""
    H, W = rgb.shape[:2]
    s = min(1.0, _GC_SIDE / max(H, W))
    return (max(1, round(H * s)), max(1, round(W * s))) if s < 1.0 else (H, W)
