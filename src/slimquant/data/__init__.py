"""Calibration data: texts from files or from the model itself, cut into token windows."""

from slimquant.data.calibration import (
    DEFAULT_PROMPTS,
    calibration_data,
    calibration_stream,
    calibration_windows,
    generate_calibration_texts,
    read_calib_file,
    start_tokens,
)

__all__ = [
    "DEFAULT_PROMPTS",
    "calibration_data",
    "calibration_stream",
    "calibration_windows",
    "generate_calibration_texts",
    "read_calib_file",
    "start_tokens",
]
