"""``suprem_weights``: the pre-trained checkpoint zoo.

    suprem_weights list                       # every checkpoint of the model table, status, local file
    suprem_weights info NAME                  # one entry in full
    suprem_weights download NAME [NAME ...] | --all [--retries N]   # into the cache, checked, resumable
    suprem_weights import FILE [--name NAME]  # a file fetched elsewhere: checked, copied into the cache
    suprem_weights verify                     # hash every cached file again
    suprem_weights check NAME|PATH [--family F] [--num-classes N] [--in-channels C] [--labels dataset.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from suprem_net.cli._common import setup_logging, user_errors_exit_2
from suprem_net.errors import SupremError
from suprem_net.weights import REGISTRY, get_entry, import_file, local_path, verify_cache, weights_dir
from suprem_net.weights.check import check_checkpoint
from suprem_net.weights.download import download_many


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="suprem_weights", description="List, download, import, verify, describe and "
                                "check pre-trained weights. The cache folder is $SUPREM_weights, else the user's "
                                "cache folder (suprem_weights list shows it).")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="all checkpoints of the SuPreM model table")
    info = sub.add_parser("info", help="details of one checkpoint")
    info.add_argument("name")
    dl = sub.add_parser("download", help="download checkpoints into the cache (resumed if interrupted; the "
                        "SHA-256, or the key layout where no hash is published, is checked before the file appears)")
    dl.add_argument("names", nargs="*", metavar="NAME", help="registry names (see list)")
    dl.add_argument("--all", action="store_true", help="every checkpoint of the table")
    dl.add_argument("--retries", type=int, default=5, help="retries per file, with exponential back-off (default 5)")
    imp = sub.add_parser("import", help="check a file fetched elsewhere (size and SHA-256 where published, else "
                         "its key layout) and copy it into the cache under its published name")
    imp.add_argument("file", type=Path)
    imp.add_argument("--name", help="registry name (default: recognised by SHA-256, then by key layout)")
    sub.add_parser("verify", help="hash every file in the cache again (exit code 2 on a mismatch)")
    check = sub.add_parser("check", help="load a checkpoint into its network and report tensor counts")
    check.add_argument("source", help="registry name or path to a .pth/.pt file")
    check.add_argument("--family", help="network family (needed for a path whose family cannot be inferred)")
    check.add_argument("--num-classes", type=int, default=2, help="output channels of the network (default 2)")
    check.add_argument("--in-channels", type=int, default=1, help="input channels of the network (default 1)")
    check.add_argument("--labels", type=Path, help="dataset.json whose 'labels' drive the head transfer")
    return p


def _cmd_list() -> None:
    rows = [("name", "family", "params", "pre-training data", "status", "local file")]
    for e in REGISTRY.values():
        rows.append((e.name, e.family or "-", e.params.split(" ")[0], e.data, e.status,
                     "present" if local_path(e).is_file() else "missing"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    print(f"\nweights folder: {weights_dir()} (set SUPREM_weights to change it; "
          "get a file with: suprem_weights download NAME)")


def _cmd_info(name: str) -> None:
    e = get_entry(name)
    if e is None:
        raise SupremError(f"unknown pretrained weights {name!r} (known: {', '.join(REGISTRY)})")
    path = local_path(e)
    lines = [
        ("name", e.name), ("model table", f"{e.title} ({e.source})" if e.source else e.title),
        ("status", e.status + (f": {e.unsupported_reason}" if not e.supported else "")),
        ("family", e.family or "-"), ("kwargs", json.dumps(e.kwargs)), ("params", e.params),
        ("backbone params", f"{e.backbone_params:,}" if e.backbone_params else "-"),
        ("pre-training data", e.data), ("file", e.file),
        ("local path", f"{path} ({'present' if path.is_file() else 'missing'})"), ("download", e.url),
        ("mirror", e.mirror_url or "-"), ("get it", f"suprem_weights download {e.name}"),
        ("size", f"{e.size:,} bytes" if e.size else e.size_note or "-"), ("sha256", e.sha256 or "-"),
        ("checksums", e.checksum_note or "-"), ("key adapter", e.adapter or "-"),
        ("expected backbone tensors", str(e.expected_tensors) if e.expected_tensors is not None else "-"),
        ("head", e.head + (f" ({len(e.head_classes)} classes: {', '.join(e.head_classes)})" if e.head_classes else "")),
        ("notes", e.notes or "-"),
    ]
    width = max(len(k) for k, _ in lines)
    for k, v in lines:
        print(f"{k.ljust(width)}  {v}")


def _read_labels(path: Path) -> dict:
    try:
        labels = json.loads(path.read_text(encoding="utf-8"))["labels"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SupremError(f"{path}: cannot read 'labels' ({type(e).__name__}: {e})") from None
    if not isinstance(labels, dict):
        raise SupremError(f"{path}: 'labels' must be an object name -> value")
    return labels


def _cmd_download(args: argparse.Namespace) -> None:
    if args.all == bool(args.names):
        raise SupremError("download: give registry names or --all")
    entries = list(REGISTRY.values()) if args.all else [get_entry(n) for n in args.names]
    unknown = [n for n, e in zip(args.names, entries) if e is None]
    if unknown:
        raise SupremError(f"unknown pretrained weights {', '.join(unknown)} (known: {', '.join(REGISTRY)})")
    for path in download_many(entries, retries=args.retries, backoff=1.0, progress=True):
        print(path)


def _cmd_import(args: argparse.Namespace) -> None:
    entry, path = import_file(args.file, args.name, progress=True)
    print(f"{entry.name}: {path}")


def _cmd_verify() -> None:
    results = verify_cache(progress=True)
    print(f"weights folder: {weights_dir()}")
    for r in results:
        print(f"{r.status:<18}  {r.name:<22}  {r.path.name}")
    if not results:
        print("no checkpoint in the cache")
    bad = [r for r in results if r.status == "MISMATCH"]
    if bad:
        raise SupremError("\n".join(f"{r.path}: SHA-256 {r.digest} differs from the reference; delete it and "
                                    f"run: suprem_weights download {r.name}" for r in bad))


def _cmd_check(args: argparse.Namespace) -> None:
    labels = _read_labels(args.labels) if args.labels else None
    report, network, num_classes = check_checkpoint(args.source, family=args.family, num_classes=args.num_classes,
                                                    in_channels=args.in_channels, labels=labels)
    family, kwargs = network["family"], network["kwargs"]
    c = report.counts()
    print(f"source      {report.source}")
    print(f"file        {report.path}")
    print(f"network     {family} {json.dumps(kwargs)}, in_channels={args.in_channels}, num_classes={num_classes}")
    print(f"adapter     {report.adapter}")
    exp = f" of {report.expected} expected" if report.expected is not None else ""
    print(f"loaded      {c['loaded']}{exp}")
    print(f"skipped     {c['skipped']} (left out on purpose: wrapper, pretext or pre-training heads)")
    print(f"unexpected  {c['unexpected']} (no counterpart in the network)")
    print(f"mismatch    {c['shape_mismatch']}" + "".join(f"\n  {k}: file {fs} network {ms}"
                                                      for k, (fs, ms) in report.shape_mismatch.items()))
    print(f"missing     {c['missing']} (left as initialised)" + "".join(f"\n  {k}" for k in report.missing[:10]))
    if report.head_note:
        print(f"head        {report.head_note}")
    print("OK")


@user_errors_exit_2
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.verbose)
    commands = {"list": _cmd_list, "info": lambda: _cmd_info(args.name), "download": lambda: _cmd_download(args),
                "import": lambda: _cmd_import(args), "verify": _cmd_verify, "check": lambda: _cmd_check(args)}
    commands[args.command]()
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
