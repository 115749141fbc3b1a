"""`dinoscale eval knn|linear|dense|visualize|report`: evaluate a backbone and write a report.

Each command writes `report.json`, `report.md` (with its PNGs) and a self-contained
`report.html` into --out. Config overrides (`eval.image_size=224 eval.knn_k=[10,20]`) follow
the options; --train / --val set eval.train_dataset / eval.val_dataset.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, Sequence

from dinoscale.errors import DinoscaleError

METRICS_FILE = "metrics.jsonl"


def _command(name: str) -> Callable[[argparse.Namespace], None]:
    """A handler that imports `dinoscale.eval.commands` (torch, matplotlib) only when it runs."""
    def run(args: argparse.Namespace) -> None:
        getattr(importlib.import_module("dinoscale.eval.commands"), name)(args)
    return run


def _common(parser: argparse.ArgumentParser, weights: bool = True) -> None:
    if weights:
        parser.add_argument("--weights", required=True, help="backbone weights file (dinoscale export, official "
                            "DINOv2/DINOv3 backbone or training checkpoint)")
    parser.add_argument("--arch", default=None, help="preset the weights belong to (detected when omitted)")
    parser.add_argument("--config", default=None, help="preset name or YAML file the eval section comes from")
    parser.add_argument("--out", default="runs/eval", help="folder for report.json/.md/.html")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. eval.image_size=224")


def _datasets(parser: argparse.ArgumentParser) -> None:
    labelled = ("a folder with one sub-folder per class, a CSV file with `path` and `label` columns, or a .txt list "
                "of images in class folders")
    parser.add_argument("--train", default=None, help=f"labelled train images: {labelled}")
    parser.add_argument("--val", default=None, help=f"labelled val images: {labelled}")


def add_eval_commands(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the knn / linear / dense / visualize / report sub-commands to `parser`; each sets `handler`."""
    sub = parser.add_subparsers(dest="eval_command", required=True)
    p = sub.add_parser("knn", help="weighted k-NN accuracy (DINO protocol)")
    _common(p)
    _datasets(p)
    subset = ("a boolean .npy mask over the val items in their order, or a text file of val keys (paths below the "
              "val dataset), one per line")
    p.add_argument("--val-subset", default=None, help=f"also score the val images it selects: {subset}")
    p.add_argument("--val-exclude", default=None, help="also score the val images it does not select (e.g. a "
                   f"curation dedup stage's contaminated.npy: the val images without a copy in train): {subset}")
    p.set_defaults(handler=_command("cmd_knn"))
    p = sub.add_parser("linear", help="linear probe with a learning-rate / weight-decay grid")
    _common(p)
    _datasets(p)
    p.set_defaults(handler=_command("cmd_linear"))
    p = sub.add_parser("dense", help="linear segmentation and depth probes on patch features")
    _common(p)
    for role in ("train", "val"):
        p.add_argument(f"--{role}", default=None, help=f"{role} images (sets eval.dense.{role}_dataset)")
        p.add_argument(f"--{role}-masks", default=None, help=f"segmentation masks of the {role} images, PNGs with "
                       f"the images' relative stems (sets eval.dense.{role}_masks)")
        p.add_argument(f"--{role}-depth", default=None, help=f"depth maps of the {role} images, 16-bit PNGs or "
                       f".npy (sets eval.dense.{role}_depth)")
    p.set_defaults(handler=_command("cmd_dense"))
    p = sub.add_parser("visualize", help="PCA and attention pictures of a few images")
    _common(p)
    p.add_argument("--images", default=None, help="images to draw (default: eval.val_dataset)")
    p.set_defaults(handler=_command("cmd_visualize"))
    p = sub.add_parser("report", help="loss curves of a run and k-NN accuracy over its checkpoints")
    _common(p, weights=False)
    _datasets(p)
    p.add_argument("--run", default=None, help=f"training run folder holding {METRICS_FILE}")
    p.add_argument("--metrics", default=None, help="metrics JSONL file (instead of --run)")
    p.add_argument("--checkpoints", nargs="+", default=None, help="backbone files to k-NN evaluate (needs --train "
                   "and --val; put config overrides before this option)")
    p.set_defaults(handler=_command("cmd_report"))
    return parser


def build_parser() -> argparse.ArgumentParser:
    return add_eval_commands(argparse.ArgumentParser(prog="dinoscale eval", description=__doc__.splitlines()[0]))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except DinoscaleError as err:
        print(f"dinoscale: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
