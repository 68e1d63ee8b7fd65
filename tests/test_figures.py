import jax
import numpy as np
from PIL import Image

from jdiff import figures


def test_schedule_figure_writes_png(tmp_path):
    path = figures.schedule_figure(tmp_path / "fig" / "schedules.png", num_columns=4)
    image = Image.open(path)
    assert image.format == "PNG" and image.size[0] > 400


def test_noising_rows_start_clean_and_end_in_noise():
    image = figures.sample_image(32)
    assert image.shape == (32, 32, 3) and image.min() >= -1 and image.max() <= 1
    rows = figures.noising_rows(("linear", "cosine"), image, 5, jax.random.key(0))
    assert rows.shape == (2, 5, 32, 32, 3)
    for row in rows:
        assert np.abs(row[0] - image).max() < 0.1  # t = 0
        assert abs(np.corrcoef(row[-1].ravel(), image.ravel())[0, 1]) < 0.05  # t = T-1
    # at mid-way the cosine schedule keeps more of the image than the linear one
    corr = [np.corrcoef(row[2].ravel(), image.ravel())[0, 1] for row in rows]
    assert corr[1] > corr[0]
