"""Calibration data: texts from files, slimquant's default set or the model itself, cut into token windows."""

from slimquant.data.calibration import (
    DEFAULT_CALIB_FILE,
    DEFAULT_PROMPTS,
    apply_tokenizer_args,
    calibration_data,
    calibration_stream,
    calibration_windows,
    default_calibration_texts,
    generate_calibration_texts,
    is_tokenized_file,
    read_calib_file,
    read_tokenized_file,
    start_tokens,
)

__all__ = [
    "DEFAULT_CALIB_FILE",
    "DEFAULT_PROMPTS",
    "apply_tokenizer_args",
    "is_tokenized_file",
    "read_tokenized_file",
    "calibration_data",
    "calibration_stream",
    "calibration_windows",
    "default_calibration_texts",
    "generate_calibration_texts",
    "read_calib_file",
    "start_tokens",
]
