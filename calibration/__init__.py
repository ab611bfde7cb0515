"""Calibration and quantization scale search (installed as `leptonc.calibration`)."""
