"""Evaluation, generation, calibration, specialisation report and the Hugging Face export of a trained checkpoint."""
