"""The `grto` command line: parse, load params, call a stage. Nothing else lives here."""

from __future__ import annotations

import os
from typing import List, Optional

import typer

# Nothing may download at run time: the hub is off unless the user turns it on explicitly.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Train reasoning/referring segmentation (VLM policy + SAM tool) with GRPO, GRTO and B-GRTO.")

PARAMS = typer.Option(None, "--params", help="Params file with one section per stage (default: ./params.yaml, "
                      "else grto's packaged defaults for the embedded default).")
SET = typer.Option(None, "--set", help="Override a param, dotted from the top of params.yaml: --set evaluate.batch_size=8")


def _version(value: bool) -> None:
    if value:
        from grto_cli import __version__

        typer.echo(f"grto {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print grto's version and exit.")):
    """Train reasoning/referring segmentation (VLM policy + SAM tool) with GRPO, GRTO and B-GRTO."""


def _run(stage_fn, *args, **kwargs):
    """Run a stage; known input errors become one clear message and exit code 2, not a traceback."""
    from grto_cli.core.data.records import DataError
    from grto_cli.stages.console import console
    from grto_cli.stages.params import ConfigError

    try:
        return stage_fn(*args, **kwargs)
    except (DataError, ConfigError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


@app.command()
def init(directory: str = typer.Argument(".", help="Project folder (made if absent)."),
         setting: str = typer.Option("synthetic", help="synthetic | refcocog | reasonseg | cod | earthreason"),
         force: bool = typer.Option(False, "--force", help="Replace params.yaml and dvc.yaml if they are there."),
         tool: str = typer.Option("vit_h", help="A real setting's tool: vit_h (SAM ViT-H) | sam2.1_hiera_l "
                                                "(SAM2.1 Hiera-L, grto[sam2]).")):
    """Start a project: params.yaml, dvc.yaml and .gitignore for one setting, git init + dvc init where absent.

    Run again in a project to refresh its record of where grto is installed (.grto/install.yaml)."""
    from grto_cli.stages import init as stage

    _run(stage.run, directory, setting, force, tool)


@app.command()
def prepare(
    dataset: str = typer.Argument(..., help="synthetic, refcoco, refcoco+, refcocog, reasonseg, cod10k, nc4k, earthreason, custom"),
    raw: Optional[str] = typer.Option(None, help="Root of the raw dataset on local disk (real datasets)."),
    out: Optional[str] = typer.Option(None, help="Output directory (default data/prepared/<dataset>)."),
    seed: Optional[int] = typer.Option(None, help="Seed (synthetic)."),
    look: Optional[str] = typer.Option(None, help="synthetic: plain | camo (the same scenes, each shape blended "
                                                  "into its surroundings; default out data/prepared/synthetic-camo)."),
    strict: Optional[bool] = typer.Option(None, "--strict/--no-strict", help="Fail on any skipped item instead of skip-and-count."),
    query_kind: Optional[str] = typer.Option(None, help="reasonseg: short | long | all."),
    keep_empty: Optional[bool] = typer.Option(None, "--keep-empty/--no-keep-empty",
                                              help="earthreason: keep no-target samples (scored by LISA's rule)."),
    params: Optional[str] = PARAMS, set_: Optional[List[str]] = SET,
):
    """Read a dataset from its published on-disk layout into normalised JSONL manifests."""
    from grto_cli.stages import prepare as stage

    _run(stage.run, params, set_, dataset=dataset, raw=raw, out=out, seed=seed, look=look, strict=strict,
         query_kind=query_kind, keep_empty=keep_empty)


@app.command()
def pretrain(out: Optional[str] = typer.Option(None, help="Output checkpoint directory."),
             params: Optional[str] = PARAMS, set_: Optional[List[str]] = SET):
    """Build and train the embedded default's tiny base models (stands in for pretrained checkpoints)."""
    from grto_cli.stages import pretrain as stage

    _run(stage.run, params, set_, out=out)


@app.command()
def evaluate(
    split: Optional[str] = typer.Option(None, help="Split to evaluate (e.g. testA, testB, val, test)."),
    checkpoint: Optional[str] = typer.Option(None, help="System directory with policy/ and tool/."),
    out: Optional[str] = typer.Option(None, help="Metrics JSON path; predictions.jsonl and overlays.png go beside it."),
    data: Optional[str] = typer.Option(None, help="Prepared dataset directory."),
    params: Optional[str] = PARAMS, set_: Optional[List[str]] = SET,
):
    """Run policy -> parse -> tool -> mask on a split and write metrics, predictions and overlays."""
    from grto_cli.stages import evaluate as stage

    _run(stage.run, params, set_, split=split, checkpoint=checkpoint, out=out, data=data)


@app.command()
def bootstrap(out: Optional[str] = typer.Option(None, help="Output directory for the bootstrapped tool."),
              params: Optional[str] = PARAMS, set_: Optional[List[str]] = SET):
    """B-GRTO: sample rollouts of the frozen initial policy once, then pre-train the tool on them."""
    from grto_cli.stages import bootstrap as stage

    _run(stage.run, params, set_, out=out)


@app.command()
def train(method: Optional[str] = typer.Option(None, help="grpo | grto | b-grto"),
          steps: Optional[int] = typer.Option(None, help="RL steps (a finished run continues to this count)."),
          out: Optional[str] = typer.Option(None, help="Output directory for the best-on-val system."),
          fresh: bool = typer.Option(False, "--fresh", help="Start this configuration again: its earlier "
                                     "checkpoints are moved aside (never deleted)."),
          params: Optional[str] = PARAMS, set_: Optional[List[str]] = SET):
    """RL training of the policy (and the tool, for grto / b-grto).

    Each configuration checkpoints into its own directory under train.checkpoints; a killed run
    started again with the same configuration resumes from its last checkpoint.
    """
    from grto_cli.stages import train as stage

    _run(stage.run, params, set_, fresh=fresh, method=method, steps=steps, out=out)


@app.command()
def export(checkpoint: Optional[str] = typer.Option(None, help="System directory with policy/ and tool/."),
           out: Optional[str] = typer.Option(None, help="Bundle directory."),
           params: Optional[str] = PARAMS, set_: Optional[List[str]] = SET):
    """Write a self-contained bundle: policy + processor, SAM state dict and grto.yaml."""
    from grto_cli.stages import export as stage

    _run(stage.run, params, set_, checkpoint=checkpoint, out=out)


@app.command()
def report(out: Optional[str] = typer.Option(None, help="Markdown report to write (plots go to study.plots)."),
           params: Optional[str] = PARAMS, set_: Optional[List[str]] = SET):
    """The method study's report: mean ± std over seeds per method, costs and curves (pipelines/study)."""
    from grto_cli.stages import report as stage

    _run(stage.run, params, set_, out=out)


@app.command()
def predict(bundle: str = typer.Option(..., help="Bundle directory written by `grto export`."),
            image: str = typer.Option(..., help="Image file."),
            query: str = typer.Option(..., help="What to segment."),
            out: str = typer.Option(..., help="Mask PNG to write; the overlay goes beside it."),
            device: str = typer.Option("auto", help="auto | cpu | cuda")):
    """Segment one image from a query, loading nothing but the bundle."""
    from grto_cli.stages import export as stage

    _run(stage.predict, bundle, image, query, out, device)


if __name__ == "__main__":
    app()
