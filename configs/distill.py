"""Distillation (SimCLRv2 section 2.3): a fine-tuned teacher labels the
unlabelled training images on the fly, a student learns its predictions.

  python -m jaxclr.distill --config configs/distill.py \
      --config.teacher_workdir=runs/default_ft1 --workdir runs/default_distill

Loss -sum softmax(teacher/T) log softmax(student/T), T=1 (the paper's choice
for distilling into a student; 0.1 for self-distillation of a same-size
network from random init), no labels (the paper uses unlabelled examples
only). Views: random crop + flip. The student starts from the teacher's
pretrained encoder, keeps projection-head layer 1 (ft_proj_selector=1), and
trains every layer with SGD + Nesterov 0.9, lr 0.1 x B/256, B=64, 30 epochs
over every training image (digits: 1,347 images, 632 steps, peak lr 0.025),
no warmup, no weight decay. The data, architecture and image size come from
the teacher's and the student's workdirs. The paper distils for 400 epochs
on ImageNet; the step count here is scaled to the digits.
Big-to-small (SimCLRv2's headline setting): a teacher fine-tuned from a wider
pretraining run, the student started from the smaller run's encoder:
  --config.teacher_workdir=runs/wide_ft1 --config.pretrained_workdir=runs/default
(docs/simclrv2.md: R-18 x 0.5 teacher into the default R-18 x 0.25, 1 label
per class, 53.2% fine-tuning alone -> 62.0% distilled, four label draws).
Arguments:
  epochs=E       distillation epochs (default 30)
  temperature=T  the softmax temperature (default 1.0)
  small_student  a random-init student of half the teacher's default digits
                 width (ResNet-18 x 0.125, 2-layer head): big-to-small
  labelled=K     also fit K true labels per class (the teacher's subset if
                 it used the same K and seed), weight 1.0
  clean          the teacher labels each image's evaluation centre crop, not
                 the student's augmented view (Noisy-Student style)
Writes OUT/results.json: top1, top5 (student), teacher_top1, teacher_top5,
num_train_examples, steps, ... (and the linear-eval keys knn_top1=None,
few_label_top1={}).
"""

from jaxclr import config as config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, epochs=30.0, temperature=1.0,
                             small_student=False, labelled=0,
                             clean=False)
  c = config_lib.distill_config()
  c.num_epochs = arg.epochs
  c.temperature = arg.temperature
  if arg.small_student:
    c.pretrained_workdir = "none"
    c.model.update(depth=18, width_multiplier=0.125, cifar_stem=True,
                   num_proj_layers=2, proj_out_dim=64)
  if arg.clean:
    c.teacher_view = "clean"
  if arg.labelled > 0:
    c.labelled_weight, c.labels_per_class = 1.0, arg.labelled
  return c
