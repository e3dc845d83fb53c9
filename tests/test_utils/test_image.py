"""transnext_mm.utils.image.load_image: the image input of tools/demo and visualize_attention."""
import cv2
import numpy as np
import pytest
import skimage.data

from transnext_mm.utils.image import SKIMAGE_PHOTOS, load_image


@pytest.mark.parametrize('name', SKIMAGE_PHOTOS)
def test_skimage_photos_by_prefixed_and_plain_name(name):
    expected = getattr(skimage.data, name)()
    for source in (f'skimage:{name}', name):
        image = load_image(source)
        assert image.dtype == np.uint8 and image.shape == expected.shape[:2] + (3, )
        np.testing.assert_array_equal(image, expected[..., :3])


def test_file_is_read_as_rgb(tmp_path):
    rgb = np.zeros((6, 8, 3), np.uint8)
    rgb[..., 0] = 200  # red
    path = str(tmp_path / 'red.png')
    cv2.imwrite(path, rgb[..., ::-1])  # OpenCV writes BGR
    np.testing.assert_array_equal(load_image(path), rgb)


def test_a_file_named_like_a_photo_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    png = cv2.imencode('.png', np.full((4, 4, 3), 7, np.uint8))[1]
    (tmp_path / 'chelsea').write_bytes(png.tobytes())
    np.testing.assert_array_equal(load_image('chelsea'), np.full((4, 4, 3), 7, np.uint8))


def test_bad_sources(tmp_path):
    with pytest.raises(ValueError, match=r"skimage photo must be one of .*got 'camera'"):
        load_image('skimage:camera')
    with pytest.raises(FileNotFoundError, match="neither a file nor one of scikit-image's photos"):
        load_image(str(tmp_path / 'missing.png'))
    not_an_image = tmp_path / 'notes.png'
    not_an_image.write_text('not an image')
    with pytest.raises(ValueError, match='is not a readable image'):
        load_image(str(not_an_image))
