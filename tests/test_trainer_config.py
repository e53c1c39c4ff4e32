"""The trainer's config is checked as a whole before any work: one line per bad key."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from cpsl_trainer.cli import main  # noqa: E402
from cpsl_trainer.config import Config, load_config  # noqa: E402
from cpsl_trainer.config_check import check_config, ConfigError  # noqa: E402
from cpsl_trainer.recipe import departures, recipe_table  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"


def config_of(*overrides: str) -> Config:
    """The defaults with random weights asked for (a training config must name its weights)."""
    return load_config(None, ["model.pretrained=random", *overrides])

# Each override is wrong in one key; the message must name it. Most of these used to surface
# only when the key was first read, hours into a run, as a raw KeyError or ZeroDivisionError,
# or never.
BAD_OVERRIDES = [
    "data.source=gtav", "data.source_size=[32]", "data.target_size=[0, 64]", "data.crop_size=512",
    "data.scale_range=[1.5, 0.5]", "data.scale_range=[0, 1]", "data.scale_long_side=0", "data.batch_size=0",
    "data.batch_size=2.5", "data.num_workers=-1", "data.protocol=cityscapes16", "data.colour_transfer=maybe",
    "data.strong_magnitude=11", "data.strong_jitter=1.5",
    "model.backbone=resnet152", "model.feat_dim=100", "model.dilations=[]", "model.dropout=1",
    "model.layout=Official", "warmup.iterations=0", "warmup.optim.lr=0", "warmup.optim.momentum=1",
    "warmup.discriminator_lr=-1", "cpsl.iterations=0", "cpsl.temperature=-1", "cpsl.epsilon=0",
    "cpsl.epsilon=.inf", "cpsl.sinkhorn_iters=0", "cpsl.queue_size=-1", "cpsl.samples_per_image=0",
    "cpsl.ema_momentum=1.5", "cpsl.rectify_threshold=2", "cpsl.cutmix_prob=-0.1", "cpsl.cutmix_box=square",
    "cpsl.prototype_min_pixels=0", "cpsl.optim.weight_decay=.nan", "distill.stages=-1", "distill.iterations=0",
    "distill.confidence=1.5", "distill.kl=Official", "distill.student_init=scratch", "distill.student_init=[]",
    "eval.every=-1", "eval.select=median", "eval.mode=Whole", "eval.window=[512]", "eval.save_images=-1",
    "train.seed=-1", "train.device=tpu", "train.amp=fp8", "train.log_every=0", "train.checkpoint_every=0",
    "train.progress=1", "train.stop_after=cpsl", "train.stop_after=500",
]


@pytest.mark.parametrize("override", BAD_OVERRIDES)
def test_each_bad_value_is_refused_naming_its_key(override):
    with pytest.raises(ConfigError) as raised:
        check_config(config_of(override))
    key = override.split("=")[0]
    assert raised.value.problems and all(problem.startswith(key) for problem in raised.value.problems), \
        raised.value.problems


def test_every_bad_key_is_reported_at_once_one_line_each():
    overrides = ["eval.mode=Whole", "cpsl.temperature=-1", "distill.kl=Official", "train.amp=fp8",
                 "train.log_every=0", "data.batch_size=2.5"]
    with pytest.raises(ConfigError) as raised:
        check_config(config_of(*overrides))
    assert sorted(problem.split("=")[0] for problem in raised.value.problems) == \
        sorted(override.split("=")[0] for override in overrides)
    assert "must be one of whole, slide" in str(raised.value) and "must be one of none, bf16, fp16" in str(raised.value)


def test_numbers_take_their_declared_types():
    # YAML 1.1 reads 1e-4 (no dot) as text, and 1 as an int where a float is declared.
    config = check_config(config_of("cpsl.optim.lr=1e-4", "cpsl.temperature=1"))
    assert config.cpsl.optim.lr == 1e-4 and type(config.cpsl.temperature) is float
    assert check_config(config_of()) == config_of()


@pytest.mark.parametrize("stop_after,message", [
    ("distill3:5", "this run's stages are warmup, cpsl, distill1, distill2"),
    ("cpsl:0", "stage cpsl has iterations 1..90000"), ("warmup:20001", "stage warmup has iterations 1..20000"),
])
def test_stop_after_must_name_an_iteration_of_a_stage_of_the_run(stop_after, message):
    with pytest.raises(ConfigError, match=message):
        check_config(config_of(f"train.stop_after={stop_after}"))
    check_config(config_of("train.stop_after=cpsl:90000"))  # the last one: stops after the stage
    with pytest.raises(ConfigError, match="takes no iterations"):
        check_config(config_of("train.stop_after=warmup:5", f"warmup.weights={__file__}"))


def test_weights_files_must_exist_where_the_run_reads_them(tmp_path):
    missing = str(tmp_path / "missing.pth")
    with pytest.raises(ConfigError, match="distill.pretrained='.*missing.pth': no such file"):
        check_config(load_config(None, [f"distill.pretrained={missing}"]))
    with pytest.raises(ConfigError, match="model.pretrained=.*: no such file"):
        check_config(load_config(None, [f"model.pretrained={missing}"]))
    with pytest.raises(ConfigError, match="warmup.weights=.*: no such file"):
        check_config(load_config(None, [f"warmup.weights={missing}"]))
    # Files the run does not read are not asked for: students from their teachers, a given warm-up.
    check_config(config_of(f"distill.pretrained={missing}", "distill.student_init=teacher"))
    check_config(load_config(None, [f"model.pretrained={missing}", f"warmup.weights={__file__}",
                                    "distill.student_init=teacher"]))


def test_synthia_needs_its_own_protocol():
    with pytest.raises(ConfigError, match="use synthia16"):
        check_config(config_of("data.source=synthia"))


@pytest.mark.parametrize("name", ["gta5_to_cityscapes", "synthia_to_cityscapes"])
def test_the_recipe_configs_pass_given_their_files_and_follow_the_recipe(tmp_path, name):
    with pytest.raises(ConfigError) as raised:  # the weights are the user's to download
        check_config(load_config(CONFIGS / f"{name}.yaml"))
    assert raised.value.problems == ["model.pretrained='pretrained/resnet101-63fe2227.pth': no such file",
                                     "distill.pretrained='pretrained/r101_1x_sk0.pth': no such file"]
    for file in ("resnet101-63fe2227.pth", "r101_1x_sk0.pth", "warmup.pth"):
        (tmp_path / file).touch()
    given = [f"model.pretrained={tmp_path / 'resnet101-63fe2227.pth'}", f"distill.pretrained={tmp_path / 'r101_1x_sk0.pth'}"]
    config = check_config(load_config(CONFIGS / f"{name}.yaml", given))
    assert departures(config) == []  # the adversarial warm-up, trained as the released one was
    assert departures(load_config(None, [f"warmup.weights={tmp_path / 'warmup.pth'}"], base=config)) == []
    assert check_config(load_config(CONFIGS / "demo.yaml")).model.pretrained == "random"


def test_the_recipe_check_names_every_departure():
    config = config_of("distill.student_init=teacher", "train.amp=bf16", "cpsl.optim.official_step=false",
                       "data.batch_size=2", "warmup.adversarial=false")
    rows = {row["setting"]: (row["here"], row["official"]) for row in departures(config)}
    assert rows == {
        "warm-up": ("trained on the source only",
                    "the released warm-up (41.4 mIoU), trained with an output-space adversarial loss"),
        "warm-up backbone": ("random weights", "ImageNet weights"),
        "distill1 student": ("its teacher's weights", "SimCLRv2 r101_1x_sk0 weights"),
        "data.batch_size": (2, 4), "cpsl.optim.official_step": (False, True), "train.amp": ("bf16", "none"),
    }
    table = recipe_table(departures(config))
    assert table.startswith("recipe check: 6 departures") and "train.amp" in table and "bf16 → none" in table
    students = departures(config_of("distill.student_init=pretrained", "distill.stages=3", "warmup.adversarial=true",
                                    f"model.pretrained={__file__}"))
    assert students == [
        {"setting": "distill1 student", "here": f"model.pretrained ({__file__})", "official": "SimCLRv2 r101_1x_sk0 weights"},
        {"setting": "distill2 student", "here": f"model.pretrained ({__file__})", "official": "its teacher's weights"},
        {"setting": "distill3 student", "here": f"model.pretrained ({__file__})", "official": "its teacher's weights"},
        {"setting": "distill.stages", "here": 3, "official": 2},
    ]


def test_random_weights_are_taken_only_when_asked_for_by_name():
    with pytest.raises(ConfigError) as raised:
        check_config(load_config(None, []))
    assert raised.value.problems == ["model.pretrained=None: the network would start from random weights; name its "
                                     "weights file, or 'random' to ask for random weights"]
    check_config(load_config(None, []), training=False)  # evaluating or exporting trains no network
    with pytest.raises(ConfigError, match="model.pretrained=None"):  # the students would start from it
        check_config(load_config(None, [f"warmup.weights={__file__}"]))
    check_config(load_config(None, [f"warmup.weights={__file__}", "distill.student_init=teacher"]))
    check_config(load_config(None, [f"warmup.weights={__file__}", "distill.pretrained=random"]))


@pytest.mark.parametrize("override", ["distill.kl=Official", "eval.mode=Whole", "warmup.iterations=0",
                                      "distill.pretrained=/missing.pth", "train.stop_after=distill9:1"])
def test_the_command_line_refuses_a_bad_config_before_writing_anything(tmp_path, override):
    output = tmp_path / "run"
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        main(["--demo", f"train.output_dir={output}", "distill.stages=1", "distill.student_init=pretrained",
              override])
    assert not output.exists()  # not even the demo data
