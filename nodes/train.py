"""TrainConceptTokens: stage 3, saving one embedding per concept into ComfyUI's embeddings folder."""

from __future__ import annotations

from .comfy_io import CATEGORY, Progress, checkpoint_path, embeddings_root, image_to_comfy, interrupted, raise_interrupt


class TrainConceptTokens:
    DESCRIPTION = (
        "Learns one textual-inversion token per concept (split-and-merge, masked denoising, contrastive "
        "and attention-alignment losses) and saves each as models/embeddings/<prefix>/<prefix>_<i>, usable "
        "as embedding:<prefix>/<prefix>_<i> in any prompt, in this run already. Cancel stops within one "
        "step and keeps a checkpoint that the next run with the same settings resumes."
    )
    CATEGORY = CATEGORY
    FUNCTION = "train"
    OUTPUT_NODE = True
    RETURN_TYPES = ("UCE_TOKENS", "STRING", "IMAGE")
    RETURN_NAMES = ("tokens", "embedding_names", "loss_curve")
    OUTPUT_TOOLTIPS = (
        "the learned tokens, for Compose Concept Prompt",
        "the saved embedding names, one per line (prefix/prefix_1, ...)",
        "training loss per step",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "the model the tokens are learned for (the one used for capture)"}),
                "clip": ("CLIP", {"tooltip": "the CLIP of the same checkpoint"}),
                "vae": ("VAE", {"tooltip": "the VAE of the same checkpoint"}),
                "concepts": ("UCE_CONCEPTS", {"tooltip": "from Localize Concepts"}),
                "steps": (
                    "INT",
                    {"default": 500, "min": 1, "max": 10000, "tooltip": "training steps (the paper's 500)"},
                ),
                "learning_rate": (
                    "FLOAT",
                    {
                        "default": 5e-4,
                        "min": 1e-6,
                        "max": 1.0,
                        "step": 1e-5,
                        "round": False,
                        "tooltip": "AdamW learning rate (the paper's 5e-4)",
                    },
                ),
                "split_tokens": (
                    "INT",
                    {
                        "default": 5,
                        "min": 1,
                        "max": 16,
                        "tooltip": "tokens per concept before they are merged (the paper's g = 5)",
                    },
                ),
                "merge_step": (
                    "INT",
                    {"default": 100, "min": 0, "max": 10000, "tooltip": "step at which split tokens merge"},
                ),
                "contrastive_weight": (
                    "FLOAT",
                    {
                        "default": 1e-3,
                        "min": 0.0,
                        "max": 10.0,
                        "step": 1e-4,
                        "round": False,
                        "tooltip": "alpha, weight of the contrastive loss between split tokens",
                    },
                ),
                "attention_weight": (
                    "FLOAT",
                    {
                        "default": 1e-5,
                        "min": 0.0,
                        "max": 10.0,
                        "step": 1e-6,
                        "round": False,
                        "tooltip": "beta, weight of the attention alignment (EMD) loss",
                    },
                ),
                "name_prefix": (
                    "STRING",
                    {"default": "concept", "tooltip": "embeddings are saved as <prefix>/<prefix>_1, ..."},
                ),
                # no "control after generate" widget: a seed the frontend randomises would retrain on every queue
                "seed": (
                    "INT",
                    {
                        "default": 20,
                        "min": 0,
                        "max": 0xFFFFFFFF,
                        "control_after_generate": False,
                        "tooltip": "seed (the official run's 20)",
                    },
                ),
                "overwrite": (
                    "BOOLEAN",
                    {"default": False, "tooltip": "replace embeddings already saved under this prefix"},
                ),
            },
            "optional": {
                "update": (
                    ["sequential", "reference", "averaged"],
                    {
                        "default": "sequential",
                        "tooltip": "sequential: the official code's one update per prompt, all prompts of a step in "
                        "one batched pass; reference: the official loop, one pass per prompt (slower); averaged: one "
                        "update per step (fewer updates: the tokens move less far)",
                    },
                ),
            },
        }

    @classmethod
    def IS_CHANGED(cls, name_prefix="concept", **kwargs):
        """Re-run when the saved set changed on disk (deleted, replaced); settings changes re-run anyway."""
        from ..uce_core.export import MANIFEST, sanitize_name

        try:
            manifest = embeddings_root() / sanitize_name(name_prefix, "name prefix") / MANIFEST
            return f"{manifest.stat().st_mtime_ns}" if manifest.exists() else "absent"
        except Exception:
            return "unknown"

    def train(
        self,
        model,
        clip,
        vae,
        concepts,
        steps=500,
        learning_rate=5e-4,
        split_tokens=5,
        merge_step=100,
        contrastive_weight=1e-3,
        attention_weight=1e-5,
        name_prefix="concept",
        seed=20,
        overwrite=False,
        update="sequential",
    ):
        import torch

        from ..uce_core.backends.comfy_backend import ComfyBackend, prepare_for_training
        from ..uce_core.concepts import Concepts
        from ..uce_core.export import (
            check_export_target,
            chosen_names,
            export_names,
            export_tokens,
            load_exported,
            sanitize_name,
        )
        from ..uce_core.previews import loss_curve
        from ..uce_core.train import TrainingCancelled, TrainSettings, run_fingerprint, train_concept_tokens

        prefix = sanitize_name(name_prefix, "name prefix")
        folder = embeddings_root() / prefix
        settings = TrainSettings(
            steps=steps,
            merge_step=merge_step,
            split_tokens=split_tokens,
            learning_rate=learning_rate,
            contrastive_weight=contrastive_weight,
            attention_weight=attention_weight,
            seed=seed,
            update=update,
        )
        settings.validate()
        with torch.inference_mode(False), torch.enable_grad():
            # tensors made by upstream nodes are inference tensors; autograd needs ordinary copies
            concepts = Concepts(
                concepts.masks.clone(),
                concepts.features.clone(),
                concepts.scores.clone(),
                concepts.grid,
                concepts.image.clone(),
                dict(concepts.info),
            )
            backend = ComfyBackend(model, clip, vae)
            fingerprint = run_fingerprint(backend.info, concepts, settings)
            if _saved_fingerprint(folder) == fingerprint:
                tokens = load_exported(folder)  # the same run already finished: reuse it
                return _outputs(tokens, prefix, loss_curve)
            names = export_names([""] * len(concepts), prefix, chosen_names(concepts.info))
            check_export_target(folder, names, overwrite)
            import comfy.model_management

            comfy.model_management.load_models_gpu([model], force_full_load=True)
            prepare_for_training(model.model, clip.cond_stage_model)
            checkpoint = checkpoint_path(prefix)
            try:
                tokens = train_concept_tokens(
                    backend,
                    concepts,
                    settings,
                    progress=Progress(steps),
                    should_stop=interrupted,
                    checkpoint=checkpoint,
                )
            except TrainingCancelled:
                raise_interrupt()
            result = export_tokens(tokens, folder, prefix=prefix, overwrite=overwrite)
            checkpoint.unlink(missing_ok=True)
            tokens = load_exported(result.folder)
        return _outputs(tokens, prefix, loss_curve)


def _saved_fingerprint(folder) -> str | None:
    """The run fingerprint of the set saved in ``folder`` (None when there is none that this version can reuse: then
    the export's own check decides whether the folder may be written)."""
    from ..uce_core.export import MANIFEST_FORMAT, read_manifest

    manifest = read_manifest(folder) or {}
    info = manifest.get("info") if manifest.get("format") == MANIFEST_FORMAT else None
    return info.get("fingerprint") if isinstance(info, dict) else None


def _outputs(tokens, prefix, loss_curve):
    names = [f"{prefix}/{n}" for n in tokens.names]
    tokens.info["embedding_names"] = names
    return {
        "ui": {"text": ["\n".join(names)]},
        "result": (tokens, "\n".join(names), image_to_comfy(loss_curve(tokens.history))),
    }
