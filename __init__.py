"""bnnc: compile an ONNX binary neural network into a static C training program.

Pipeline (one module per stage, data flowing one way):
    compiler.frontend  ONNX file        -> ir.Graph      (layers, latent float parameters)
    compiler.schedule  Graph + config   -> Schedule      (one training step as typed kernel calls)
    compiler.liveness  Schedule         -> Liveness      (interval of every tensor)
    compiler.planner   Liveness         -> ArenaPlan     (static offsets in one arena)
    compiler.codegen   Schedule + plan  -> C sources     (Jinja templates in templates/)
runtime/ holds what runs things: numpy reference, cffi loader, QEMU/ssh runners, datasets.
"""

__version__ = "0.1.0"
