"""The trimode command line: the group (group.py) with every command registered on it. Each command
module reads options, builds settings, calls one stage and prints; what they share is in common.py.

    generate.py    generate
    checkpoint.py  make-checkpoint, quantize, train-draft
    evaluate.py    eval
    engine.py      build, inspect
    serve.py       repo, serve (and generate --url's client)
    deploy.py      deploy
    bench.py       bench
"""

from trimode.cli import bench, checkpoint, deploy, engine, evaluate, generate, serve
from trimode.cli.common import EMBEDDED_CHECKPOINT
from trimode.cli.group import main

for _command in (
    generate.generate,
    checkpoint.make_checkpoint,
    checkpoint.quantize,
    checkpoint.train_draft,
    evaluate.eval_command,
    engine.build,
    engine.inspect,
    serve.repo,
    serve.serve,
    deploy.deploy,
    bench.bench,
):
    main.add_command(_command)
del _command

__all__ = ["EMBEDDED_CHECKPOINT", "main"]
