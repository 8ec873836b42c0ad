"""Views: batched, per-sample random augmentations on the training device (`views.py`, with the colour ops
in `color.py`), composed by named presets. A new preset is a function (augmenter, x, generator, size) -> two views and one line in registry.PRESETS."""

from simclr_cli.augment.views import (PRESETS, Augmenter, describe_views, progressive_size, sample_crop_boxes,
                                      view_size_at, view_sizes)

__all__ = ["PRESETS", "Augmenter", "describe_views", "progressive_size", "sample_crop_boxes", "view_size_at",
           "view_sizes"]
