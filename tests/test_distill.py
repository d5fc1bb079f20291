"""Few-step students: the distillation losses learn what they should (tiny teachers, fixed batches), and the
`distill` command makes a model folder that every tool runs at its own steps, or says what is wrong and writes
nothing."""

import contextlib
import copy
import json
import os

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, LCMScheduler
from huggingface_hub import ModelCard
from test_convert import TINY_ORIGINAL_ENCODER, TINY_ORIGINAL_UNET

from diffused_heads import distill, make_dataset, runtime
from diffused_heads.cards import model_card
from diffused_heads.distillation import (
    Conditioning,
    DistillationSettings,
    batch_losses,
    consistency_losses,
    ddim_step,
    default_student_timesteps,
    direct_losses,
    lip_weighted_mse,
    roll_out,
    sample_frames,
    student_scheduler,
    teacher_grid,
)
from diffused_heads.hub.convert_checkpoint import convert
from diffused_heads.hub.pipeline_diffused_heads import DiffusedHeadsPipeline, to_motion_frame
from diffused_heads.training import NoiseSchedule

from helpers import tiny_pipeline
from original_model import scripted_audio_encoder, traced_unet

TEACHER_STEPS, STUDENT_STEPS = 10, 2


def v_teacher(seed=0):
    """A tiny teacher as the built-in model is: v-prediction, DDPM with the posterior variance, 10 steps."""
    pipe = tiny_pipeline(seed)
    pipe.scheduler = DDPMScheduler.from_config(
        pipe.scheduler.config, prediction_type="v_prediction", variance_type="fixed_small"
    )
    pipe.register_to_config(num_inference_steps=TEACHER_STEPS, stabilize_every=1)
    return pipe


def conditioning(batch=4, seed=0):
    """Fixed conditioning of a batch: smooth random identity and motion frames, random audio windows."""
    g = torch.Generator().manual_seed(seed)
    smooth = lambda: torch.nn.functional.interpolate(torch.rand(batch, 3, 4, 4, generator=g) * 2 - 1, size=16)  # noqa
    identity = smooth()
    motion = torch.cat([identity, smooth()], dim=1)
    audio = torch.randn(batch, 5, 8, generator=g)
    return Conditioning(identity, motion, audio)


def mean_frames(unet, scheduler, steps, cond, seeds=6):
    return torch.stack(
        [sample_frames(unet, scheduler, steps, cond, torch.Generator().manual_seed(s)) for s in range(seeds)]
    ).mean(0)


def student_of(teacher):
    student = type(teacher.unet).from_config(teacher.unet.config)
    student.load_state_dict(teacher.unet.state_dict())
    return student.train()


def teacher_draws(teacher, cond, count=8):
    """The teacher's own sampler (10 steps) `count` times on the same conditioning."""
    return [
        sample_frames(teacher.unet, teacher.scheduler, TEACHER_STEPS, cond, torch.Generator().manual_seed(s)).clamp(
            -1, 1
        )
        for s in range(count)
    ]


def distil(teacher, method, draws, steps, fixed=False, wrong_target=False):
    """Train a student on fixed conditioning with one method's losses, against the teacher's `draws` in turn
    (with the same noise for each draw when `fixed`, else new noise at every step); return it, its sampler, and
    the losses of every step."""
    cond = conditioning()
    schedule = NoiseSchedule(teacher.scheduler)
    sampler = student_scheduler(teacher.scheduler.config, TEACHER_STEPS)
    sampler.set_timesteps(STUDENT_STEPS)
    student = student_of(teacher)
    target_network = copy.deepcopy(student).requires_grad_(False)  # the EMA of the student, for consistency
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
    history = []
    for step in range(steps):
        g = torch.Generator().manual_seed(1000 + (step % len(draws) if fixed else step))
        target = draws[step % len(draws)]
        if method == "direct":
            if wrong_target:  # the noise instead of the teacher's frame
                target = torch.randn(target.shape, generator=g)
            losses = direct_losses(student, sampler, schedule, target, cond, g)
        else:
            losses = consistency_losses(student, target_network, teacher.unet, sampler, schedule, target, cond, g)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        with torch.no_grad():
            for kept, trained in zip(target_network.parameters(), student.parameters()):
                kept.lerp_(trained, 0.1)
        history.append(losses["loss"].item())
    return student.eval(), sampler, history


def test_the_student_sampler_lies_on_the_teachers_grid():
    sampler = student_scheduler(v_teacher().scheduler.config, TEACHER_STEPS)
    assert isinstance(sampler, LCMScheduler)
    assert sampler.config.prediction_type == "v_prediction"
    sampler.set_timesteps(2)
    assert sampler.timesteps.tolist() == [999, 499]
    assert teacher_grid(sampler).tolist() == list(range(99, 1000, 100))


# Consistency distillation's target is the student's own estimate one step down, which moves as it learns: its
# loss falls more slowly than a regression's.
@pytest.mark.parametrize("method,fraction", [("direct", 0.75), ("consistency", 0.85)])
def test_the_students_loss_falls_on_fixed_batches(method, fraction):
    teacher = v_teacher()
    draws = teacher_draws(teacher, conditioning(), count=2)
    _, _, history = distil(teacher, method, draws, steps=80, fixed=True)
    assert np.mean(history[-4:]) < fraction * np.mean(history[:4]), history


@pytest.mark.parametrize("wrong_target", [False, True], ids=["teacher's frames", "the noise as target"])
def test_the_students_few_steps_come_closer_to_the_teacher_than_its_own_few_steps(wrong_target):
    """The student's 2-step frames (averaged over seeds) against the teacher's own 10-step sampler (averaged over
    the draws the student learnt from), beside the teacher's 2-step DDIM frames: direct distillation must bring them
    closer; a student trained on the noise instead of the teacher's frames must not."""
    teacher, cond = v_teacher(), conditioning()
    draws = teacher_draws(teacher, cond)
    reference = torch.stack(draws).mean(0)
    student, sampler, _ = distil(teacher, "direct", draws, steps=120, wrong_target=wrong_target)
    ddim = DDIMScheduler.from_config(teacher.scheduler.config, timestep_spacing="trailing")
    baseline = (mean_frames(teacher.unet, ddim, STUDENT_STEPS, cond) - reference).pow(2).mean().item()
    distilled = (mean_frames(student, sampler, STUDENT_STEPS, cond) - reference).pow(2).mean().item()
    if wrong_target:
        assert distilled > baseline, (distilled, baseline)
    else:
        assert distilled < 0.75 * baseline, (distilled, baseline)


class Oracle(torch.nn.Module):
    """A denoiser that knows the clean frames `x_start`: its prediction (noise, v or sample, as the schedule's
    parameterisation asks) implies exactly `x_start` from any noisy input."""

    def __init__(self, x_start, schedule):
        super().__init__()
        self.x_start, self.schedule = x_start, schedule
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, timesteps, identity, motion, audio):
        alpha_bar = self.schedule.alpha_bar(timesteps, x)
        a, b = alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt()
        eps = (x - a * self.x_start) / b
        kind = self.schedule.prediction_type
        output = eps if kind == "epsilon" else a * eps - b * self.x_start if kind == "v_prediction" else self.x_start
        return type("Output", (), {"sample": output})


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_the_consistency_loss_of_a_denoiser_that_knows_the_clean_frame_is_zero(prediction_type):
    """Where teacher, student and target all imply the clean frame from any noisy input, the student is already
    the consistency function: its loss is (nearly) zero at every grid point; a student that knows other clean
    frames has the squared distance between them as its loss."""
    schedule = NoiseSchedule(DDPMScheduler(prediction_type=prediction_type))
    sampler = student_scheduler(DDPMScheduler(prediction_type=prediction_type).config, TEACHER_STEPS)
    g = torch.Generator().manual_seed(0)
    x_start = torch.rand(8, 3, 8, 8, generator=g) * 1.6 - 0.8
    other = torch.rand(8, 3, 8, 8, generator=g) * 1.6 - 0.8
    oracle = Oracle(x_start, schedule)
    cond = conditioning(batch=8)
    for seed in range(3):
        losses = consistency_losses(
            oracle, oracle, oracle, sampler, schedule, x_start, cond, torch.Generator().manual_seed(seed)
        )
        assert losses["loss"].item() < 1e-4, losses
    wrong = consistency_losses(Oracle(other, schedule), oracle, oracle, sampler, schedule, x_start, cond, g)
    assert wrong["loss"].item() == pytest.approx((other - x_start).pow(2).mean().item(), rel=0.05)


class MotionRecorder(torch.nn.Module):
    """A UNet wrapper that keeps the motion input of every call."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.config, self.motions = unet, unet.config, []

    def forward(self, x, timesteps, identity, motion, audio):
        self.motions.append(motion.clone())
        return self.unet(x, timesteps, identity, motion, audio)


@pytest.mark.parametrize("stabilize", [True, False])
def test_the_rollout_gives_the_student_its_own_frames_and_the_identity_where_it_stabilizes(stabilize):
    """Four history frames: the student makes the third and fourth from the two before each; the newer motion frame
    is always the frame just made (the second ground-truth frame at first), the older one the identity frame where
    the rollout stabilizes, else the frame before that."""
    teacher, cond = v_teacher(), conditioning(batch=2)
    student = MotionRecorder(teacher.unet.eval())
    g = torch.Generator().manual_seed(0)
    history = torch.rand(2, 4, 3, 16, 16, generator=g) * 2 - 1
    audio = torch.randn(2, 3, 5, 8, generator=g)
    sampler = student_scheduler(teacher.scheduler.config, TEACHER_STEPS)
    sampler.set_timesteps(STUDENT_STEPS)
    pair = roll_out(student, sampler, cond.identity, history, audio, g, stabilize)
    channels = teacher.unet.config.motion_frame_channels
    motion = lambda frame: to_motion_frame(frame, channels)  # noqa: E731
    assert len(student.motions) == 2 * STUDENT_STEPS
    first, second = student.motions[0], student.motions[STUDENT_STEPS]
    assert all(torch.equal(m, first) for m in student.motions[:STUDENT_STEPS])
    made = pair[:, 0]  # the third frame, made by the student
    assert not torch.allclose(made, history[:, 2])
    assert torch.allclose(first[:, channels:], motion(history[:, 1]))
    assert torch.allclose(second[:, channels:], motion(made))
    older_first = motion(cond.identity) if stabilize else motion(history[:, 0])
    older_second = motion(cond.identity) if stabilize else motion(history[:, 1])
    assert torch.allclose(first[:, :channels], older_first)
    assert torch.allclose(second[:, :channels], older_second)


@pytest.mark.parametrize("context", ["rollout", "ground-truth"])
def test_the_teachers_target_is_made_from_the_context_asked_for(context):
    """`direct`: the student is always given its own rolled-out frame; the teacher makes its target from that frame
    (`--target-context rollout`) or from the clip's own frame before the target (`ground-truth`)."""
    import contextlib
    import types

    teacher = v_teacher()
    recorder = MotionRecorder(teacher.unet.eval())
    teacher.unet = recorder
    student = MotionRecorder(copy.deepcopy(recorder.unet))
    g = torch.Generator().manual_seed(0)
    history = torch.rand(2, 4, 3, 16, 16, generator=g) * 2 - 1
    batch = {
        "x_start": torch.rand(2, 3, 16, 16, generator=g) * 2 - 1,
        "identity": history[:, 0],
        "motion": history,
        "audio": torch.randn(2, 3, 5, 8, generator=g),
        "boxes": None,
    }
    accelerator = types.SimpleNamespace(device=torch.device("cpu"), autocast=contextlib.nullcontext)
    sampler = student_scheduler(teacher.scheduler.config, TEACHER_STEPS)
    sampler.set_timesteps(STUDENT_STEPS)
    settings = DistillationSettings("direct", lip_weight=0.0, target_context=context)
    losses = batch_losses(settings, accelerator, teacher, TEACHER_STEPS, sampler, stabilize=True)
    losses(batch, torch.Generator().manual_seed(1), {"unet": student})
    channels = teacher.unet.config.motion_frame_channels
    made = student.motions[-1][:, channels:]  # what the student was trained on: its own last frame
    truth = to_motion_frame(history[:, -1], channels)
    assert not torch.allclose(made, truth)
    assert len(recorder.motions) == TEACHER_STEPS
    expected = made if context == "rollout" else truth
    assert all(torch.allclose(m[:, channels:], expected) for m in recorder.motions)
    assert all(torch.allclose(m[:, :channels], to_motion_frame(history[:, 0], channels)) for m in recorder.motions)


@pytest.mark.parametrize(
    "value,message",
    [("999,x", "not a comma-separated list"), ("999", "gives 1 timesteps for 2 steps"), ("199,999", "descending")],
)
def test_wrong_student_timesteps_are_refused(value, message, capsys):
    with pytest.raises(SystemExit):
        distill.parse_args(["--data", "d", "--output-dir", "o", "--student-timesteps", value])
    assert message in capsys.readouterr().err


def test_the_target_context_is_an_option_of_direct_only(capsys):
    common = ["--model", "m", "--data", "d", "--output-dir", "o", "--target-context", "ground-truth"]
    assert distill.parse_args([*common, "--method", "direct"]).target_context == "ground-truth"
    with pytest.raises(SystemExit):
        distill.parse_args([*common, "--method", "consistency"])
    assert "--target-context is an option of --method direct" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# The command


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    arguments = ["--output", str(folder), "--num-clips", "2", "--size", "16", "--max-seconds", "1.0"]
    assert make_dataset.main([*arguments, "--speech", "synthetic"]) == 0
    return folder


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teacher") / "teacher"
    v_teacher().save_pretrained(folder, model_card=model_card(license="cc-by-nc-sa-4.0"))
    return folder


def run_distill(teacher, clips, output, *extra):
    arguments = ["--model", str(teacher), "--data", str(clips), "--output-dir", str(output), "--batch-size", "2"]
    arguments += ["--num-workers", "0", "--log-every", "1", "--checkpoint-every", "2", "--threads", "2"]
    return distill.main([*arguments, *extra])


def test_the_student_is_a_model_folder_every_tool_runs_at_its_own_steps(teacher_folder, clips, tmp_path):
    output = tmp_path / "student"
    assert run_distill(teacher_folder, clips, output, "--max-steps", "3", "--rollout-frames", "2") == 0
    pipe = DiffusedHeadsPipeline.from_pretrained(output)
    assert isinstance(pipe.scheduler, LCMScheduler)
    assert pipe.config.num_inference_steps == STUDENT_STEPS and pipe.config.stabilize_every == 1
    assert pipe.scheduler.config.original_inference_steps == TEACHER_STEPS
    assert runtime.default_steps(pipe) == STUDENT_STEPS
    # Two UNet evaluations a frame by default.
    calls = []
    pipe.unet.register_forward_hook(lambda module, args, output: calls.append(args[1]))
    pipe.set_progress_bar_config(disable=True)
    frames = pipe(np.zeros((16, 16, 3), np.uint8), np.zeros(3200, np.float32)).frames
    assert frames.shape == (1, 5, 16, 16, 3) and len(calls) == 5 * STUDENT_STEPS
    assert [int(t) for t in calls[:2]] == [999, 199]  # the default student timesteps
    card = ModelCard.load(output / "README.md")
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "image-to-video"
    assert "distillation" in card.data.tags and str(teacher_folder) in card.text
    assert "the student's rolled-out frames" in card.text  # the target context of `direct`
    # A teacher folder's licence is the student's; a folder is no Hub `base_model`.
    assert card.data.license == "cc-by-nc-sa-4.0" and card.data.base_model is None
    assert "## Sample frames" in card.text and (output / "samples.png").is_file()
    record = json.loads((output / "distillation.json").read_text())
    assert record["method"] == "direct" and record["student_steps"] == 2 and record["teacher_steps"] == 10
    log = [json.loads(line) for line in open(f"{output}-checkpoints/train_log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in log)


def test_resuming_gives_the_weights_of_an_unbroken_run(teacher_folder, clips, tmp_path, monkeypatch):
    # The training loop's clock, made to advance one second at each reading, so the times are exact.
    import types

    from diffused_heads import training

    readings = iter(range(10**6))
    monkeypatch.setattr(training, "time", types.SimpleNamespace(time=lambda: float(next(readings))))
    common = ["--method", "consistency", "--rollout-frames", "1", "--ema-decay", "0.9"]
    assert run_distill(teacher_folder, clips, tmp_path / "straight", "--max-steps", "4", *common) == 0
    assert run_distill(teacher_folder, clips, tmp_path / "split", "--max-steps", "2", *common) == 0
    import shutil

    shutil.rmtree(tmp_path / "split")
    extra = ("--max-steps", "4", "--resume", "latest", *common)
    assert run_distill(teacher_folder, clips, tmp_path / "split", *extra) == 0
    straight = DiffusedHeadsPipeline.from_pretrained(tmp_path / "straight").unet.state_dict()
    resumed = DiffusedHeadsPipeline.from_pretrained(tmp_path / "split").unet.state_dict()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=key)
    # The training time goes on from where it stopped: the log's clock does not restart, and the record counts
    # both parts (one second a step on this clock).
    log = [json.loads(line) for line in open(tmp_path / "split-checkpoints" / "train_log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert [r["elapsed_s"] for r in log] == [1.0, 2.0, 3.0, 4.0]
    assert json.loads((tmp_path / "split" / "distillation.json").read_text())["seconds"] == 4.0


def test_distill_runs_from_a_converted_folder_of_the_released_files(clips, tmp_path):
    """A tiny stand-in of the released files, converted: learned-range variance, noise prediction, 100 steps."""
    unet_file, encoder_file = tmp_path / "crema_script.pt", tmp_path / "audio_encoder.pt"
    traced_unet(unet_file, size=128, **TINY_ORIGINAL_UNET)
    scripted_audio_encoder(encoder_file, **TINY_ORIGINAL_ENCODER)
    convert(str(unet_file), str(encoder_file), str(tmp_path / "converted"), log=lambda message: None)
    extra = ("--max-steps", "1", "--batch-size", "1", "--teacher-steps", "10", "--rollout-frames", "1")
    assert run_distill(tmp_path / "converted", clips, tmp_path / "student", *extra) == 0
    pipe = DiffusedHeadsPipeline.from_pretrained(tmp_path / "student")
    assert pipe.scheduler.config.prediction_type == "epsilon" and pipe.config.num_inference_steps == 2


@pytest.mark.parametrize(
    "teacher_steps,student_steps,expected",
    [(10, 2, [999, 199]), (10, 3, [999, 599, 199]), (10, 1, [999]), (100, 2, [999, 199]), (4, 3, [999, 749, 249])],
)
def test_the_default_student_timesteps_end_near_a_fifth_of_the_schedule(teacher_steps, student_steps, expected):
    assert default_student_timesteps(1000, teacher_steps, student_steps) == expected


def test_the_direct_loss_trains_the_student_at_its_own_timesteps():
    teacher = v_teacher()
    cond = conditioning()
    sampler = student_scheduler(teacher.scheduler.config, TEACHER_STEPS)
    sampler.set_timesteps(timesteps=[999, 199])
    student = student_of(teacher)
    seen = []
    student.register_forward_hook(lambda module, args, out: seen.extend(int(t) for t in args[1].expand(len(args[0]))))
    target = teacher_draws(teacher, cond, count=1)[0]
    for seed in range(3):
        direct_losses(
            student,
            sampler,
            NoiseSchedule(teacher.scheduler),
            target,
            cond,
            torch.Generator().manual_seed(seed),
        )
    assert set(seen) == {999, 199}


def test_the_rollout_samples_at_the_timesteps_its_sampler_is_set_to():
    teacher, cond = v_teacher(), conditioning(batch=2)
    sampler = student_scheduler(teacher.scheduler.config, TEACHER_STEPS)
    sampler.set_timesteps(timesteps=[999, 199])
    student = student_of(teacher)
    seen = []
    student.register_forward_hook(lambda module, args, out: seen.extend(int(t) for t in args[1].expand(len(args[0]))))
    g = torch.Generator().manual_seed(0)
    history = torch.rand(2, 3, 3, 16, 16, generator=g) * 2 - 1
    roll_out(student, sampler, cond.identity, history, torch.randn(2, 2, 5, 8, generator=g), g, stabilize=True)
    assert seen == [999, 999, 199, 199]  # one frame of a batch of 2, at each of the two timesteps


def test_a_student_trained_at_its_own_timesteps_keeps_and_samples_at_them(teacher_folder, clips, tmp_path):
    output = tmp_path / "student"
    extra = ("--max-steps", "2", "--rollout-frames", "1", "--student-timesteps", "999,199", "--sample-frames", "0")
    assert run_distill(teacher_folder, clips, output, *extra) == 0
    pipe = DiffusedHeadsPipeline.from_pretrained(output)
    assert pipe.config.timesteps == [999, 199] and pipe.config.num_inference_steps == 2
    assert json.loads((output / "distillation.json").read_text())["student_timesteps"] == [999, 199]
    calls = []
    pipe.unet.register_forward_hook(lambda module, args, output: calls.append(int(args[1])))
    pipe.set_progress_bar_config(disable=True)
    face, speech = np.zeros((16, 16, 3), np.uint8), np.zeros(1280, np.float32)
    pipe(face, speech)
    assert calls == [999, 199] * 2
    # Another number of steps is the scheduler's own choice; the call's own timesteps win.
    calls.clear()
    pipe(face, speech, num_inference_steps=3)
    assert calls[:3] == [999, 699, 399]
    calls.clear()
    pipe(face, speech, timesteps=[999, 599])
    assert calls == [999, 599] * 2


@pytest.mark.parametrize(
    "case,message",
    [
        ("student teacher", "already a distilled student"),
        ("too many steps", "must be fewer than the teacher's 10 steps"),
        ("short clips", "is long enough"),
        ("output exists", "exists already"),
        ("no teacher", "no such folder"),
        ("off the grid", "are not on the teacher's grid"),
    ],
)
def test_bad_input_is_one_error_line_and_writes_nothing(case, message, teacher_folder, clips, tmp_path, capsys):
    teacher, output, extra = teacher_folder, tmp_path / "out", ["--max-steps", "1"]
    if case == "student teacher":
        teacher = tmp_path / "student"
        pipe = DiffusedHeadsPipeline.from_pretrained(teacher_folder)
        pipe.scheduler = student_scheduler(pipe.scheduler.config, TEACHER_STEPS)
        pipe.save_pretrained(teacher)
    elif case == "too many steps":
        extra += ["--student-steps", "10"]
    elif case == "short clips":
        extra += ["--rollout-frames", "40"]  # the clips are at most 25 frames long
    elif case == "off the grid":
        extra += ["--student-timesteps", "999,150"]
    elif case == "output exists":
        output.mkdir()
        (output / "keep.txt").write_text("mine")
    else:
        teacher = tmp_path / "nowhere"
    before = sorted(os.listdir(tmp_path))
    capsys.readouterr()  # the set-up's own output
    assert run_distill(teacher, clips, output, *extra) == 1
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines
    assert sorted(os.listdir(tmp_path)) == before
    if case == "output exists":
        assert os.listdir(output) == ["keep.txt"]


def test_the_lip_loss_is_the_error_inside_the_mouth_box_added_with_its_weight():
    """A prediction wrong by 1 only inside the mouth box (a quarter of each frame): the MSE over the frame is 1/4,
    the lip loss over the box 1, and the loss the MSE plus the weight times the lip loss."""
    target = torch.zeros(2, 3, 8, 8)
    mask = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    mask[:, :, 4:, 2:6] = True
    prediction = torch.where(mask, torch.ones_like(target), target)
    losses = lip_weighted_mse(prediction, target, mask, lip_weight=0.5)
    assert losses["mse"].item() == pytest.approx(0.25)
    assert losses["lip"].item() == pytest.approx(1.0)
    assert losses["loss"].item() == pytest.approx(0.25 + 0.5 * 1.0)
    without = lip_weighted_mse(prediction, target, mask, lip_weight=0.0)
    assert "lip" not in without and without["loss"].item() == pytest.approx(0.25)


# --------------------------------------------------------------------------------------------------
# Known answers, worked out by hand on a schedule of three points


def three_point_schedule(prediction_type="epsilon"):
    """betas 0.36, 0.4375, 0.75: alpha-bar 0.64, 0.36, 0.09 (square roots 0.8, 0.6, 0.3; of 1 - alpha-bar 0.6, 0.8,
    0.954...)."""
    return DDPMScheduler(num_train_timesteps=3, trained_betas=[0.36, 0.4375, 0.75], prediction_type=prediction_type)


def test_the_noise_schedule_of_three_points():
    schedule = NoiseSchedule(three_point_schedule())
    like = torch.zeros(4, 1)
    alpha_bar = schedule.alpha_bar(torch.tensor([0, 1, 2, -1]), like).flatten()
    torch.testing.assert_close(alpha_bar, torch.tensor([0.64, 0.36, 0.09, 1.0]))
    x0, eps = torch.tensor([[0.5]]), torch.tensor([[-1.0]])
    # x_1 = 0.6 * 0.5 + 0.8 * (-1) = -0.5; v = 0.6 * (-1) - 0.8 * 0.5 = -1.0
    x1 = schedule.add_noise(x0, eps, torch.tensor([1]))
    torch.testing.assert_close(x1, torch.tensor([[-0.5]]))
    v = NoiseSchedule(three_point_schedule("v_prediction"))
    torch.testing.assert_close(v.target(x0, eps, torch.tensor([1])), torch.tensor([[-1.0]]))
    torch.testing.assert_close(v.predicted_clean(torch.tensor([[-1.0]]), x1, torch.tensor([1])), x0)
    torch.testing.assert_close(v.predicted_noise(torch.tensor([[-1.0]]), x1, torch.tensor([1])), eps)
    torch.testing.assert_close(schedule.noise_of(x0, x1, torch.tensor([1])), eps)


def test_the_teachers_ddim_step_clips_the_clean_frame_and_recomputes_its_noise():
    """From x_1 = 1 with predicted noise -0.5: the clean frame (1 + 0.8 * 0.5) / 0.6 = 2.33 is clipped to 1, the
    noise recomputed from it, (1 - 0.6) / 0.8 = 0.5, and x_0 = 0.8 * 1 + 0.6 * 0.5 = 1.1 (with the unclipped noise
    it would be 0.5); to the clean end (-1) the step gives the clipped frame."""
    schedule = NoiseSchedule(three_point_schedule())
    x_t, output = torch.ones(2, 1), torch.full((2, 1), -0.5)
    x_s, x0 = ddim_step(schedule, output, x_t, torch.tensor([1, 1]), torch.tensor([0, -1]))
    torch.testing.assert_close(x0, torch.ones(2, 1))
    torch.testing.assert_close(x_s, torch.tensor([[1.1], [1.0]]))


class TimestepRecorder(torch.nn.Module):
    """A UNet stand-in that predicts zero noise and keeps the timesteps and audio windows of every call."""

    def __init__(self, name, calls, sample_size=4, motion_frame_channels=3):
        super().__init__()
        self.name, self.calls = name, calls
        self.config = type(
            "Config",
            (),
            dict(in_channels=3, sample_size=sample_size, audio_context=5, motion_frame_channels=motion_frame_channels),
        )
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, timesteps, identity, motion, audio):
        timesteps = torch.as_tensor(timesteps).expand(len(x))
        self.calls.append((self.name, timesteps.tolist(), audio[:, 0, 0].tolist()))
        return type("Output", (), {"sample": x * 0 + self.weight})


def test_the_consistency_targets_lie_one_grid_step_below_on_a_grid_of_three():
    """Teacher grid of 3 on 30 timesteps: 9, 19, 29. The teacher and the student are called at a grid point t,
    the target network at the point below (t - 10), at 0 for the clean end (where the target is the teacher's
    clean frame)."""
    scheduler = DDPMScheduler(num_train_timesteps=30)
    sampler = student_scheduler(scheduler.config, 3)
    assert teacher_grid(sampler).tolist() == [9, 19, 29]
    calls = []
    models = [TimestepRecorder(name, calls) for name in ("student", "target", "teacher")]
    cond = Conditioning(torch.zeros(64, 3, 4, 4), torch.zeros(64, 6, 4, 4), torch.zeros(64, 5, 8))
    x_start = torch.rand(64, 3, 4, 4) * 2 - 1
    consistency_losses(*models, sampler, NoiseSchedule(scheduler), x_start, cond, torch.Generator().manual_seed(0))
    seen = {name: steps for name, steps, _ in calls}
    assert set(seen["teacher"]) == {9, 19, 29}
    assert seen["student"] == seen["teacher"]
    assert seen["target"] == [max(t - 10, 0) for t in seen["teacher"]]


def test_each_rolled_out_frame_and_the_target_get_their_own_audio_window():
    """History of 4 frames (2 start the rollout), audio windows 0, 1, 2 (the last the target's): the student makes
    frame 2 with window 0 and frame 3 with window 1; the teacher's target and the student's loss use window 2."""
    calls = []
    student, teacher_unet = TimestepRecorder("student", calls), TimestepRecorder("teacher", calls)
    scheduler = DDPMScheduler(num_train_timesteps=30, variance_type="fixed_small")
    teacher = type("Teacher", (), dict(unet=teacher_unet, scheduler=scheduler))
    sampler = student_scheduler(scheduler.config, 3)
    sampler.set_timesteps(2)
    accelerator = type(
        "Accelerator", (), dict(device=torch.device("cpu"), autocast=lambda self: contextlib.nullcontext())
    )()
    losses_of_batch = batch_losses(DistillationSettings("direct"), accelerator, teacher, 3, sampler, stabilize=True)
    audio = torch.arange(3.0).view(1, 3, 1, 1).expand(2, 3, 5, 8)  # window k holds k
    batch = dict(
        x_start=torch.zeros(2, 3, 4, 4),
        identity=torch.zeros(2, 3, 4, 4),
        motion=torch.zeros(2, 4, 3, 4, 4),
        audio=audio,
        boxes=None,
    )
    losses_of_batch(batch, torch.Generator().manual_seed(0), {"unet": student})
    windows = [(name, window[0]) for name, _, window in calls]
    assert windows[:4] == [("student", 0.0)] * 2 + [("student", 1.0)] * 2  # two sampler steps a frame
    assert set(windows[4:]) == {("teacher", 2.0), ("student", 2.0)}


def test_the_consistency_target_is_made_by_the_target_network_not_the_online_student():
    calls = []
    scheduler = DDPMScheduler(num_train_timesteps=30)
    teacher = type("Teacher", (), dict(unet=TimestepRecorder("teacher", calls), scheduler=scheduler))
    sampler = student_scheduler(scheduler.config, 3)
    accelerator = type(
        "Accelerator", (), dict(device=torch.device("cpu"), autocast=lambda s: contextlib.nullcontext())
    )
    losses_of_batch = batch_losses(DistillationSettings("consistency"), accelerator(), teacher, 3, sampler, True)
    batch = dict(
        x_start=torch.zeros(8, 3, 4, 4),
        identity=torch.zeros(8, 3, 4, 4),
        motion=torch.zeros(8, 2, 3, 4, 4),
        audio=torch.zeros(8, 1, 5, 8),
        boxes=None,
    )
    models = {"unet": TimestepRecorder("student", calls), "unet_target": TimestepRecorder("target", calls)}
    losses_of_batch(batch, torch.Generator().manual_seed(0), models)
    seen = {name: steps for name, steps, _ in calls}
    assert [name for name, _, _ in calls] == ["teacher", "target", "student"]
    assert seen["target"] == [max(t - 10, 0) for t in seen["teacher"]] and seen["student"] == seen["teacher"]
