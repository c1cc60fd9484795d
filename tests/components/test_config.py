"""The configuration plane (components/config.py): step configs built from mappings, files, ``--set`` and
generated options, and one set of defaults for the command line, ``dvc repro`` and the Kubeflow pipeline."""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from components import config as cfg
from components.cli import app
from components.commands.config_options import TRAINER_RENAMES, config_command, from_options
from components.commands.finetune import finetune_command as FINETUNE
from components.commands.pretrain import pretrain_command as PRETRAIN
from components.steps.finetune import FinetuneConfig
from components.steps.pretrain import PretrainConfig
from components.training.config import TrainerConfig

ROOT = Path(__file__).resolve().parents[2]
PATHS = {"dataset": "data/world", "validation": "data/validation", "features": "data/features"}


def parse(step: str, args: list[str]):
    """The config a `vilbert <step> ARGS` command line builds (parsed by the real Typer command, not run)."""
    group = typer.main.get_command(app)
    command = group.commands[step]  # type: ignore[attr-defined]
    ctx = command.make_context(step, list(args))
    generated = command.callback.__wrapped__  # Typer wraps the generated function (functools.wraps)
    return from_options(generated.config_class, generated.options, ctx.params)


def test_a_step_config_round_trips_through_plain_values() -> None:
    config = cfg.load(PretrainConfig, PATHS, {"trainer": {"output_dir": "out", "lr_multipliers": [["a.", 2]]}})
    assert cfg.build(PretrainConfig, json.loads(cfg.dumps(config))) == config
    tuned = cfg.load(FinetuneConfig, PATHS, {"task": "vqa", "head_lr_mult": 30, "trainer": {"output_dir": "o"}})
    assert cfg.build(FinetuneConfig, cfg.to_mapping(tuned)) == tuned
    assert tuned.trainer.lr == 4e-5 and tuned.trainer.epochs == 3.0 and tuned.trainer.keep_last == 2  # step defaults


def test_step_defaults_and_the_epochs_rule() -> None:
    base = {**PATHS, "trainer": {"output_dir": "o"}}
    assert cfg.load(PretrainConfig, base).trainer.epochs == 1.0
    steps_only = cfg.load(PretrainConfig, base, {"trainer": {"max_steps": 5}})
    assert steps_only.trainer.epochs is None and steps_only.trainer.max_steps == 5
    both = cfg.load(PretrainConfig, base, {"trainer": {"max_steps": 5, "epochs": 2}})
    assert both.trainer.epochs == 2.0 and isinstance(both.trainer.epochs, float)


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        ({"trainer": {"output_dir": "o", "lrr": 1}}, r"unknown key trainer\.lrr \(did you mean lr\?\)"),
        ({"trainer": {"output_dir": "o", "lr": "fast"}}, "trainer.lr must be float"),
        ({"trainer": {"output_dir": "o", "batch_size": 2.5}}, "trainer.batch_size must be int"),
        ({"trainer": {"output_dir": "o", "lr": -1}}, "lr must be positive"),
        ({"trainer": {"output_dir": "o"}, "data": {"masked_pairs": "some"}}, "masked_pairs must be one of"),
        ({"trainer": {}}, "trainer.output_dir is required"),
        ({"trainer": {"output_dir": "o"}, "preset": "huge"}, "unknown preset"),
        ({"trainer": "fast"}, "trainer must be a mapping"),
    ],
)
def test_bad_settings_are_named_by_their_dotted_key(layer, message) -> None:
    with pytest.raises(cfg.ConfigError, match=message):
        cfg.load(PretrainConfig, PATHS, layer)


def test_one_task_gets_its_own_settings_and_later_layers_still_win() -> None:
    file = {"trainer": {"max_steps": 300, "lr": 1e-4}, "by_task": {"vqa": {"trainer": {"max_steps": 600}}}}
    base = {**PATHS, "trainer": {"output_dir": "o"}}
    vqa = cfg.load(FinetuneConfig, base, file, {"task": "vqa"})
    vcr = cfg.load(FinetuneConfig, base, file, {"task": "vcr"})
    assert (vqa.trainer.max_steps, vqa.trainer.lr, vcr.trainer.max_steps) == (600, 1e-4, 300)
    flag = cfg.load(FinetuneConfig, base, file, {"task": "vqa", "trainer": {"max_steps": 50}})
    assert flag.trainer.max_steps == 50  # an option given on the command line beats the file's by_task
    assert cfg.assignments(FinetuneConfig, ["by_task.vqa.trainer.max_steps=9"]) == {
        "by_task": {"vqa": {"trainer": {"max_steps": 9}}}}  # fmt: skip
    with pytest.raises(cfg.ConfigError, match="by_task names unknown task vqaa"):
        cfg.load(FinetuneConfig, base, {"by_task": {"vqaa": {}}}, {"task": "vqa"})
    with pytest.raises(cfg.ConfigError, match="unknown key trainer.nope"):
        cfg.load(FinetuneConfig, base, {"by_task": {"vqa": {"trainer": {"nope": 1}}}}, {"task": "vqa"})


def test_assignments_are_read_as_their_fields_type() -> None:
    got = cfg.assignments(PretrainConfig, ["trainer.lr=3e-4", "trainer.max_steps=null", "trainer.bf16=false",
                                           "data.masked_pairs=all", "trainer.adam_betas=[0.9, 0.98]"])  # fmt: skip
    assert got == {"trainer": {"lr": 3e-4, "max_steps": None, "bf16": False, "adam_betas": [0.9, 0.98]},
                   "data": {"masked_pairs": "all"}}  # fmt: skip
    for bad, message in [("trainer.lr", "key=value"), ("trainer.nope=1", "no field 'nope'"),
                         ("trainer.batch_size=many", "not a valid int"), ("trainer.lr=null", "must not be null")]:  # fmt: skip
        with pytest.raises(cfg.ConfigError, match=message):
            cfg.assignments(PretrainConfig, [bad])


def test_every_trainer_field_has_an_option_on_both_training_commands() -> None:
    scalars = {leaf.key for leaf in cfg.leaves(PretrainConfig) if leaf.key.startswith("trainer.")}
    assert {f"trainer.{f.name}" for f in dataclasses.fields(TrainerConfig)} - scalars == {
        "trainer.lr_multipliers", "trainer.adam_betas", "trainer.freeze"}  # tuples: --set only  # fmt: skip
    for command in (PRETRAIN, FINETUNE):
        covered = {key for keys in command.options.values() for key in keys}
        assert scalars <= covered
    assert PRETRAIN.options["seed"] == ("trainer.seed", "data.seed")
    assert PRETRAIN.options["output"] == ("trainer.output_dir",) and FINETUNE.options["threads"] == (
        "trainer.cpu_threads",
    )


@dataclasses.dataclass(frozen=True)
class NewTrainer(TrainerConfig):
    ema_decay: float = 0.0
    """Exponential moving average of the weights (0: none)."""


@dataclasses.dataclass(frozen=True)
class NewStep:
    trainer: NewTrainer
    """How to train."""


def test_a_new_field_is_one_declaration(tmp_path: Path) -> None:
    """What adding a hyperparameter costs: a field.  Its option, --set, the file and the help follow."""
    seen: list[NewStep] = []
    command = config_command(NewStep, seen.append, doc="A step.", renames=TRAINER_RENAMES)
    sub = typer.Typer()
    sub.command("step")(command)
    sub.command("other")(lambda: None)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"trainer": {"ema_decay": 0.5, "epochs": 1}}))
    runner = CliRunner()
    result = runner.invoke(sub, ["step", "--output", str(tmp_path), "--config", str(tmp_path / "params.yaml")])
    assert result.exit_code == 0, result.output
    assert seen[-1].trainer.ema_decay == 0.5
    result = runner.invoke(sub, ["step", "--output", "o", "--epochs", "1", "--ema-decay", "0.9"])
    assert result.exit_code == 0 and seen[-1].trainer.ema_decay == 0.9
    result = runner.invoke(sub, ["step", "--output", "o", "--epochs", "1", "--set", "trainer.ema_decay=0.25"])
    assert result.exit_code == 0 and seen[-1].trainer.ema_decay == 0.25
    assert "Exponential moving average" in runner.invoke(sub, ["step", "--help"], env={"COLUMNS": "200"}).output


def test_precedence_is_defaults_then_file_then_set_then_options(tmp_path: Path) -> None:
    settings = tmp_path / "params.yaml"
    settings.write_text(yaml.safe_dump({"model": {"preset": "tiny"}, "pretrain": {"trainer": {"lr": 1e-3,
                                        "batch_size": 8, "log_every": 3}}}))  # fmt: skip
    base = ["--dataset", "d", "--features", "f", "--output", "o", "--config", str(settings)]
    config = parse(
        "pretrain", [*base, "--set", "trainer.lr=2e-3", "--set", "trainer.batch_size=4", "--batch-size", "2"]
    )
    assert (config.preset, config.trainer.lr, config.trainer.batch_size, config.trainer.log_every) == (
        "tiny",
        2e-3,
        2,
        3,
    )
    only = parse("pretrain", [*base, "--section", "pretrain"])
    assert only.preset == "demo" and only.trainer.lr == 1e-3
    result = CliRunner().invoke(app, ["pretrain", *base, "--set", "trainer.lr=fast"])
    assert result.exit_code == 2 and "trainer.lr='fast': not a valid float" in result.output
    result = CliRunner().invoke(app, ["pretrain", *base, "--section", "nope"])
    assert result.exit_code == 2 and "has no section nope" in result.output


def _dvc_args(stage: str, item: dict[str, str] | None = None) -> list[str]:
    """A dvc.yaml stage's command line after DVC's interpolation (params.yaml and the matrix item)."""
    import re

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    cmd = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["cmd"]

    def value(match: re.Match[str]) -> str:
        group, _, key = match.group(1).partition(".")
        return str((item or {})[key] if group == "item" else params[group][key])

    args = shlex.split(re.sub(r"\$\{([^}]+)\}", value, cmd))
    assert args[0] == "vilbert"
    return args[2:]


def test_cli_dvc_and_kubeflow_build_the_same_training_configs(tmp_path: Path) -> None:
    """params.yaml is the one default: what `dvc repro` runs, what the compiled Kubeflow pipeline runs by default,
    and what the PyTorchJob's workers read back from the step's JSON file are the same config objects."""
    from pipelines.launchers import finetune_config, job_config, pretrain_command, pretrain_config

    compiled = next(yaml.safe_load_all((ROOT / "pipelines" / "full.yaml").read_text()))
    kfp = {k: v["defaultValue"] for k, v in compiled["root"]["inputDefinitions"]["parameters"].items()}
    experiment = kfp["experiment"]

    dvc_pretrain = parse("pretrain", _dvc_args("pretrain"))
    kfp_pretrain = pretrain_config(json.loads(kfp["pretrain"]), PATHS, "runs/pretrain", experiment)
    cli_pretrain = parse("pretrain", ["--config", str(ROOT / "params.yaml"), *sum(([f"--{k}", v] for k, v in
                         PATHS.items()), []), "--output", "runs/pretrain", "--no-progress"])  # fmt: skip
    assert dvc_pretrain == kfp_pretrain == cli_pretrain
    assert dvc_pretrain.trainer.epochs == 30.0 and dvc_pretrain.data.masked_pairs == "matched"

    for init, stage, blind in (("scratch", "finetune-scratch", False), ("pretrained", "finetune-pretrained", False),
                               ("scratch", "finetune-blind", True)):  # fmt: skip
        dvc_tuned = parse("finetune", _dvc_args(stage, {"task": "vqa", "seed": "0"}))
        out = f"runs/finetune/vqa-{stage.split('-')[1]}-s0"
        paths = {**PATHS, "pretrained": "runs/pretrain"} if init == "pretrained" else PATHS
        kfp_tuned = finetune_config(json.loads(kfp["finetune"]), paths, "vqa", init, blind, out, experiment)
        if init != "pretrained":  # the pipeline hands every op its pretrained artifact; scratch ignores it
            kfp_tuned = dataclasses.replace(kfp_tuned, pretrained=None)
        assert dvc_tuned == kfp_tuned, stage
        assert dvc_tuned.trainer.max_steps == 600 and dvc_tuned.head_lr_mult == 30.0  # VQA: params' by_task
        vcr = parse("finetune", _dvc_args(stage, {"task": "vcr", "seed": "0"}))
        kfp_vcr = finetune_config(json.loads(kfp["finetune"]), paths, "vcr", init, blind, out.replace("vqa", "vcr"),
                                  experiment)  # fmt: skip
        if init != "pretrained":
            kfp_vcr = dataclasses.replace(kfp_vcr, pretrained=None)
        assert vcr == kfp_vcr and vcr.trainer.max_steps == 300, stage

    from pipelines.launchers import evaluate_config

    for stage, zero_shot, model in (("evaluate", False, "runs/finetune/vqa-scratch-s0"),
                                    ("evaluate-zero-shot", True, "runs/pretrain")):  # fmt: skip
        dvc_eval = parse("evaluate", _dvc_args(stage, {"task": "vqa", "init": "scratch", "seed": "0"}))
        out = "runs/evaluate/" + ("retrieval-zero-shot" if zero_shot else "vqa-scratch-s0")
        paths = {**PATHS, "model": model, "output": out}
        kfp_eval = evaluate_config(json.loads(kfp["evaluate"]), paths, zero_shot, experiment)
        # dvc's evaluate reads the data folders from the model's step.json; the pipeline passes its artifacts
        assert dataclasses.replace(kfp_eval, dataset=None, validation=None, features=None) == dvc_eval, stage

    # the PyTorchJob: its config file, read back by `vilbert pretrain --config`, is the step's config
    uris = {"dataset": "s3://b/world", "validation": "s3://b/validation", "features": "minio://b/features"}
    job = job_config(json.loads(kfp["pretrain"]), uris, str(tmp_path / "shared"), 4, experiment)
    (tmp_path / "config.json").write_text(cfg.dumps(job))
    args = pretrain_command(str(tmp_path / "config.json"))
    assert parse("pretrain", args[2:]) == job and job.nproc == 4 and job.features == "s3://b/features"
