# Sourced by the launch scripts: the job that JAXCLR_MODULE names.
# (slurm_gpu.sbatch keeps its own copy: sbatch runs a spooled copy of the
# script, from which this file's location is unknown.)

# Sets `module` to $JAXCLR_MODULE (default jaxclr.main), or exits 2 naming
# the valid ones. $1: the calling script's name, for the message.
select_job() {
  module=${JAXCLR_MODULE:-jaxclr.main}
  case $module in
    jaxclr.main | jaxclr.linear_eval | jaxclr.finetune | jaxclr.distill) ;;
    *) echo "$1: error: JAXCLR_MODULE=$module; valid: jaxclr.main," \
         "jaxclr.linear_eval, jaxclr.finetune, jaxclr.distill" >&2
       exit 2 ;;
  esac
}
