"""Run by the eval tests (directly or under `accelerate launch`): `soarflow eval` with every scorer stand-in.

python eval_worker.py STANDIN_ROOT -- <soarflow eval arguments>
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for scorer_testing, diffusers_testing

import torch  # noqa: E402

torch.set_num_threads(1)

from scorer_testing import build_standins  # noqa: E402
from soarflow.commands.eval import build_parser, close_process_group, run  # noqa: E402

if __name__ == "__main__":
    root, rest = sys.argv[1], sys.argv[sys.argv.index("--") + 1 :]
    args = build_parser().parse_args(rest)
    names = args.scorers.split(",") if args.scorers else None
    standins = build_standins(Path(root))
    # the same teardown as `soarflow eval`'s main: the process group destroyed before the interpreter exits
    try:
        run(args, {n: s for n, s in standins.items() if names is None or n in names})
    finally:
        close_process_group()
