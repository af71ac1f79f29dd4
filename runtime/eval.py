"""Score a state of a model on a dataset: accuracy, mean cross-entropy and the confusion matrix
(`bnnc eval`).

Two entries:
- `eval_compiled(out_dir, opts)`: the program compiled into OUT/ scores the split with its own
  predict entry, where the program runs: natively (host target), under QEMU (`emulate`: rpi4/rpi3
  in user mode, cortex-m7/m4 as an MPS2 board) or on a device over ssh (`device`, the paths of
  runtime/run.py). The split is fitted to the model and packed into OUT/data/eval.bnnd; the
  trainer's `--eval` mode prints the predicted class and the summed -ln p(label) of every 16
  examples (templates/trainer/skeleton.c.j2), nothing else runs.
- `eval_model(graph, cfg, tensors, data, ...)`: the numpy reference's inference
  (`reference.predict`) for a model file that was not compiled, in batches of the config's size.

The data are fitted as `bnnc run` fitted them: --fit, --layout and --label-column default to what
OUT/data.json recorded, and data whose class names map to other indices are refused.

The state (`state`): "init" is step 0 (OUT/init_state.npz: the model file's own weights, or
bnnc's initialisation); a path is an .npz of state tensors or a state blob of the compiled
program (a checkpoint, e.g. fetched from a device); None is the state `bnnc run` left in OUT
(final_state.npz, else state.bin), else step 0.

Loss: mean over examples of -ln p(label), p clamped below at FLT_MIN (so one example contributes at
most 87.3), float32 sums per 16 examples added in double. Accuracy: argmax with the first maximum
winning, as the trainer's test accuracy. Confusion matrix: rows = true class, columns = predicted.
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from ..compiler.config import TrainConfig
from ..compiler.errors import ConfigError, DataError, TargetError
from ..compiler.ir import Graph
from ..compiler.preprocess import Preprocess
from . import baremetal
from . import reference as ref
from .datasets import DataRequest, ModelData, open_data, preprocess_pixels
from .device import SshRunner, parse_device
from .outdir import (INIT_STATE, check_class_names, class_names_of, load_init_state, read_compiled,
                     read_data_record, same_class_order, saved_state_path, write_atomic)
from .programs import LocalRunner, build_trainer, check_result, target_of
from .state_blob import read_state_blob, state_values_f32, trained_state

EVAL_FILE = "eval.bnnd"
EVAL_STATE = "eval_state.f32"
FLT_MIN = float(np.finfo(np.float32).tiny)


@dataclass(frozen=True)
class EvalResult:
    model: str
    where: str                    # "numpy reference", "native", the emulator, the device
    state: str                    # which state was scored
    data: str
    split: str
    class_names: tuple[str, ...]
    confusion: np.ndarray         # int64 [classes, classes]: row = true class, column = predicted
    loss_sum: float
    predictions: np.ndarray       # int64 [count]: the predicted class of each example, in order

    @property
    def count(self) -> int:
        return int(self.confusion.sum())

    @property
    def accuracy(self) -> float:
        return float(np.trace(self.confusion)) / max(1, self.count)

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / max(1, self.count)


@dataclass(frozen=True)
class EvalOptions:
    data: DataRequest
    split: str = "test"
    state: str | None = None              # "init", a path, or None (module docstring)
    emulate: bool = False
    device: str | None = None
    port: int | None = None
    identity: Path | None = None
    ssh_options: tuple[str, ...] = ()
    timeout: float | None = None


def confusion(pred: np.ndarray, y: np.ndarray, classes: int) -> np.ndarray:
    m = np.zeros((classes, classes), np.int64)
    np.add.at(m, (np.asarray(y, np.int64), np.asarray(pred, np.int64)), 1)
    return m


def _class_names(data: ModelData, classes: int, stored: tuple[str, ...] | None
                 ) -> tuple[str, ...]:
    names = stored if stored is not None else data.class_names
    return tuple(names) + tuple(str(k) for k in range(len(names), classes))


# --------------------------------------------------------------------------------------------------
# a model file: the numpy reference

def eval_model(graph: Graph, cfg: TrainConfig, tensors: dict, data: ModelData, pre: Preprocess,
               *, split: str = "test", state: str = "init",
               class_names: tuple[str, ...] | None = None) -> EvalResult:
    """Score `tensors` with the numpy reference's inference on a split of `data`; `class_names`:
    what the model file records (an export's "bnnc.classes"), checked against the data's."""
    same_class_order(class_names, data.class_names, data.request.spec, "the model file")
    st = ref.TrainState(dict(tensors), 0)
    preds, ys, loss = [], [], 0.0
    for x, y in data.batches(split, cfg.batch):
        probs = ref.predict(graph, cfg, st, preprocess_pixels(x, pre))
        p = probs[np.arange(len(y)), y].astype(np.float32)
        loss += float(-np.log(np.maximum(p, np.float32(FLT_MIN))).astype(np.float64).sum())
        preds.append(probs.argmax(axis=1))
        ys.append(y)
    pred = np.concatenate(preds).astype(np.int64)
    m = confusion(pred, np.concatenate(ys), graph.num_classes)
    return EvalResult(graph.name, "numpy reference", state, data.name, split,
                      _class_names(data, graph.num_classes, class_names), m, loss, pred)


# --------------------------------------------------------------------------------------------------
# a compiled program: its trainer's --eval mode, where it runs

def eval_compiled(out_dir: Path, opts: EvalOptions,
                  on_line: Callable[[str], None] | None = None) -> EvalResult:
    """Score a state of the program compiled into `out_dir` (module docstring)."""
    out_dir = Path(out_dir)
    manifest, graph, cfg = read_compiled(out_dir)
    tgt = target_of(out_dir)
    _check_mode(out_dir, tgt, opts)
    data = open_data(_as_recorded(out_dir, opts.data), graph.input_shape, graph.num_classes,
                     model_name=repr(graph.name))
    check_class_names(out_dir, data.class_names, opts.data.spec)
    where_dir = out_dir / "data"
    where_dir.mkdir(exist_ok=True)
    test_f = where_dir / EVAL_FILE
    data.pack(opts.split, test_f)
    label, tensors, blob = _state(out_dir, manifest, graph, cfg, opts.state)
    events: list[dict] = []
    if tgt.kind == "baremetal":
        if blob is None:
            blob = baremetal.start_state_blob(out_dir, tensors)
        _, btgt = baremetal.compiled_program(out_dir, tgt)
        res = baremetal.evaluate(out_dir, btgt, test=test_f, start_blob=blob,
                                 on_event=events.append,
                                 timeout=opts.timeout if opts.timeout is not None else 24 * 3600.0)
        where = f"{btgt.name}, QEMU"
        if res.returncode != 0:
            raise DataError(f"the {tgt.name} program failed (exit {res.returncode}): "
                            f"{res.error() or res.stderr.strip()[-800:] or 'no output'}")
    else:
        write_atomic(out_dir / EVAL_STATE, state_values_f32(manifest, tensors))
        exe = build_trainer(out_dir, tgt)
        args = ["--eval", "--test", EVAL_FILE, "--init", EVAL_STATE]
        if opts.device:
            runner = SshRunner(parse_device(opts.device, f"bnnc-{graph.name}"), tgt,
                               port=opts.port, identity=opts.identity, options=opts.ssh_options)
            where = runner.describe()
            runner.check()
            runner.put([(exe, "trainer"), (test_f, EVAL_FILE), (out_dir / EVAL_STATE, EVAL_STATE)])
            res = runner.run("trainer", args, on_event=events.append, timeout=opts.timeout)
            check_result(res, f"the evaluation on {opts.device}")
        else:
            local = LocalRunner(tgt)
            where = local.describe()
            paths = {EVAL_FILE: str(test_f), EVAL_STATE: str(out_dir / EVAL_STATE)}
            res = local.run(exe, [paths.get(a, a) for a in args], on_event=events.append,
                            timeout=opts.timeout)
            check_result(res, f"the {tgt.name} evaluation")
    src = data.split(opts.split)
    pred = np.full(src.count, -1, np.int64)
    loss = 0.0
    for ev in events:
        if ev.get("event") != "pred":
            continue
        at, p = int(ev["at"]), ev["pred"]
        pred[at:at + len(p)] = p
        loss += float(ev["loss"])
    if (pred < 0).any():
        raise TargetError(f"the {tgt.name} program reported {int((pred >= 0).sum())} of "
                          f"{src.count} predictions", hint="run it again; was it interrupted?")
    m = confusion(pred, src.labels, graph.num_classes)
    return EvalResult(graph.name, where, label, data.name, opts.split,
                      _class_names(data, graph.num_classes, class_names_of(out_dir)), m, loss,
                      pred)


def _as_recorded(out_dir: Path, req: DataRequest) -> DataRequest:
    """`req` with the options `bnnc run` recorded in OUT/data.json filled in where the user gave
    none (--fit, --layout, --label-column): the data are fitted as they were for training."""
    rec = read_data_record(out_dir) or {}
    return dataclasses.replace(
        req, fit=req.fit if req.fit is not None else rec.get("fit"),
        layout=req.layout if req.layout is not None else rec.get("layout"),
        label_column=req.label_column if req.label_column is not None
        else rec.get("label_column"))


def _check_mode(out_dir: Path, tgt, opts: EvalOptions) -> None:
    if opts.emulate and opts.device:
        raise ConfigError("--emulate and --device exclude each other")
    if tgt.kind == "baremetal" and not opts.emulate:
        raise ConfigError(f"{out_dir} is a bare-metal {tgt.name} program",
                          hint="evaluate it under QEMU with --emulate")
    if tgt.kind == "linux" and not (opts.emulate or opts.device):
        raise ConfigError(f"{out_dir} was compiled for {tgt.name} ({tgt.arch})",
                          hint="add --emulate (QEMU) or --device USER@HOST[:DIR]")
    if tgt.kind == "host" and opts.emulate:
        raise ConfigError("the host target runs natively; --emulate is for cross targets")


def _state(out_dir: Path, manifest, graph, cfg, state: str | None):
    """(label, tensors or None, blob or None) of the state to score."""
    if state is None:
        saved = saved_state_path(out_dir)
        state = str(saved) if saved.is_file() else "init"
    if state == "init":
        return "step 0 (" + INIT_STATE + ")", load_init_state(out_dir, graph, cfg), None
    path = Path(state)
    if not path.is_file():
        raise ConfigError(f"--state {state}: no such file", hint="pass an .npz of state tensors, "
                          "a checkpoint (state.bin) of this program, or `init` for step 0")
    if path.suffix == ".npz":
        return str(path), trained_state(graph, cfg, path, manifest), None
    blob = read_state_blob(path, manifest)      # refuses a foreign or damaged file
    return f"{path} (step {blob.step})", blob.tensors, path.read_bytes()


# --------------------------------------------------------------------------------------------------
# presentation: text and picture

def confusion_text(r: EvalResult, *, max_classes: int = 30) -> str:
    """The confusion matrix as aligned text (rows = true class), with per-class recall."""
    k = len(r.class_names)
    if k > max_classes:
        return f"(confusion matrix of {k} classes omitted; write it with --png)"
    m = r.confusion
    labels = [f"{i} {n}" if n != str(i) else n for i, n in enumerate(r.class_names)]
    corner = "true \\ pred"
    lw = max(len(s) for s in labels + [corner])
    cw = max(5, len(str(int(m.max(initial=0)))) + 1)
    out = [f"{corner:<{lw}}" + "".join(f"{j:>{cw}}" for j in range(k)) + "   recall"]
    for i in range(k):
        total = int(m[i].sum())
        rec = f"{100 * m[i, i] / total:6.2f} %" if total else "      -"
        out.append(f"{labels[i]:<{lw}}" + "".join(f"{int(v):>{cw}}" for v in m[i]) + f"  {rec}")
    return "\n".join(out)


def confusion_png(r: EvalResult, path: Path, *, cell: int = 40) -> None:
    """A picture of the row-normalised confusion matrix (darker = larger share of the true
    class), the counts written in each cell; written atomically."""
    k = len(r.class_names)
    m = r.confusion.astype(np.float64)
    share = m / np.maximum(1, m.sum(axis=1, keepdims=True))
    margin = 8 + 7 * min(24, max(len(n) for n in r.class_names))
    size = (margin + k * cell + 8, margin + k * cell + 24)
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    draw.text((4, margin + k * cell + 6), f"{r.model}: {r.data} {r.split}, acc "
              f"{100 * r.accuracy:.2f} %, loss {r.mean_loss:.4f}", fill="black")
    for i in range(k):
        name = r.class_names[i][:24]
        draw.text((4, margin + i * cell + cell // 2 - 5), name, fill="black")
        draw.text((margin + i * cell + 4, margin - 14), str(i), fill="black")
        for j in range(k):
            v = int(255 * (1 - share[i, j]))
            x0, y0 = margin + j * cell, margin + i * cell
            draw.rectangle((x0, y0, x0 + cell - 1, y0 + cell - 1),
                           fill=(v, v, 255) if i != j else (v, 255, v), outline="grey")
            draw.text((x0 + 3, y0 + cell // 2 - 5), str(int(m[i, j])),
                      fill="black" if share[i, j] < 0.6 else "white")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    write_atomic(Path(path), buf.getvalue())


def save_predictions(r: EvalResult, path: Path) -> None:
    """The predicted class of each example, in the split's order, as an int64 .npy (written
    atomically): to compare with another runtime's predictions example by example."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(r.predictions, np.int64))
    write_atomic(Path(path), buf.getvalue())
