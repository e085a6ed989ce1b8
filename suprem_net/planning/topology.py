"""nnU-Net's rule for the pooling/kernel topology of its CNNs (re-implemented from its
description: nnunetv2 is not a dependency of ours).

Per stage: pool (stride 2) every axis that is at least ``2 * min_feature_map`` long and
whose spacing is within a factor 2 of the finest such axis (a lone axis needs length
``3 * min_feature_map``); the kernel of an axis becomes 3 once its spacing is within a
factor 2 of the finest spacing and stays 3. The bottleneck kernel is 3.
"""
from __future__ import annotations

import math


def pool_and_conv_props(spacing, patch, min_feature_map: int = 4, max_stages: int = 7):
    """Return ``(strides, kernels, padded_patch, divisor_per_axis)``; ``strides[0]`` is the stem (all 1)."""
    spacing = [float(s) for s in spacing]
    size = [int(p) for p in patch]
    cur_sp, cur_size = list(spacing), list(size)
    strides, kernels = [[1, 1, 1]], []
    n_pool = [0, 0, 0]
    kernel = [1, 1, 1]
    while len(strides) < max_stages:
        valid = [i for i in range(3) if cur_size[i] >= 2 * min_feature_map]
        if not valid:
            break
        finest = min(cur_sp[i] for i in valid)
        valid = [i for i in valid if cur_sp[i] / finest < 2]
        if len(valid) == 1 and cur_size[valid[0]] < 3 * min_feature_map:
            break
        for d in range(3):
            if kernel[d] != 3 and cur_sp[d] / min(cur_sp) < 2:
                kernel[d] = 3
        stride = [1, 1, 1]
        for v in valid:
            stride[v] = 2
            n_pool[v] += 1
            cur_sp[v] *= 2
            cur_size[v] = math.ceil(cur_size[v] / 2)
        strides.append(stride)
        kernels.append(list(kernel))
    kernels.append([3, 3, 3])
    divisor = [2 ** n for n in n_pool]
    padded = [int(math.ceil(p / d) * d) for p, d in zip(size, divisor)]
    return strides, kernels, padded, divisor


def nnunet_kwargs(family, spacing, patch, max_features: int = 320, base_features: int = 32) -> tuple[dict, list[int]]:
    """Architecture kwargs of an nnU-Net-style ``family`` (its ``topology_kwargs``) for ``patch``, and the
    padded patch size."""
    strides, kernels, padded, _ = pool_and_conv_props(spacing, patch)
    features = [min(max_features, base_features * 2 ** i) for i in range(len(strides))]
    return family.topology_kwargs(strides, kernels, features), padded
