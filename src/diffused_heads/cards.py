"""Model cards (`README.md`) of the model folders the tools write: a trained or fine-tuned model (`train`), a
few-step student (`distill`) and a converted release (`convert`). One builder makes them all: the YAML header the
Hub reads (`library_name: diffusers` and the tags through diffusers' own `populate_model_card`, `pipeline_tag`,
the licence, `base_model` for fine-tunes and students), what the model is, how to use it, and its figures."""

import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence

from . import BUILTIN_MODELS
from .hub.pipeline_diffused_heads import MODEL_CARD_TAGS

logger = logging.getLogger(__name__)


def model_card(
    title: str = "Diffused Heads",
    description: str = "A Diffused Heads pipeline: a talking-face video from one face image and a speech recording.",
    *,
    license: str = "other",
    base_model: Optional[str] = None,
    tags: Sequence[str] = (),
    steps: Optional[int] = None,
    usage: Optional[str] = None,
    figures: Optional[Dict[str, Any]] = None,
    sections: Optional[Dict[str, str]] = None,
    samples: Optional[str] = None,
    repo: str = "path/to/this/folder",
) -> str:
    """The text of a model card. `usage` replaces the default usage section (Markdown), `figures` (name -> value)
    becomes a table, `sections` (heading -> Markdown) follow it, and `samples` (Markdown: sample frames and what
    they show) ends the card."""
    from diffusers.utils.hub_utils import populate_model_card
    from huggingface_hub import ModelCard, ModelCardData

    calls = f"{steps} UNet evaluations per frame" if steps else "the model's own steps per frame"
    if usage is None:
        usage = "\n".join(
            [
                "```python",
                "from diffusers import DiffusionPipeline",
                "",
                f'pipe = DiffusionPipeline.from_pretrained("{repo}", trust_remote_code=True)',
                f"video = pipe(face, speech, sampling_rate=16000).frames[0]  # {calls}",
                "```",
                "",
                "`face` is a face image (centred on a plain background works best), `speech` a 1-D waveform; the "
                "frames",
                "are 25 per second of speech. With the `diffused_heads` package installed: `diffused-heads generate",
                f"--model {repo}`.",
            ]
        )
    body = [f"# {title}", "", description, "", "## Usage", "", usage]
    if figures:
        body += ["", "## Figures", "", "| | |", "|---|---|"]
        body += [f"| {name} | {value} |" for name, value in figures.items()]
    for heading, text in (sections or {}).items():
        body += ["", f"## {heading}", "", text]
    if samples:
        body += ["", "## Sample frames", "", samples]
    data = ModelCardData(pipeline_tag="image-to-video", license=license, base_model=base_model)
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n")
    card = populate_model_card(card, tags=list(dict.fromkeys([*MODEL_CARD_TAGS, *tags])))
    return str(card) if str(card).endswith("\n") else str(card) + "\n"


def card_license(folder: Optional[str], default: str = "other") -> str:
    """The licence a saved folder's model card states, else `default`: what a model made from it carries on."""
    readme = os.path.join(folder, "README.md") if folder and os.path.isdir(folder) else None
    if readme and os.path.isfile(readme):
        from huggingface_hub import ModelCard

        try:
            return ModelCard.load(readme).data.license or default
        except Exception:  # a card without a YAML header
            return default
    return default


def model_provenance(model: Optional[str]) -> "tuple[str, Optional[str]]":
    """The licence and the Hub `base_model` that a model trained or distilled from `model` (as given to
    `resolve_model`) carries on: the licence its model card states ("other" where it states none; the built-in
    models are the package's, Apache-2.0), and `model` itself as `base_model` where it is a Hub id."""
    if model is None or (model in BUILTIN_MODELS and not os.path.exists(model)):
        return "apache-2.0", None
    if os.path.isdir(model):
        return card_license(model), None
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    # diffusers does not download a model's README.md: fetch it (small) unless it is cached.
    card = try_to_load_from_cache(model, "README.md")
    if not isinstance(card, str):
        try:
            card = hf_hub_download(model, "README.md")
        except Exception as error:  # no card, no network, a gated repository: the licence is unknown
            logger.info(f"the model card of {model} could not be read ({type(error).__name__}): licence 'other'")
            card = None
    return card_license(os.path.dirname(card) if card else None), model


@dataclass
class TrainingRun:
    """What a trained model's card says of how it was made (`train`'s options)."""

    init_from: Optional[str] = None  # the model it was fine-tuned from (None: trained from scratch)
    preset: str = "tiny"
    config: Optional[str] = None
    max_steps: int = 0
    batch_size: int = 0
    learning_rate: float = 0.0
    train_layers: str = "all"
    train_audio_encoder: bool = False
    lip_loss_weight: float = 0.0


def trained_model_card(run: TrainingRun, pipe, record: dict, samples: Optional[str] = None) -> str:
    """A trained model's card: a fine-tune keeps its starting model's licence and names it as `base_model` where
    it is a Hub id; a new model's licence is "other" until its owner sets it. `record` holds the run's `clips`,
    `minutes`, `seconds` and `device`."""
    if run.init_from:
        license, base_model = model_provenance(run.init_from)
        made = f"fine-tuned from `{run.init_from}`"
    else:
        license, base_model = "other", None
        made = f"trained from scratch (preset `{run.preset}`{', ' + run.config if run.config else ''})"
    steps = pipe.config.get("num_inference_steps")
    description = (
        f"A Diffused Heads model {made} by `diffused-heads train` on {record['clips']} clips "
        f"({record['minutes']:.1f} minutes). Measure it on held-out clips with `diffused-heads evaluate --model "
        "THIS_FOLDER ...` (lip sync and identity, with 95% intervals)."
    )
    if not run.init_from:
        description += " Set the licence in this card's header to the one your training data allows."
    figures = {
        "optimisation steps": f"{run.max_steps} of batch {run.batch_size} per process",
        "learning rate": run.learning_rate,
        "layers trained": run.train_layers + (" and the audio encoder" if run.train_audio_encoder else ""),
        "lip-loss weight": run.lip_loss_weight,
        "sampler": f"{type(pipe.scheduler).__name__}, {steps or 'the default'} steps per frame",
        "training time": f"{record['seconds'] / 60:.1f} minutes on {record['device']}",
    }
    return model_card(
        "Diffused Heads",
        description,
        license=license,
        base_model=base_model,
        tags=("fine-tuned",) if run.init_from else (),
        steps=steps,
        figures=figures,
        samples=samples,
    )


def student_model_card(teacher_model: Optional[str], teacher, record: dict, samples: Optional[str] = None) -> str:
    """A few-step student's card: the teacher's licence, the teacher as `base_model` where it is a Hub id (
    `teacher_model` as given to `distill --model`), what it is and how it was made. `record` is the run's
    `distillation.json`."""
    license, base_model = model_provenance(teacher_model)
    k, teacher_name, teacher_steps = record["student_steps"], record["teacher"], record["teacher_steps"]
    description = (
        f"A few-step student of `{teacher_name}`: the same UNet, trained by `diffused-heads distill` (method "
        f"`{record['method']}`) to make each frame in {k} denoising step{'s' if k > 1 else ''} (`LCMScheduler`) "
        f"instead of the teacher's {teacher_steps}, with its own generated frames as motion frames during training "
        f"({record['rollout_frames']} frames rolled out before each target). Measure it beside its teacher on "
        "held-out clips with `diffused-heads evaluate --model STUDENT --model TEACHER ...` (lip sync and identity, "
        "with 95% intervals)."
    )
    figures = {
        "teacher": f"`{teacher_name}` ({teacher_steps} steps per frame, {type(teacher.scheduler).__name__})",
        "method": f"`{record['method']}`",
        "steps per frame": k,
        "timesteps": ", ".join(str(t) for t in record["student_timesteps"]),
        "optimisation steps": f"{record['steps']} of batch {record['batch_size']} per process",
        "learning rate": record["learning_rate"],
        "rollout frames": record["rollout_frames"],
        "data": f"{record['clips']} clips, {record['minutes']:.1f} minutes",
        "training time": f"{record['seconds'] / 60:.1f} minutes on {record['device']}",
    }
    if record["method"] == "direct":
        own = record["target_context"] != "ground-truth"
        figures["teacher's target made from"] = "the student's rolled-out frames" if own else "the clip's frames"
    return model_card(
        f"Diffused Heads, {k}-step student",
        description,
        license=license,
        base_model=base_model,
        tags=("distillation", "few-step"),
        steps=k,
        figures=figures,
        samples=samples,
    )
