"""Evaluation of pretrained encoders: kNN, linear probes, export."""
