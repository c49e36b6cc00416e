"""The trainer's commands in one table, and the dispatch of `python -m trainer COMMAND`.

`kdfleet trainer COMMAND` is the same group; `kdfleet COMMAND` also reaches
every command here but `serve` (kdfleet/cli.py builds its table from this
one). A command's module is imported only when it runs.
"""
from __future__ import annotations

import importlib
import sys

# name -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "data": ("trainer.cli", "data_main", "make datasets (`data synth OUT --seed N`)"),
    "train": ("trainer.cli", "train_main", "train STFPM / RD / US, unified or one-class"),
    "evaluate": ("trainer.cli", "evaluate_main", "evaluate a checkpoint or package on an MVTec-layout set"),
    "compare": ("trainer.cli", "compare_main", "unified vs one-class for each method: the per-class report folder"),
    "export": ("trainer.cli", "export_main", "export a checkpoint to ONNX and pack a model package"),
    "quantize": ("trainer.quantize.cli", "quantize_main", "FP16 / PTQ / QAT variants and their accuracy-speed report"),
    "demo-model": ("trainer.cli", "demo_model_main", "train (or reuse) the small unified model the demo runs"),
    "serve": ("trainer.serve", "main", "retrain from reviewed results and roll out what passes the gate"),
}
GROUP_ONLY = ("serve",)   # reached as `kdfleet trainer serve`, not `kdfleet serve`
INSTALL_HINT = "pip install 'kdfleet[train]'"


def usage(prog: str) -> str:
    width = max(len(n) for n in COMMANDS)
    lines = [f"usage: {prog} <command> [options]   ({prog} <command> --help for more)", "", "commands:"]
    return "\n".join(lines + [f"  {n.ljust(width)}  {text}" for n, (_, _, text) in COMMANDS.items()])


def main(argv: list[str] | None = None, prog: str = "python -m trainer") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(prog))
        return 0
    if argv[0] not in COMMANDS:
        print(f"{prog}: unknown command {argv[0]!r}\n\n{usage(prog)}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[argv[0]]
    try:
        target = getattr(importlib.import_module(module), func)
    except ImportError as exc:
        print(f"{prog} {argv[0]}: needs a package that is not installed ({exc.name}); install it with: "
              f"{INSTALL_HINT}", file=sys.stderr)
        return 2
    return int(target(argv[1:]) or 0)
