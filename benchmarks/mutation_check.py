"""Does the test suite notice a one-line bug? A small mutation check of the package's own.

Each entry of MUTATIONS is a bug of the kind a change could bring in (a default changed, an option not passed
on, an index off by one, a step skipped): a file, a line's text, what it becomes, and the tests that should fail.
For each, the repository's tracked files are copied to a temporary folder, the one line is changed there, and the
tests run against the copy (`PYTHONPATH` puts the copy's package first, for the tests' own processes too). A
mutation is *caught* when those tests fail, *survived* when they pass.

    python benchmarks/mutation_check.py                  # every mutation (about 10 minutes on 2 cores)
    python benchmarks/mutation_check.py -k media         # those whose name contains "media"
    python benchmarks/mutation_check.py --list

An entry whose line is no longer in its file (the code moved) is reported as stale and counts as survived:
update the list when code moves. Not run in CI: it runs the selected tests once per mutation.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "src/diffused_heads/"
PIPELINE = "pipeline_diffused_heads.py"


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository root
    line: str  # the text of one line (stripped), found exactly once in the file
    becomes: str  # the line's new text (indentation kept)
    tests: Tuple[str, ...]  # pytest arguments that select the tests expected to catch it


MUTATIONS: List[Mutation] = [
    # The pipeline's frame loop
    Mutation(
        "pipeline: first latents not scaled by init_noise_sigma",
        PIPELINE,
        "latents = noise * scheduler.init_noise_sigma",
        "latents = noise",
        ("tests/test_pipeline.py", "-k", "initial_scale"),
    ),
    Mutation(
        "pipeline: motion frames in the wrong order",
        PIPELINE,
        "identity_frames, motion_frames = self.identity_frames, torch.cat(self.previous, dim=1)",
        "identity_frames, motion_frames = self.identity_frames, torch.cat(self.previous[::-1], dim=1)",
        ("tests/test_pipeline.py", "-k", "frame_loop_conditioning"),
    ),
    Mutation(
        "pipeline: stabilize_every ignored",
        PIPELINE,
        "self.previous[0] = self.identity_motion",
        "pass",
        ("tests/test_pipeline.py",),
    ),
    # Data preparation
    Mutation(
        "prepare-dataset: --smoothing dropped",
        PACKAGE + "video_preparation.py",
        "matrices = smooth_transforms(raw_matrices, smoothing, shown)",
        "matrices = raw_matrices",
        ("tests/test_prepare_dataset.py", "-k", "smoothed_transforms"),
    ),
    Mutation(
        "prepare-dataset: a clip's audio cut from the video's start",
        PACKAGE + "video_preparation.py",
        "writer.close(waveform[start * SAMPLES_PER_FRAME : end * SAMPLES_PER_FRAME], plan.mouth)",
        "writer.close(waveform[: (end - start) * SAMPLES_PER_FRAME], plan.mouth)",
        ("tests/test_prepare_dataset.py", "-k", "own_at_the_clips"),
    ),
    # Measures
    Mutation(
        "measures: PSNR's mask ignored",
        PACKAGE + "measures.py",
        "mse = squared[np.broadcast_to(mask, squared.shape)].mean() if mask is not None else squared.mean()",
        "mse = squared.mean()",
        ("tests/test_measures.py",),
    ),
    Mutation(
        "measures: the t quantile of the wrong degrees of freedom",
        PACKAGE + "measures.py",
        "quantile = T_975[len(values) - 2] if len(values) - 1 <= len(T_975) else 1.96",
        "quantile = T_975[len(values) - 1] if len(values) <= len(T_975) else 1.96",
        ("tests/test_measures.py", "tests/test_evaluate.py"),
    ),
    # Media
    Mutation(
        "media: a live video not fragmented",
        PACKAGE + "media.py",
        'options = {"movflags": "frag_keyframe+empty_moov+default_base_moof", "flush_packets": "1"}',
        "options = {}",
        ("tests/test_media.py", "-k", "fragmented"),
    ),
    Mutation(
        "media: a live video's fragments left in the muxer's buffer",
        PACKAGE + "media.py",
        'options = {"movflags": "frag_keyframe+empty_moov+default_base_moof", "flush_packets": "1"}',
        'options = {"movflags": "frag_keyframe+empty_moov+default_base_moof"}',
        ("tests/test_media.py", "-k", "fragmented"),
    ),
    Mutation(
        "media: an image's temporary file in the system's temp folder",
        PACKAGE + "media.py",
        'handle, temporary = tempfile.mkstemp(suffix=suffix, prefix=".partial-", dir=directory)',
        'handle, temporary = tempfile.mkstemp(suffix=suffix, prefix=".partial-")',
        ("tests/test_media.py", "-k", "image"),
    ),
    Mutation(
        "media: a failed image write leaves its temporary file",
        PACKAGE + "media.py",
        "os.remove(temporary)",
        "pass",
        ("tests/test_media.py", "-k", "image"),
    ),
    Mutation(
        "media: a written image keeps the temporary file's 0600 mode",
        PACKAGE + "media.py",
        "os.chmod(temporary, default_file_mode())",
        "pass",
        ("tests/test_media.py", "-k", "image"),
    ),
    Mutation(
        "media: a video keeps the temporary file's 0600 mode",
        PACKAGE + "media.py",
        "os.chmod(self._target, default_file_mode())",
        "pass",
        ("tests/test_media.py", "-k", "mode"),
    ),
    # Pasting back into the photo
    Mutation(
        "paste: the forward transform instead of its inverse",
        PACKAGE + "paste.py",
        "crop_x = matrix[0, 0] * xs + matrix[0, 1] * ys + matrix[0, 2]",
        "crop_x = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]",
        ("tests/test_paste.py",),
    ),
    Mutation(
        "paste: the generated frame's person mask left out",
        PACKAGE + "paste.py",
        "return head, weight * self.border, band, person_near",
        "return head, self.border.clone(), band, person_near",
        ("tests/test_paste.py",),
    ),
    Mutation(
        "paste: the green tint of the outline kept",
        PACKAGE + "paste.py",
        "pixels = torch.stack([pixels[0], torch.where(near, spill_free, pixels[1]), pixels[2]])",
        "pass",
        ("tests/test_paste.py", "-k", "green"),
    ),
    Mutation(
        "paste: the photo's own head left where the new one is not",
        PACKAGE + "paste.py",
        "base = photo * (1 - cover) + self.plate * cover",
        "base = photo",
        ("tests/test_paste.py",),
    ),
    Mutation(
        "paste: the old head's soft edge left where the new head is not near",
        PACKAGE + "paste.py",
        "cover = torch.maximum(self.hole, self.cover * (1.0 - person_near))",
        "cover = self.hole",
        ("tests/test_paste.py", "-k", "left_its_place"),
    ),
    Mutation(
        "paste: no sharpness carried across the seam",
        PACKAGE + "paste.py",
        "head = (head + fine * (band * agree)[None]).clamp(0.0, 1.0)",
        "pass",
        ("tests/test_paste.py", "-k", "sharp"),
    ),
    Mutation(
        "paste: the photo's detail added where the head moved away",
        PACKAGE + "paste.py",
        "agree = torch.exp(-(((head - low).abs().mean(dim=0) / DETAIL_TOLERANCE) ** 2))",
        "agree = torch.ones_like(band)",
        ("tests/test_paste.py", "-k", "moved_away"),
    ),
    # Batches and the page
    Mutation(
        "batch: outputs paired with the planned batch, not the prepared jobs",
        PACKAGE + "jobs.py",
        "for k, (job, _, _, (paste, _)) in enumerate(ready):",
        "for k, (job, (_, _, _, (paste, _))) in enumerate(zip(batch, ready)):",
        ("tests/test_batch.py", "-k", "beside_it_fails"),
    ),
    Mutation(
        "app: an error shows the server's copy of the upload",
        PACKAGE + "serving.py",
        "message = message.replace(path, os.path.basename(path))",
        "pass",
        ("tests/test_app.py", "-k", "errors_and_the_queue"),
    ),
    Mutation(
        "runtime: concurrent requests share one scheduler",
        PACKAGE + "runtime.py",
        "if name is None and not overrides and not own:",
        "if name is None and not overrides:",
        ("tests/test_streaming.py", "-k", "interleaved"),
    ),
    Mutation(
        "evaluate: --device ignored on drawn clips",
        PACKAGE + "evaluate.py",
        "pipes = [runtime.load_pipeline(model, device, dtype) for model in args.models]",
        'pipes = [runtime.load_pipeline(model, "cpu", dtype) for model in args.models]',
        ("tests/test_evaluate.py", "-k", "device"),
    ),
    # The training library
    Mutation(
        "training: the warm-up not counted over the processes",
        PACKAGE + "training.py",
        "num_warmup_steps=warmup_steps * num_processes,",
        "num_warmup_steps=warmup_steps,",
        ("tests/test_prepare_dataset.py", "-k", "fine_tuning_runs_over_two"),
    ),
    Mutation(
        "training: a resumed run's clock restarts",
        PACKAGE + "training.py",
        "started, running, seconds_before = time.time(), {}, state.seconds",
        "started, running, seconds_before = time.time(), {}, 0.0",
        ("tests/test_distill.py", "-k", "resuming"),
    ),
    Mutation(
        "training: the target network never follows the EMA",
        PACKAGE + "training.py",
        'ema.copy_to(targets[name + "_target"].parameters())',
        "pass",
        ("tests/test_distill.py", "tests/test_train.py"),
    ),
    Mutation(
        "training: the lip loss left out",
        PACKAGE + "training.py",
        'losses["loss"] = losses["loss"] + lip_weight * losses["lip"]',
        "pass",
        ("tests/test_distill.py", "-k", "lip_loss"),
    ),
    # Distillation
    Mutation(
        "distill: --target-context ground-truth ignored (the teacher's target from the rollout)",
        PACKAGE + "distillation.py",
        'if settings.target_context == "ground-truth":',
        "if False:",
        ("tests/test_distill.py", "-k", "context"),
    ),
    Mutation(
        "distillation: the direct student learns the noise, not the teacher's frames",
        PACKAGE + "distillation.py",
        "return lip_weighted_mse(prediction, teacher_frames, mouth_mask, lip_weight)",
        "return lip_weighted_mse(prediction, x, mouth_mask, lip_weight)",
        ("tests/test_distill.py", "-k", "closer or falls"),
    ),
    Mutation(
        "distillation: the consistency target is the noisy input",
        PACKAGE + "distillation.py",
        "target = consistency_function(sampler, schedule, output, x_s, s.clamp(min=0))",
        "target = x_s",
        ("tests/test_distill.py", "-k", "knows_the_clean"),
    ),
    Mutation(
        "distillation: the rollout ignores stabilize_every",
        PACKAGE + "distillation.py",
        "older = identity if stabilize else frames[-2]",
        "older = frames[-2]",
        ("tests/test_distill.py", "-k", "rollout"),
    ),
    Mutation(
        "distill: a student as many steps as its teacher accepted",
        PACKAGE + "distillation.py",
        "if student_steps >= teacher_steps:",
        "if student_steps > teacher_steps:",
        ("tests/test_distill.py", "-k", "bad_input"),
    ),
    # Streaming speech and the live session
    Mutation(
        "streaming: the encoder's state started afresh at every chunk",
        "audio_encoder/audio_encoder_diffused_heads.py",
        "embeddings, self.hidden = self.encoder.gru(codes[None], self.hidden)",
        "embeddings, self.hidden = self.encoder.gru(codes[None], None)",
        ("tests/test_speech_stream.py", "-k", "carried or whole_speech"),
    ),
    Mutation(
        "streaming: a frame made one window before its speech is in",
        PIPELINE,
        "return self.frame_index + self.context // 2 < self.speech.windows",
        "return self.frame_index + self.context // 2 - 1 < self.speech.windows",
        ("tests/test_speech_stream.py", "-k", "as_soon_as"),
    ),
    Mutation(
        "streaming: the resampler keeps too few past samples",
        PIPELINE,
        "keep_from = max(self.first, math.floor(self.emitted / self.kernel.ratio) - self.kernel.reach)",
        "keep_from = max(self.first, math.floor(self.emitted / self.kernel.ratio))",
        ("tests/test_speech_stream.py", "-k", "resampling"),
    ),
    Mutation(
        "live: a rewind keeps the encoder's state past the cut",
        PACKAGE + "live.py",
        "self._encoder.restore(state)",
        "pass",
        ("tests/test_live.py", "-k", "barge"),
    ),
    Mutation(
        "live: a rewind keeps the noise of the dropped frames",
        PACKAGE + "live.py",
        "self._generator.set_state(generator_state)",
        "pass",
        ("tests/test_live.py", "-k", "barge"),
    ),
    Mutation(
        "live: a frame carries the next frame's audio",
        PACKAGE + "live.py",
        "begin, end = index * self.hop, (index + 1) * self.hop",
        "begin, end = (index + 1) * self.hop, (index + 2) * self.hop",
        ("tests/test_live.py", "-k", "25_per_second"),
    ),
    Mutation(
        "live: a turn placed without the lead",
        PACKAGE + "live.py",
        "start = (playing + self.lead_frames) * self.hop",
        "start = playing * self.hop",
        ("tests/test_live.py", "-k", "25_per_second"),
    ),
    Mutation(
        "live: behind real time, speech frames dropped too",
        PACKAGE + "live.py",
        "return not self._speaking and not self._timeline.is_speech(index * self.hop, (index + 1) * self.hop)",
        "return True",
        ("tests/test_live.py", "-k", "behind"),
    ),
    # The distillation's arithmetic, by known answers
    Mutation(
        "distillation: the teacher's DDIM step keeps the noise of the unclipped frame",
        PACKAGE + "distillation.py",
        "eps = schedule.noise_of(x0, x_t, t)",
        "eps = schedule.predicted_noise(output, x_t, t)",
        ("tests/test_distill.py", "-k", "ddim_step"),
    ),
    Mutation(
        "distillation: the consistency grid one timestep off",
        PACKAGE + "distillation.py",
        "s = t - (int(grid[0]) + 1)  # the grid's previous point; -1 at the clean end",
        "s = t - int(grid[0])",
        ("tests/test_distill.py", "-k", "grid_of_three"),
    ),
    Mutation(
        "distillation: the consistency target made by the online student",
        PACKAGE + "distillation.py",
        'models["unet_target"],',
        "student,",
        ("tests/test_distill.py", "-k", "target_network"),
    ),
    Mutation(
        "training: a clean-frame estimate's noise without its sqrt(alpha_bar)",
        PACKAGE + "training.py",
        "return (x_t - alpha_bar.sqrt() * x_start) / (1.0 - alpha_bar).sqrt().clamp(min=1e-8)",
        "return (x_t - x_start) / (1.0 - alpha_bar).sqrt().clamp(min=1e-8)",
        ("tests/test_distill.py", "-k", "three_points"),
    ),
    # GPU set-up
    Mutation(
        "training: the EMA made before accelerate moves the models",
        PACKAGE + "training.py",
        "emas[name].to(device)",
        "emas[name].to('cpu')",
        ("tests/test_devices.py",),
    ),
    Mutation(
        "training: only the main process saves its checkpoint",
        PACKAGE + "training.py",
        'accelerator.save_state(os.path.join(settings.checkpoint_dir, f"checkpoint-{state.step}"))',
        "accelerator.is_main_process and accelerator.save_state("
        'os.path.join(settings.checkpoint_dir, f"checkpoint-{state.step}"))',
        ("tests/test_train.py", "-k", "mean_over"),
    ),
    # Paste-back and saving, by known answers
    Mutation(
        "paste: the crop's scale read from the matrix's first entry",
        PACKAGE + "paste.py",
        "self.zoom = float(np.hypot(*matrix[:, 0]))  # crop pixels per photo pixel",
        "self.zoom = float(abs(matrix[0, 0]))",
        ("tests/test_paste.py", "-k", "columns_length"),
    ),
    Mutation(
        "paste: the seam's colour offset with its sign reversed",
        PACKAGE + "paste.py",
        "offset = (photo[:, seam] - head[:, seam]).mean(dim=1).clamp(-0.1, 0.1)",
        "offset = (head[:, seam] - photo[:, seam]).mean(dim=1).clamp(-0.1, 0.1)",
        ("tests/test_paste.py", "-k", "colour_is_moved"),
    ),
    Mutation(
        "paste: a scaled photo's matrix scaled by the factor, not its inverse",
        PACKAGE + "paste.py",
        "matrix = matrix @ np.diag([1 / factor_x, 1 / factor_y, 1.0])",
        "matrix = matrix @ np.diag([factor_x, factor_y, 1.0])",
        ("tests/test_paste.py", "-k", "scaled_down"),
    ),
    Mutation(
        "paste: the person's mask not passed on the commands' path",
        PACKAGE + "paste.py",
        "paste = PasteBack(photo, aligned.matrix, identity.width, identity_mask=aligned.mask, max_size=max_size)",
        "paste = PasteBack(photo, aligned.matrix, identity.width, max_size=max_size)",
        ("tests/test_paste.py", "-k", "passes_the"),
    ),
    Mutation(
        "saving: push_to_hub's private flag dropped",
        PIPELINE,
        'repo_id = create_repo(repo_id, exist_ok=True, private=hub_kwargs.get("private"), token=token).repo_id',
        "repo_id = create_repo(repo_id, exist_ok=True, private=None, token=token).repo_id",
        ("tests/test_save_load.py", "-k", "private"),
    ),
    Mutation(
        "saving: a fine-tune's Hub start model not named as base_model",
        PACKAGE + "cards.py",
        "license, base_model = model_provenance(run.init_from)",
        "license, base_model = model_provenance(run.init_from)[0], None",
        ("tests/test_save_load.py", "-k", "base_model"),
    ),
    Mutation(
        "generate: pasted frames saved squashed to --size",
        PACKAGE + "generate.py",
        "save_frame(frame, args.save_frames, output.frame_index, size=size)",
        "save_frame(frame, args.save_frames, output.frame_index, size=args.size)",
        ("tests/test_paste.py", "-k", "saved_frames"),
    ),
    # diffusers' and accelerate's helpers
    Mutation(
        "training: only torch seeded, not through accelerate's set_seed",
        PACKAGE + "training.py",
        "set_seed(settings.seed, device_specific=True)",
        "torch.manual_seed(settings.seed)",
        ("tests/test_devices.py", "-k", "seeds"),
    ),
    Mutation(
        "training: --report-to reaches no tracker",
        PACKAGE + "training.py",
        "log_with=wanted or None,",
        "log_with=None,",
        ("tests/test_train.py", "-k", "report_to_tensorboard"),
    ),
    Mutation(
        "pipeline: custom timesteps passed to a scheduler that cannot take them",
        PIPELINE,
        "if not accepts_timesteps(scheduler):",
        "if False:",
        ("tests/test_sampler.py", "-k", "retrieve_timesteps"),
    ),
    Mutation(
        "saving: a push into a subfolder replaces the repository's card",
        PIPELINE,
        "if not subfolder and not os.path.exists(readme):",
        "if not os.path.exists(readme):",
        ("tests/test_save_load.py", "-k", "subfolder"),
    ),
    Mutation(
        "preparation: a clip cut short by an early end left as .partial",
        PACKAGE + "video_preparation.py",
        "if writer is not None:  # the video ended inside this part: nothing of it is kept",
        "if False:  # the video ended inside this part: nothing of it is kept",
        ("tests/test_prepare_dataset.py", "-k", "ends_early"),
    ),
]


def tracked_files() -> List[str]:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [name for name in listed.decode().split("\0") if name]


def copy_repository(target: str) -> None:
    """The tracked files as they are in the working tree (links kept as links)."""
    for name in tracked_files():
        source = os.path.join(ROOT, name)
        if not os.path.lexists(source):
            continue
        destination = os.path.join(target, name)
        os.makedirs(os.path.dirname(destination), exist_ok=True)
        if os.path.islink(source):
            os.symlink(os.readlink(source), destination)
        else:
            shutil.copy2(source, destination)


def mutate(root: str, mutation: Mutation) -> bool:
    """Change the mutation's line in the copy; False when the line is not in the file exactly once."""
    path = os.path.join(root, mutation.path)
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    found = [i for i, line in enumerate(lines) if line.strip() == mutation.line]
    if len(found) != 1:
        return False
    i = found[0]
    indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
    lines[i] = indent + mutation.becomes
    os.remove(path)  # a link's target is not changed through the link
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return True


def run_tests(root: str, tests: Tuple[str, ...], timeout: float) -> Tuple[bool, str]:
    environment = dict(os.environ, PYTHONPATH=os.path.join(root, "src"), PYTHONDONTWRITEBYTECODE="1")
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    try:
        result = subprocess.run(command, cwd=root, env=environment, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, "timed out"
    tail = (result.stdout.strip().splitlines() or [""])[-1]
    return result.returncode == 0, tail


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", default="", help="only the mutations whose name contains this")
    parser.add_argument("--list", action="store_true", help="list the mutations and stop")
    parser.add_argument("--baseline", action="store_true", help="first check that each selection passes unmutated")
    parser.add_argument("--timeout", type=float, default=600, help="seconds for one mutation's tests")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if args.k.lower() in m.name.lower()]
    if args.list:
        for m in chosen:
            print(f"{m.name}  [{m.path}]  pytest {' '.join(m.tests)}")
        return 0
    caught, survived = [], []
    with tempfile.TemporaryDirectory(prefix="mutation-check-") as work:
        pristine = os.path.join(work, "pristine")
        copy_repository(pristine)
        if args.baseline:
            for tests in sorted({m.tests for m in chosen}):
                passed, tail = run_tests(pristine, tests, args.timeout)
                if not passed:
                    print(f"the unmutated code fails `pytest {' '.join(tests)}`: {tail}", file=sys.stderr)
                    return 2
        for number, mutation in enumerate(chosen, 1):
            root = os.path.join(work, f"m{number}")
            shutil.copytree(pristine, root, symlinks=True)
            started = time.time()
            if not mutate(root, mutation):
                verdict, detail = "STALE", "the line is not in the file exactly once: update the list"
                survived.append(mutation)
            else:
                passed, detail = run_tests(root, mutation.tests, args.timeout)
                verdict = "survived" if passed else "caught"
                (survived if passed else caught).append(mutation)
            shutil.rmtree(root, ignore_errors=True)
            print(f"[{number}/{len(chosen)}] {verdict:8s} {mutation.name} ({time.time() - started:.0f} s; {detail})")
            sys.stdout.flush()
    total = len(caught) + len(survived)
    print(f"\ncaught {len(caught)} of {total} ({100.0 * len(caught) / max(total, 1):.0f}%)")
    for mutation in survived:
        print(f"  survived: {mutation.name} [{mutation.path}]")
    return 0 if not survived else 1


if __name__ == "__main__":
    sys.exit(main())
