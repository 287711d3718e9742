"""Evaluators of a frozen encoder: restoring it (encoder.py), features,
linear and few-label probes (linear.py), kNN (knn.py), and kNN during
pretraining (periodic.py). The jobs that train (fine-tuning, the paper's
probe, distillation) are in jaxclr/jobs."""
