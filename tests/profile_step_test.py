"""benchmarks/profile_step.py: the HLO classification rules, and a profile
of the tiny config's real step in which every convolution kind shows up."""

import os
import sys
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import profile_step  # noqa: E402
from jaxclr import config as config_lib  # noqa: E402

import train_test  # noqa: E402

HLO = """
%fused_conv (param_0: f32[4,3,3,8], param_1: f32[3,3,8,8]) -> f32[8,3,3,8] {
  %param_0 = f32[4,3,3,8]{3,2,1,0} parameter(0)
  ROOT %convolution.41 = f32[8,3,3,8]{3,2,1,0} convolution(%param_0, %param_1), window={size=3x3}, dim_labels=b01f_01io->b01f
}

%fused_bn (param_0.1: f32[4,8]) -> f32[4,8] {
  %param_0.1 = f32[4,8]{1,0} parameter(0)
  ROOT %mul.3 = f32[4,8]{1,0} multiply(%param_0.1, %param_0.1), metadata={op_name="jit(train_step)/jvp(SimCLRModel)/encoder/group1_block1/bn2/mul"}
}

%fused_t (param_0.2: f32[4,8]) -> f32[8,4] {
  %param_0.2 = f32[4,8]{1,0} parameter(0)
  %sub.1 = f32[4,8]{1,0} subtract(%param_0.2, %param_0.2), metadata={op_name="jit(train_step)/jvp(SimCLRModel)/encoder/group1_block1/bn3/sub"}
  ROOT %transpose.2 = f32[8,4]{1,0} transpose(%sub.1), dimensions={1,0}
}

%fused_tap (param_0.3: f32[8,36], param_1.3: f32[36,8]) -> f32[8,8] {
  %param_0.3 = f32[8,36]{1,0} parameter(0)
  %param_1.3 = f32[36,8]{1,0} parameter(1)
  ROOT %dot.5 = f32[8,8]{1,0} dot(%param_0.3, %param_1.3), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(train_step)/transpose(jvp(SimCLRModel))/encoder/group1_block1/conv1/while/body/dot_general"}
}

ENTRY %main.9 (p0: f32[4,3,3,8], p1: f32[3,3,8,8]) -> f32[8,3,3,8] {
  %conv_general_dilated.7 = f32[4,3,3,8]{3,2,1,0} convolution(%p0, %p1), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, metadata={op_name="jit(train_step)/jvp(SimCLRModel)/encoder/group1_block1/conv1/conv_general_dilated"}
  %convolution.2 = f32[4,3,3,8]{3,2,1,0} convolution(%p0, %p1), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, metadata={op_name="jit(train_step)/transpose(jvp(SimCLRModel))/encoder/group1_block1/conv1/conv_general_dilated"}
  %ynn_fusion.3 = f32[8,3,3,8]{3,2,1,0} fusion(%p0, %p1), kind=kCustom, calls=%fused_conv
  %bn_fusion = f32[4,8]{1,0} fusion(%p0), kind=kLoop, calls=%fused_bn
  %transpose_copy_fusion = f32[8,4]{1,0} fusion(%p0), kind=kLoop, calls=%fused_t
  %ynn_fusion.4 = f32[8,8]{1,0} fusion(%p0, %p1), kind=kCustom, calls=%fused_tap
  %dynamic-slice_bitcast_fusion = f32[36,8]{1,0} dynamic-slice(%p0, %p1), dynamic_slice_sizes={36,8}, metadata={op_name="jit(train_step)/transpose(jvp(SimCLRModel))/encoder/group1_block1/proj_conv/while/body/dynamic_slice"}
  %dense_dot = f32[8,8]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(train_step)/transpose(jvp(SimCLRModel))/projection_head/dense_0/dot_general"}
  %select.1 = f32[4,8]{1,0} select(%p0, %p0, %p0), metadata={op_name="jit(train_step)/cond/branch_1_fun/select_n"}
  %nt = f32[4,8]{1,0} exponential(%p0), metadata={op_name="jit(train_step)/jvp()/exp"}
  ROOT %copy.1 = f32[8,3,3,8]{3,2,1,0} copy(%ynn_fusion.3)
}
"""


def test_classification_rules_on_written_hlo():
  got = profile_step.instruction_categories(HLO)
  assert {k: got[k] for k in ("conv_general_dilated.7", "convolution.2",
                              "ynn_fusion.3", "bn_fusion", "select.1", "nt",
                              "copy.1", "transpose_copy_fusion",
                              "ynn_fusion.4", "dynamic-slice_bitcast_fusion",
                              "dense_dot")} == {
      "conv_general_dilated.7": "conv forward",
      "convolution.2": "conv backward-input",
      "ynn_fusion.3": "conv backward-filter",
      "bn_fusion": "batchnorm", "select.1": "optimizer", "nt": "loss",
      "copy.1": "copies/transposes",
      # A transpose with BatchNorm's recomputation fused in is a transpose.
      "transpose_copy_fusion": "copies/transposes",
      # model.conv_kernel_grad='patches': a conv's per-tap matmul and its
      # window copy; a dense layer's gradient stays with the model.
      "ynn_fusion.4": "conv backward-filter",
      "dynamic-slice_bitcast_fusion": "conv backward-filter",
      "dense_dot": "other model"}


@pytest.mark.slow
def test_profile_of_the_tiny_step_sees_every_kind_of_convolution():
  c = config_lib.load_config_file(train_test.TINY_CONFIG)
  r = profile_step.profile(c, steps=1)
  ms = r["op_ms_per_step"]
  assert set(ms) == set(profile_step.CATEGORIES)
  for kind in ("conv forward", "conv backward-input", "conv backward-filter",
               "batchnorm", "optimizer"):
    assert ms[kind] > 0, kind
  assert abs(sum(r["share"].values()) - 1.0) < 1e-9
