"""Boxes, masks and their encodings: one implementation of each, used by the detector, the data
pipeline, MaskCut, evaluation and self-training (Detectron2's ``structures/``)."""
from .boxes import box_area, clip_boxes, nonempty_boxes, pairwise_intersection, pairwise_iou, xywh_to_xyxy
from .masks import mask_iou, masks_to_boxes
from .rle import encode_masks, rle_area, rle_iou, rle_to_bbox, rle_to_json, segmentation_to_rle

__all__ = ["box_area", "clip_boxes", "nonempty_boxes", "pairwise_intersection", "pairwise_iou", "xywh_to_xyxy",
           "mask_iou", "masks_to_boxes", "encode_masks", "rle_area", "rle_iou", "rle_to_bbox", "rle_to_json",
           "segmentation_to_rle"]
