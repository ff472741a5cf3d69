"""Component and hole clean-up of the network's soft map (pure numpy/OpenCV, no network).

A saliency network often answers with the subject plus small far-away islands, and fills small holes inside
the subject. Here the map is thresholded at 0.5; the largest connected component is kept, with any part at
least a quarter of its size and smaller parts close to it, and small islands far from the subject are dropped.
Small holes enclosed by the mask (up to 5% of its area) are filled as *probable* subject, unless the network
is sure they are background (``hole_min_p``: a real hole). The refinement (``refine``) starts from this.
"""

from __future__ import annotations

import cv2
import numpy as np


def _disk(r: int) -> np.ndarray:
    r = max(1, int(r))
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def keep_main_components(binary: np.ndarray, *, secondary_frac: float = 0.25, near_frac: float = 0.08,
                         min_near_frac: float = 0.002) -> np.ndarray:
    """Keep the largest connected component; keep another one if it is large (>= ``secondary_frac`` of the
    largest) or close to the kept ones (within ``near_frac`` of the image diagonal) and not tiny."""
    binary = binary.astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    if n <= 2:
        return binary.astype(bool)
    areas = stats[1:, cv2.CC_STAT_AREA]
    order = np.argsort(-areas) + 1
    largest = areas.max()
    keep = np.zeros(n, dtype=bool)
    keep[order[0]] = True
    for lab in order[1:]:
        if stats[lab, cv2.CC_STAT_AREA] >= secondary_frac * largest:
            keep[lab] = True
    h, w = binary.shape
    diag = float(np.hypot(h, w))
    kept = keep[labels]
    dist = cv2.distanceTransform((~kept).astype(np.uint8), cv2.DIST_L2, 3)
    for lab in order[1:]:
        if keep[lab] or stats[lab, cv2.CC_STAT_AREA] < min_near_frac * largest:
            continue
        if dist[labels == lab].min() <= near_frac * diag:
            keep[lab] = True
    return keep[labels]


def enclosed_holes(binary: np.ndarray, *, max_frac: float = 0.05) -> np.ndarray:
    """Background regions fully enclosed by the mask whose area is at most ``max_frac`` of the mask area."""
    binary = binary.astype(bool)
    inv = (~binary).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(inv, connectivity=4)
    if n <= 1:
        return np.zeros_like(binary)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    limit = max_frac * max(int(binary.sum()), 1)
    hole = np.zeros(n, dtype=bool)
    for lab in range(1, n):
        if lab not in border and stats[lab, cv2.CC_STAT_AREA] <= limit:
            hole[lab] = True
    return hole[labels]


def cleanup_mask(prob: np.ndarray, *, threshold: float = 0.5, secondary_frac: float = 0.25,
                 near_frac: float = 0.08, hole_min_p: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Component and hole cleanup of a soft network mask (float in [0, 1]).

    Returns ``(cleaned, holes)``: ``cleaned`` is the soft mask with dropped islands zeroed and enclosed small
    holes filled (set to 1); ``holes`` marks the filled pixels (bool). A hole whose mean network probability is
    under ``hole_min_p`` (the network is sure it is background: a real hole) stays open.
    """
    prob = np.clip(prob.astype(np.float32), 0.0, 1.0)
    binary = prob > threshold
    if not binary.any():
        return prob.copy(), np.zeros(prob.shape, dtype=bool)
    kept = keep_main_components(binary, secondary_frac=secondary_frac, near_frac=near_frac)
    # Zero the dropped islands together with their soft surroundings (the low-confidence halo of an island).
    dropped = binary & ~kept
    cleaned = prob.copy()
    if dropped.any():
        r = max(2, round(0.01 * max(prob.shape)))
        halo = cv2.dilate(dropped.astype(np.uint8), _disk(r)).astype(bool)
        keep_zone = cv2.dilate(kept.astype(np.uint8), _disk(r)).astype(bool)
        cleaned[halo & ~keep_zone] = 0.0
    holes = enclosed_holes(kept)
    if hole_min_p > 0 and holes.any():
        n, labels = cv2.connectedComponents(holes.astype(np.uint8), connectivity=4)
        mean_p = np.bincount(labels.ravel(), prob.ravel(), n) / np.maximum(np.bincount(labels.ravel(), minlength=n), 1)
        holes &= (mean_p >= hole_min_p)[labels]
    cleaned[holes] = 1.0
    return cleaned, holes
