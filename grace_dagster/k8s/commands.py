"""`grace k8s render | lint | exceptions | cleanup-plan`: the manifests for the NRP, from the registry, checked before
use, and what to delete when the work is done.

Exit codes: 0 when everything is in order, 1 when a check fails (a violation, a schema error, drift, a missing
exception), 2 when the input cannot be read (registry or manifest files).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from grace_dagster.k8s.conventions import NAMESPACE
from grace_dagster.k8s.manifests import ManifestError, drift, load_manifests, to_files, write_files
from grace_dagster.k8s.policy import EXCEPTION_RULES, check_objects, required_exceptions
from grace_dagster.k8s.render import RenderError, render_objects
from grace_dagster.k8s.schema import KUBERNETES_VERSION, validate_objects
from grace_dagster.registry.loader import Registry, RegistryError, load_registry

DEFAULT_DIR = Path("k8s")


def _registry(path: str | None) -> Registry | None:
    try:
        return load_registry(path)
    except RegistryError as e:
        print(e, file=sys.stderr)
        return None


def _rendered(args: argparse.Namespace) -> tuple[Registry, list[dict]] | None:
    """The registry and every object rendered from it, or None after saying why they cannot be had."""
    registry = _registry(args.registry)
    if registry is None:
        return None
    try:
        return registry, render_objects(registry)
    except RenderError as e:
        print(f"cannot render the manifests: {e}", file=sys.stderr)
        return None


def cmd_render(args: argparse.Namespace) -> int:
    rendered = _rendered(args)
    if rendered is None:
        return 2
    registry, objects = rendered
    # A render that breaks a rule is never written: what is committed under k8s/ can always be applied.
    try:
        problems = [str(e) for e in validate_objects(objects, args.kubernetes_version)]
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    problems += [str(v) for v in check_objects(objects, registry)]
    if problems:
        print("\n".join(problems), file=sys.stderr)
        print(
            f"refusing to render: {len(problems)} problem(s) in the objects rendered from {registry.source}",
            file=sys.stderr,
        )
        return 1
    files = to_files(objects)
    out: Path = args.out
    if args.check:
        report = drift(files, out)
        if report:
            print("\n".join(report))
            print(
                f"{out}/ differs from what the registry renders ({len(report)} file(s)); run `grace k8s render "
                f"--out {out}` and commit the result",
                file=sys.stderr,
            )
            return 1
        print(f"{out}/ matches the registry: {len(objects)} objects in {len(files)} files")
        return 0
    changed = write_files(files, out)
    for rel in changed:
        print(f"  {'written' if (out / rel).exists() else 'removed'} {out / rel}")
    print(f"rendered {len(objects)} objects into {len(files)} files under {out}/ ({len(changed)} changed)")
    return 0


def cmd_lint(args: argparse.Namespace) -> int:
    registry = _registry(args.registry)
    if registry is None:
        return 2
    try:
        manifests = load_manifests(args.directory)
    except ManifestError as e:
        print(e, file=sys.stderr)
        return 2
    if not manifests:
        print(f"{args.directory}: no manifests (*.yaml, *.yaml.template) to lint", file=sys.stderr)
        return 2
    objects = [m.obj for m in manifests]
    source = {(str(m.obj.get("kind")), str(m.obj["metadata"].get("name"))): str(m.path) for m in manifests}
    try:
        errors = validate_objects(objects, args.kubernetes_version)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    problems = [str(dataclasses.replace(e, source=source.get((e.kind, e.name)))) for e in errors]
    for v in check_objects(objects, registry):
        # A violation on a claim template or ephemeral volume names its workload first.
        key = (v.kind, v.name.split(" (")[0])
        problems.append(str(dataclasses.replace(v, source=source.get(key))))
    for line in problems:
        print(line)
    files = len({m.path for m in manifests})
    summary = (
        f"{args.directory}/: {len(objects)} objects in {files} files, Kubernetes {args.kubernetes_version} "
        f"schemas and NRP policy: {len(problems)} problem(s)"
    )
    print(summary, file=sys.stderr if problems else sys.stdout)
    return 1 if problems else 0


def cmd_exceptions(args: argparse.Namespace) -> int:
    rendered = _rendered(args)
    if rendered is None:
        return 2
    registry, objects = rendered
    needs = required_exceptions(objects)
    print(f"NRP exception requests for namespace {NAMESPACE!r} (from {registry.source}).")
    print("Each names the object, what it needs beyond the cluster's defaults, and why. Send them to the NRP")
    print("admins before applying k8s/.\n")
    missing = []
    requested = set()
    order = {rule: i for i, rule in enumerate(EXCEPTION_RULES)}
    by_model: dict[str, list] = {}
    for need in needs:
        by_model.setdefault(need.model or "(no model)", []).append(need)
    for slug in sorted(by_model):
        model = registry.by_slug.get(slug)
        revision = f" ({model.weights_revision})" if model else ""
        print(f"{slug}{revision}")
        for need in sorted(by_model[slug], key=lambda n: (order.get(n.rule, 99), n.object)):
            grant = next((e for e in model.nrp_exceptions if e.rule == need.rule), None) if model else None
            print(f"  - {need.object}: {need.rule}: {need.detail}")
            if grant is None:
                missing.append(need)
                print("    why: MISSING - the registry records no reason for this exception")
            else:
                requested.add((slug, need.rule))
                print(f"    why: {grant.reason}")
        print()
    print(f"{len(requested)} exception(s) for {len(by_model)} model(s).")
    for model in registry.models:
        for e in model.nrp_exceptions:
            if (model.slug, e.rule) not in requested:
                print(
                    f"note: {model.slug} records a {e.rule} exception that no rendered object needs; "
                    "drop it from the registry unless it is meant for later"
                )
    if missing:
        for need in missing:
            print(
                f"{need.object} needs {need.rule} but model {need.model!r} records no such exception: add "
                f"{{rule: {need.rule}, reason: ...}} to its nrp_exceptions in models.yaml",
                file=sys.stderr,
            )
        return 1
    return 0


def cmd_cleanup_plan(args: argparse.Namespace) -> int:
    from datetime import UTC, date, datetime

    from grace_dagster.archive import read_receipts
    from grace_dagster.k8s.cleanup import cleanup_plan, read_namespace, unverified_archives
    from grace_dagster.k8s.cluster import ClusterError, api_client

    registry = _registry(args.registry)
    if registry is None:
        return 2
    try:
        ended = date.fromisoformat(args.ended) if args.ended else None
        now = datetime.combine(date.fromisoformat(args.today), datetime.min.time(), UTC) if args.today else None
    except ValueError as e:
        print(f"--ended/--today take a date as YYYY-MM-DD: {e}", file=sys.stderr)
        return 2
    if not args.archives.is_dir():
        print(
            f"--archives {args.archives}: not a directory (where the archive copies and receipts are)", file=sys.stderr
        )
        return 2
    receipts = read_receipts(args.archives)
    try:
        state = read_namespace(api_client(args.api_host, args.kubeconfig, args.context), args.namespace)
    except ClusterError as e:
        print(e, file=sys.stderr)
        return 2
    lines = cleanup_plan(
        state,
        receipts,
        registry,
        now or datetime.now(UTC),
        ended,
        unverified_archives(args.archives, receipts),
    )
    print("\n".join(lines))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `k8s` command group to the `grace` parser."""
    k8s = sub.add_parser("k8s", help="Kubernetes manifests for the NRP: render, lint, exception requests")
    commands = k8s.add_subparsers(dest="k8s_command", required=True)

    render = commands.add_parser("render", help="render k8s/ from the model registry (refuses on a violation)")
    render.add_argument("--out", type=Path, default=DEFAULT_DIR, help="output directory (default: k8s)")
    render.add_argument(
        "--check", action="store_true", help="compare with --out instead of writing; exit 1 on any drift"
    )
    render.add_argument("--registry", help="registry file (default: the packaged models.yaml)")
    render.add_argument(
        "--kubernetes-version",
        default=KUBERNETES_VERSION,
        help=f"schemas to validate against (default: {KUBERNETES_VERSION})",
    )
    render.set_defaults(func=cmd_render)

    lint = commands.add_parser(
        "lint", help="schema-validate manifests and check the NRP policy (exit 1 on a violation)"
    )
    lint.add_argument(
        "directory", nargs="?", type=Path, default=DEFAULT_DIR, help="directory of manifests (default: k8s)"
    )
    lint.add_argument("--registry", help="registry file granting the exceptions (default: the packaged one)")
    lint.add_argument(
        "--kubernetes-version",
        default=KUBERNETES_VERSION,
        help=f"schemas to validate against (default: {KUBERNETES_VERSION})",
    )
    lint.set_defaults(func=cmd_lint)

    plan = commands.add_parser(
        "cleanup-plan",
        help="list the namespace's volumes (age, verified archives) and print what to delete, in the audit's order",
    )
    plan.add_argument("--archives", type=Path, default=Path("."), help="where the archive copies are (default: .)")
    plan.add_argument("--ended", help="the day the experiments ended, YYYY-MM-DD (30 days later nothing may remain)")
    plan.add_argument("--today", help=argparse.SUPPRESS)  # a fixed date, for reproducible plans in tests
    plan.add_argument("--namespace", default=NAMESPACE, help=f"namespace (default: {NAMESPACE})")
    plan.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
    plan.add_argument("--context", help="kubeconfig context (default: the current one)")
    plan.add_argument("--api-host", help="Kubernetes API URL used without credentials (`kubectl proxy`)")
    plan.add_argument("--registry", help="registry file (default: the packaged models.yaml)")
    plan.set_defaults(func=cmd_cleanup_plan)

    exceptions = commands.add_parser("exceptions", help="print the exception requests to send to the NRP admins")
    exceptions.add_argument("--registry", help="registry file (default: the packaged models.yaml)")
    exceptions.set_defaults(func=cmd_exceptions)
