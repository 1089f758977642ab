"""Draws assets/world-example.png: the scene-world scene that `concept-express extract --demo` runs on
(uce_core/world/scenes.py, DEMO_SEED), so a reader can see it without running anything.

    python assets/make_world_example.py
"""

from pathlib import Path

from PIL import Image

from concept_express.uce_core.world.scenes import DEMO_SEED, render_scene


def main() -> None:
    Image.fromarray(render_scene(DEMO_SEED).image).save(Path(__file__).with_name("world-example.png"), optimize=True)


if __name__ == "__main__":
    main()
