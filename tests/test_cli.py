"""The README's main job and the CLI's help, run as a user would."""

import subprocess
import sys

import pytest

from components.bench.demo import run_demo


def test_demo_runs_real_steps_and_losses_fall():
    result = run_demo(steps=3, log=lambda *_: None)
    assert result.bert_weights_loaded == 29  # embeddings (5) + the demo preset's 2 MiniLM layers x 12 tensors
    first, last = result.losses[0], result.losses[-1]
    assert all(v > 0 for row in result.losses for v in row.values())
    assert last["masked_lm"] < first["masked_lm"]  # three AdamW steps on one batch must fit it a little


@pytest.mark.e2e
def test_vilbert_model_demo_prints_the_three_losses():
    done = subprocess.run(
        [sys.executable, "-m", "components.cli", "model", "demo", "--steps", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "masked_lm" in done.stdout and "masked_region" in done.stdout and "alignment" in done.stdout


def test_every_cli_option_has_help():
    import click
    import typer.main

    from pipelines.cli import app  # the console script: the steps plus `vilbert pipeline`

    def walk(cmd, path):
        for param in cmd.params:
            if isinstance(param, click.Option | click.Argument) and param.name != "help":
                assert getattr(param, "help", None), f"{path} {param.name} has no help text"
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, f"{path} {name}")

    walk(typer.main.get_command(app), "vilbert")


def test_training_and_evaluation_steps_do_not_import_torchvision():
    """torchvision.ops pulls in torch._dynamo: 1.7 s of start-up in every fine-tune and evaluation process of the
    pipeline.  Only feature extraction and RefCOCO+'s IoU need it, and import it where they use it."""
    code = (
        "import sys, components.steps.pretrain, components.steps.finetune, components.steps.evaluate, "
        "components.data.tasks; print('torchvision' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
