"""Inference: trained runs (the loader), safe model loading, sliding windows, case prediction."""
