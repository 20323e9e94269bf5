"""Calibration data: texts from files, slimquant's default set or the model itself, cut into token windows."""

from slimquant.data.calibration import (
    DEFAULT_CALIB_FILE,
    DEFAULT_PROMPTS,
    calibration_data,
    calibration_stream,
    calibration_windows,
    default_calibration_texts,
    generate_calibration_texts,
    read_calib_file,
    start_tokens,
)

__all__ = [
    "DEFAULT_CALIB_FILE",
    "DEFAULT_PROMPTS",
    "calibration_data",
    "calibration_stream",
    "calibration_windows",
    "default_calibration_texts",
    "generate_calibration_texts",
    "read_calib_file",
    "start_tokens",
]
