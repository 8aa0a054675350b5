"""detectron2's DefaultPredictor, fed as evaluation feeds the model, with the checks and inputs a
clinical tool needs."""
import cv2
import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.modeling import build_model

from ..data.transforms import build_ssd_augmentation
from ..modeling.temperature import attach_malignancy_temperature, resolve_malignancy_temperature
from .checkpoint import load_inference_weights

__all__ = ["Predictor"]


class Predictor:
    """One image in, ``{"instances": Instances}`` out, for any model a thyroid_det config builds.

    The image is resized as evaluation resizes it (tools/evaluate.py, the trainer's
    evaluations): by the test mapper's augmentation
    (:func:`~thyroid_det.data.transforms.build_ssd_augmentation`: to ``INPUT.FIXED_SIZE``, aspect
    ratio not kept), so that given the array :func:`~thyroid_det.data.image_io.read_image` reads,
    it predicts what was scored. detectron2's ``DefaultPredictor`` resizes by the shorter edge
    (``INPUT.MIN/MAX_SIZE_TEST``; the SSD configs set MIN_SIZE_TEST 0 and the model resizes
    itself): the two give equal outputs on an image of ``INPUT.FIXED_SIZE``, which both resizes
    keep as it is. On top, it takes grayscale arrays, loads ``MODEL.WEIGHTS`` as evaluation does
    (refusing a checkpoint that leaves model weights uninitialised; a periodic checkpoint's EMA
    average: :func:`~thyroid_det.engine.load_inference_weights`) and applies the malignancy
    temperature. It has DefaultPredictor's attributes (``cfg``, ``model``, ``metadata``,
    ``input_format``, ``aug``).

    Accepted images (uint8 unless noted):

    * "BGR" / "RGB": HxWx3 BGR, as DefaultPredictor takes, or HxW / HxWx1 grayscale (given to
      the model as three equal channels, as ``read_image`` reads a gray file).
    * "L" (older configs): HxW or HxWx1 grayscale (any dtype the resize takes), or HxWx3 BGR
      converted as :func:`thyroid_det.data.image_io.read_image` converts colour files (ITU-R
      601 luma).
    """

    def __init__(self, cfg):
        self.cfg = cfg.clone()
        self.model = build_model(self.cfg)
        self.model.eval()
        if len(cfg.DATASETS.TEST):
            self.metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0])
        if cfg.MODEL.WEIGHTS:  # empty: random weights, as DefaultPredictor (for tests)
            load_inference_weights(self.model, cfg.MODEL.WEIGHTS)
        # Temperature-scaled malignant probability (MODEL.MALIGNANCY_TEMPERATURE or checkpoint).
        self.malignancy_temperature = resolve_malignancy_temperature(cfg)
        attach_malignancy_temperature(self.model, self.malignancy_temperature)
        # SSDDatasetMapper's test-time augmentation, not DefaultPredictor's ResizeShortestEdge:
        # the peers would otherwise see the aspect ratio kept, an image they were never scored on.
        augs = build_ssd_augmentation(cfg, is_train=False)
        # One Augmentation, as DefaultPredictor's: callers use ``aug.get_transform(image)``.
        self.aug = augs[0] if len(augs) == 1 else T.AugmentationList(augs)
        self.input_format = cfg.INPUT.FORMAT
        if self.input_format not in ("L", "BGR", "RGB"):
            raise ValueError(f"Predictor: unsupported INPUT.FORMAT {self.input_format!r}")

    def _to_input_format(self, image: np.ndarray) -> np.ndarray:
        """The HxWxC array in ``INPUT.FORMAT`` that the mapper would have read."""
        colour = image.ndim == 3 and image.shape[2] == 3
        if self.input_format == "L":
            if image.ndim == 2:
                return image[:, :, None]
            if image.ndim == 3 and image.shape[2] == 1:
                return image
            if colour and image.dtype == np.uint8:
                return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)[:, :, None]
            expected = "HxW or HxWx1 grayscale, or HxWx3 uint8 BGR"
        else:
            if colour:
                return image[:, :, ::-1] if self.input_format == "RGB" else image
            if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
                return np.repeat(image.reshape(*image.shape[:2], 1), 3, axis=2)
            expected = "HxWx3 BGR, or HxW or HxWx1 grayscale"
        raise ValueError(
            f"Predictor: got an image of shape {image.shape} and dtype {image.dtype}; "
            f"INPUT.FORMAT {self.input_format!r} takes {expected}"
        )

    def __call__(self, original_image):
        """
        Args:
            original_image (np.ndarray): see the class docstring.

        Returns:
            dict: the model's output for this image, ``{"instances": Instances}`` in the
            coordinates of ``original_image``.
        """
        image = self._to_input_format(np.asarray(original_image))
        with torch.no_grad():
            height, width = image.shape[:2]
            aug_input = T.AugInput(image)
            self.aug(aug_input)
            chw = aug_input.image.astype("float32").transpose(2, 0, 1)
            inputs = {"image": torch.as_tensor(chw), "height": height, "width": width}
            return self.model([inputs])[0]
