"""The jobs the commands run, each on the training core: pretraining
(pretrain.py), evaluation of a frozen encoder (linear_eval.py, with the
paper's SGD probe in paper_probe.py), fine-tuning (finetune.py),
distillation (distill.py), and the checkpoint tools (convert.py,
export.py)."""
