"""Downstream evaluation: multi-view fusion, accuracy metrics and the results report."""
