"""The ``robust-distill`` command: data preparation and Kubernetes manifests.

    robust-distill data digits OUT              the built-in digits data set as shards
    robust-distill data convert ROOT OUT        an ImageFolder tree (ImageNet layout) as shards
    robust-distill data verify DIR [--decode]   check a shard set against its manifest (and decode every sample)
    robust-distill k8s render --out DIR [--overlay NAME] [pools.*=... k8s.*=...]
                                                KubeRay manifests from the typed pool config
    robust-distill k8s check FILE...            validate manifests against the pool sizes they run
    robust-distill plan [key=value ...]         teacher GPUs, CPUs, network and hours of a DAD run

Training and evaluation are recipes: ``python recipes/dad_imagenet.py --help``.
"""

from __future__ import annotations

import argparse
import sys

from cluster.deploy.k8s import OVERLAYS, load_deploy_config, render
from cluster.deploy.k8s_checks import check_manifests, load_manifests
from cluster.deploy.plan import add_plan_parser
from robust.data.digits import build_digits_shards
from robust.data.folder import convert_folder
from robust.data.shard_reader import verify_manifest


def _data(args: argparse.Namespace) -> None:
    if args.action == "digits":
        for split, path in build_digits_shards(args.out).items():
            print(f"{split}: {path}")
    elif args.action == "convert":
        report = convert_folder(args.root, args.out, prefix=args.prefix, max_per_shard=args.max_per_shard)
        print(f"wrote {report.manifest.total} samples in {len(report.manifest.shards)} shards to {args.out}; "
              f"skipped {len(report.skipped)}")
    else:
        manifest = verify_manifest(args.dir, decode=args.decode)
        decoded = ", every sample decodes" if args.decode else ""
        print(f"{args.dir}: {manifest.total} samples in {len(manifest.shards)} shards, checksums match{decoded}")


def _k8s(args: argparse.Namespace) -> None:
    if args.action == "render":
        cfg = load_deploy_config(args.overlay, args.overrides)
        for path in render(cfg.pools, cfg.k8s, out_dir=args.out):
            print(path)
    else:
        check_manifests(load_manifests(args.files))
        print(f"{len(args.files)} manifest file(s) agree with their pool sizes and policies")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="robust-distill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data", help="build, convert and verify webdataset shards")
    dsub = data.add_subparsers(dest="action", required=True)
    dsub.add_parser("digits", help="write scikit-learn's digits as train/test shards").add_argument("out")
    conv = dsub.add_parser("convert", help="convert an ImageFolder tree to shards")
    conv.add_argument("root")
    conv.add_argument("out")
    conv.add_argument("--prefix", default="shard")
    conv.add_argument("--max-per-shard", type=int, default=1000)
    verify = dsub.add_parser("verify", help="check counts and checksums against manifest.json")
    verify.add_argument("dir")
    verify.add_argument("--decode", action="store_true", help="also decode every sample and check its label")
    data.set_defaults(func=_data)
    k8s = sub.add_parser("k8s", help="render and check KubeRay manifests")
    ksub = k8s.add_subparsers(dest="action", required=True)
    rend = ksub.add_parser("render", help="write RayJob, RayCluster and PVC manifests for a pool config")
    rend.add_argument("--out", required=True)
    rend.add_argument("--overlay", choices=sorted(OVERLAYS), default=None)
    rend.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. pools.student.num_workers=16")
    ksub.add_parser("check", help="validate manifest files").add_argument("files", nargs="+")
    k8s.set_defaults(func=_k8s)
    add_plan_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
