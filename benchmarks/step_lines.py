"""Readability figure: the source lines one RL step actually runs, by file, for a config (default: quickstart).

    python benchmarks/step_lines.py                       # the embedded default method (GRPO, ppo_clip, token_mean)
    python benchmarks/step_lines.py --set kl.coef=0.05    # any recipe / override

A reader following one step of a method has to read what that step executes: this counts the distinct lines
of steadyrl's own code run inside ``Trainer.rl_step`` (the collect, score and update stages and everything they
call), leaving out the rollout backend's decode loop and the task's reward function (not the RL algorithm).
Run it on two checkouts (``PYTHONPATH=<checkout>/src``) to compare them; docs/architecture.md quotes it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

EXCLUDE = ("/rollout/hf.py", "/rollout/native.py", "/rollout/fused_decode.py", "/rollout/sampling.py", "/tasks/")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", default=None, help="recipe (default: the packaged quickstart)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)

    import steadyrl
    from steadyrl.config_load import load_config
    from steadyrl.train.trainer import Trainer

    root = str(Path(steadyrl.__file__).parent)
    config = args.config or str(Path(root) / "configs" / "quickstart.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        overrides = ["eval.every=0", "logging.progress=false", "logging.report=false", "logging.tensorboard=false",
                     f"run.output_dir={tmp}/run", "run.device=cpu", *args.set]
        trainer = Trainer(load_config(config, overrides))
        trainer.rl_step(1)  # warm: lazy imports and one-time set-up are not the step
        seen: dict[str, set[int]] = defaultdict(set)

        def tracer(frame, event, arg):
            path = frame.f_code.co_filename
            if not path.startswith(root) or any(x in path for x in EXCLUDE):
                return None
            if event == "line":
                seen[path].add(frame.f_lineno)
            return tracer

        sys.settrace(tracer)
        try:
            trainer.rl_step(2)
        finally:
            sys.settrace(None)
    total = 0
    for path in sorted(seen):
        total += len(seen[path])
        print(f"{len(seen[path]):5d}  {path[len(root) + 1:]}")
    print(f"{total} lines run in {len(seen)} files by one RL step of {Path(config).name} {' '.join(args.set)}".rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
