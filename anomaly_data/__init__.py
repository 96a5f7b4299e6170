"""Datasets: readers for the benchmark layouts and plain folders, meta.json, image/mask loading,
transforms, and the synthetic defect generator. Independent of the model."""

from .io import IMAGE_EXTS, MAX_PIXELS_DEFAULT, check_pixels, image_size, is_image_path, list_images, load_image, load_mask, max_pixels, pair_masks
from .names import PROMPT_NAMES, prompt_name
from .readers import READERS, Dataset, Sample, load_dataset, parse_data_spec, write_meta
from .synth import DEFECTS, SYNTH_CLASSES, synthesize, synthesize_demo_world, synthesize_world
from .world import HELD_OUT_DEFECTS, SEEN_DEFECTS, WORLD_AUX, WORLD_DEFECTS, WORLD_TARGET

# torch_data needs torch: imported on first use, so that the torch-free runtime (kano.deploy) can read images
_TORCH_NAMES = ("CLIP_MEAN", "CLIP_STD", "SampleDataset", "image_to_tensor", "mask_to_tensor", "raise_batch_errors")


def __getattr__(name: str):
    if name in _TORCH_NAMES:
        from . import torch_data

        return getattr(torch_data, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["CLIP_MEAN", "CLIP_STD", "DEFECTS", "MAX_PIXELS_DEFAULT", "check_pixels", "max_pixels", "Dataset", "IMAGE_EXTS", "image_size", "is_image_path", "PROMPT_NAMES", "READERS", "SYNTH_CLASSES", "Sample",
           "SampleDataset", "image_to_tensor", "list_images", "load_dataset", "load_image", "load_mask", "mask_to_tensor",
           "pair_masks", "parse_data_spec", "prompt_name", "raise_batch_errors", "synthesize", "synthesize_demo_world", "synthesize_world", "write_meta",
           "HELD_OUT_DEFECTS", "SEEN_DEFECTS", "WORLD_AUX", "WORLD_DEFECTS", "WORLD_TARGET"]
