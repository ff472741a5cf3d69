"""A point on the subject: the user's click (or ``--point``) when the automatic mask missed the subject.

The network looks for the most salient thing in the frame, which is sometimes something other than the
subject (a larger object behind it) or nothing. Square crops around the point, largest first, make the subject
a larger share of the frame, so the network finds it more often; the first crop in which the network finds a
thing at the point, whole (not cut by the crop's edge), gives the map that is refined instead.
"""

from __future__ import annotations

import cv2
import numpy as np

from .cleanup import _disk
from .network import network_mask

# Square crops around the point, as a fraction of the image's longer side, largest first. In a crop the subject is
# a larger share of the frame, so the network, which looks for the most salient thing, finds it more often.
_POINT_CROPS = (0.7, 0.45)
POINT_NOT_FOUND = ("Nothing stands out from its surroundings at the point you clicked, so the mask was not changed. "
                   "Paint the subject green in the editor below, or upload your own mask.")


def _component_at(binary: np.ndarray, x: int, y: int, radius: float) -> np.ndarray | None:
    """The connected component of ``binary`` at (x, y), or the nearest one within ``radius`` pixels; None if none."""
    n, labels = cv2.connectedComponents(binary.astype(np.uint8), connectivity=8)
    label = labels[y, x]
    if label == 0:
        ys, xs = np.nonzero(labels)
        if not len(xs):
            return None
        distances = np.hypot(xs - x, ys - y)
        nearest = int(np.argmin(distances))
        if distances[nearest] > radius:
            return None
        label = labels[ys[nearest], xs[nearest]]
    return labels == label


def _touches_cut_edge(component: np.ndarray, box: tuple[int, int, int, int], width: int, height: int) -> bool:
    """Whether ``component`` (in crop ``box`` = x0, y0, x1, y1) reaches a crop edge that is not the image's edge:
    then the thing found goes on outside the crop, and this crop does not hold it whole."""
    x0, y0, x1, y1 = box
    return bool((x0 > 0 and component[:, 0].any()) or (y0 > 0 and component[0, :].any())
                or (x1 < width and component[:, -1].any()) or (y1 < height and component[-1, :].any()))


def _map_around_point(rgb: np.ndarray, point: tuple[int, int], model: str, work_size: tuple[int, int]
                      ) -> np.ndarray | None:
    """A network map (at ``work_size``) holding only what the network finds at ``point`` when it looks at crops
    around it, largest first; the first crop that holds such a thing whole wins. None when no crop does."""
    H, W = rgb.shape[:2]
    x, y = point
    for fraction in _POINT_CROPS:
        side = max(32, int(fraction * max(H, W)))
        x0 = int(np.clip(x - side // 2, 0, max(0, W - side)))
        y0 = int(np.clip(y - side // 2, 0, max(0, H - side)))
        box = (x0, y0, min(W, x0 + side), min(H, y0 + side))
        crop_map = network_mask(np.ascontiguousarray(rgb[box[1]:box[3], box[0]:box[2]]), model)
        ch, cw = crop_map.shape
        cx = min(cw - 1, int((x - x0) * cw / (box[2] - x0)))
        cy = min(ch - 1, int((y - y0) * ch / (box[3] - y0)))
        component = _component_at(crop_map > 0.5, cx, cy, radius=0.05 * float(np.hypot(ch, cw)))
        if component is None or _touches_cut_edge(component, box, W, H):
            continue
        # Keep the component and its soft edge; everything else in the crop and outside it is background.
        zone = cv2.dilate(component.astype(np.uint8), _disk(max(2, round(0.02 * max(ch, cw))))).astype(bool)
        canvas = np.zeros((H, W), np.float32)
        canvas[box[1]:box[3], box[0]:box[2]] = cv2.resize(np.where(zone, crop_map, 0.0).astype(np.float32),
                                                          (box[2] - x0, box[3] - y0), interpolation=cv2.INTER_LINEAR)
        return cv2.resize(canvas, (work_size[1], work_size[0]), interpolation=cv2.INTER_AREA)
    return None
