"""The `bnnc` click group every command module registers on (cli/__init__.py imports them all)."""

from __future__ import annotations

import click

from .. import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="bnnc")
def cli() -> None:
    """bnnc -- compile an ONNX binary neural network into a static C training program.

    \b
    Typical session:
      bnnc zoo mlp -o mlp.onnx                     write a built-in model
      bnnc info mlp.onnx                           what the importer sees
      bnnc inspect mlp.onnx --compare standard,proposed --html arena.html
                                                   training memory, planned statically
      bnnc compile mlp.onnx --target host -o out   emit the C trainer
      bnnc check mlp.onnx                          its gradients vs the numpy reference
      bnnc run out --data mnist --epochs 1         train the emitted C (bnnc data fetch mnist)
      bnnc export out -o trained.onnx              the trained model as inference ONNX
    """
