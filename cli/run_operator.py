"""`pinnace operator`: run the LLMDeployment controller (kopf) against the current cluster.

Credentials: the in-cluster service account, else the current kubeconfig context. With
peering (the default), several replicas elect one active operator through kopf's
`ClusterKopfPeering`/`KopfPeering` objects (deploy/peering.yaml).
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("operator", help="run the LLMDeployment operator")
    scope = parser.add_mutually_exclusive_group(required=True)
    scope.add_argument(
        "-n", "--namespace", action="append", help="serve this namespace (repeatable)"
    )
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="serve all namespaces")
    parser.add_argument(
        "--peering", default="pinnace", help="kopf peering object for leader election"
    )
    parser.add_argument(
        "--standalone", action="store_true", help="no leader election (a single replica)"
    )
    parser.add_argument(
        "--liveness",
        default="http://0.0.0.0:8080/healthz",
        help="health endpoint URL for the liveness probe ('' to disable)",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import kopf

    from pinnace.operator.handlers import build_registry

    kopf.configure(verbose=args.verbose)
    kopf.run(
        registry=build_registry(),
        clusterwide=args.all_namespaces,
        namespaces=args.namespace or (),
        standalone=args.standalone,
        peering_name=None if args.standalone else args.peering,
        liveness_endpoint=args.liveness or None,
    )
    return 0
