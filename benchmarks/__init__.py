"""Benchmarks: the input pipeline (input_pipeline.py), the train step (step.py)
and its scaling over devices and batch sizes (scaling.py)."""
