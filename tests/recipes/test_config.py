import dataclasses
import pkgutil
import re

import pytest

import recipes.configs
from recipes.config import Config, ConfigError, load_config, override, validate
from recipes.run import main, run


@dataclasses.dataclass
class ToySection:
    sizes: tuple[int, ...] = (1, 2)
    rate: float | None = None
    label: str = "a"


def test_overrides_parse_by_field_type():
    config = load_config(
        "resnet18_digits",
        [
            "train.steps=7",
            "optim.lr=0.5",
            "optim.nesterov=true",
            "optim.grad_clip=none",
            "optim.grad_clip=2",
            "model.name=efficientnet_b0",
            "data.data_dir=/data/tfds",
        ],
    )
    assert config.train.steps == 7 and config.optim.lr == 0.5 and config.optim.nesterov is True
    assert config.optim.grad_clip == 2 and config.model.name == "efficientnet_b0"
    assert config.data.data_dir == "/data/tfds"
    assert load_config("resnet18_digits").train.steps != 7  # overrides never mutate


def test_factorize_overrides_parse_by_field_type():
    config = load_config(
        "digits_demo",
        ["factorize.frobenius_decay=5e-4", "factorize.rank=stable", "factorize.warmup_steps=50"],
    )
    f = config.factorize
    assert (f.frobenius_decay, f.rank, f.warmup_steps) == (5e-4, "stable", 50)
    assert load_config("digits_demo", ["factorize.rank=16"]).factorize.rank == 16
    assert load_config("digits_demo", ["factorize.rank=0.5"]).factorize.rank == 0.5
    off = load_config("digits_demo", ["factorize.frobenius_decay=none"])
    assert off.factorize.frobenius_decay is None


def test_task_specific_sections_are_read_from_the_instance():
    config = Config(name="toy", model=ToySection())
    config = override(override(config, "model.sizes=3, 4,5"), "model.rate=0.25")
    assert config.model.sizes == (3, 4, 5) and config.model.rate == 0.25
    assert validate(config) is config


@pytest.mark.parametrize(
    "assignment, message",
    [
        (
            "train.stepz=3",
            "unknown config key 'train.stepz'. Did you mean 'train.steps'? Valid keys under 'train': steps,",
        ),
        ("trian.steps=3", "unknown config key 'trian.steps'. Did you mean 'train'?"),
        ("train.steps=ten", "train.steps='ten' cannot be read as int."),
        ("optim.nesterov=maybe", "optim.nesterov='maybe' cannot be read as bool."),
        (
            "model.name=vgg",
            "model.name='vgg' cannot be read as 'resnet18' | 'resnet34' | 'resnet50' | 'efficientnet_b0'.",
        ),
        ("optim.grad_clip=big", "optim.grad_clip='big' cannot be read as float | None."),
        ("train=3", "config key 'train' is a section; set one of its keys: train.steps,"),
        ("train.steps.max=3", "config key 'train.steps' is a value, not a section"),
        ("train.steps", "override 'train.steps' is not of the form key=value"),
        ("train.steps=-1", "train.steps=-1 must be positive."),
        ("train.seed=-1", "train.seed=-1 must not be negative."),
        ("train.steps=0", "train.steps=0 must be positive."),
        ("data.batch_size=0", "data.batch_size=0 must be positive."),
        ("optim.lr=nan", "optim.lr=nan must be a finite number."),
        ("optim.lr=inf", "optim.lr=inf must be a finite number."),
        ("optim.lr=-1", "optim.lr=-1.0 must be positive."),
        ("optim.lr=0", "optim.lr=0.0 must be positive."),
        ("optim.grad_clip=-1", "optim.grad_clip=-1.0 must be positive."),
        ("optim.grad_clip=nan", "optim.grad_clip=nan must be a finite number."),
        ("optim.momentum=1", "optim.momentum=1.0 must be in [0, 1)."),
        ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1 must be >= 0."),
        ("model.width=0", "model.width=0 must be positive."),
        ("model.dropout=1.5", "model.dropout=1.5 must be in [0, 1)."),
        ("data.image_size=0", "data.image_size=0 must be positive."),
        ("train.keep_checkpoints=0", "train.keep_checkpoints=0 must be positive."),
        ("factorize.frobenius_decay=-1", "factorize.frobenius_decay=-1.0 must be >= 0."),
        ("factorize.rank=nan", "factorize.rank=nan must be a finite number."),
        (
            "factorize.warmup=3",
            "unknown config key 'factorize.warmup'. Did you mean 'factorize.warmup_steps'?",
        ),
        ("factorize.calibration=some", "factorize.calibration='some' cannot be read as int."),
    ],
)
def test_bad_overrides_name_the_key(assignment, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("resnet18_digits", [assignment])


def test_text_sections_are_bounded_too():
    with pytest.raises(ConfigError, match=re.escape("model.d_model=0 must be positive.")):
        load_config("shakespeare_teacher", ["model.d_model=0"])
    with pytest.raises(ConfigError, match=re.escape("model.params=1.5 must be in (0, 1].")):
        load_config("shakespeare_student", ["model.params=1.5"])
    with pytest.raises(ConfigError, match=re.escape("distill.alpha=nan must be a finite number.")):
        load_config("shakespeare_student", ["distill.alpha=nan"])


def test_configs_written_with_wrong_types_are_rejected(tmp_path):
    path = tmp_path / "typo.py"
    path.write_text(
        "from recipes.config import Config, TrainConfig\n"
        "def config():\n    return Config(name='typo', train=TrainConfig(steps='100'))\n"
    )
    with pytest.raises(ConfigError, match=r"train\.steps='100' has type str; expected int\."):
        load_config(str(path))
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(ConfigError, match="defines no config\\(\\) function"):
        load_config(str(tmp_path / "empty.py"))
    with pytest.raises(ConfigError, match="config file '.*missing.py' does not exist"):
        load_config(str(tmp_path / "missing.py"))
    with pytest.raises(ConfigError, match="unknown config 'nope'; available: .*resnet18_digits"):
        load_config("nope")


def test_every_shipped_config_validates():
    names = [m.name for m in pkgutil.iter_modules(recipes.configs.__path__)]
    assert "resnet18_digits" in names
    for name in names:
        assert load_config(name).name == name


def test_command_line_errors_come_before_any_compute(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["resnet18_digits", "--set", "train.steps=5", "optim.lrr=1"])
    assert exit.value.code == 2
    assert (
        "error: unknown config key 'optim.lrr'. Did you mean 'optim.lr'?" in capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        main(["resnet18_digits", "--set", "train.steps=5"])  # warm-up of 20 steps
    assert "optim.warmup_steps=20 exceeds train.steps=5" in capsys.readouterr().err
    with pytest.raises(
        ConfigError, match="task='translate' is unknown; available: image_classification"
    ):
        run(dataclasses.replace(load_config("resnet18_digits"), task="translate"))
