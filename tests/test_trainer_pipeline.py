"""The example trainer's config, augmentation and stages, on tiny synthetic datasets (CPU)."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from cpsl_trainer.augment import CropBoxes, box_mask, crop, cutmix_box  # noqa: E402
from cpsl_trainer.cli import main  # noqa: E402
from cpsl_trainer.config import Config, load_config, parse_override, student_init  # noqa: E402
from cpsl_trainer.demo_data import write_demo_datasets  # noqa: E402
from cpsl_trainer.engine import Pipeline  # noqa: E402
from cpsl_trainer.stage_distill import distillation_kl  # noqa: E402
from cpsl_trainer.training import EpochBatches, StopRequested, reverse_cross_entropy  # noqa: E402
from cpsl_trainer.labels import IGNORE_INDEX  # noqa: E402

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "examples" / "configs" / "demo.yaml"


# ----------------------------------------------------------------------------- config


def test_overrides_are_parsed_as_yaml_and_nested():
    assert parse_override("cpsl.optim.lr=0.5") == {"cpsl": {"optim": {"lr": 0.5}}}
    config = load_config(None, ["cpsl.optim.lr=0.5", "data.crop_size=[32, 64]", "model.pretrained=null"])
    assert config.cpsl.optim.lr == 0.5 and config.data.crop_size == [32, 64] and config.model.pretrained is None
    assert config.warmup.optim.lr == Config().warmup.optim.lr  # other sections keep their defaults


def test_config_rejects_unknown_keys_and_round_trips(tmp_path):
    with pytest.raises(KeyError, match="cpsl.itertions"):
        load_config(None, ["cpsl.itertions=3"])
    with pytest.raises(ValueError, match="section.field=value"):
        parse_override("cpsl")
    path = tmp_path / "config.yaml"
    path.write_text(load_config(None, ["cpsl.epsilon=0.01"]).to_yaml())
    assert load_config(path).cpsl.epsilon == 0.01


def test_paper_defaults():
    cpsl = Config().cpsl
    assert (cpsl.temperature, cpsl.epsilon, cpsl.sinkhorn_iters, cpsl.queue_size) == (0.08, 0.05, 3, 65536)
    assert (cpsl.rce_alpha, cpsl.rce_beta, cpsl.consistency_weight, cpsl.self_labeling_weight) == (0.1, 1.0, 5.0, 0.1)
    assert cpsl.optim.lr == 1e-4 and cpsl.optim.head_lr_mult == 5.0 and cpsl.ema_momentum == 0.999


# ----------------------------------------------------------------------------- augmentation


def test_identity_and_flipped_crop_boxes():
    images = torch.rand(2, 3, 8, 12)
    identity = CropBoxes(torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2), torch.tensor([False, True]))
    out = crop(images, identity, (8, 12))
    torch.testing.assert_close(out[0], images[0])
    torch.testing.assert_close(out[1], images[1].flip(-1))


def test_crop_of_labels_is_nearest_and_matches_the_image_crop():
    labels = torch.randint(0, 5, (3, 1, 16, 32))
    boxes = CropBoxes.sample(torch.Generator().manual_seed(0), 3, (16, 32), (8, 16), (1.0, 1.0))
    cropped = crop(labels, boxes, (8, 16))
    assert cropped.dtype == labels.dtype and set(cropped.unique().tolist()) <= set(range(5))
    # At scale 1 the crop is a plain sub-window: compare with slicing.
    for b in range(3):
        top, left = (boxes.boxes[b, :2] * torch.tensor([16, 32])).round().long().tolist()
        window = labels[b, 0, top:top + 8, left:left + 16]
        expected = window.flip(-1) if boxes.flips[b] else window
        assert torch.equal(cropped[b, 0], expected)


def test_official_cutmix_box_covers_half_the_crop_inside_it():
    for seed in range(50):
        box = cutmix_box(torch.Generator().manual_seed(seed))
        top, left, height, width = box[0].tolist()
        assert height * width == pytest.approx(0.5) and 0.5 <= height / width <= 2
        assert 0 <= top and top + height <= 1 and 0 <= left and left + width <= 1
        area = box_mask(box, (256, 256), torch.device("cpu")).float().mean()
        assert area == pytest.approx(0.5, abs=2 / 256)


def test_clipped_cutmix_box_covers_half_the_crop_unless_clipped():
    areas = torch.stack([box_mask(cutmix_box(torch.Generator().manual_seed(s), "clipped"), (64, 64),
                                  torch.device("cpu")).float().mean() for s in range(20)])
    assert (areas <= 0.51).all() and (areas > 0.1).all() and (areas > 0.49).any() and (areas < 0.45).any()
    with pytest.raises(ValueError, match="cutmix_box"):
        cutmix_box(torch.Generator(), "round")


def test_distillation_kl_forms_match_their_definitions():
    student, teacher = torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 4).softmax(1)
    p = student.softmax(1)
    official = (teacher * (teacher.log() - p)).mean()  # what F.kl_div computes when given probabilities
    torch.testing.assert_close(distillation_kl(student, teacher, "official"), official)
    proper = (teacher * (teacher.log() - student.log_softmax(1))).sum(1).mean()
    torch.testing.assert_close(distillation_kl(student, teacher, "proper"), proper)
    with pytest.raises(ValueError, match="distill.kl"):
        distillation_kl(student, teacher, "symmetric")


def test_reverse_cross_entropy_matches_its_definition():
    logits, labels = torch.randn(2, 5, 3, 4), torch.randint(0, 5, (2, 3, 4))
    labels[0, 0, 0] = IGNORE_INDEX
    p = logits.softmax(1).clamp(1e-7, 1)
    one_hot = torch.nn.functional.one_hot(labels.clamp(0, 4), 5).permute(0, 3, 1, 2).float().clamp(1e-4, 1)
    expected = -(p * one_hot.log()).sum(1)[labels != IGNORE_INDEX].mean()
    torch.testing.assert_close(reverse_cross_entropy(logits, labels), expected)


def test_epoch_batches_resume_where_they_stopped():
    def take(sampler, count):
        stream = iter(sampler)
        return [next(stream) for _ in range(count)]

    full = take(EpochBatches(10, 3, seed=5), 8)
    assert sorted(sum(full[:3], []) + full[3][:1]) == list(range(10))  # one epoch is a permutation
    assert take(EpochBatches(10, 3, seed=5, start_batch=5), 3) == full[5:]


# ----------------------------------------------------------------------------- stages


def tiny_config(tmp_path: Path, name: str, *overrides: str) -> Config:
    gta5, cityscapes = write_demo_datasets(tmp_path / "data", (32, 64), 8, 6, 4, seed=1, progress=False)
    return load_config(DEMO_CONFIG, [
        f"data.source_root={gta5}", f"data.target_root={cityscapes}", f"train.output_dir={tmp_path / name}",
        "data.source_size=[32, 64]", "data.target_size=[32, 64]", "data.crop_size=[32, 64]", "data.batch_size=2",
        "warmup.iterations=2", "cpsl.iterations=3", "cpsl.queue_size=64", "cpsl.samples_per_image=16",
        "distill.stages=2", "distill.iterations=2", "distill.student_init=teacher", "train.progress=false",
        "train.checkpoint_every=100", "eval.save_images=2", *overrides,
    ])


def final_weights(config: Config) -> dict:
    return torch.load(Path(config.train.output_dir) / "checkpoints" / "distill2.pt")


def test_every_stage_runs_and_writes_metrics_and_pictures(tmp_path):
    config = tiny_config(tmp_path, "run")
    metrics = Pipeline(config).run()
    output = Path(config.train.output_dir)
    saved = json.loads((output / "metrics.json").read_text())
    assert saved == metrics and list(saved["stages"]) == ["warmup", "cpsl", "distill1", "distill2"]
    assert saved["adapted_stage"] == "distill2" and 0 <= saved["source_only"]["mIoU"] <= 100
    assert {"setting": "warm-up backbone", "here": "random weights", "official": "ImageNet weights"} in \
        saved["recipe_departures"]
    assert len(list((output / "predictions" / "cpsl").glob("*.png"))) == 2
    assert len(list((output / "pseudo_labels" / "warmup").glob("*.png"))) == 2
    summary = torch.load(output / "pseudo" / "warmup" / "summary.pt")
    torch.testing.assert_close(summary["prior"].sum(), torch.tensor(1.0))
    assert (summary["prior"] > 0).all() and summary["prototypes"].shape == (19, 256)


def test_a_resumed_run_ends_exactly_like_an_uninterrupted_one(tmp_path):
    uninterrupted = tiny_config(tmp_path, "straight")
    Pipeline(uninterrupted).run()
    interrupted = tiny_config(tmp_path, "killed")
    with pytest.raises(StopRequested):
        Pipeline(interrupted, stop_after=("cpsl", 2)).run()
    checkpoint = Path(interrupted.train.output_dir) / "checkpoints" / "last.pt"
    assert torch.load(checkpoint)["iteration"] == 2
    with pytest.raises(StopRequested, match="after stage cpsl"):  # a stage's last iteration: stops at its end
        Pipeline(load_config(None, ["train.stop_after=cpsl:3"], base=interrupted)).run(resume=checkpoint)
    assert torch.load(checkpoint)["completed"] == ["warmup", "cpsl"]
    Pipeline(interrupted).run(resume=checkpoint)
    expected, resumed = final_weights(uninterrupted), final_weights(interrupted)
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key


def test_resume_refuses_another_config_and_an_earlier_checkpoint_format(tmp_path):
    config = tiny_config(tmp_path, "run", "distill.stages=0")
    with pytest.raises(StopRequested):
        Pipeline(config, stop_after=("warmup", 1)).run()
    last = Path(config.train.output_dir) / "checkpoints" / "last.pt"
    changed = tiny_config(tmp_path, "run", "distill.stages=0", "cpsl.epsilon=0.1", "data.crop_size=[16, 32]")
    with pytest.raises(ValueError, match=r"another config.*data.crop_size: \[32, 64\] there, \[16, 32\] here; "
                                         r"cpsl.epsilon: 0.05 there, 0.1 here"):
        Pipeline(changed).run(resume=last)
    # What only decides what is shown and written may change; the payload is released once restored.
    shown = tiny_config(tmp_path, "run", "distill.stages=0", "data.num_workers=1", "train.progress=true",
                        "train.log_every=7", "train.checkpoint_every=3", "eval.save_images=1")
    checkpoints = Pipeline(shown).checkpoints
    checkpoints.load(last)
    assert checkpoints.resumed_modules and checkpoints.resume_modules("warmup", {}) == 1 and checkpoints.resumed_modules == {}
    payload = torch.load(last)
    del payload["format"]  # as the trainer wrote it before the global batch and RandAugmentMC
    torch.save(payload, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="earlier version of the trainer"):
        Pipeline(config).run(resume=tmp_path / "old.pt")


class CodeInPickle:
    """Unpickled, it runs ``source``: what a crafted checkpoint could do to a trusting loader."""

    def __init__(self, source: str) -> None:
        self.source = source

    def __reduce__(self):
        return exec, (self.source,)


def test_resume_runs_no_code_from_a_crafted_checkpoint(tmp_path):
    config = tiny_config(tmp_path, "run", "distill.stages=0")
    marker = tmp_path / "code_ran"
    crafted = tmp_path / "last.pt"
    torch.save({"format": 2, "config": CodeInPickle(f"open({str(marker)!r}, 'w').write('ran')")}, crafted)
    with pytest.raises(ValueError, match=f"{crafted}.*only tensors, numbers"):
        Pipeline(config).run(resume=crafted)
    assert not marker.exists()
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")  # readable, but no checkpoint
    with pytest.raises(ValueError, match="tensor.pt is not a checkpoint written by this trainer"):
        Pipeline(config).run(resume=tmp_path / "tensor.pt")


def test_command_line_trains_resumes_evaluates_and_prepares(tmp_path, capsys):
    config = tiny_config(tmp_path, "run", "distill.stages=0")
    path = tmp_path / "config.yaml"
    path.write_text(config.to_yaml())
    output = Path(config.train.output_dir)
    assert main(["--config", str(path), "--resume", "auto"]) == 0  # no last.pt yet: a fresh start
    assert "--resume auto: no " in capsys.readouterr().out
    metrics = json.loads((output / "metrics.json").read_text())
    assert main(["--config", str(path), "--resume", "auto"]) == 0  # every stage done: nothing retrained
    assert json.loads((output / "metrics.json").read_text()) == metrics
    capsys.readouterr()
    assert main(["evaluate", "--config", str(path), "--weights", str(output / "checkpoints" / "cpsl.pt")]) == 0
    printed = capsys.readouterr().out
    assert "== cpsl: target val IoU" in printed
    assert float(printed.strip().splitlines()[-1].split()[-1]) == pytest.approx(metrics["adapted"]["mIoU"], abs=0.01)
    data = Path(config.data.source_root).parent
    assert main(["prepare", "--gta5", str(data / "GTA5"), "--cityscapes", str(data / "cityscapes")]) == 0
    assert main(["prepare", "--gta5", str(tmp_path / "nowhere")]) == 1


@pytest.mark.slow
def test_demo_adaptation_beats_source_only_by_a_clear_margin(tmp_path, capsys):
    # The demo's own data and model with shorter stages (about 4 minutes on 2 cores): CPSL must
    # reduce the synthetic domain shift, or the demo (or the method) is broken.
    output = tmp_path / "demo"
    assert main(["--demo", f"train.output_dir={output}", "train.progress=false",
                 "warmup.iterations=250", "cpsl.iterations=120"]) == 0
    metrics = json.loads((output / "metrics.json").read_text())
    printed = capsys.readouterr().out
    assert "== warmup: target val IoU" in printed and "== cpsl: target val IoU" in printed
    assert metrics["adapted_stage"] == "cpsl"
    assert metrics["mIoU_gain"] == pytest.approx(metrics["adapted"]["mIoU"] - metrics["source_only"]["mIoU"], abs=0.01)
    assert metrics["mIoU_gain"] >= 4.0, metrics


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 not a whole zip"])
def test_a_truncated_or_empty_checkpoint_is_an_error_naming_it(tmp_path, content):
    config = tiny_config(tmp_path, "run")
    checkpoint = tmp_path / "last.pt"
    checkpoint.write_bytes(content)
    with pytest.raises(ValueError, match=r"last\.pt is not a readable torch file"):
        Pipeline(config).run(resume=checkpoint)


def test_a_second_run_on_the_same_output_folder_is_refused(tmp_path):
    from cpsl_trainer.files import OutputLock

    config = tiny_config(tmp_path, "run")
    with OutputLock(Path(config.train.output_dir)):  # as the first run holds it
        with pytest.raises(RuntimeError, match="another trainer process is writing into"):
            Pipeline(config).run()
    with OutputLock(Path(config.train.output_dir)):  # released: a later run may take it
        pass


def test_overrides_may_follow_the_options_and_a_resume_logs_no_iteration_twice(tmp_path):
    config = tiny_config(tmp_path, "run", "distill.stages=0", "train.log_every=1", "cpsl.iterations=4")
    path = tmp_path / "config.yaml"
    path.write_text(config.to_yaml())
    checkpoints = Path(config.train.output_dir) / "checkpoints"
    with pytest.raises(StopRequested):
        Pipeline(config, stop_after=("cpsl", 2)).run()
    shutil.copy(checkpoints / "last.pt", tmp_path / "at2.pt")
    with pytest.raises(StopRequested):  # logs CPSL iteration 3, then stops
        Pipeline(config, stop_after=("cpsl", 3)).run(resume=checkpoints / "last.pt")
    # Back to the checkpoint at 2 (as if the job had died before the one at 3), the override after
    # the options: iteration 3 is logged again, and only once.
    assert main(["--config", str(path), "--resume", str(tmp_path / "at2.pt"), "train.log_every=1"]) == 0
    logged = [(entry["stage"], entry["iteration"]) for entry in
              map(json.loads, (Path(config.train.output_dir) / "log.jsonl").read_text().splitlines())]
    assert len(logged) == len(set(logged)) and logged[-2:] == [("cpsl", 3), ("cpsl", 4)]


def test_warmup_weights_replace_stage_zero_and_students_may_carry_bn_pretrain(tmp_path):
    config = tiny_config(tmp_path, "run", "distill.stages=1", "distill.student_init=pretrained")
    torch.manual_seed(0)
    weights = Pipeline(config).context.new_model().state_dict()
    torch.save(weights, tmp_path / "warm.pt")
    config = load_config(None, [f"warmup.weights={tmp_path / 'warm.pt'}"], base=config)
    metrics = Pipeline(config).run()
    output = Path(config.train.output_dir)
    adopted = torch.load(output / "checkpoints" / "warmup.pt")
    assert all(torch.equal(adopted[name], value) for name, value in weights.items())
    stages = {json.loads(line)["stage"] for line in (output / "log.jsonl").read_text().splitlines()}
    assert stages == {"cpsl", "distill1"} and list(metrics["stages"]) == ["warmup", "cpsl", "distill1"]
    student = torch.load(output / "checkpoints" / "distill1.pt")
    assert "bn_pretrain.weight" in student and "bn_pretrain.weight" not in torch.load(output / "checkpoints" / "cpsl.pt")


def test_warmup_weights_of_another_network_are_refused(tmp_path):
    torch.save({"ResNet101": {"model_state": {"conv1.weight": torch.zeros(1)}}, "iter": 1}, tmp_path / "official.pth")
    config = tiny_config(tmp_path, "run", "distill.stages=0", f"warmup.weights={tmp_path / 'official.pth'}")
    with pytest.raises(ValueError, match="model.backbone=resnet101 and model.layout=official"):
        Pipeline(config).run()
    torch.save({"head.classifier.weight": torch.zeros(1)}, tmp_path / "other.pt")
    config = tiny_config(tmp_path, "again", "distill.stages=0", f"warmup.weights={tmp_path / 'other.pt'}")
    with pytest.raises(ValueError, match=r"other.pt does not match the model: .*1 of another shape"):
        Pipeline(config).run()


def test_each_stage_hands_on_and_reports_its_best_evaluation(tmp_path):
    config = tiny_config(tmp_path, "best", "distill.stages=1", "eval.every=1")
    pipeline = Pipeline(config)
    metrics = pipeline.run()
    assert "best evaluation" in metrics["selection"]
    for stage in metrics["stages"].values():
        selection = stage["selection"]
        assert selection["rule"] == "best" and stage["mIoU"] == selection["best_mIoU"] >= selection["last_mIoU"]
    model = pipeline.context.stage_model("cpsl")
    model.load_state_dict(torch.load(pipeline.checkpoints.selected_weights("cpsl")))  # what distill1 took as its teacher
    assert pipeline.evaluator.evaluate(model, "check", save_images=False)["mIoU"] == metrics["stages"]["cpsl"]["mIoU"]
    last = Pipeline(tiny_config(tmp_path, "last", "distill.stages=0", "eval.every=1", "eval.select=last")).run()
    assert all(stage["mIoU"] == stage["selection"]["last_mIoU"] for stage in last["stages"].values())
    with pytest.raises(ValueError, match="eval.select"):
        Pipeline(tiny_config(tmp_path, "bad", "eval.select=median"))


@pytest.mark.parametrize("override,message", [
    ("data.strong_magnitude=1", "strong_magnitude"), ("data.strong_magnitude=11", "strong_magnitude"),
    ("data.strong_ops=-1", "strong_ops"), ("data.strong_jitter=1.5", "strong_jitter"),
])
def test_strong_view_settings_out_of_range_are_refused_at_the_start(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        Pipeline(tiny_config(tmp_path, "bad", override))


def test_pseudo_labels_are_reused_only_for_the_weights_that_made_them(tmp_path):
    pipeline = Pipeline(tiny_config(tmp_path, "run"))
    torch.manual_seed(0)
    first, second = pipeline.context.new_model().eval(), pipeline.context.new_model().eval()
    directory = pipeline.pseudo_labels.generate(first, "warmup", flip=False, with_prototypes=True)
    files = sorted(directory.glob("*.npy"))
    assert len(files) == len(pipeline.context.target_train) and files[0].name.endswith("_leftImg8bit.npy")
    made = {path: path.stat().st_mtime_ns for path in files}
    pipeline.pseudo_labels.generate(first, "warmup", flip=False, with_prototypes=True)
    assert {path: path.stat().st_mtime_ns for path in files} == made  # the same weights: reused
    before = torch.load(directory / "summary.pt")["prior"]
    pipeline.pseudo_labels.generate(second, "warmup", flip=False, with_prototypes=True)  # a new warm-up
    assert not torch.equal(torch.load(directory / "summary.pt")["prior"], before)
    assert sorted(directory.glob("*.npy")) == files


def test_each_distillation_stage_chooses_how_its_student_starts(tmp_path):
    config = tiny_config(tmp_path, "run", "distill.student_init=[pretrained, teacher]")
    assert [student_init(config, n) for n in (1, 2, 3)] == ["pretrained", "teacher", "teacher"]
    assert Config().distill.student_init == ["pretrained", "teacher"] and Config().distill.bn_pretrain
    for bad in ("distill.student_init=scratch", "distill.student_init=[]"):
        with pytest.raises(ValueError, match="distill.student_init"):
            Pipeline(tiny_config(tmp_path, "bad", bad))


def test_crops_scale_the_long_side_to_the_official_length(tmp_path):
    assert Config().data.scale_long_side == 2200
    pipeline = Pipeline(tiny_config(tmp_path, "run", "data.scale_long_side=256", "data.crop_size=[16, 32]"))
    boxes = pipeline.context.views.crop_boxes(torch.Generator().manual_seed(0), 64, (32, 64)).boxes
    long_side = 32 / boxes[:, 3]  # the rescaled image's width, from the crop's width fraction
    assert (long_side >= 0.75 * 256 - 1e-3).all() and (long_side <= 1.25 * 256 + 1e-3).all()
    assert long_side.max() - long_side.min() > 0.3 * 256


def test_gta5_batches_are_colour_transferred_reproducibly(tmp_path):
    pipeline = Pipeline(tiny_config(tmp_path, "run", "data.colour_transfer=true"))
    plain = Pipeline(tiny_config(tmp_path, "plain"))
    first, again, untouched = (next(p.context.source_batches(3)) for p in (pipeline, pipeline, plain))
    assert first["name"] == untouched["name"] and torch.equal(first["image"], again["image"])
    assert not torch.equal(first["image"], untouched["image"])
    assert torch.equal(first["label"], untouched["label"])


def test_adversarial_warmup_trains_a_discriminator_and_resumes_exactly(tmp_path):
    overrides = ("distill.stages=0", "cpsl.iterations=1", "warmup.iterations=3", "warmup.adversarial=true")
    straight = tiny_config(tmp_path, "straight", *overrides)
    Pipeline(straight).run()
    log = [json.loads(line) for line in (Path(straight.train.output_dir) / "log.jsonl").read_text().splitlines()]
    warmup = [entry for entry in log if entry["stage"] == "warmup"]
    assert warmup and all(entry["loss_adv"] > 0 and entry["loss_D"] > 0 for entry in warmup)
    killed = tiny_config(tmp_path, "killed", *overrides)
    with pytest.raises(StopRequested):
        Pipeline(killed, stop_after=("warmup", 2)).run()
    checkpoint = Path(killed.train.output_dir) / "checkpoints" / "last.pt"
    assert "discriminator" in torch.load(checkpoint)["modules"]
    Pipeline(killed).run(resume=checkpoint)
    expected = torch.load(Path(straight.train.output_dir) / "checkpoints" / "warmup.pt")
    resumed = torch.load(Path(killed.train.output_dir) / "checkpoints" / "warmup.pt")
    assert all(torch.equal(expected[name], resumed[name]) for name in expected)


def test_cutmix_pastes_the_source_losss_own_crop_and_its_labels(tmp_path, monkeypatch):
    # The official step pastes source_x, the crop the source loss saw, and source_label at the
    # quarter grid (nearest, [::4, ::4]), not another crop of the source images.
    from cpsl_trainer.model import DeepLabV2
    from cpsl_trainer.stage_cpsl import CPSLStage

    config = tiny_config(tmp_path, "mix", "distill.stages=0", "cpsl.cutmix_prob=1.0", "data.crop_size=[16, 32]",
                         "data.scale_range=[1.0, 1.25]")
    recording, inputs, targets = [], [], []
    forward, cross_entropy, cpsl_step = DeepLabV2.forward, torch.nn.functional.cross_entropy, CPSLStage.step

    def spy_forward(self, x):
        if recording and torch.is_grad_enabled() and tuple(x.shape[-2:]) == (16, 32):
            inputs.append(x.detach().clone())
        return forward(self, x)

    def spy_cross_entropy(logits, labels, *args, **kwargs):
        if recording:
            targets.append(labels.clone())
        return cross_entropy(logits, labels, *args, **kwargs)

    def spy_step(self, *args):
        recording.append(True)
        try:
            return cpsl_step(self, *args)
        finally:
            recording.clear()

    monkeypatch.setattr(DeepLabV2, "forward", spy_forward)
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", spy_cross_entropy)
    monkeypatch.setattr(CPSLStage, "step", spy_step)
    Pipeline(config).run()
    assert len(inputs) == 3 * config.cpsl.iterations and len(targets) == 2 * config.cpsl.iterations
    for step in range(config.cpsl.iterations):
        source, weak = inputs[3 * step], inputs[3 * step + 1]  # then the strong view
        source_labels, target_labels = targets[2 * step], targets[2 * step + 1]
        pasted = (weak == source).all(1)  # (B, 16, 32): the CutMix box of exactly half the crop
        assert 0.45 <= pasted.float().mean() < 1, step
        quarter = pasted[:, ::4, ::4]
        assert quarter.any()
        assert torch.equal(target_labels[quarter], source_labels[:, ::4, ::4][quarter]), step


def test_adversarial_warmup_uses_the_official_discriminator_on_the_poly_schedule(tmp_path):
    config = tiny_config(tmp_path, "adv", "distill.stages=0", "warmup.iterations=3", "warmup.adversarial=true")
    with pytest.raises(StopRequested):
        Pipeline(config, stop_after=("warmup", 2)).run()
    modules = torch.load(Path(config.train.output_dir) / "checkpoints" / "last.pt")["modules"]
    assert {"conv1.weight", "conv4.weight", "classifier.weight"} <= set(modules["discriminator"])
    assert modules["discriminator"]["conv1.weight"].shape == (64, 19, 3, 3)
    # The last step run was iteration 1 of 3: Adam's rate 1e-4 x (1 - 1/3) ** 0.9, as the network's.
    lr = modules["discriminator_optimizer"]["param_groups"][0]["lr"]
    assert lr == pytest.approx(config.warmup.discriminator_lr * (1 - 1 / 3) ** config.warmup.optim.poly_power)


def test_the_contrastive_term_is_on_without_cutmix_once_the_memory_bank_is_full(tmp_path, monkeypatch):
    # 2 images x 16 samples a step fill the 64-row bank before the last image of step 3.
    from cpsl_trainer import stage_cpsl

    config = tiny_config(tmp_path, "contrast", "distill.stages=0", "cpsl.cutmix_prob=0.0", "train.log_every=1")
    assert config.cpsl.contrastive_weight == 0.001
    calls, contrastive = [], stage_cpsl.supervised_contrastive_loss

    def spy(*args):
        calls.append(contrastive(*args))
        assert calls[-1].requires_grad  # it trains the student's features
        return calls[-1]

    monkeypatch.setattr(stage_cpsl, "supervised_contrastive_loss", spy)
    Pipeline(config).run()
    output = Path(config.train.output_dir)
    log = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    contrast = [entry["loss_contrast"] for entry in log if entry["stage"] == "cpsl"]
    assert len(calls) == 1 and contrast == [0.0, 0.0, pytest.approx(calls[0].item())]
    # Resumed before that step, the bank's labels come back from the checkpoint: the same weights.
    killed = tiny_config(tmp_path, "killed", "distill.stages=0", "cpsl.cutmix_prob=0.0", "train.log_every=1")
    with pytest.raises(StopRequested):
        Pipeline(killed, stop_after=("cpsl", 2)).run()
    checkpoint = Path(killed.train.output_dir) / "checkpoints" / "last.pt"
    assert torch.load(checkpoint)["modules"]["contrastive_labels"]["labels"].shape == (64,)
    Pipeline(killed).run(resume=checkpoint)
    assert len(calls) == 2 and torch.equal(calls[0].detach(), calls[1].detach())
    expected = torch.load(output / "checkpoints" / "cpsl.pt")
    resumed = torch.load(Path(killed.train.output_dir) / "checkpoints" / "cpsl.pt")
    assert all(torch.equal(expected[name], resumed[name]) for name in expected)
