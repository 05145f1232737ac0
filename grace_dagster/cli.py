"""The `grace` command: run the pipeline on the embedded default and manage models."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _dagster_home() -> Path:
    # The UI command uses the same home, so what the CLI runs shows up in the UI.
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(Path(".dagster_home").resolve())))
    home.mkdir(parents=True, exist_ok=True)
    return home


def cmd_run(args: argparse.Namespace) -> int:
    from dagster import DagsterInstance, materialize

    from grace_dagster.assets import study_trials
    from grace_dagster.resources.defaults import default_resources
    from grace_dagster.studies import STUDIES

    _dagster_home()
    instance = DagsterInstance.get()
    resources = default_resources()
    ok = True
    for name in args.studies or list(STUDIES):
        result = materialize(
            [study_trials], partition_key=name, resources=resources, instance=instance, raise_on_error=False
        )
        if not result.success:
            ok = False
            print(f"{name}: FAILED", file=sys.stderr)
            for event in result.all_events:
                if event.is_step_failure and event.step_failure_data.error:
                    print(event.step_failure_data.error.message, file=sys.stderr)
            continue
        meta = result.asset_materializations_for_node("study_trials")[0].metadata
        print(f"{name}: {meta['rows'].value} trials validated from {meta['source'].value}")
        print(f"  written to {meta['path'].value}")
    return 0 if ok else 1


def cmd_models(args: argparse.Namespace) -> int:
    from grace_dagster.registry import load_registry

    registry = load_registry(args.registry)
    for m in registry.models:
        r = m.resources
        print(
            f"{m.slug:32} {m.serving.backend:9} {m.kind:9} gpus={r.gpus} cpu={r.cpu:g} mem={r.memory_gib:g}Gi  "
            f"{m.weights_revision}"
        )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from grace_dagster.serving.server import serve

    serve(args.model, host=args.host, port=args.port, ready_file=args.ready_file, parent_pid=args.parent_pid)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grace", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="materialize the pipeline on the embedded default and print a summary")
    run.add_argument("--studies", nargs="*", help="studies to run (default: all)")
    run.set_defaults(func=cmd_run)

    models = sub.add_parser("models", help="list the model registry")
    models.add_argument("--registry", help="registry file (default: the packaged models.yaml)")
    models.set_defaults(func=cmd_models)

    serve = sub.add_parser("serve", help="serve a registry model with the embedded OpenAI-compatible server")
    serve.add_argument("model", help="registry slug, e.g. smollm2-135m")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8011, help="0 lets the OS choose a free port")
    serve.add_argument("--ready-file", type=Path, help="write {host, port, pid} here once serving")
    serve.add_argument("--parent-pid", type=int, help="exit when this process is gone (used by the resource)")
    serve.set_defaults(func=cmd_serve)

    from grace_dagster.k8s.commands import register as register_k8s

    register_k8s(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
