"""Raw input -> model input: a release's recorded input contract as a transform (:func:`transform_for`)."""

from moezoo.data.transforms import (
    AudioTransform,
    ImageTransform,
    LogMel,
    SeriesTransform,
    audio_input,
    image_input,
    series_input,
    transform_for,
    transform_from_record,
)

__all__ = [
    "AudioTransform",
    "ImageTransform",
    "LogMel",
    "SeriesTransform",
    "audio_input",
    "image_input",
    "series_input",
    "transform_for",
    "transform_from_record",
]
