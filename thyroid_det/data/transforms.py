"""SSD-style training augmentation (Liu et al. 2016, sec. 2.2; MC-CNN sec. V-B) as detectron2
Augmentations.

The pipeline is photometric jitter -> zoom-out (expand) -> min-IoU random crop -> resize to the
fixed network size -> flip. Every geometric step returns an fvcore ``Transform``, so boxes follow
the image through ``T.AugInput``; which boxes survive a crop is decided by the mapper with SSD's
centre rule (see :class:`MinIoURandomCrop`).
"""
import numpy as np
from detectron2.data import transforms as T
from fvcore.transforms.transform import CropTransform, NoOpTransform, PadTransform

__all__ = [
    "FillPadTransform",
    "RandomExpand",
    "MinIoURandomCrop",
    "build_ssd_augmentation",
]


class FillPadTransform(PadTransform):
    """
    A :class:`PadTransform` whose image fill may be one value per channel (``np.pad`` takes a
    single value for all channels), so an expanded canvas can hold the per-channel pixel mean.
    Coordinates, segmentation and the inverse are PadTransform's.
    """

    def apply_image(self, img):
        h, w = img.shape[:2]
        canvas = np.empty((h + self.y0 + self.y1, w + self.x0 + self.x1) + img.shape[2:], img.dtype)
        fill = np.asarray(self.pad_value, dtype=np.float64)
        if img.dtype == np.uint8:
            fill = np.clip(np.round(fill), 0, 255)
        canvas[...] = fill.astype(img.dtype)
        canvas[self.y0 : self.y0 + h, self.x0 : self.x0 + w] = img
        return canvas


class RandomExpand(T.Augmentation):
    """
    SSD's zoom-out: with probability ``prob``, place the image at a random position on a canvas
    ``ratio`` times larger on each side (ratio uniform in ``ratio_range``) filled with ``fill``.
    It makes nodules smaller relative to the network input, which trains the coarse levels.
    """

    def __init__(self, *, ratio_range=(1.0, 3.0), prob=0.5, fill=0.0):
        """
        Args:
            ratio_range (tuple[float, float]): range of canvas side / image side, >= 1.
            prob (float): probability of expanding at all.
            fill (float or list[float]): canvas value, one for all channels or one per channel
                (normally cfg.MODEL.PIXEL_MEAN, so the canvas is zero after normalisation).
        """
        super().__init__()
        lo, hi = ratio_range
        if not 1.0 <= lo <= hi:
            raise ValueError(
                f"RandomExpand: ratio_range must satisfy 1 <= low <= high, got {ratio_range}"
            )
        self.ratio_range = (float(lo), float(hi))
        self.prob = float(prob)
        self.fill = tuple(float(v) for v in np.atleast_1d(fill))

    def get_transform(self, image):
        # Draw every random number on each call so the stream does not depend on the branch.
        do, ratio, u_left, u_top = np.random.uniform(0.0, 1.0, size=4)
        if do >= self.prob:
            return NoOpTransform()
        lo, hi = self.ratio_range
        ratio = lo + (hi - lo) * ratio
        h, w = image.shape[:2]
        pad_w, pad_h = int(w * ratio) - w, int(h * ratio) - h
        left, top = int(u_left * (pad_w + 1)), int(u_top * (pad_h + 1))
        fill = self.fill[0] if len(self.fill) == 1 else self.fill
        return FillPadTransform(
            left, top, pad_w - left, pad_h - top, orig_w=w, orig_h=h, pad_value=fill
        )


class MinIoURandomCrop(T.Augmentation):
    """
    SSD's patch sampler. Each option in ``min_ious`` draws ``max_tries`` crops (each side
    ``min_scale``-1 of the image's, aspect width/height in ``aspect_ratio_range``) and keeps the
    first one in which some ground-truth box whose centre lies inside the crop has
    IoU >= that option's threshold. The result is the whole image with probability
    ``skip_prob``, otherwise a crop from an option drawn uniformly among those that found one
    (SSD's Caffe sampler also picks among the samplers that succeeded); when none did, the
    whole image. All tries are drawn and scored at once, with no Python loop.

    Boxes are not clipped or dropped here: the caller keeps the boxes whose centre lands inside
    the output (SSD's rule; the box that met the threshold is always among them) and clips them.
    An image without boxes gets an unconstrained crop (scale and aspect limits only): there is
    nothing to keep, and background crops still teach scale.
    """

    def __init__(
        self,
        *,
        min_ious=(0.1, 0.3, 0.5, 0.7, 0.9),
        skip_prob=1.0 / 6,
        min_scale=0.3,
        aspect_ratio_range=(0.5, 2.0),
        max_tries=50,
    ):
        """
        Args:
            min_ious (list[float]): IoU thresholds, one per sampling option (0.0 = any crop that
                keeps a box centre).
            skip_prob (float): probability of keeping the whole image.
            min_scale (float): smallest crop side as a fraction of the image side.
            aspect_ratio_range (tuple[float, float]): allowed crop width / height.
            max_tries (int): crops drawn per option.
        """
        super().__init__()
        if len(min_ious) == 0:
            raise ValueError(
                "MinIoURandomCrop: min_ious is empty; use skip_prob=1.0 to disable cropping"
            )
        self.min_ious = tuple(float(v) for v in min_ious)
        self.skip_prob = float(skip_prob)
        self.min_scale = float(min_scale)
        self.aspect_ratio_range = tuple(float(v) for v in aspect_ratio_range)
        self.max_tries = int(max_tries)

    def get_transform(self, image, boxes):
        h, w = image.shape[:2]
        boxes = np.zeros((0, 4)) if boxes is None else np.asarray(boxes, dtype=np.float64)
        boxes = boxes.reshape(-1, 4)
        shape = (len(self.min_ious), self.max_tries)
        # A fixed number of draws per call keeps results reproducible under a fixed seed.
        skip, choice = np.random.uniform(0.0, 1.0, size=2)
        scale_w, scale_h = np.random.uniform(self.min_scale, 1.0, size=(2,) + shape)
        u_left, u_top = np.random.uniform(0.0, 1.0, size=(2,) + shape)

        crop_w = np.maximum((scale_w * w).astype(np.int64), 1)
        crop_h = np.maximum((scale_h * h).astype(np.int64), 1)
        x0 = (u_left * (w - crop_w + 1)).astype(np.int64)
        y0 = (u_top * (h - crop_h + 1)).astype(np.int64)
        lo, hi = self.aspect_ratio_range
        aspect = crop_w / crop_h
        valid = (aspect >= lo) & (aspect <= hi)

        if len(boxes):
            # (options, tries, 1) crop edges against (boxes,) box edges -> (options, tries, boxes).
            left, top = x0[..., None].astype(np.float64), y0[..., None].astype(np.float64)
            right, bottom = left + crop_w[..., None], top + crop_h[..., None]
            cx = (boxes[:, 0] + boxes[:, 2]) / 2
            cy = (boxes[:, 1] + boxes[:, 3]) / 2
            centre_in = (left < cx) & (cx < right) & (top < cy) & (cy < bottom)
            iw = np.minimum(right, boxes[:, 2]) - np.maximum(left, boxes[:, 0])
            ih = np.minimum(bottom, boxes[:, 3]) - np.maximum(top, boxes[:, 1])
            inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
            area_boxes = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            union = (crop_w * crop_h)[..., None] + area_boxes - inter
            iou = inter / np.maximum(union, 1e-12)
            thresholds = np.asarray(self.min_ious)[:, None, None]
            valid &= (centre_in & (iou >= thresholds)).any(axis=-1)

        found = np.flatnonzero(valid.any(axis=1))
        if skip < self.skip_prob or len(found) == 0:
            return NoOpTransform()
        option = found[min(int(choice * len(found)), len(found) - 1)]
        t = int(np.argmax(valid[option]))
        x, y, cw, ch = (int(v[option, t]) for v in (x0, y0, crop_w, crop_h))
        return CropTransform(x, y, cw, ch, orig_w=w, orig_h=h)


def build_ssd_augmentation(cfg, is_train):
    """
    The augmentations SSDDatasetMapper applies, from ``cfg.INPUT``.

    Training with ``INPUT.SSD_AUG.ENABLED``: brightness/contrast jitter (each with probability
    0.5, if ``PHOTOMETRIC``), expand, min-IoU crop, resize to ``INPUT.FIXED_SIZE``, flip.
    Training without it: resize and flip. Testing: resize only. The flip follows
    ``INPUT.RANDOM_FLIP`` and comes after the resize, where the image is smallest.

    Returns:
        list[Augmentation]
    """
    aug = cfg.INPUT.SSD_AUG
    height, width = cfg.INPUT.FIXED_SIZE
    augs = []
    if is_train and aug.ENABLED:
        if aug.PHOTOMETRIC:
            augs.append(T.RandomApply(T.RandomBrightness(*aug.BRIGHTNESS), prob=0.5))
            augs.append(T.RandomApply(T.RandomContrast(*aug.CONTRAST), prob=0.5))
        augs.append(
            RandomExpand(
                ratio_range=aug.EXPAND_RATIO, prob=aug.EXPAND_PROB, fill=cfg.MODEL.PIXEL_MEAN
            )
        )
        augs.append(MinIoURandomCrop(min_ious=aug.MIN_IOUS, skip_prob=aug.CROP_SKIP_PROB))
    augs.append(T.Resize((height, width)))
    if is_train and cfg.INPUT.RANDOM_FLIP != "none":
        augs.append(
            T.RandomFlip(
                horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
                vertical=cfg.INPUT.RANDOM_FLIP == "vertical",
            )
        )
    return augs
