"""suprem_predict --nnunet-model on an nnU-Net v2 results folder built by hand (no nnunetv2 needed):
plans.json / dataset.json in nnU-Net's schema, a checkpoint with nnU-Net's key layout."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet

from suprem_net.cli.predict import main as predict_main
from suprem_net.errors import SupremError
from suprem_net.inference.nnunet_compat import load_nnunet_model
from suprem_net.inference.predictor import Predictor
from suprem_net.io.image import Geometry, read_image, write_image
from tests.helpers import user_error

ARCH = {
    "n_stages": 3,
    "features_per_stage": [4, 8, 16],
    "conv_op": "torch.nn.modules.conv.Conv3d",
    "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3]],
    "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]],
    "n_conv_per_stage": [2, 2, 2],
    "n_conv_per_stage_decoder": [2, 2],
    "conv_bias": True,
    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
    "norm_op_kwargs": {"eps": 1e-05, "affine": True},
    "dropout_op": None,
    "dropout_op_kwargs": None,
    "nonlin": "torch.nn.LeakyReLU",
    "nonlin_kwargs": {"inplace": True},
}
# the image arrays are (z, y, x) = (20, 24, 10) with spacing (1.5, 1.5, 4.0): x is the coarse axis
SPACING = (1.5, 1.5, 4.0)
TRANSPOSE_FORWARD, TRANSPOSE_BACKWARD = [2, 0, 1], [1, 2, 0]


def _plans(transpose_forward, transpose_backward, spacing_after_transp) -> dict:
    return {
        "dataset_name": "Dataset999_Toy",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": spacing_after_transp,
        "original_median_shape_after_transp": [10, 20, 24],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": transpose_forward,
        "transpose_backward": transpose_backward,
        "configurations": {
            "3d_fullres": {
                "data_identifier": "nnUNetPlans_3d_fullres",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": [8, 16, 16],
                "median_image_size_in_voxels": [10.0, 15.0, 18.0],
                "spacing": [s * f for s, f in zip(spacing_after_transp, (1.0, 1.25, 1.25))],
                "normalization_schemes": ["CTNormalization"],
                "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
                "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                       "force_separate_z": None},
                "architecture": {
                    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                    "arch_kwargs": ARCH,
                    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
                },
                "batch_dice": False,
            },
        },
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {
            "max": 400.0, "mean": 80.0, "median": 70.0, "min": -100.0,
            "percentile_00_5": -50.0, "percentile_99_5": 300.0, "std": 60.0}},
    }


def _results_folder(root: Path, transpose=(TRANSPOSE_FORWARD, TRANSPOSE_BACKWARD), spacing=(4.0, 1.5, 1.5),
                    extra_ckpt: dict | None = None) -> Path:
    model = root / "Dataset999_Toy" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (model / "fold_0").mkdir(parents=True)
    plans = _plans(list(transpose[0]), list(transpose[1]), list(spacing))
    (model / "plans.json").write_text(json.dumps(plans, indent=4))
    (model / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "spleen": 2},
        "numTraining": 4, "file_ending": ".nii.gz"}))
    torch.manual_seed(0)
    net = PlainConvUNet(1, num_classes=3, deep_supervision=True, conv_op=torch.nn.Conv3d,
                        norm_op=torch.nn.InstanceNorm3d, nonlin=torch.nn.LeakyReLU,
                        **{k: v for k, v in ARCH.items() if k not in ("conv_op", "norm_op", "nonlin")})
    with torch.no_grad():  # a non-trivial head so that every class appears
        net.decoder.seg_layers[-1].bias.copy_(torch.tensor([0.0, 0.05, -0.05]))
    ckpt = {  # nnU-Net v2's save_checkpoint layout
        "network_weights": net.state_dict(),
        "optimizer_state": torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99).state_dict(),
        "grad_scaler_state": None,
        "logging": {"mean_fg_dice": [np.float64(0.5)], "ema_fg_dice": [np.float64(0.5)],
                    "dice_per_class_or_region": [[np.float64(0.4), np.float64(0.6)]],
                    "train_losses": [0.3], "val_losses": [0.4], "lrs": [0.01],
                    "epoch_start_timestamps": [1.0], "epoch_end_timestamps": [2.0]},
        "_best_ema": np.float64(0.5),
        "current_epoch": 1,
        "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0,
                      "dataset_json": {"labels": {"background": 0}}, "device": torch.device("cpu")},
        "trainer_name": "nnUNetTrainer",
        "inference_allowed_mirroring_axes": (0, 1, 2),
        **(extra_ckpt or {}),
    }
    torch.save(ckpt, model / "fold_0" / "checkpoint_final.pth")
    return model


def _image(root: Path) -> tuple[Path, np.ndarray, Geometry]:
    rng = np.random.default_rng(0)
    arr = rng.normal(60, 80, size=(20, 24, 10)).astype(np.int16)
    arr[:, :3] = -1000
    geo = Geometry((20, 24, 10), SPACING, (10.0, -5.0, 3.0), (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0))
    path = root / "in" / "toy_0000.nii.gz"
    write_image(path, arr, geo)
    return path, arr, geo


def test_cli_predicts_nnunet_folder_in_input_geometry(tmp_path):
    model = _results_folder(tmp_path / "results")
    path, arr, geo = _image(tmp_path)
    rc = predict_main(["-i", str(path.parent), "-o", str(tmp_path / "out"), "--nnunet-model", str(model),
                       "-f", "0", "--device", "cpu", "--no-tta"])
    assert rc == 0
    labels, out_geo = read_image(tmp_path / "out" / "toy.nii.gz")
    assert out_geo.mismatch(geo) is None
    assert labels.shape == arr.shape
    assert set(np.unique(labels)) <= {0, 1, 2}


def test_transpose_is_applied_and_undone(tmp_path):
    """Predicting with transpose [2,0,1] equals predicting the pre-transposed image with identity."""
    _, arr, geo = _image(tmp_path)
    plan, models, axes = load_nnunet_model(_results_folder(tmp_path / "a"))
    assert axes == (0, 1, 2) and plan["transpose_forward"] == TRANSPOSE_FORWARD
    assert plan["normalization"] == [{"scheme": "ct", "clip": [-50.0, 300.0], "mean": 80.0, "std": 60.0}]
    assert isinstance(models[0], PlainConvUNet) and not models[0].decoder.deep_supervision
    labels, _ = Predictor(plan, models, device="cpu", tta=False).predict_case([arr], geo)
    assert labels.shape == arr.shape

    plan_i, models_i, _ = load_nnunet_model(_results_folder(tmp_path / "b", transpose=([0, 1, 2], [0, 1, 2])))
    t = np.transpose(arr, TRANSPOSE_FORWARD)
    geo_t = Geometry(t.shape, tuple(SPACING[a] for a in TRANSPOSE_FORWARD), geo.origin, geo.direction)
    labels_i, _ = Predictor(plan_i, models_i, device="cpu", tta=False).predict_case([t], geo_t)
    np.testing.assert_array_equal(labels, np.transpose(labels_i, TRANSPOSE_BACKWARD))
    assert len(np.unique(labels)) > 1


def test_mirroring_axes_from_checkpoint(tmp_path):
    model = _results_folder(tmp_path, extra_ckpt={"inference_allowed_mirroring_axes": (1, 2)})
    plan, models, axes = load_nnunet_model(model)
    assert axes == (1, 2)
    assert len(Predictor(plan, models, device="cpu", tta=True).window.mirrors) == 4


class _NotAllowed:  # a pickled class the weights-only loader must refuse
    pass


def test_unsafe_checkpoint_is_refused(tmp_path):
    model = _results_folder(tmp_path, extra_ckpt={"trainer_name": _NotAllowed()})
    with pytest.raises(SupremError, match="cannot load checkpoint"):
        load_nnunet_model(model)


def test_user_errors(tmp_path, capsys):
    model = _results_folder(tmp_path / "r")
    plans = json.loads((model / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["nonlin"] = "os.system"
    (model / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(SupremError, match="only torch.nn and dynamic_network_architectures"):
        load_nnunet_model(model)
    path, _, _ = _image(tmp_path)
    user_error(predict_main, ["-i", str(path), "-o", str(tmp_path / "o.nii.gz"), "--nnunet-model",
                              str(tmp_path / "missing"), "--device", "cpu"], capsys, "nnU-Net model folder not found")
