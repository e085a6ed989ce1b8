"""suprem_train: train one fold of a planned, preprocessed dataset (resumable, DDP under torchrun)."""
from __future__ import annotations

import argparse
import os

from suprem_net import api
from suprem_net.cli._common import parse_duration, setup_logging, user_errors_exit_2
from suprem_net.plan import DEFAULT_PLANS_NAME


def _positive(kind):
    def parse(text):
        v = kind(text)
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return v
    return parse


def _compile_default() -> bool | None:
    """``$SUPREM_compile`` (0/1) when set; else None: compile where the plan's measurement says it pays."""
    value = os.environ.get("SUPREM_compile", "").strip().lower()
    if not value:
        return None
    return value not in ("0", "false", "no", "off")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="suprem_train",
        description="Train one cross-validation fold from a plan (network, patch, schedule). Outputs go to "
                    "RESULTS/DatasetXXX/<plans>/fold_F: checkpoints, training_log.txt, progress.png, validation/. "
                    "Multi-GPU: torchrun --nproc_per_node N -m suprem_net.cli.train ...")
    p.add_argument("dataset", help="dataset number (e.g. 3) or full name (Dataset003_Liver)")
    p.add_argument("fold", help="fold 0..4, or 'all' (train and validate on every case)")
    p.add_argument("--plans", default=DEFAULT_PLANS_NAME, help=f"plans name (default {DEFAULT_PLANS_NAME})")
    p.add_argument("--pretrained", metavar="NAME|PATH", help="start from a zoo checkpoint (see suprem_weights) or a file")
    p.add_argument("--freeze-encoder-epochs", type=int, default=0, metavar="N",
                   help="keep the encoder fixed for the first N epochs")
    p.add_argument("--encoder-lr-scale", type=float, default=1.0, metavar="S",
                   help="learning rate of the encoder = S x the plan's")
    p.add_argument("--time-budget", type=parse_duration, metavar="DURATION",
                   help="train for this wall-clock time, e.g. 30m, 2h, 1h30m (overrides the plan's "
                        "training.time_budget_s): epochs x iterations are set from the measured step time, "
                        "re-estimated every epoch, and training stops there with checkpoint_final.pth and the "
                        "final validation (which runs after the budget)")
    p.add_argument("--epochs", type=_positive(int), help="override plan training.epochs (not with --time-budget)")
    p.add_argument("--iterations-per-epoch", type=_positive(int), help="override plan training.iterations_per_epoch")
    p.add_argument("--val-iterations", type=_positive(int), help="override plan training.num_val_iterations")
    p.add_argument("--lr", type=_positive(float), help="override plan training.lr")
    p.add_argument("--batch-size", type=_positive(int), help="override the plan's batch size (total over processes)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="auto: bf16 (else fp16 + grad scaling) on CUDA, fp32 on CPU")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=_compile_default(),
                   help="torch.compile the model and loss (faster iterations after a one-off compilation). Default: "
                        "on where the plan's measurement on this machine found compiled steps faster and the run long "
                        "enough to repay the compilation; $SUPREM_compile=0|1 sets the default")
    p.add_argument("--num-workers", type=int, default=max(1, min(4, (os.cpu_count() or 2) - 1)),
                   help="augmentation worker processes (0: in the training process)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=_positive(int), default=1, help="write checkpoint_latest.pth every N epochs")
    p.add_argument("--continue", dest="resume", action="store_true",
                   help="resume exactly from fold_F/checkpoint_latest.pth")
    p.add_argument("--elastic", action="store_true", help="add elastic deformation to the augmentation")
    p.add_argument("--no-augmentation", action="store_true", help="train on plain patches (debugging)")
    p.add_argument("--skip-final-validation", action="store_true",
                   help="do not predict the validation cases at the end")
    p.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms(True)")
    p.add_argument("--no-progress-bar", action="store_true")
    p.add_argument("--preprocessed", help="default: $SUPREM_preprocessed, else ./suprem_data/preprocessed")
    p.add_argument("--results", help="default: $SUPREM_results, else ./suprem_data/results")
    p.add_argument("--raw", help="raw datasets folder, only used to resolve a dataset number")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


@user_errors_exit_2
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    result = api.train(
        args.dataset, args.fold, raw=args.raw, preprocessed=args.preprocessed, results=args.results,
        plans_name=args.plans,
        overrides={"epochs": args.epochs, "iterations_per_epoch": args.iterations_per_epoch, "lr": args.lr,
                   "num_val_iterations": args.val_iterations},
        batch_size=args.batch_size, num_workers=args.num_workers, seed=args.seed, save_every=args.save_every,
        resume=args.resume, precision=args.precision, device=args.device, pretrained=args.pretrained,
        freeze_encoder_epochs=args.freeze_encoder_epochs, encoder_lr_scale=args.encoder_lr_scale,
        elastic=args.elastic, augment=not args.no_augmentation, final_validation=not args.skip_final_validation,
        deterministic=args.deterministic, progress_bar=not args.no_progress_bar, compile=args.compile,
        time_budget_s=args.time_budget)
    if int(os.environ.get("RANK", "0")) == 0:
        h = result["history"]
        last = h["pseudo_dice"][-1] if h["pseudo_dice"] else []
        print(f"fold {args.fold}: {result['epochs']} epochs, best EMA pseudo Dice {result['best_ema']:.4f}, "
              f"last pseudo Dice {[round(d, 3) for d in last]} -> {result['fold_dir']}")
        if "validation" in result:
            fm = result["validation"]["foreground_mean"]
            print(f"validation: mean Dice {fm['dice']}, mean NSD {fm['nsd']}")
    return 0


if __name__ == "__main__":
    main()
