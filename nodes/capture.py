"""CaptureAttention: stage 1 on ComfyUI's MODEL, CLIP and VAE."""

from __future__ import annotations

from .comfy_io import CATEGORY, image_from_comfy, image_to_comfy


class CaptureAttention:
    DESCRIPTION = (
        "Runs the UNet once on the image (clean latent, t = 0, empty prompt, as ConceptExpress does) and "
        "records its self-attention and end-of-text cross-attention, aggregated onto the latent grid."
    )
    CATEGORY = CATEGORY
    FUNCTION = "capture"
    RETURN_TYPES = ("UCE_ATTENTION", "IMAGE")
    RETURN_NAMES = ("attention", "eot_preview")
    OUTPUT_TOOLTIPS = (
        "aggregated attention of the image, for Localize Concepts",
        "the end-of-text attention map over the image: the saliency used to drop background",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "an SD1.x, SD2.x or SDXL model from Load Checkpoint"}),
                "clip": ("CLIP", {"tooltip": "the CLIP of the same checkpoint"}),
                "vae": ("VAE", {"tooltip": "the VAE of the same checkpoint"}),
                "image": ("IMAGE", {"tooltip": "the image with the concepts (only the first of a batch is used)"}),
                "timestep": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 999,
                        "tooltip": "timestep of the capture pass; 0 (no noise) is the paper's choice",
                    },
                ),
                "resize": (
                    ["keep", "stretch"],
                    {
                        "default": "keep",
                        "tooltip": "keep the aspect ratio, or stretch to a square like the official code",
                    },
                ),
                "resolution": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 2048,
                        "step": 64,
                        "tooltip": "working resolution in pixels; 0 = the model's native one (512, 768 or 1024)",
                    },
                ),
            }
        }

    def capture(self, model, clip, vae, image, timestep=0, resize="keep", resolution=0):
        from ..uce_core.attention import capture_attention
        from ..uce_core.backends.comfy_backend import ComfyBackend
        from ..uce_core.previews import eot_preview

        backend = ComfyBackend(model, clip, vae)
        maps = capture_attention(
            backend, image_from_comfy(image), timestep=timestep, resize=resize, resolution=resolution or None
        )
        return (maps, image_to_comfy(eot_preview(maps)))
