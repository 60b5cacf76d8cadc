"""Offline side: synthetic data, encoder training, export, evaluation."""
