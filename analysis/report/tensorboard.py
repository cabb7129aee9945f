"""The results in TensorBoard, beside the fit's loss curve: `tensorboard --logdir <output-dir>` shows the fit's
`lightning_logs/` and the `tensorboard/` folder that the evaluation, the analysis and ROAR write their headline
numbers (scalars), figures (images, the same PNGs as the files) and tables (Markdown text) into."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def write_tensorboard(
    folder: Path,
    scalars: Mapping[str, float] | None = None,
    figures: Mapping[str, Path] | None = None,
    tables: Mapping[str, Sequence[str]] | None = None,
) -> None:
    """One event file in `folder`: `scalars` by tag at step 0, every PNG of `figures` as an image (RGB), every table
    (lines of Markdown) as text."""
    from matplotlib.image import imread
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder))
    try:
        for tag, value in (scalars or {}).items():
            writer.add_scalar(tag, value, 0)
        for tag, path in (figures or {}).items():
            writer.add_image(tag, imread(str(path))[..., :3], 0, dataformats="HWC")
        for tag, lines in (tables or {}).items():
            writer.add_text(tag, "\n".join(lines), 0)
    finally:
        writer.close()
