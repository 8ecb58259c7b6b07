"""Tests for tinyddpm.images: the [-1, 1] -> uint8 mapping, grid layout and
padding, trajectory strips and GIFs, read back with Pillow."""
import numpy as np
import pytest
from PIL import Image

from tinyddpm.images import make_grid, save_grid, save_trajectory, to_uint8


def constant_images(n, value=1.0, c=1, h=28, w=28):
    return np.full((n, c, h, w), value, dtype=np.float32)


def test_uint8_mapping_sends_minus_one_to_black_and_one_to_white():
    x = np.array([-1.0, 0.0, 1.0, -3.0, 7.0, 1 / 127.5 - 1])
    assert to_uint8(x).tolist() == [0, 128, 255, 0, 255, 1]
    assert to_uint8(x).dtype == np.uint8


def test_grid_is_square_ish_with_two_pixels_of_padding():
    grid = make_grid(constant_images(5))                  # 3 columns, 2 rows
    assert grid.shape == (2 * 30 + 2, 3 * 30 + 2) and grid.dtype == np.uint8
    assert make_grid(constant_images(64)).shape == (8 * 30 + 2, 8 * 30 + 2)
    assert make_grid(constant_images(5), nrow=5).shape == (30 + 2, 5 * 30 + 2)


def test_grid_places_tile_i_in_row_major_order_and_padding_stays_black():
    images = np.stack([constant_images(1, value=-1 + 0.25 * i)[0] for i in range(5)])
    grid = make_grid(images)
    for i in range(5):
        top, left = 2 + (i // 3) * 30, 2 + (i % 3) * 30
        assert (grid[top:top + 28, left:left + 28] == to_uint8(-1 + 0.25 * i)).all()
    white = make_grid(constant_images(4))
    assert (white[:2] == 0).all() and (white[:, :2] == 0).all()         # outer border
    assert (white[30:32] == 0).all() and (white[:, 30:32] == 0).all()   # between tiles
    assert white.sum() == 4 * 28 * 28 * 255                             # nothing else lit
    assert make_grid(constant_images(5))[32:, 62:].max() == 0           # the empty sixth cell


def test_rgb_grid_keeps_its_channels():
    assert make_grid(constant_images(2, c=3)).shape == (32, 62, 3)


def test_grid_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="expected images"):
        make_grid(np.zeros((2, 28, 28)))
    with pytest.raises(ValueError, match="expected images"):
        make_grid(np.zeros((2, 2, 28, 28)))


def test_save_grid_writes_the_grid_as_a_gray_png(tmp_path):
    images = np.random.default_rng(0).uniform(-1, 1, size=(6, 1, 28, 28))
    save_grid(images, tmp_path / "g.png")
    with Image.open(tmp_path / "g.png") as im:
        assert im.mode == "L"
        np.testing.assert_array_equal(np.asarray(im), make_grid(images))


def trajectory(snapshots=4, n=3):
    """(t, x_t) pairs as GaussianDiffusion.sample returns them; snapshot s is all s/10."""
    return [(snapshots - s, constant_images(n, value=s / 10)) for s in range(snapshots)]


def test_strip_has_a_row_per_sample_and_a_column_per_snapshot(tmp_path):
    save_trajectory(trajectory(snapshots=4, n=3), tmp_path / "s.png")
    with Image.open(tmp_path / "s.png") as im:
        strip = np.asarray(im)
    assert strip.shape == (3 * 30 + 2, 4 * 30 + 2)
    for row in range(3):
        for col in range(4):
            assert strip[2 + row * 30, 2 + col * 30] == to_uint8(col / 10)


def test_gif_has_a_frame_per_snapshot(tmp_path):
    save_trajectory(trajectory(snapshots=4, n=3), tmp_path / "s.gif")
    with Image.open(tmp_path / "s.gif") as im:
        assert im.n_frames == 4
        assert im.size == (2 * 30 + 2, 2 * 30 + 2)
        im.seek(3)
        assert im.convert("L").getpixel((2, 2)) == to_uint8(0.3)
