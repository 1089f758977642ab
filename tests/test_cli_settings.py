"""Every CLI flag of capture, localization and token learning reaches its setting with a non-default value (a flag
that is parsed but never passed on is a setting that never reaches its use). What each setting then does is tested
where it is used (test_capture_settings.py, test_localize.py, test_train_reach.py)."""

from concept_express.uce_core import cli, cli_options
from concept_express.uce_core.localize import LocalizeSettings
from concept_express.uce_core.train import TrainSettings

TRAIN_FLAGS = {
    "--steps": ("steps", "37", 37),
    "--merge-step": ("merge_step", "9", 9),
    "--split-tokens": ("split_tokens", "3", 3),
    "--lr": ("learning_rate", "0.002", 0.002),
    "--contrastive-weight": ("contrastive_weight", "0.25", 0.25),
    "--attention-weight": ("attention_weight", "0.5", 0.5),
    "--emd": ("emd", "exact", "exact"),
    "--update": ("update", "averaged", "averaged"),
    "--init": ("init", "reference", "reference"),
    "--template": ("template", "art of {}", "art of {}"),
    "--seed": ("seed", "5", 5),
    "--micro-batch": ("micro_batch", "2", 2),
    "--memory-budget": ("memory_budget", "1.5", 1.5),
    "--checkpoint-every": ("checkpoint_every", "7", 7),
}


def test_every_training_flag_reaches_its_setting():
    argv = ["extract", "photo.png", "--model", "m", "--no-flip", "--gradient-checkpointing"]
    for flag, (_, text, _) in TRAIN_FLAGS.items():
        argv += [flag, text]
    settings = cli_options.train_settings(cli.build_parser().parse_args(argv))
    default = TrainSettings()
    for flag, (field, _, value) in TRAIN_FLAGS.items():
        assert getattr(default, field) != value, flag  # the test value is not the default
        assert getattr(settings, field) == value, flag
    assert settings.flip is False and settings.gradient_checkpointing is True


def test_every_capture_and_localization_flag_reaches_its_setting(monkeypatch):
    import concept_express.uce_core.attention as attention
    import concept_express.uce_core.localize as localize

    seen = {}
    monkeypatch.setattr(attention, "capture_attention", lambda backend, image, **kw: seen.setdefault("capture", kw))
    monkeypatch.setattr(localize, "localize_concepts", lambda maps, s: seen.setdefault("localize", s))
    argv = ["localize", "photo.png", "--model", "m", "--timestep", "250", "--capture-prompt", "a cat"]
    argv += ["--resize", "stretch", "--resolution", "640", "--n-max", "4", "--delta", "paper", "--min-area", "0.02"]
    args = cli.build_parser().parse_args(argv)
    cli._capture(args, object(), "photo.png")
    cli._localize(args, None)
    assert seen["capture"] == dict(timestep=250, prompt="a cat", resize="stretch", resolution=640)
    assert seen["localize"] == LocalizeSettings(n_max=4, delta="paper", min_area=0.02)
