# Copyright (c) transnext-mm contributors. All rights reserved.
"""Reading the input image of the command-line tools: a file or a bundled scikit-image photo."""
import os.path as osp

import numpy as np

# scikit-image's bundled colour photos: the tools run on them without downloads.
SKIMAGE_PHOTOS = ('astronaut', 'chelsea', 'coffee')
SKIMAGE_PREFIX = 'skimage:'


def load_image(source: str) -> np.ndarray:
    """Read an image as an (H, W, 3) RGB uint8 array.

    Args:
        source (str): An image file, or one of :data:`SKIMAGE_PHOTOS` as ``skimage:NAME`` or
            plain ``NAME`` (a file of that name takes precedence over the plain form).

    Returns:
        np.ndarray: The image, RGB channel order, uint8.

    Raises:
        ValueError: if a ``skimage:`` name is not one of :data:`SKIMAGE_PHOTOS`, or the file is
            not a readable image.
        FileNotFoundError: if ``source`` is neither a file nor a photo name.
    """
    if source.startswith(SKIMAGE_PREFIX):
        name = source[len(SKIMAGE_PREFIX):]
        if name not in SKIMAGE_PHOTOS:
            raise ValueError(f'image: skimage photo must be one of {SKIMAGE_PHOTOS}, got {name!r}')
        return _skimage_photo(name)
    if osp.isfile(source):
        import cv2  # read like the toolboxes' LoadImageFromFile (OpenCV backend)
        image = cv2.imread(source, cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError(f'image: {source} is not a readable image')
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if source in SKIMAGE_PHOTOS:
        return _skimage_photo(source)
    raise FileNotFoundError(f'image: {source!r} is neither a file nor one of scikit-image\'s '
                            f'photos {SKIMAGE_PHOTOS} (NAME or {SKIMAGE_PREFIX}NAME)')


def _skimage_photo(name: str) -> np.ndarray:
    import skimage.data
    return np.ascontiguousarray(getattr(skimage.data, name)()[..., :3])
