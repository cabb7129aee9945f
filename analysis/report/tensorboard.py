"""The results in TensorBoard, beside the fit's loss curve: `tensorboard --logdir <output-dir>` shows the fit's
`lightning_logs/` and the `tensorboard/` folder that the evaluation, the analysis and ROAR write their headline
numbers (scalars), figures (images, the same PNGs as the files) and tables (Markdown text) into."""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from pathlib import Path


def write_tensorboard(
    folder: Path,
    scalars: Mapping[str, float] | None = None,
    figures: Mapping[str, Path] | None = None,
    tables: Mapping[str, Sequence[str]] | None = None,
) -> None:
    """One event file in `folder`: `scalars` by tag at step 0, every PNG of `figures` as an image (the file's own
    bytes), every table (lines of Markdown) as text."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder))
    try:
        for tag, value in (scalars or {}).items():
            writer.add_scalar(tag, value, 0)
        for tag, path in (figures or {}).items():
            # SummaryWriter has no public call for an already encoded image; its file writer takes the summary as is.
            writer._get_file_writer().add_summary(png_summary(tag, Path(path).read_bytes()), 0)
        for tag, lines in (tables or {}).items():
            writer.add_text(tag, "\n".join(lines), 0)
    finally:
        writer.close()


# PNG colour types (the IHDR chunk's byte 25) and the channels TensorBoard's image summary calls their colourspace.
_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}


def png_summary(tag: str, png: bytes):
    """An image summary holding the PNG as it was written. `SummaryWriter.add_image` would decode it to float
    pixels and encode it again: about 0.1 GB resident for a report figure, at a moment the model is still loaded, and
    an image that is not the file's."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    if png[:8] != b"\x89PNG\r\n\x1a\n" or png[12:16] != b"IHDR":
        raise ValueError(f"{tag}: not a PNG file")
    width, height = struct.unpack(">II", png[16:24])
    image = Summary.Image(height=height, width=width, colorspace=_PNG_CHANNELS[png[25]], encoded_image_string=png)
    return Summary(value=[Summary.Value(tag=tag, image=image)])
