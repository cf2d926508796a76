"""Plots are real PNG images of the expected size."""

import pandas as pd

from flor_ray.queries.plot import plot_metric


def test_plot_metric_writes_png(tmp_path):
    df = pd.DataFrame({"run_id": ["a"] * 3 + ["b"] * 3, "epoch": [0, 1, 2] * 2, "wnorm": [1.0, 1.5, 1.7, 0.9, 1.2, 1.6]})
    out = plot_metric(df, "wnorm", tmp_path / "w.png")
    import matplotlib.image as mpimg

    img = mpimg.imread(out)
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert img.shape[:2] == (400, 640)
    assert img[..., :3].std() > 0.05  # lines were drawn, not a blank canvas
