"""Dataset mapper that turns a detectron2 dataset dict into a fixed-size SSD training/test input."""
import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BoxMode

from .image_io import UnreadableImage, read_image
from .transforms import build_ssd_augmentation

__all__ = ["SSDDatasetMapper"]


class SSDDatasetMapper:
    """
    Read an image (the record's ``"frame"`` of a multi-frame DICOM), apply SSD augmentation
    (training) or the plain resize (testing) and return the model's input dict:

    * "image": CxHxW uint8 tensor of size ``INPUT.FIXED_SIZE`` (C = 1 for ``INPUT.FORMAT`` "L").
    * "instances": ``gt_boxes`` / ``gt_classes`` in the resized frame, when the dict has
      "annotations" (crowd annotations are ignored).
    * "height", "width": the original image size, so predictions map back to it; "file_name",
      "image_id" and any other keys pass through.

    Boxes follow the image through the augmentations; a box is kept only if its centre lands
    strictly inside the output image (SSD's crop rule), then it is clipped to the image and
    empty ones are dropped.
    """

    @configurable
    def __init__(self, *, is_train, augmentations, image_format):
        """
        Args:
            is_train (bool): whether the mapper feeds training; training dicts always get
                "instances" (empty for an image without annotations).
            augmentations (list[Augmentation or Transform]): applied in order to image and boxes.
            image_format (str): format for :func:`~thyroid_det.data.image_io.read_image`: "L",
                "BGR" or "RGB".
        """
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format

    @classmethod
    def from_config(cls, cfg, is_train=True):
        return {
            "is_train": is_train,
            "augmentations": build_ssd_augmentation(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
        }

    def _read_image(self, file_name, frame=0):
        try:
            return read_image(file_name, format=self.image_format, frame=frame)
        except UnreadableImage as e:
            raise UnreadableImage(f"Cannot read image {file_name!r}: {e}") from None

    def __call__(self, dataset_dict):
        """
        Args:
            dataset_dict (dict): one image's metadata, in detectron2 Dataset format.

        Returns:
            dict: a new dict in the format detectron2 models take.
        """
        dataset_dict = dict(dataset_dict)
        image = self._read_image(dataset_dict["file_name"], dataset_dict.get("frame", 0))
        utils.check_image_size(dataset_dict, image)

        # Training always yields (possibly empty) instances; testing only when annotated.
        with_instances = self.is_train or "annotations" in dataset_dict
        annos = dataset_dict.pop("annotations", None) or []
        annos = [obj for obj in annos if obj.get("iscrowd", 0) == 0]
        boxes = np.array(
            [BoxMode.convert(obj["bbox"], obj["bbox_mode"], BoxMode.XYXY_ABS) for obj in annos],
            dtype=np.float64,
        ).reshape(-1, 4)

        aug_input = T.AugInput(image, boxes=boxes)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        h, w = image.shape[:2]
        # np.require copies only when needed (a 1-channel transpose is already contiguous but
        # may be a read-only view of a PIL buffer).
        chw = np.require(image.transpose(2, 0, 1), requirements="CW")
        dataset_dict["image"] = torch.as_tensor(chw)

        if with_instances:
            centres = transforms.apply_coords((boxes[:, :2] + boxes[:, 2:]) / 2)
            cx, cy = centres[:, 0], centres[:, 1]
            keep = np.flatnonzero((cx > 0) & (cx < w) & (cy > 0) & (cy < h))
            kept_boxes = np.clip(aug_input.boxes[keep], 0, [w, h, w, h])
            kept_annos = [
                {"bbox": box, "bbox_mode": BoxMode.XYXY_ABS, "category_id": annos[i]["category_id"]}
                for i, box in zip(keep, kept_boxes)
            ]
            instances = utils.annotations_to_instances(kept_annos, (h, w))
            dataset_dict["instances"] = utils.filter_empty_instances(instances)
        return dataset_dict
